"""Fixtures shared by every test module: address families and event loops."""

from __future__ import annotations

from tests import _session_netns

# First, before any socket or thread exists: the session's own network namespace.
_session_netns.enter_private_namespace()

import socket  # noqa: E402

import pytest  # noqa: E402

from tests._support import has_ipv6_loopback  # noqa: E402


def pytest_report_header() -> str:
    return f"tcpclose tests run in: {_session_netns.status}"


_FAMILIES = {"ipv4": socket.AF_INET, "ipv6": socket.AF_INET6}


@pytest.fixture(params=list(_FAMILIES))
def family(request: pytest.FixtureRequest) -> int:
    """Each test runs over IPv4 and IPv6 loopback; IPv6 skips when ``::1`` is missing."""
    fam = _FAMILIES[request.param]
    if fam == socket.AF_INET6 and not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback (::1) on this machine")
    return fam


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_name(request: pytest.FixtureRequest) -> str:
    """Each asyncio test runs on the default loop and on uvloop."""
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    name: str = request.param
    return name
