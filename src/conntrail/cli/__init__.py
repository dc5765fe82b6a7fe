"""The command line: `conntrail <subcommand>`, one module per subcommand."""
