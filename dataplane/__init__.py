"""Bilayer's dataplane: the routing table schema, L4 and L7 proxies, and the admin API.

This package never imports the control plane: the routing table is the only thing
that crosses between them.
"""
