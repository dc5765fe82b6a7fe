"""The one exception hierarchy of conntrail: every error a user can see derives from here."""

from __future__ import annotations


class ConntrailError(Exception):
    """Base of every error conntrail raises on purpose."""


class DecodeError(ConntrailError):
    """Malformed kernel bytes: names the byte offset, the message type and what was wrong."""

    def __init__(self, offset: int, reason: str, msg_type: int | None = None) -> None:
        self.offset = offset
        self.reason = reason
        self.msg_type = msg_type
        where = f"at offset {offset}"
        if msg_type is not None:
            where += f" (message type 0x{msg_type:04x})"
        super().__init__(f"{reason} {where}")


class NetlinkError(ConntrailError):
    """The kernel answered a netlink request with an error code."""

    def __init__(self, errno: int, context: str) -> None:
        self.errno = errno
        self.context = context
        super().__init__(f"{context}: kernel returned errno {errno}")


class EventsLost(ConntrailError):  # noqa: N818 - the design guide's name; it is a report
    """The kernel dropped events because our receive buffer overflowed (ENOBUFS)."""


class ConfigError(ConntrailError):
    """Invalid configuration or arguments; `path` names the key or option at fault."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}" if path else reason)


class FilterError(ConfigError):
    """A filter expression that does not parse or names an unknown field."""


class KernelError(ConntrailError):
    """A system call or kernel facility failed (namespace missing, no permission, …)."""


class BatchSpooled(ConntrailError):  # noqa: N818 - a report, as EventsLost
    """A batch could not be written now but is durable in an on-disk spool (replayed later,
    in order): the caller must not retry it, or it would be spooled twice."""
