"""conntrail: the connection audit trail for Linux hosts and gateways."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.4.0"

if TYPE_CHECKING:
    from conntrail.api import Listener, aevents, events

__all__ = ["Listener", "__version__", "aevents", "events"]


def __getattr__(name: str) -> Any:
    # Lazy: `import conntrail.model` must not pull in sockets and subprocesses.
    if name in ("Listener", "aevents", "events"):
        from conntrail import api

        return getattr(api, name)
    raise AttributeError(name)
