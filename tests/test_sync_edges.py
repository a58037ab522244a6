"""The sync driver's edges from issue 20: each one reproduced first, then fixed.

Real loopback connections; the kernel's view from ``tcpclose.lookup`` and ``ss``.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
import tracemalloc

import pytest

import tcpclose
from tcpclose import TcpState
from tcpclose._plan import Outcome
from tests._support import addr, ss_lookup, tcp_pair


def fill_send_queue(sock: socket.socket) -> int:
    """Send until the kernel refuses more (the peer is not reading); return bytes sent."""
    sock.setblocking(False)
    chunk = b"x" * 65536
    sent = 0
    for _ in range(10_000):
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            return sent
    raise AssertionError("the send queue never filled")


def set_linger(sock: socket.socket, on: int, seconds: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", on, seconds))


def linger_of(sock: socket.socket) -> tuple[int, int]:
    on, seconds = struct.unpack("ii", sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
    return on, seconds


# -- item 3: an application's SO_LINGER must not stretch the policy's bounds -------------------


@pytest.mark.parametrize(
    ("policy", "bound"),
    [
        ("graceful linger_time=1s idle_timeout=500ms", 1.0),
        ("peer-first timeout=300ms fallback=graceful linger_time=500ms idle_timeout=200ms", 0.8),
        ("default", 0.0),
    ],
)
def test_application_linger_does_not_stretch_the_bound(
    family: int, policy: str, bound: float
) -> None:
    """Issue 20 (3): with ``SO_LINGER {1, 10}`` set by the application, a blocking
    socket's ``close()`` waits up to 10 s for a peer that does not read; the sync
    driver left it on, so ``tcpclose.close()`` took 11.15 s against a 2 s bound."""
    # Without the library: close() blocks for the linger time.
    client, server = tcp_pair(family)
    fill_send_queue(server)
    server.setblocking(True)
    set_linger(server, 1, 1)
    start = time.monotonic()
    server.close()
    assert time.monotonic() - start >= 0.9
    client.close()

    # With it: the policy's bound holds, and nothing of ours is reset away.
    client, server = tcp_pair(family)
    local, peer = addr(server), addr(server, peer=True)
    queued = fill_send_queue(server)
    server.setblocking(True)
    set_linger(server, 1, 10)
    start = time.monotonic()
    report = tcpclose.close(server, policy)
    took = time.monotonic() - start
    assert took < bound + 0.5, f"{policy}: {took:.2f}s"
    assert not report.rst_sent
    assert report.warnings == ()  # a blocking socket: lingering is no surprise to warn of
    # Our queued bytes are still on their way (no RST threw them away).
    assert report.kernel_state is not None
    assert report.kernel_state.state in (TcpState.FIN_WAIT1, TcpState.ESTABLISHED)
    entry = ss_lookup(local, peer)
    assert entry is not None
    assert entry.send_q > 0
    assert queued > 0
    client.close()


def test_non_blocking_socket_with_linger_warns_and_keeps_the_bound(family: int) -> None:
    """The same on a non-blocking socket: TC201 as before, and now the bound holds."""
    client, server = tcp_pair(family)
    fill_send_queue(server)
    set_linger(server, 1, 10)
    start = time.monotonic()
    with pytest.warns(tcpclose.BlockingCloseWarning, match="TC201"):
        report = tcpclose.close(server, "graceful linger_time=500ms idle_timeout=200ms")
    assert time.monotonic() - start < 1.0
    assert report.outcome in (Outcome.IDLE_TIMEOUT, Outcome.LINGER_TIME)
    assert report.warnings == ("TC201",)
    client.close()


def test_abort_still_resets_with_application_linger(family: int) -> None:
    """``abort`` replaces the application's linger with ``{1, 0}``: RST at once."""
    client, server = tcp_pair(family)
    fill_send_queue(server)
    server.setblocking(True)
    set_linger(server, 1, 10)
    start = time.monotonic()
    report = tcpclose.close(server, "abort", allow_data_loss=True)
    assert time.monotonic() - start < 0.5
    assert report.rst_sent
    assert report.outcome is Outcome.ABORTED
    assert report.state is TcpState.CLOSED
    client.close()


# -- item 9: one scratch buffer per thread, not one per drain ----------------------------------


def _drain_allocations(closes: int) -> list[int]:
    """Bytes each graceful close allocates at its peak beyond what was held before it,
    as tracemalloc counts them, for ``closes`` closes that each drain the peer's data."""
    sizes: list[int] = []
    tracemalloc.start()
    try:
        for _ in range(closes):
            client, server = tcp_pair()
            client.sendall(b"request body nobody read")
            client.shutdown(socket.SHUT_WR)
            tracemalloc.reset_peak()
            held = tracemalloc.get_traced_memory()[0]
            report = tcpclose.close(server, "graceful", report=False)
            sizes.append(tracemalloc.get_traced_memory()[1] - held)
            assert report.drained_bytes == 24
            client.close()
    finally:
        tracemalloc.stop()
    return sizes


def test_drains_share_one_scratch_buffer_per_thread() -> None:
    """Issue 20 (9): each drain allocated a fresh 64 KiB buffer (2,000 drains: 203 MB
    allocated). One buffer per thread now serves every drain on that thread."""
    sizes = _drain_allocations(50)
    later = sizes[1:]  # (the thread's first drain may make its buffer)
    assert max(later) < 16 * 1024, later
    assert sum(later) < 49 * 16 * 1024

    # Each thread has its own (sync closes run in thread pools): no thread waits for
    # another's, and all drain correctly at once.
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(20):
                client, server = tcp_pair()
                client.sendall(b"x" * 100_000)
                client.shutdown(socket.SHUT_WR)
                report = tcpclose.close(server, "graceful", report=False)
                assert report.drained_bytes == 100_000
                assert report.outcome is Outcome.PEER_EOF
                client.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
