"""The one kernel boundary: every syscall conntrail makes (sockets, setns, /proc, nft) is here."""
