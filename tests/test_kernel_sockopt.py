"""tcp_info(), queues(), socket_cookie() on every kind of socket object, and the
errors for what is not a usable TCP socket (issue 4)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import struct
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import tcpclose
import tcpclose.kernel
from tcpclose import NotTcpSocketError, Queues, TcpInfo, TcpState
from tcpclose._kernel._sockopt import borrow, fileno_of
from tests._support import addr, listener, tcp_pair, wait_until

Probe = Callable[[Any], object]
PROBES: list[Probe] = [tcpclose.tcp_info, tcpclose.queues, tcpclose.kernel.socket_cookie]
PROBE_IDS = ["tcp_info", "queues", "socket_cookie"]


@pytest.fixture
def pair(family: int) -> Iterator[tuple[socket.socket, socket.socket]]:
    client, server = tcp_pair(family)
    yield client, server
    client.close()
    server.close()


def test_tcp_info_of_a_connection(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    info = tcpclose.tcp_info(client)
    assert isinstance(info, TcpInfo)
    assert info.state is TcpState.ESTABLISHED
    assert info.rtt is not None
    assert 0 <= info.rtt < 1.0
    assert info.size >= 104
    server.sendall(b"x" * 100)
    wait_until(lambda: tcpclose.queues(client).unread == 100, message="100 bytes unread")
    after = tcpclose.tcp_info(client)
    assert after is not None
    assert after.bytes_received == 100


def test_queues_unread_unsent_unacked(pair: tuple[socket.socket, socket.socket]) -> None:
    client, server = pair
    assert tcpclose.queues(client) == Queues(unread=0, unsent=0, unacked=0)
    server.sendall(b"y" * 1234)
    wait_until(lambda: tcpclose.queues(client).unread == 1234, message="1234 bytes unread")
    assert tcpclose.queues(client).outgoing == 0
    # Fill the peer until our send buffer holds data it has not taken.
    server.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        for _ in range(1000):
            server.send(b"z" * 65536)
    q = tcpclose.queues(server)
    assert q.outgoing > 0
    assert q.unsent + q.unacked == q.outgoing


def test_socket_cookie_is_stable_and_what_lookup_reports(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, _ = pair
    cookie = tcpclose.kernel.socket_cookie(client)
    assert isinstance(cookie, int)
    assert cookie == tcpclose.kernel.socket_cookie(client.fileno())
    assert tcpclose.lookup(addr(client), addr(client, peer=True)).cookie == cookie


def test_listening_socket(family: int) -> None:
    with listener(family) as lst:
        info = tcpclose.tcp_info(lst)
        assert info is not None
        assert info.state is TcpState.LISTEN
        with pytest.raises(ValueError, match="listening"):
            tcpclose.queues(lst)


# -- what counts as a socket, without taking ownership ---------------------------------------


class HasFileno:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd


@pytest.mark.parametrize("probe", PROBES, ids=PROBE_IDS)
@pytest.mark.parametrize("kind", ["socket", "int", "fileno"])
def test_accepted_forms_leave_the_fd_alone(
    pair: tuple[socket.socket, socket.socket], probe: Probe, kind: str
) -> None:
    client, _ = pair
    fd = client.fileno()
    obj: Any = {"socket": client, "int": fd, "fileno": HasFileno(fd)}[kind]
    blocking = os.get_blocking(fd)
    assert probe(obj) is not None
    assert client.fileno() == fd
    assert os.get_blocking(fd) == blocking
    assert tcpclose.tcp_info(client) is not None  # still open and usable
    client.sendall(b"ok")


def test_borrowing_ignores_a_global_default_timeout(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    """Python makes a new socket object non-blocking when a default timeout is set;
    the temporary object must not do that to the caller's descriptor."""
    client, _ = pair
    assert os.get_blocking(client.fileno())
    socket.setdefaulttimeout(1.0)
    try:
        tcpclose.queues(client.fileno())
        tcpclose.tcp_info(HasFileno(client.fileno()))
    finally:
        socket.setdefaulttimeout(None)
    assert os.get_blocking(client.fileno())


async def _probe_transport_socket() -> list[object]:
    results: list[object] = []
    done = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        results.extend(
            [type(sock).__name__, *(probe(sock) for probe in PROBES), sock.fileno() >= 0]
        )
        writer.close()
        await writer.wait_closed()
        done.set_result(None)

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await asyncio.wait_for(done, 5)
    await reader.read()
    writer.close()
    await writer.wait_closed()
    server.close()
    await server.wait_closed()
    return results


def test_asyncio_transport_socket_and_uvloop_pseudo_socket(loop_name: str) -> None:
    loop: asyncio.AbstractEventLoop
    if loop_name == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    try:
        kind, info, queues, cookie, still_open = loop.run_until_complete(_probe_transport_socket())
    finally:
        loop.close()
    assert kind == ("PseudoSocket" if loop_name == "uvloop" else "TransportSocket")
    assert isinstance(info, TcpInfo)
    assert info.state is TcpState.ESTABLISHED
    assert isinstance(queues, Queues)
    assert isinstance(cookie, int)
    assert still_open is True


# -- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize("probe", PROBES, ids=PROBE_IDS)
def test_udp_socket_is_a_type_error(probe: Probe, family: int) -> None:
    with socket.socket(family, socket.SOCK_DGRAM) as udp:
        name = "AF_INET" if family == socket.AF_INET else "AF_INET6"
        expected = f"expected a TCP socket, got a UDP socket ({name}, SOCK_DGRAM)"
        with pytest.raises(NotTcpSocketError, match=rf"^{re.escape(expected)}$") as info:
            probe(udp)
        assert isinstance(info.value, TypeError)
        with pytest.raises(TypeError, match="UDP"):
            probe(udp.fileno())


@pytest.mark.parametrize("probe", PROBES, ids=PROBE_IDS)
def test_unix_socket_is_a_type_error(probe: Probe) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b, pytest.raises(TypeError, match=r"got a UNIX socket \(AF_UNIX, SOCK_STREAM\)"):
        probe(a)


@pytest.mark.parametrize("probe", PROBES, ids=PROBE_IDS)
def test_not_a_socket_is_a_type_error(probe: Probe) -> None:
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(TypeError, match="not a socket"):
            probe(read_end)
    finally:
        os.close(read_end)
        os.close(write_end)
    for wrong in ("eth0", 1.5, None, True, object()):
        with pytest.raises(TypeError, match="expected a socket"):
            probe(wrong)


@pytest.mark.parametrize("probe", PROBES, ids=PROBE_IDS)
def test_closed_socket_is_a_value_error(probe: Probe, family: int) -> None:
    client, server = tcp_pair(family)
    server.close()
    client.close()
    with pytest.raises(ValueError, match="closed"):
        probe(client)
    with pytest.raises(ValueError, match="closed"):
        probe(HasFileno(-1))
    # A number that is no open descriptor at all: EBADF.
    spare = socket.socket()
    free_fd = spare.fileno()
    spare.close()
    with pytest.raises(ValueError, match="closed"):
        probe(free_fd)


def test_fileno_of_rejects_a_fileno_returning_garbage() -> None:
    class Bad:
        def fileno(self) -> str:
            return "3"

    with pytest.raises(TypeError, match="returned str"):
        fileno_of(Bad())


def test_borrow_detaches_even_when_the_check_fails() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        fd = udp.fileno()
        with pytest.raises(TypeError), borrow(fd):
            pass
        assert udp.fileno() == fd
        udp.sendto(b"", ("127.0.0.1", 9))  # still open


def test_queues_counts_discarded_data_on_abort(family: int) -> None:
    """The figure an abort report needs: what SO_LINGER {1,0} would throw away."""
    client, server = tcp_pair(family)
    try:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        server.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(1000):
                server.send(b"q" * 65536)
        outgoing = tcpclose.queues(server).outgoing
        assert outgoing > 0
        server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        server.close()
        client.close()
