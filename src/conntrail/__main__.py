"""`python -m conntrail` runs the command line."""

from conntrail.cli.main import main

raise SystemExit(main())
