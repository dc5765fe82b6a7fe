"""The library API: iterate over conntrack events from Python, sync or async.

    import conntrail
    for event in conntrail.events(netns="qrouter-1", kinds={"new"}):
        print(event.flow.orig.src)

`Listener` exposes `fileno()` so the socket fits any event loop.
"""

from __future__ import annotations

import asyncio
import select
from collections.abc import AsyncIterator, Callable, Iterable, Iterator

from conntrail.errors import ConfigError
from conntrail.kernel.netns import resolve
from conntrail.model import EventKind, FlowEvent, Record
from conntrail.session import KernelSession, SessionOptions
from conntrail.sources.conntrack import ConntrackOptions, ConntrackSource

DEFAULT_SESSION = SessionOptions()


def parse_kinds(kinds: Iterable[str]) -> frozenset[EventKind]:
    """Event kind names ('new', 'update', 'destroy') to EventKinds; unknown names refused."""
    out = set()
    for name in kinds:
        try:
            kind = EventKind[name.strip().upper()]
        except KeyError:
            raise ConfigError("--events", f"unknown event kind {name!r}; "
                              "use new, update, destroy") from None
        if kind is EventKind.DUMP:
            raise ConfigError("--events", "use --dump to show existing flows")
        out.add(kind)
    return frozenset(out)


class Listener:
    """Conntrack events of one namespace, with the kernel prepared and restored around it."""

    def __init__(self, netns: str | None = None,
                 kinds: Iterable[str] = ("new", "update", "destroy"), dump: bool = False,
                 prepare: SessionOptions | None = DEFAULT_SESSION) -> None:
        self._kinds = parse_kinds(kinds)
        self._netns = resolve(netns)
        self._session = KernelSession(prepare) if prepare is not None else None
        self._source = ConntrackSource(self._netns, ConntrackOptions(self._kinds, dump=dump))

    def open(self) -> Listener:
        """Prepare the namespace and subscribe."""
        try:
            if self._session is not None:
                self._session.prepare(self._netns)
            self._source.start()
        except BaseException:
            self.close()  # undo a half-done open: no table left behind
            raise
        return self

    def fileno(self) -> int:
        """The netlink socket's fd: readable when `read()` has events."""
        return self._source.fileno()

    def read(self) -> list[Record]:
        """Events (and loss notices) available now, without blocking."""
        return self._source.read()

    def stats(self) -> dict[str, int]:
        """Received, dumped, lost and resync counters."""
        return self._source.stats()

    def close(self) -> None:
        """Unsubscribe and undo what `open` changed."""
        self._source.stop()
        if self._session is not None:
            self._session.close()

    def __enter__(self) -> Listener:
        return self.open()

    def __exit__(self, *_: object) -> None:
        self.close()


def events(netns: str | None = None, kinds: Iterable[str] = ("new", "update", "destroy"),
           dump: bool = False, where: Callable[[FlowEvent], bool] | None = None,
           timeout: float | None = None) -> Iterator[FlowEvent]:
    """Yield flow events forever (or until `timeout` seconds pass with none)."""
    with Listener(netns, kinds, dump) as listener:
        while True:
            for record in listener.read():
                if isinstance(record, FlowEvent) and (where is None or where(record)):
                    yield record
            readable, _, _ = select.select([listener], [], [], timeout)
            if not readable:
                return


async def aevents(netns: str | None = None,
                  kinds: Iterable[str] = ("new", "update", "destroy"),
                  dump: bool = False) -> AsyncIterator[FlowEvent]:
    """Async variant of `events`: wakes on the socket through the running loop."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    with Listener(netns, kinds, dump) as listener:
        loop.add_reader(listener.fileno(), ready.set)
        try:
            while True:
                for record in listener.read():
                    if isinstance(record, FlowEvent):
                        yield record
                await ready.wait()
                ready.clear()
        finally:
            loop.remove_reader(listener.fileno())
