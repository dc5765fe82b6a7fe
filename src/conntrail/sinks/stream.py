"""A sink writing formatted records to a binary stream (stdout, or a file opened by the CLI)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Sequence
from typing import BinaryIO

from conntrail.config import Table
from conntrail.model import Record
from conntrail.pipeline.stages import Formatter, SinkContext


class StreamSink:
    """Writes each batch with one write and one flush: low latency, few syscalls."""

    def __init__(self, name: str, stream: BinaryIO, formatter: Formatter) -> None:
        self.name = name
        self._stream = stream
        self._format = formatter

    def open(self) -> None:
        """Nothing to acquire: the stream is already open."""

    def encode(self, batch: Sequence[Record]) -> bytes:
        """The batch's lines as one bytes object."""
        fmt = self._format
        return b"".join([fmt(record) for record in batch])

    def write(self, payload: bytes) -> None:
        """Write and flush; a closed pipe raises BrokenPipeError to the runner."""
        self._stream.write(payload)
        self._stream.flush()

    def close(self) -> None:
        """Flush what is buffered; the stream itself belongs to the caller."""
        with contextlib.suppress(BrokenPipeError, ValueError):
            self._stream.flush()


def stdout_from_config(table: Table, context: SinkContext) -> StreamSink:
    """`type = "stdout"`: lines on standard output (the journal, under systemd); format keys
    as for files, text by default."""
    from conntrail.formats.choose import formatter_from

    formatter = formatter_from(table, default="text")
    table.done()
    return StreamSink(context.name, sys.stdout.buffer, formatter)
