"""Flow inventory: distinct flows seen, their views, state file, and firewall rules."""
