"""The kernel view against the live kernel: real loopback connections driven into each
TCP state, looked up through every backend (sock_diag and procfs) and compared with
the state we drove them to and with ``ss -tanoi`` (issue 4)."""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import tcpclose
import tcpclose.kernel
from tcpclose import KernelState, TcpState, TimerKind
from tcpclose._kernel import _netlink
from tcpclose._kernel._address import parse_four_tuple
from tcpclose._kernel._diag import encode_lookup_request
from tcpclose._kernel._procfs import ProcfsBackend
from tests._support import (
    addr,
    has_ipv6_loopback,
    listener,
    open_fd_count,
    ss_lookup,
    tcp_pair,
    wait_until,
)

pytestmark = pytest.mark.skipif(
    tcpclose.kernel.backend() != "netlink", reason="needs Linux sock_diag"
)

Lookup = Callable[..., KernelState]

_SS_TIMERS = {
    TimerKind.RETRANSMIT: "on",
    TimerKind.KEEPALIVE: "keepalive",
    TimerKind.TIMEWAIT: "timewait",
    TimerKind.PROBE: "persist",
}


@pytest.fixture(params=["netlink", "procfs"])
def view(request: pytest.FixtureRequest) -> Lookup:
    """The public ``lookup`` (sock_diag here) and the procfs backend, one conformance
    suite for both."""
    if request.param == "netlink":
        return tcpclose.lookup
    procfs = ProcfsBackend()

    def lookup(local: Any, peer: Any, *, cookie: int | None = None) -> KernelState:
        return procfs.lookup(parse_four_tuple(local, peer), cookie)

    return lookup


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    """Sockets to close after the test (RST first, so nothing lingers)."""
    held: list[socket.socket] = []
    yield held
    for sock in held:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def ends(sock: socket.socket) -> tuple[tuple[str, int], tuple[str, int]]:
    return addr(sock), addr(sock, peer=True)


def inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


def wait_state(view: Lookup, local: Any, peer: Any, state: TcpState, **kw: Any) -> KernelState:
    def reached() -> KernelState | None:
        st = view(local, peer, **kw)
        return st if st.state is state else None

    return wait_until(reached, message=f"{state.name} for {local} -> {peer}")


def same_host(a: str, b: str) -> bool:
    def norm(h: str) -> str:
        return h[7:] if h.startswith("::ffff:") else h

    return norm(a) == norm(b)


def check_against_ss(st: KernelState, local: Any, peer: Any, *, settled: bool = True) -> None:
    """ss must agree on existence, state, queues and timer kind. Unless ``settled``,
    the send queue and the timer may have moved between the two looks (a socket
    still probing a window that opens now and then)."""
    entry = ss_lookup(local, peer)
    if not st.exists:
        assert entry is None, f"we say {st.state.name}, ss says {entry}"
        return
    assert entry is not None, f"we say {st.state.name}, ss shows nothing"
    assert entry.state == st.state.label, entry.raw
    assert entry.recv_q == st.recv_queue, entry.raw
    timer = _SS_TIMERS.get(st.timer or TimerKind.OFF)
    if settled:
        assert entry.send_q == st.send_queue, entry.raw
        assert entry.timer == timer, entry.raw
    else:
        assert entry.send_q > 0, entry.raw
        assert {entry.timer, timer} <= {"on", "persist"}, entry.raw


def check_addresses(st: KernelState, local: Any, peer: Any) -> None:
    assert st.local is not None
    assert st.peer is not None
    assert same_host(st.local[0], local[0])
    assert st.local[1] == local[1]
    assert same_host(st.peer[0], peer[0])
    assert st.peer[1] == peer[1]


# -- the states -----------------------------------------------------------------------------


def test_established(family: int, view: Lookup, sockets: list[socket.socket]) -> None:
    client, server = tcp_pair(family)
    sockets += [client, server]
    for sock in (client, server):
        local, peer = ends(sock)
        st = view(local, peer)
        assert st.state is TcpState.ESTABLISHED
        check_addresses(st, local, peer)
        assert st.inode == inode(sock)
        assert st.uid == os.getuid()
        assert st.timer is TimerKind.OFF
        assert st.seconds_left is None
        check_against_ss(st, local, peer)


def test_fin_wait2_after_close_and_close_wait(
    family: int, view: Lookup, sockets: list[socket.socket]
) -> None:
    """After close() the active closer is an orphan FIN_WAIT2: a timewait-kind socket
    with the tcp_fin_timeout timer, uid and inode 0. The peer is in CLOSE_WAIT with
    the FIN counted in its receive queue."""
    client, server = tcp_pair(family)
    sockets.append(server)
    local, peer = ends(client)
    client.close()
    st = wait_state(view, local, peer, TcpState.FIN_WAIT2)
    assert st.timer is TimerKind.TIMEWAIT
    assert st.seconds_left is not None
    assert 50 < st.seconds_left <= 60.01
    assert (st.inode, st.uid) == (0, 0)
    check_against_ss(st, local, peer)

    s_local, s_peer = ends(server)
    st = view(s_local, s_peer)
    assert st.state is TcpState.CLOSE_WAIT
    assert st.recv_queue == 1
    assert st.inode == inode(server)
    check_against_ss(st, s_local, s_peer)


def test_fin_wait2_after_shutdown(family: int, view: Lookup, sockets: list[socket.socket]) -> None:
    """After shutdown(SHUT_WR) with the fd open, FIN_WAIT2 is a full socket: no
    timer, the real inode."""
    client, server = tcp_pair(family)
    sockets += [client, server]
    local, peer = ends(client)
    client.shutdown(socket.SHUT_WR)
    st = wait_state(view, local, peer, TcpState.FIN_WAIT2)
    assert st.timer is TimerKind.OFF
    assert st.seconds_left is None
    assert st.inode == inode(client)
    check_against_ss(st, local, peer)
    s_local, s_peer = ends(server)
    assert view(s_local, s_peer).state is TcpState.CLOSE_WAIT


def test_last_ack(family: int, view: Lookup, sockets: list[socket.socket]) -> None:
    """LAST_ACK held still: the peer shut down its side and stopped reading, so our
    FIN waits behind data its zero window will not take."""
    lst = listener(family)
    client = socket.socket(family, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    client.connect(lst.getsockname()[:2])
    server, _ = lst.accept()
    lst.close()
    sockets += [client, server]
    client.shutdown(socket.SHUT_WR)
    s_local, s_peer = ends(server)
    wait_state(view, s_local, s_peer, TcpState.CLOSE_WAIT)
    server.setblocking(False)
    chunk = b"x" * 65536
    for _ in range(1000):  # fill the peer's window and our send buffer
        try:
            server.send(chunk)
        except BlockingIOError:
            break
    else:
        pytest.fail("the send buffer never filled")
    server.close()
    st = wait_state(view, s_local, s_peer, TcpState.LAST_ACK)
    assert st.send_queue is not None
    assert st.send_queue > 0
    assert (st.inode, st.uid) == (0, 0)  # orphaned
    # The peer's receive queue may still be compacted, opening its window a little:
    # what is queued, and which timer runs, can change between our look and ss's.
    check_against_ss(st, s_local, s_peer, settled=False)


def test_time_wait_and_seconds_left_agree_with_ss(
    family: int, view: Lookup, sockets: list[socket.socket]
) -> None:
    client, server = tcp_pair(family)
    local, peer = ends(client)
    s_local, s_peer = ends(server)
    client.close()
    wait_state(view, local, peer, TcpState.FIN_WAIT2)
    server.close()
    wait_state(view, local, peer, TcpState.TIME_WAIT)
    entry = ss_lookup(local, peer)  # ss first: its (truncated) figure is older
    st = view(local, peer)
    assert st.state is TcpState.TIME_WAIT
    assert entry is not None
    assert entry.state == "TIME-WAIT", entry.raw
    assert st.timer is TimerKind.TIMEWAIT
    assert entry.timer == "timewait"
    assert st.seconds_left is not None
    assert entry.timer_seconds is not None
    assert abs(st.seconds_left - entry.timer_seconds) <= 1.0, (st, entry.raw)
    assert 50 < st.seconds_left <= 60.01
    assert (st.inode, st.uid, st.recv_queue, st.send_queue) == (0, 0, 0, 0)
    check_addresses(st, local, peer)
    # The passive closer's socket is gone (its listener too: no trap here).
    closed = wait_state(view, s_local, s_peer, TcpState.CLOSED)
    assert not closed.exists
    assert closed.local is None
    check_against_ss(closed, s_local, s_peer)


def test_reset_leaves_nothing(family: int, view: Lookup, sockets: list[socket.socket]) -> None:
    """SO_LINGER {1, 0} then close(): RST, no TIME_WAIT on either side. The peer's
    socket still has its fd but is out of the kernel's tables (TCP_CLOSE)."""
    client, server = tcp_pair(family)
    sockets.append(server)
    local, peer = ends(client)
    s_local, s_peer = ends(server)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()
    assert view(local, peer).state is TcpState.CLOSED
    wait_until(lambda: view(s_local, s_peer).state is TcpState.CLOSED, message="peer reset")
    info = tcpclose.tcp_info(server)
    assert info is not None
    assert info.state is TcpState.CLOSE
    check_against_ss(view(local, peer), local, peer)
    check_against_ss(view(s_local, s_peer), s_local, s_peer)


# -- the listener trap and mapped addresses ------------------------------------------------------


def test_listener_trap(family: int, view: Lookup, sockets: list[socket.socket]) -> None:
    """Regression (issue 4): once an accepted connection is gone and its listener is
    not, the kernel's exact lookup answers with the LISTEN socket. That must read as
    CLOSED, with or without a cookie."""
    lst = listener(family)
    sockets.append(lst)
    client, server = tcp_pair(family, lst)
    s_local, s_peer = ends(server)
    cookie = tcpclose.kernel.socket_cookie(server)
    assert view(s_local, s_peer, cookie=cookie).state is TcpState.ESTABLISHED
    client.close()
    server.close()
    wait_until(lambda: ss_lookup(s_local, s_peer) is None, message="server side gone")

    # The trap is real: the raw reply describes the listener.
    msg = _netlink.channel().lookup(parse_four_tuple(s_local, s_peer))
    assert msg is not None
    assert msg.state == TcpState.LISTEN
    assert msg.peer is not None
    assert msg.peer[1] == 0
    assert msg.inode == inode(lst)

    st = view(s_local, s_peer)
    assert st.state is TcpState.CLOSED, st
    assert view(s_local, s_peer, cookie=cookie).state is TcpState.CLOSED


def test_cookie_tells_a_reused_tuple(family: int, sockets: list[socket.socket]) -> None:
    """A cookie that is not the socket's (e.g. from an earlier connection on the same
    4-tuple) gives CLOSED; the right one finds the socket, through TIME_WAIT."""
    client, server = tcp_pair(family)
    sockets.append(server)
    local, peer = ends(client)
    cookie = tcpclose.kernel.socket_cookie(client)
    assert cookie is not None
    first = tcpclose.lookup(local, peer, cookie=cookie)
    assert first.state is TcpState.ESTABLISHED
    assert first.cookie == cookie
    assert tcpclose.lookup(local, peer, cookie=cookie ^ 0x5A5A).state is TcpState.CLOSED
    client.close()
    server.close()
    st = wait_state(tcpclose.lookup, local, peer, TcpState.TIME_WAIT, cookie=cookie)
    assert st.cookie == cookie


@pytest.fixture
def dual_stack(sockets: list[socket.socket]) -> socket.socket:
    if not has_ipv6_loopback():
        pytest.skip("no IPv6")
    lst = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    lst.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    lst.bind(("::", 0))
    lst.listen(8)
    sockets.append(lst)
    return lst


def test_mapped_addresses(
    dual_stack: socket.socket, view: Lookup, sockets: list[socket.socket]
) -> None:
    """A dual-stack listener on :: takes an IPv4 client: its accepted socket is AF_INET6
    with ::ffff:127.0.0.1 on both ends. Asked either way, it is found, and reported as
    the kernel holds it."""
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.connect(("127.0.0.1", dual_stack.getsockname()[1]))
    server, _ = dual_stack.accept()
    sockets += [client, server]
    mapped_local, mapped_peer = server.getsockname(), server.getpeername()
    assert mapped_local[0] == "::ffff:127.0.0.1"
    plain_local, plain_peer = ("127.0.0.1", mapped_local[1]), ("127.0.0.1", mapped_peer[1])

    for local, peer in (
        (mapped_local, mapped_peer),  # 4-tuples straight from getsockname()
        (plain_local, plain_peer),
        (plain_local, mapped_peer[:2]),  # one end mapped, one not
    ):
        st = view(local, peer)
        assert st.state is TcpState.ESTABLISHED, (local, peer)
        assert st.local == ("::ffff:127.0.0.1", mapped_local[1])
        assert st.inode == inode(server)
    check_against_ss(view(plain_local, plain_peer), plain_local, plain_peer)

    # The IPv4 client's socket, asked with mapped addresses.
    c_local, c_peer = ends(client)
    st = view(("::ffff:" + c_local[0], c_local[1]), ("::ffff:" + c_peer[0], c_peer[1]))
    assert st.state is TcpState.ESTABLISHED
    assert st.local == c_local

    # Server closes first: its TIME_WAIT is found both ways; the client side is gone
    # and the dual-stack listener's trap reads CLOSED.
    server.close()
    wait_state(view, c_local, c_peer, TcpState.CLOSE_WAIT)
    client.close()
    st = wait_state(view, mapped_local, mapped_peer, TcpState.TIME_WAIT)
    assert st.local is not None
    assert st.local[0] == "::ffff:127.0.0.1"
    assert view(plain_local, plain_peer).state is TcpState.TIME_WAIT
    check_against_ss(st, plain_local, plain_peer)
    wait_state(view, c_local, c_peer, TcpState.CLOSED)


def test_dual_stack_listener_trap(dual_stack: socket.socket, sockets: list[socket.socket]) -> None:
    """Regression (issue 4): the same trap through a dual-stack listener, asked with
    one end mapped and the other not (the kernel then searches the IPv6 table and
    falls through to the listener on ::)."""
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.connect(("127.0.0.1", dual_stack.getsockname()[1]))
    server, _ = dual_stack.accept()
    s_local, s_peer = server.getsockname(), server.getpeername()
    client.close()
    server.close()
    wait_until(lambda: ss_lookup(s_local[:2], s_peer[:2]) is None, message="server side gone")
    for local, peer in ((s_local, s_peer), (s_local[:2], ("127.0.0.1", s_peer[1]))):
        assert tcpclose.lookup(local, peer).state is TcpState.CLOSED


# -- resources -------------------------------------------------------------------------------


def test_no_fd_leak_over_10000_lookups(sockets: list[socket.socket]) -> None:
    client, server = tcp_pair(socket.AF_INET)
    sockets += [client, server]
    local, peer = ends(client)
    miss = ("127.0.0.1", 1)
    tcpclose.lookup(local, peer)  # opens this thread's channel
    before = open_fd_count()
    for i in range(10_000):
        st = tcpclose.lookup(local, peer if i % 2 else miss)
        assert st.state is (TcpState.ESTABLISHED if i % 2 else TcpState.CLOSED)
    assert open_fd_count() == before


def test_threads_each_get_a_channel_closed_with_the_thread(
    sockets: list[socket.socket],
) -> None:
    client, server = tcp_pair(socket.AF_INET)
    sockets += [client, server]
    local, peer = ends(client)
    tcpclose.lookup(local, peer)
    before = open_fd_count()
    results: list[TcpState] = []
    channels: set[int] = set()

    together = threading.Barrier(4, timeout=10)

    def work() -> None:
        for _ in range(200):
            results.append(tcpclose.lookup(local, peer).state)
        channels.add(_netlink.channel().fileno())
        together.wait()  # all four channels open at once: distinct descriptors

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    gc.collect()
    assert results == [TcpState.ESTABLISHED] * 800
    assert len(channels) == 4
    assert _netlink.channel().fileno() not in channels
    assert open_fd_count() == before


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork()")
def test_forked_child_opens_its_own_channel(sockets: list[socket.socket]) -> None:
    client, server = tcp_pair(socket.AF_INET)
    sockets += [client, server]
    local, peer = ends(client)
    parent_channel = _netlink.channel()
    assert tcpclose.lookup(local, peer).state is TcpState.ESTABLISHED
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            state = tcpclose.lookup(local, peer).state
            fresh = _netlink.channel().pid == os.getpid()
            os.write(write_end, f"{state.name} {fresh}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        answer = pipe.read().decode()
    os.waitpid(pid, 0)
    assert answer == "ESTABLISHED True"
    assert _netlink.channel() is parent_channel
    assert tcpclose.lookup(local, peer).state is TcpState.ESTABLISHED


def test_a_stale_reply_is_skipped(sockets: list[socket.socket]) -> None:
    """A reply left over from an earlier request (e.g. one that timed out) must not
    be taken for the answer to the next one."""
    client, server = tcp_pair(socket.AF_INET)
    sockets += [client, server]
    local, peer = ends(client)
    chan = _netlink.channel()
    stale = parse_four_tuple(("127.0.0.1", 1), ("127.0.0.1", 2))
    sock = chan._sock
    assert sock is not None
    sock.send(encode_lookup_request(stale, seq=0xFFFF_0000))  # never read
    assert tcpclose.lookup(local, peer).state is TcpState.ESTABLISHED
    assert tcpclose.lookup(("127.0.0.1", 1), ("127.0.0.1", 2)).state is TcpState.CLOSED


def test_kernel_view_failure_is_unknown_not_an_exception(
    monkeypatch: pytest.MonkeyPatch, sockets: list[socket.socket]
) -> None:
    client, server = tcp_pair(socket.AF_INET)
    sockets += [client, server]
    local, peer = ends(client)

    def broken(self: _netlink.NetlinkChannel, four: Any, cookie: Any = None) -> KernelState:
        raise TimeoutError("no answer")

    monkeypatch.setattr(_netlink.NetlinkChannel, "state", broken)
    st = tcpclose.lookup(local, peer)
    assert st.state is TcpState.UNKNOWN
    assert st.source == "netlink"
    monkeypatch.undo()
    assert tcpclose.lookup(local, peer).state is TcpState.ESTABLISHED
