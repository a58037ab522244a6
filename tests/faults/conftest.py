"""Fixtures for two-host fault tests: a fresh pair of namespaces per test.

``two_hosts`` (and ``needs_netns``, for tests that call ``create_two_hosts()`` themselves)
skip with the reason where namespaces cannot be made: not Linux, not root, no iproute2,
or a sandbox that forbids them. ``needs_nft`` and ``needs_tc`` skip
tests whose faults need nftables or tc.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from tests._netns import (
    TwoHosts,
    create_two_hosts,
    netns_unavailable,
    nft_unavailable,
    tc_unavailable,
)
from tests.faults._matrix_support import (
    DRIVERS,
    POLICY_NAMES,
    Case,
    DriverName,
    case_of,
    prepare_driver,
)


@pytest.fixture
def needs_netns() -> None:
    """Skip unless this process can create network namespaces (Linux, root, iproute2)."""
    reason = netns_unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def two_hosts(needs_netns: None) -> Iterator[TwoHosts]:
    """A server and a client namespace joined by a veth pair, torn down after the test."""
    with create_two_hosts() as hosts:
        yield hosts


@pytest.fixture
def needs_nft() -> None:
    """Skip unless nftables works inside a namespace."""
    reason = nft_unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture
def needs_tc() -> None:
    """Skip unless tc can shape traffic."""
    reason = tc_unavailable()
    if reason is not None:
        pytest.skip(reason)


@pytest.fixture(params=["ipv4", "ipv6"])
def netns_family(request: pytest.FixtureRequest, two_hosts: TwoHosts) -> int:
    """IPv4 and IPv6 across the veth; IPv6 skips when the namespaces have none."""
    if request.param == "ipv6":
        if not two_hosts.has_ipv6:
            pytest.skip("IPv6 is disabled in the test namespaces")
        return socket.AF_INET6
    return socket.AF_INET


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> DriverName:
    """Each matrix cell runs through the sync driver, asyncio and uvloop (a module that
    covers fewer narrows it with ``pytest.mark.parametrize("driver", [...],
    indirect=True)``)."""
    return prepare_driver(request.param)


@pytest.fixture(params=POLICY_NAMES)
def case(request: pytest.FixtureRequest, two_hosts: TwoHosts, driver: DriverName) -> Iterator[Case]:
    """One policy through one driver across a fresh pair of hosts."""
    with case_of(two_hosts, request.param, driver) as c:
        yield c
