"""Security of the drain (issue 9): what a hostile peer can make a close cost.

* A peer that trickles one byte every ``idle_timeout - ε`` never lets the idle timeout
  fire, but cannot hold the connection past ``linger_time`` (peer-first: past
  ``timeout + linger_time`` with the graceful fallback).
* A peer that floods cannot make the drain read more than ``max_drain_bytes``, and the
  memory the close uses stays flat: tracemalloc's peak during a 64 MiB flood, with a
  budget of about 1 MiB, stays far below even that budget.

Plain loopback: these are about the drivers, not the network. The flooder is a child
process, so that its own buffers are not in this process's memory figures.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator

import pytest

import tcpclose
from tcpclose import ClosePolicy, Outcome
from tests._support import listener, open_fd_count, wait_until

pytestmark = pytest.mark.timeout(60)

DRIVERS = ("sync", "asyncio", "uvloop")
IDLE_S = 0.2
LINGER_S = 0.8
TIMEOUT_S = 0.3
#: Longer than the timeout: peer-first waits the whole timeout (the bounds under test).
GRACE_S = 60.0
#: About 1 MiB, and no multiple of a read size: a drain that overshoots the budget by a
#: partial read cannot land on it by chance.
CAP = 1_000_003
FLOOD = 64 << 20
#: How much more memory than at its start the close may use at its peak, during the
#: flood. The sync driver reads into one reused 64 KiB buffer; the event loops hand
#: the asyncio driver reads of up to 256 KiB each. Either way, far below the budget.
PEAK_LIMIT = {"sync": 128 << 10, "asyncio": 512 << 10, "uvloop": 512 << 10}


def _loop_factory(driver: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if driver == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


def close_with(
    driver: str, sock: socket.socket, policy: ClosePolicy, before: Callable[[], None] = lambda: None
) -> tcpclose.CloseReport:
    """Close ``sock`` with ``driver``; ``before()`` runs just before the close call."""
    if driver == "sync":
        before()
        return tcpclose.close(sock, policy, allow_data_loss=True)
    from tcpclose import aio

    async def main() -> tcpclose.CloseReport:
        sock.setblocking(False)
        _, writer = await asyncio.open_connection(sock=sock)
        before()
        return await aio.aclose(writer, policy, allow_data_loss=True)

    with asyncio.Runner(loop_factory=_loop_factory(driver)) as runner:
        return runner.run(main())


def warm_up_lookups() -> None:
    """Open this thread's sock_diag socket (kept for the thread's life) before counting fds."""
    tcpclose.lookup(("127.0.0.1", 1), ("127.0.0.1", 2))


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """``(peer, ours)`` over loopback; whatever is left open is closed afterwards."""
    warm_up_lookups()
    fds = open_fd_count()
    lst = listener(socket.AF_INET)
    peer = socket.create_connection(lst.getsockname()[:2])
    ours, _ = lst.accept()
    lst.close()
    yield peer, ours
    for sock in (peer, ours):
        if sock.fileno() != -1:
            sock.close()
    wait_until(lambda: open_fd_count() == fds, message="fd count back to the start")


# -- a trickling peer -----------------------------------------------------------------------------


class Trickler:
    """Sends one byte every ``every`` seconds until stopped or the connection fails."""

    def __init__(self, sock: socket.socket, every: float) -> None:
        self.sent = 0
        self.gaps: list[float] = []
        self._sock = sock
        self._every = every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        last = time.monotonic()
        deadline = last + 20
        while not self._stop.wait(self._every) and time.monotonic() < deadline:
            try:
                self._sock.send(b".")
            except OSError:
                return
            now = time.monotonic()
            self.gaps.append(now - last)
            last = now
            self.sent += 1

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)
        assert not self._thread.is_alive()


@pytest.mark.parametrize(
    ("policy", "bound"),
    [
        (f"graceful idle_timeout={IDLE_S}s linger_time={LINGER_S}s", LINGER_S),
        (
            f"peer-first timeout={TIMEOUT_S}s grace={GRACE_S}s fallback=graceful "
            f"idle_timeout={IDLE_S}s linger_time={LINGER_S}s",
            TIMEOUT_S + LINGER_S,
        ),
    ],
    ids=["graceful", "peer-first"],
)
def test_trickling_peer_cannot_hold_past_linger_time(
    driver: str, pair: tuple[socket.socket, socket.socket], policy: str, bound: float
) -> None:
    """One byte every idle_timeout/2: the idle timeout never fires, linger_time does."""
    peer, ours = pair
    trickler = Trickler(peer, IDLE_S / 2)
    wait_until(lambda: trickler.sent >= 1, message="the trickle started")
    t0 = time.monotonic()
    try:
        report = close_with(driver, ours, ClosePolicy.parse(policy))
    finally:
        wall = time.monotonic() - t0
        trickler.stop()
    # The trickle really was faster than the idle timeout the whole time ...
    assert max(trickler.gaps) < IDLE_S, trickler.gaps
    # ... so only the total bound could end the close, and it did, on time.
    assert report.outcome is Outcome.LINGER_TIME, report
    assert bound - 0.002 <= report.duration <= bound * 1.1, report
    assert wall <= bound * 1.1 + 0.02, (wall, report)
    assert 0 < report.drained_bytes <= trickler.sent


# -- a flooding peer ------------------------------------------------------------------------------

_FLOODER = """
import socket, sys
sock = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
chunk = b"f" * (1 << 20)
left = int(sys.argv[2])
try:
    while left > 0:
        left -= sock.send(chunk[: min(len(chunk), left)])
except OSError:
    pass
print(int(sys.argv[2]) - left, flush=True)
"""


def _flood(driver: str) -> tuple[tcpclose.CloseReport, int]:
    """Close a connection a child process floods with 64 MiB, graceful with a ~1 MiB
    budget. Returns the report and how far above its start the traced memory peaked
    during the close."""
    warm_up_lookups()
    fds = open_fd_count()
    lst = listener(socket.AF_INET)
    flooder = subprocess.Popen(
        [sys.executable, "-c", _FLOODER, str(lst.getsockname()[1]), str(FLOOD)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        lst.settimeout(10)
        ours, _ = lst.accept()
        lst.close()
        wait_until(lambda: tcpclose.queues(ours).unread > 0, message="the flood arriving")
        policy = ClosePolicy.parse(f"graceful max_drain_bytes={CAP} linger_time=10s")
        base: list[int] = []

        def start_measuring() -> None:
            tracemalloc.reset_peak()
            base.append(tracemalloc.get_traced_memory()[0])

        tracemalloc.start()
        try:
            report = close_with(driver, ours, policy, before=start_measuring)
            peak = tracemalloc.get_traced_memory()[1] - base[0]
        finally:
            tracemalloc.stop()
        out, _ = flooder.communicate(timeout=20)
    finally:
        if flooder.poll() is None:
            flooder.kill()
            flooder.communicate(timeout=5)
    assert int(out) < FLOOD  # the flood was cut off by our reset, not finished
    assert report.outcome is Outcome.BYTE_CAP, report
    assert report.rst_sent  # the rest of the flood was still unread: RST
    wait_until(lambda: open_fd_count() == fds, message="fd count back to the start")
    return report, peak


def test_flooding_peer_leaves_memory_flat(driver: str) -> None:
    """A 64 MiB flood, a ~1 MiB budget: the close's memory peaks at one read buffer."""
    report, peak = _flood(driver)
    assert peak < PEAK_LIMIT[driver], f"peak {peak} B above the start of the close: {report}"


def test_flooding_peer_cannot_make_the_drain_read_more(driver: str) -> None:
    """A 64 MiB flood, a ~1 MiB budget: the drain reads the budget, not a byte more."""
    report, _ = _flood(driver)
    assert report.drained_bytes == CAP, report
