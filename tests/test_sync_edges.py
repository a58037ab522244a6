"""The sync driver's edges from issue 20: each one reproduced first, then fixed.

Real loopback connections; the kernel's view from ``tcpclose.lookup`` and ``ss``.
(Item 8's forked fd holder applies to every driver: ``tests/test_conformance.py``.)
"""

from __future__ import annotations

import os
import socket
import struct
import threading
import time
import tracemalloc

import pytest

import tcpclose
from tcpclose import TcpState
from tcpclose._plan import Outcome
from tests._support import addr, fill_send_queue, ss_lookup, tcp_pair


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


# -- item 8: reports claim only what happened --------------------------------------------------


def test_never_connected_socket_is_a_value_error(family: int) -> None:
    """Issue 20 (8): a socket that never connected was "closed" with outcome ``reset``
    and error ENOTCONN; it is bad input, like a listening one: ValueError, untouched."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    fresh = socket.socket(family, socket.SOCK_STREAM)
    bound = socket.socket(family, socket.SOCK_STREAM)
    bound.bind((host, 0))
    refused = socket.socket(family, socket.SOCK_STREAM)
    port = bound.getsockname()[1]  # bound, not listening: connecting to it is refused
    with pytest.raises(ConnectionRefusedError):
        refused.connect((host, port))
    for sock in (fresh, bound, refused):
        with pytest.raises(ValueError, match="never connected"):
            tcpclose.close(sock, "graceful")
        assert sock.fileno() != -1  # bad input: left untouched
        with pytest.raises(ValueError, match="never connected"):
            tcpclose.closing(sock, "abort")
        sock.close()


def test_a_connection_reset_before_the_close_still_closes(family: int) -> None:
    """Not to be mistaken for a never-connected socket: a connection the peer reset,
    its error already seen by the application, is closed and reported as ``reset``."""
    client, server = tcp_pair(family)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    with pytest.raises(ConnectionResetError):
        server.recv(1)
    report = tcpclose.close(server, "graceful")
    assert report.outcome is Outcome.RESET
    assert server.fileno() == -1


@pytest.mark.parametrize("policy", ["graceful idle_timeout=300ms", "peer-first timeout=300ms"])
def test_own_read_shutdown_is_not_the_peers_eof(family: int, policy: str) -> None:
    """Issue 20 (8): after the application's ``shutdown(SHUT_RDWR)``, reads return EOF
    at once although the peer sent no FIN; the report said ``peer_eof``."""
    client, server = tcp_pair(family)
    local, peer = addr(server), addr(server, peer=True)
    server.shutdown(socket.SHUT_RDWR)
    assert server.recv(1) == b""  # EOF, yet the peer has not closed:
    entry = ss_lookup(peer, local)
    assert entry is not None
    assert entry.state == "CLOSE-WAIT"  # the peer got our FIN and sent none
    report = tcpclose.close(server, policy)
    assert not report.peer_eof
    assert not report.peer_closed_first
    assert report.outcome is Outcome.ERROR
    assert report.error == "read-shutdown"
    client.close()


def test_peer_eof_after_own_read_shutdown_is_still_seen(family: int) -> None:
    """When the peer's FIN did arrive, a shut read side does not hide it."""
    client, server = tcp_pair(family)
    client.close()
    server.shutdown(socket.SHUT_RD)
    report = tcpclose.close(server, "graceful")
    assert report.peer_eof
    assert report.outcome is Outcome.PEER_EOF


def test_connecting_socket_is_a_value_error(family: int) -> None:
    """A connect still under way (SYN_SENT) has no connection to close yet either."""
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    with socket.socket(family, socket.SOCK_STREAM) as lst:
        lst.bind((host, 0))
        lst.listen(0)
        first = socket.create_connection(lst.getsockname()[:2])  # fills the accept queue
        connecting = socket.socket(family, socket.SOCK_STREAM)
        connecting.setblocking(False)
        with pytest.raises(BlockingIOError):
            connecting.connect(lst.getsockname()[:2])  # its SYN is dropped: queue full
        state = tcpclose.lookup(addr(connecting), lst.getsockname()[:2]).state
        assert state is TcpState.SYN_SENT
        with pytest.raises(ValueError, match="still connecting"):
            tcpclose.close(connecting)
        assert connecting.fileno() != -1
        connecting.close()
        first.close()


# -- item 7: closing() whose block closed or detached the socket --------------------------------


def _close_inside(sock: socket.socket, how: str) -> None:
    if how == "close":
        sock.close()
    elif how == "detach":
        os.close(sock.detach())  # (the caller took the fd over, and closed it)
    else:
        os.close(sock.fileno())  # behind the socket object's back


@pytest.mark.parametrize("how", ["close", "detach", "os.close"])
def test_closing_never_hides_the_blocks_exception(how: str) -> None:
    """Issue 20 (7): when the block closed or detached the socket and then raised,
    ``__exit__`` raised OSError(EBADF) in place of the block's exception. The block's
    exception now propagates as it is; there is no report (nothing was closed by us)."""
    client, server = tcp_pair()
    handles: list[tcpclose.ClosingHandle] = []

    def serve() -> None:
        with tcpclose.closing(server, "graceful", on_error="abort") as handle:
            handles.append(handle)
            _close_inside(server, how)
            raise RuntimeError("handler failed")

    with pytest.raises(RuntimeError, match="handler failed") as caught:
        serve()
    assert caught.value.__context__ is None  # nothing of ours in its chain
    assert handles[0].report is None
    client.close()


@pytest.mark.parametrize("how", ["close", "detach", "os.close"])
def test_closing_says_what_happened_when_the_block_succeeded(how: str) -> None:
    """A block that ends normally after closing the socket itself gets a clear
    ValueError (the policy could not be applied), not a bare EBADF."""
    client, server = tcp_pair()
    with (
        pytest.raises(ValueError, match="inside the with block") as caught,
        tcpclose.closing(server, "graceful") as handle,
    ):
        _close_inside(server, how)
    assert not isinstance(caught.value, OSError)
    assert handle.report is None
    client.close()


def test_closing_does_not_close_a_reused_fd_number() -> None:
    """The block closed the fd, and the number came to name another socket before the
    block ended: that socket is not ours to shut down or close."""
    client, server = tcp_pair()
    other_client, other = tcp_pair()
    fd = server.detach()
    handles: list[tcpclose.ClosingHandle] = []

    def serve() -> None:
        with tcpclose.closing(fd) as handle:
            handles.append(handle)
            os.close(fd)
            os.dup2(other.fileno(), fd)  # the number now names the other connection

    with pytest.raises(ValueError, match="inside the with block"):
        serve()
    assert handles[0].report is None
    os.fstat(fd)  # still open: left to its owner
    other.sendall(b"still ours")  # and not shut down: no FIN went to its peer
    assert other_client.recv(100) == b"still ours"
    other_client.setblocking(False)
    with pytest.raises(BlockingIOError):
        other_client.recv(100)
    os.close(fd)
    for sock in (other, other_client, client):
        sock.close()
