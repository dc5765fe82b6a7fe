"""Sans-IO netlink codec: kernel bytes to typed records and requests to bytes (stdlib only)."""
