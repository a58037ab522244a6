"""Fixtures shared by every test module: address families and event loops."""

from __future__ import annotations

import socket

import pytest

from tests._support import has_ipv6_loopback

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
