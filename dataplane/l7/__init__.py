"""L7: HTTP/1.1 routing."""
