"""L4: TCP forwarding with paired protocols."""
