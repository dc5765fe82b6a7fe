"""`conntrail run` (the daemon) and `conntrail check` (validate a configuration, health-check
its sinks, start nothing)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from conntrail.daemon import config as config_module

RUN_DESCRIPTION = """\
Run the conntrail daemon: the pipelines of a TOML configuration (sources → attribution →
filters → sinks), until SIGTERM.

With no --config and no /etc/conntrail/conntrail.toml, built-in defaults apply: conntrack
NEW and DESTROY events of this namespace, with attribution, written as ECS JSON lines to
/var/log/conntrail/flows.jsonl and recorded in the SQLite history
/var/lib/conntrail/history.sqlite (query it with `conntrail who` / `conntrail query`).

signals:
  SIGTERM, SIGINT  drain queued events (daemon.drain_timeout), close sinks, remove our rules
  SIGHUP           reopen output files, then reload the configuration (filters and sinks;
                   an invalid file is rejected and the running configuration goes on)
  SIGUSR1          write STATE_DIR/status.json with every counter

Under systemd (Type=notify) it reports READY, STATUS, RELOADING, STOPPING and WATCHDOG.
Metrics: Prometheus text at http://127.0.0.1:9477/metrics unless [metrics] says otherwise.
Exit status: 0 after a clean stop, 1 if a pipeline failed, 2 for a configuration error.
"""

CHECK_DESCRIPTION = """\
Validate a configuration as `conntrail run` would (every key, filter and sink type), then
health-check each sink (directory writable, syslog server reachable, database connecting),
without touching the kernel or starting anything. Exit 0 when all is well, 1 when a health
check failed, 2 for an invalid configuration.
"""

CONFIG_ENV = "CONNTRAIL_CONFIG"


def add_parser(subparsers: Any, parents: list[argparse.ArgumentParser]) -> None:
    """Register `run` and `check`."""
    for name, text, description, run in (
            ("run", "run the daemon (configured pipelines)", RUN_DESCRIPTION, run_daemon),
            ("check", "validate a configuration and health-check its sinks",
             CHECK_DESCRIPTION, run_check)):
        parser = subparsers.add_parser(name, parents=parents, help=text,
                                       description=description,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("-c", "--config", type=Path, metavar="FILE",
                            help=f"TOML configuration (default: ${CONFIG_ENV}, else "
                                 f"{config_module.DEFAULT_PATH} if it exists, else the "
                                 "built-in defaults)")
        if name == "check":
            parser.add_argument("--print-defaults", action="store_true",
                                help="print the built-in configuration and exit")
        parser.set_defaults(run=run)


def config_path(args: argparse.Namespace) -> Path | None:
    """--config, $CONNTRAIL_CONFIG, the default file if present, else None (defaults)."""
    if args.config is not None:
        return Path(args.config)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    return config_module.DEFAULT_PATH if config_module.DEFAULT_PATH.exists() else None


def run_daemon(args: argparse.Namespace) -> int:
    """Validate everything, then run until stopped."""
    from conntrail.daemon.build import build_all
    from conntrail.daemon.lifecycle import Daemon

    path = config_path(args)
    config = config_module.load(path)
    build_all(config)  # every sink's keys checked before the kernel is touched
    return Daemon(config, path).run()


def run_check(args: argparse.Namespace) -> int:
    """Validate, health-check, report."""
    from conntrail.daemon.build import build_all, check_sinks

    if getattr(args, "print_defaults", False):
        print(config_module.DEFAULT_CONFIG, end="")
        return 0
    path = config_path(args)
    config = config_module.load(path)
    if config.daemon.user is not None:
        from conntrail.kernel.privileges import resolve

        resolve(config.daemon.user, config.daemon.group)
    results = check_sinks(build_all(config))
    print(f"{config.origin}: configuration valid ({len(config.pipelines)} pipeline(s), "
          f"{len(results)} sink(s))")
    for key_path, text, ok in results:
        print(f"  {'ok  ' if ok else 'FAIL'} {key_path}: {text}")
    failed = [key_path for key_path, _text, ok in results if not ok]
    if failed:
        print(f"conntrail: {len(failed)} sink(s) failed their health check", file=sys.stderr)
        return 1
    return 0
