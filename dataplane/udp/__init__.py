"""UDP listeners: datagrams forwarded per session (client address and port)."""
