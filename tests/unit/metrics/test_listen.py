"""parse_listen(): the `listen` address of the metrics endpoint."""

from __future__ import annotations

import pytest

from conntrail.errors import ConfigError
from conntrail.metrics.server import parse_listen

KEY = "metrics.listen"


@pytest.mark.parametrize(("text", "address"), [
    ("127.0.0.1:9477", ("127.0.0.1", 9477)),
    (":9477", ("127.0.0.1", 9477)),  # loopback unless asked otherwise
    ("0.0.0.0:9100", ("0.0.0.0", 9100)),
    ("[::1]:9477", ("::1", 9477)),
    ("[::]:9477", ("::", 9477)),
    ("[0:0:0:0:0:0:0:1]:1", ("::1", 1)),
    ("10.1.2.3:65535", ("10.1.2.3", 65535)),
    ("127.0.0.1:0", ("127.0.0.1", 0)),
])
def test_valid_listen_addresses(text: str, address: tuple[str, int]) -> None:
    assert parse_listen(text, KEY) == address


@pytest.mark.parametrize(("text", "reason"), [
    ("", "not HOST:PORT"),
    ("9477", "not HOST:PORT"),
    ("[::1]", "not HOST:PORT"),
    ("127.0.0.1:", "port '' in"),
    ("127.0.0.1:http", "port 'http' in"),
    ("127.0.0.1:65536", "not a number 0-65535"),
    ("127.0.0.1:-1", "not a number 0-65535"),
    ("127.0.0.1:٣", "not a number 0-65535"),  # a digit, but not an ASCII one
    ("localhost:9477", "'localhost' in 'localhost:9477' is not an IP address"),
    ("::1:9477", 'brackets: "[::1]:PORT"'),
    ("[127.0.0.1]:9477", "only IPv6 addresses go in brackets"),
    ("[::1:9477", "is not an IP address"),
    ("999.0.0.1:80", "is not an IP address"),
])
def test_invalid_listen_addresses_name_the_key(text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_listen(text, KEY)
    assert caught.value.path == KEY
    assert reason in caught.value.reason
    assert str(caught.value).startswith(f"{KEY}: ")
