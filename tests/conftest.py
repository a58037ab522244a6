"""Fixtures shared by every test module: address families, event loops, and the skip
of TIME_WAIT tests on a full host table when the session shares the host's namespace."""

from __future__ import annotations

from tests import _session_netns

# First, before any socket or thread exists: the session's own network namespace.
_session_netns.enter_private_namespace()

import inspect  # noqa: E402
import socket  # noqa: E402

import pytest  # noqa: E402

from tests._support import has_ipv6_loopback  # noqa: E402


def pytest_report_header() -> str:
    return f"tcpclose tests run in: {_session_netns.status}"


# -- TIME_WAIT tests on a host whose table is nearly full ------------------------------

#: TIME_WAIT entries a test may need to create: the largest tests make about 1,000.
TIME_WAIT_ROOM_NEEDED = 5_000


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark ``time_wait`` every test whose code names TIME_WAIT or FIN_WAIT2 (it counts
    or expects such entries: an orphaned FIN_WAIT2 is held in the same table), so that
    :func:`_time_wait_room` can skip it on a full host table."""
    for item in items:
        function = getattr(item, "function", None)
        try:
            source = inspect.getsource(function).lower() if function is not None else ""
        except (OSError, TypeError):
            continue
        if any(word in source for word in ("time_wait", "time-wait", "fin_wait2", "fin-wait")):
            item.add_marker(pytest.mark.time_wait)


@pytest.fixture(autouse=True)
def _time_wait_room(request: pytest.FixtureRequest) -> None:
    """Outside a private namespace, a TIME_WAIT test skips when the host's table has
    less than :data:`TIME_WAIT_ROOM_NEEDED` free: new closes would skip TIME_WAIT and
    its counts would be wrong for reasons that are not the test's."""
    if _session_netns.private or request.node.get_closest_marker("time_wait") is None:
        return
    room = _session_netns.time_wait_room()
    if room is None:
        return
    now, limit = room
    if limit - now < TIME_WAIT_ROOM_NEEDED:
        pytest.skip(
            f"host TIME_WAIT table nearly full ({now} of tcp_max_tw_buckets={limit}) and "
            f"this session shares it ({_session_netns.status}); run as root for a "
            "private namespace"
        )


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
