"""Integration fixtures: root, fresh namespaces per test, guaranteed clean-up."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.integration.netenv import NatTopology, NetnsFactory, build_nat_topology


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test in this folder needs root and a real kernel."""
    for item in items:
        if "integration" in str(item.path):
            item.add_marker(pytest.mark.root)


@pytest.fixture(autouse=True)
def _require_root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("integration tests must run as root in CI")
        pytest.skip("needs root (network namespaces, netlink, nft)")


@pytest.fixture
def netns_factory() -> Iterator[NetnsFactory]:
    """Make namespaces; all are deleted after the test, pass or fail."""
    factory = NetnsFactory()
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.fixture
def nat_topology(netns_factory: NetnsFactory) -> NatTopology:
    """client → router with masquerade → server."""
    return build_nat_topology(netns_factory)
