"""The quick close (issue 16): with reports off, a server's close on a plain TCP
transport follows its policy's course with the transport's calls alone, and hands over
to the closer at the first event off the course, which replays the steps through the
plan.

Each behaviour runs twice against the same real peer: once as a server runs it (the
quick close), once with debug logging on, where every close is the plan's interpreter,
asked at every step. The reports must agree on everything the plan decides (mode,
fallback, outcome, who closed first, bytes drained, FIN and RST) and
on what the driver saw (unread and discarded bytes, the error, the warnings). ``ss``
checks what the kernel holds. Peers are blocking sockets in a thread.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import struct
import termios
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

import tcpclose.aio
from tcpclose import CloseReport
from tcpclose._aio_closer import _Closer, _QuickClose
from tcpclose._aio_proxy import PolicyProtocol
from tests._aio_support import run, wait_for
from tests._support import recv_exactly, ss_lookup

pytestmark = pytest.mark.timeout(60)

REQUEST = b"GET / HTTP/1.1\r\n\r\n"
RESPONSE = b"r" * 4096

#: A client's script: its socket, and an event set once the server's report is in.
Peer = Callable[[socket.socket, threading.Event], None]


@dataclass
class Served:
    report: CloseReport
    #: How the close ran: "quick", "handed over" (quick, then the closer) or "closer".
    path: str
    warnings: tuple[str, ...]
    local: tuple[str, int]
    peer: tuple[str, int]


def _unread(fd: int) -> int:
    raw = fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", raw)[0])


def _path(conn: PolicyProtocol) -> str:
    closer = conn.closer
    if isinstance(closer, _QuickClose):
        return "quick" if closer._full is None else "handed over"
    assert isinstance(closer, _Closer)
    return "closer"


async def _serve_once(
    policy: str, peer: Peer, *, read_request: bool = True, report: bool = False
) -> Served:
    """One connection to ``tcpclose.aio.start_server`` with ``policy``, reports on or
    off (``on_close`` gets the report either way); ``peer`` is the client's script."""
    loop = asyncio.get_running_loop()
    reports: asyncio.Queue[CloseReport] = asyncio.Queue()
    conns: list[PolicyProtocol] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn: PolicyProtocol = writer.transport.connection  # type: ignore[attr-defined]
        conns.append(conn)
        if read_request:
            await reader.readexactly(len(REQUEST))
        else:
            # The request stays in the kernel: reading paused until it is all there.
            # (The real transport's socket: the application's would make the close
            # check SO_LINGER, which takes it off the quick course.)
            writer.transport.pause_reading()  # type: ignore[attr-defined]
            paused.set()
            fd = conn.real.get_extra_info("socket").fileno()
            await wait_for(lambda: _unread(fd) >= len(REQUEST), what="the request queued")
        writer.write(RESPONSE)

    server = await tcpclose.aio.start_server(
        handler, "127.0.0.1", 0, close_policy=policy, on_close=reports.put_nowait, report=report
    )
    port = server.sockets[0].getsockname()[1]

    reported = threading.Event()
    paused = threading.Event()  # (the handler stopped reading: the request may come)

    def client() -> tuple[tuple[str, int], tuple[str, int]]:
        sock = socket.create_connection(("127.0.0.1", port))
        try:
            if not read_request:
                assert paused.wait(10)
            names = sock.getpeername(), sock.getsockname()  # (before an abort resets it)
            sock.sendall(REQUEST)
            peer(sock, reported)
            return names
        finally:
            sock.close()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        running = loop.run_in_executor(None, client)
        try:
            got = await asyncio.wait_for(reports.get(), 10)
        finally:
            reported.set()
        local, peer_address = await running
    server.close()
    await server.wait_closed()
    codes = tuple(str(getattr(w.message, "code", w.category.__name__)) for w in caught)
    return Served(got, _path(conns[0]), codes, local, peer_address)


@pytest.fixture(params=[False, True], ids=["reports-off", "reports-on"])
def report(request: pytest.FixtureRequest) -> bool:
    """Reports off (the quick close measures only what its course needs) or on (it
    measures what the closer does, with the same watch)."""
    return bool(request.param)


def _both(loop_name: str, policy: str, peer: Peer, **kwargs: Any) -> tuple[Served, Served]:
    """The quick run and the interpreter's, in that order."""

    async def main() -> tuple[Served, Served]:
        quick = await _serve_once(policy, peer, **kwargs)
        log = logging.getLogger("tcpclose")
        level = log.level
        log.setLevel(logging.DEBUG)
        try:
            interpreted = await _serve_once(policy, peer, **kwargs)
        finally:
            log.setLevel(level)
        assert interpreted.path == "closer"
        return quick, interpreted

    return run(loop_name, main)


def _same(quick: CloseReport, interpreted: CloseReport) -> None:
    for name in (
        "policy",
        "mode",
        "fallback",
        "outcome",
        "drained_bytes",
        "discarded_bytes",
        "unread_bytes",
        "peer_closed_first",
        "peer_eof",
        "fin_sent",
        "rst_sent",
        "warnings",
        "error",
        "trigger",
        "time_wait_skipped",
        "kernel_state_mode",
    ):
        assert getattr(quick, name) == getattr(interpreted, name), (name, quick, interpreted)
    if quick.kernel_state_mode == "off":
        assert quick.kernel_state is None
        assert quick.local is None
    else:
        assert quick.local is not None


# -- the peers ----------------------------------------------------------------------------------


def cooperating(sock: socket.socket, reported: threading.Event) -> None:
    """Reads the whole response, and closes at our FIN."""
    recv_exactly(sock, len(RESPONSE))
    assert sock.recv(1) == b""


def talks_after_our_fin(sock: socket.socket, reported: threading.Event) -> None:
    """Reads the response and our FIN, then sends 10,000 bytes more before closing."""
    cooperating(sock, reported)
    sock.sendall(b"x" * 10_000)


def silent(sock: socket.socket, reported: threading.Event) -> None:
    """Reads the response and our FIN, then says nothing until the server gave up."""
    cooperating(sock, reported)
    assert reported.wait(10)


def resets(sock: socket.socket, reported: threading.Event) -> None:
    """Reads the response and our FIN, then resets the connection."""
    cooperating(sock, reported)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


def reads_to_reset_or_eof(sock: socket.socket, reported: threading.Event) -> None:
    """Reads until the server's FIN or RST."""
    sock.settimeout(10)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


# -- the behaviours -----------------------------------------------------------------------------


def test_graceful_course_is_quick_and_as_the_plan_says(loop_name: str, report: bool) -> None:
    """The usual close: our FIN, the peer's, the fd closed; TIME_WAIT on our side."""
    quick, interpreted = _both(loop_name, "graceful", cooperating, report=report)
    assert quick.path == "quick"
    _same(quick.report, interpreted.report)
    assert quick.report.outcome == "peer-eof"
    assert quick.report.fin_sent
    entry = ss_lookup(quick.local, quick.peer)
    assert entry is not None
    assert entry.state == "TIME-WAIT", entry


def test_data_during_the_drain_hands_over(loop_name: str, report: bool) -> None:
    """Bytes after our FIN are off the course: the closer drains and counts them."""
    quick, interpreted = _both(loop_name, "graceful", talks_after_our_fin, report=report)
    assert quick.path == "handed over"
    _same(quick.report, interpreted.report)
    assert quick.report.drained_bytes == 10_000


def test_silent_peer_hands_over_at_the_deadline(loop_name: str, report: bool) -> None:
    """The drain's idle bound ends the wait: the closer takes it from the deadline."""
    quick, interpreted = _both(
        loop_name, "graceful idle_timeout=0.2s linger_time=2s", silent, report=report
    )
    assert quick.path == "handed over"
    _same(quick.report, interpreted.report)
    assert quick.report.outcome == "idle-timeout"


def test_reset_during_the_drain_hands_over(loop_name: str, report: bool) -> None:
    """The peer's RST while we wait for its FIN: the closer reports it."""
    quick, interpreted = _both(loop_name, "graceful", resets, report=report)
    assert quick.path == "handed over"
    _same(quick.report, interpreted.report)
    assert quick.report.error == "ECONNRESET"


def test_default_close_is_quick(loop_name: str, report: bool) -> None:
    """Mode default: the transport's own close, nothing unread."""
    quick, interpreted = _both(loop_name, "default", cooperating, report=report)
    assert quick.path == "quick"
    _same(quick.report, interpreted.report)


def test_default_close_with_unread_bytes_hands_over_and_warns(loop_name: str, report: bool) -> None:
    """The RST trap: the handler never read the request, so the close resets the peer.
    The quick close sees the unread bytes and leaves the close (and its warning) to the
    closer."""
    quick, interpreted = _both(
        loop_name, "default", reads_to_reset_or_eof, read_request=False, report=report
    )
    assert quick.path == "handed over"
    _same(quick.report, interpreted.report)
    assert quick.report.unread_bytes == len(REQUEST)
    assert quick.report.rst_sent
    assert quick.report.warnings
    assert quick.warnings == interpreted.warnings


def test_abort_course_is_quick(loop_name: str, report: bool) -> None:
    """Mode abort with nothing unsent: SO_LINGER {1, 0} and the fd's close sends RST."""
    quick, interpreted = _both(loop_name, "abort", reads_to_reset_or_eof, report=report)
    assert quick.path == "quick"
    _same(quick.report, interpreted.report)
    assert quick.report.rst_sent
    assert not quick.report.fin_sent
    assert ss_lookup(quick.local, quick.peer) is None


def closes_first(sock: socket.socket, reported: threading.Event) -> None:
    """Reads the whole response and closes at once (a browser, curl): its FIN first."""
    recv_exactly(sock, len(RESPONSE))


def waits_for_our_fin(sock: socket.socket, reported: threading.Event) -> None:
    """Reads the whole response, then waits for the server's FIN (ab, a close-delimited
    body): peer-first's grace runs out and the fallback sends our FIN."""
    cooperating(sock, reported)


def test_peer_first_course_is_quick(loop_name: str, report: bool) -> None:
    """The peer closes first, within its grace: our side keeps no TIME_WAIT."""
    quick, interpreted = _both(loop_name, "peer-first timeout=5s", closes_first, report=report)
    assert quick.path == "quick"
    _same(quick.report, interpreted.report)
    assert quick.report.peer_closed_first
    assert quick.report.outcome == "peer-eof"
    entry = ss_lookup(quick.local, quick.peer)
    assert entry is None or entry.state != "TIME-WAIT", entry


def test_peer_first_grace_over_hands_over(loop_name: str, report: bool) -> None:
    """A peer that waits for our FIN: the grace ends (a deadline), the closer takes
    over and the plan's fallback sends our FIN."""
    quick, interpreted = _both(
        loop_name, "peer-first timeout=5s grace=100ms", waits_for_our_fin, report=report
    )
    assert quick.path == "handed over"
    _same(quick.report, interpreted.report)
    assert quick.report.fallback is not None
    assert quick.report.fin_sent


def test_server_shutdown_waits_for_a_quick_close(loop_name: str) -> None:
    """``server.close()`` and ``wait_closed()`` while a quick close drains: the shutdown
    waits for it (the close hands over to the closer, whose report it awaits), and the
    close ends when the peer's FIN comes."""

    async def main() -> None:
        reports: list[CloseReport] = []
        conns: list[PolicyProtocol] = []

        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conns.append(writer.transport.connection)  # type: ignore[attr-defined]
            await reader.readexactly(len(REQUEST))
            writer.write(RESPONSE)

        server = await tcpclose.aio.start_server(
            handler,
            "127.0.0.1",
            0,
            close_policy="graceful idle_timeout=10s",
            on_close=reports.append,
            report=False,
        )
        port = server.sockets[0].getsockname()[1]
        release = threading.Event()

        def client() -> None:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(REQUEST)
                cooperating(sock, release)
                assert release.wait(10)  # then our FIN

        thread = threading.Thread(target=client)
        thread.start()
        try:

            def draining() -> bool:
                closer = conns[0].closer if conns else None
                return isinstance(closer, _QuickClose) and closer._state == "drain"

            await wait_for(draining, what="the quick close draining")
            server.close()
            closing = asyncio.ensure_future(server.wait_closed())
            await wait_for(lambda: _path(conns[0]) == "handed over", what="the hand-over")
            assert not closing.done()
        finally:
            release.set()
            await asyncio.to_thread(thread.join, 10)
        await asyncio.wait_for(closing, 10)
        assert len(reports) == 1
        assert reports[0].outcome == "peer-eof"
        assert reports[0].trigger == "handler-return"

    run(loop_name, main)
