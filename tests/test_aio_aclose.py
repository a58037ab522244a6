"""aclose() on transports and StreamWriters: input checking, warnings, cancellation,
reports off, many closes without a leak, uvloop's socket wrapper (issue 6)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from typing import Any

import pytest

import tcpclose
import tcpclose.aio
from tcpclose import BlockingCloseWarning, CloseReport, DataLossWarning, TcpState
from tcpclose._aio import connection_of
from tcpclose._plan import Outcome
from tests._aio_support import Client, payload, run, sha256, wait_for

pytestmark = pytest.mark.timeout(60)

RESPONSE = payload(64 * 1024)


class Holder(asyncio.Protocol):
    """A server protocol that answers the first line and waits for the test."""

    def __init__(self, made: asyncio.Queue[Holder], response: bytes = RESPONSE) -> None:
        self.made = made
        self.response = response
        self.transport: Any = None
        self.lost: list[Exception | None] = []
        self.data = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        first = b"\n" not in self.data
        self.data += data
        if first and b"\n" in self.data:
            self.transport.write(self.response)
            self.made.put_nowait(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.append(exc)


async def holder_server(
    response: bytes = RESPONSE,
) -> tuple[asyncio.AbstractServer, asyncio.Queue[Holder], tuple[str, int]]:
    loop = asyncio.get_running_loop()
    made: asyncio.Queue[Holder] = asyncio.Queue()
    server = await loop.create_server(lambda: Holder(made, response), "127.0.0.1", 0)
    name = server.sockets[0].getsockname()
    return server, made, (name[0], name[1])


def test_aclose_bare_transport(loop_name: str) -> None:
    """aclose() on a transport whose protocol is the application's own: the protocol
    gets connection_lost(None) once, when the connection is finished."""

    async def main() -> None:
        server, made, addr = await holder_server()
        client = Client(expect=len(RESPONSE), after="eof-close")
        task = asyncio.ensure_future(client.run(addr))
        proto = await made.get()
        report = await tcpclose.aio.aclose(proto.transport, "graceful")
        peer = await task
        server.close()
        await server.wait_closed()
        assert sha256(peer.data) == sha256(RESPONSE)
        assert report.outcome is Outcome.PEER_EOF
        assert report.state is TcpState.TIME_WAIT
        assert report.trigger == "aclose"
        assert proto.lost == [None]
        # The transport is closed now.
        with pytest.raises(ValueError, match="already closing"):
            await tcpclose.aio.aclose(proto.transport)

    run(loop_name, main)


def test_aclose_client_transport(loop_name: str) -> None:
    """aclose() works on the connecting side too (loop.create_connection)."""

    async def main() -> None:
        listener = socket.create_server(("127.0.0.1", 0))
        addr = listener.getsockname()[:2]

        def serve() -> bytes:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                data = b""
                while chunk := conn.recv(65536):
                    data += chunk
                return data  # we saw the client's FIN: close (the server is second)

        server_task = asyncio.ensure_future(asyncio.to_thread(serve))
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_connection(asyncio.Protocol, *addr)
        transport.write(b"hello")
        report = await tcpclose.aio.aclose(transport, "graceful")
        assert await server_task == b"hello"
        listener.close()
        assert report.outcome is Outcome.PEER_EOF
        assert report.state is TcpState.TIME_WAIT  # we closed first

    run(loop_name, main)


def test_aclose_bad_input(loop_name: str) -> None:
    """Not a transport: TypeError; a UNIX socket: TypeError (NotTcpSocketError); a
    closing transport: ValueError; a bad policy: PolicyError before anything is done."""

    async def main() -> None:
        with pytest.raises(TypeError, match="expected an asyncio transport or StreamWriter"):
            await tcpclose.aio.aclose(42)
        loop = asyncio.get_running_loop()
        a, b = socket.socketpair()
        transport, _ = await loop.connect_accepted_socket(asyncio.Protocol, a)
        with pytest.raises(tcpclose.NotTcpSocketError):
            await tcpclose.aio.aclose(transport)
        transport.close()
        b.close()
        server, made, addr = await holder_server()
        client = Client(expect=len(RESPONSE), after="eof-close")
        task = asyncio.ensure_future(client.run(addr))
        proto = await made.get()
        with pytest.raises(tcpclose.PolicyError):
            await tcpclose.aio.aclose(proto.transport, "gracefull")
        assert not proto.transport.is_closing()
        proto.transport.close()
        with pytest.raises(ValueError, match="already closing"):
            await tcpclose.aio.aclose(proto.transport)
        await task
        server.close()
        await server.wait_closed()

    run(loop_name, main)


def test_streamwriter_wait_closed_after_aclose(loop_name: str) -> None:
    """After aclose(writer): writer.wait_closed() returns, the reader is at EOF."""

    async def main() -> None:
        reports: list[CloseReport] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(RESPONSE)
            reports.append(await tcpclose.aio.aclose(writer))
            await asyncio.wait_for(writer.wait_closed(), 2)
            assert reader.at_eof()
            assert writer.is_closing()

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()[:2]
        await Client(expect=len(RESPONSE), after="eof-close").run(addr)
        await wait_for(lambda: reports, 5, "the report")
        server.close()
        await server.wait_closed()
        assert reports[0].outcome is Outcome.PEER_EOF

    run(loop_name, main)


@pytest.mark.parametrize("report_on", [True, False])
def test_aclose_after_the_application_read_eof(loop_name: str, report_on: bool) -> None:
    """The handler read to EOF before answering (the peer half-closed): aclose knows
    the peer's FIN is in, does not wait for it again, and we are the passive closer."""
    reports: list[CloseReport] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read()  # until the client's FIN
        writer.write(request.upper())
        reports.append(
            await tcpclose.aio.aclose(writer, "graceful idle_timeout=5s", report=report_on)
        )

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()[:2]
        result = await asyncio.to_thread(_half_close_client, addr)
        await wait_for(lambda: reports, 5, "the report")
        server.close()
        await server.wait_closed()
        assert result == b"PING"
        report = reports[0]
        assert report.outcome is Outcome.PEER_EOF
        assert report.duration < 1
        assert report.peer_closed_first
        if report_on:
            assert report.state is TcpState.CLOSED

    run(loop_name, main)


def _half_close_client(addr: tuple[str, int]) -> bytes:
    with socket.create_connection(addr, timeout=5) as sock:
        sock.sendall(b"ping")
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(100):
            data += chunk
        return data


def test_blocking_linger_warning_and_no_blocking(loop_name: str) -> None:
    """SO_LINGER {1, N} makes close() block the whole loop for up to N seconds when
    data is unacknowledged. aclose warns (BlockingCloseWarning, TC201), turns SO_LINGER
    off before the fd is closed, and the loop never stalls."""
    linger = struct.pack("ii", 1, 1)
    big = payload(8 << 20, seed=7)

    async def stall_during(action: Any) -> float:
        """The longest gap between 10 ms ticks while ``action`` runs."""
        gaps: list[float] = []
        stop = False

        async def tick() -> None:
            last = time.monotonic()
            while not stop:
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = asyncio.ensure_future(tick())
        await asyncio.sleep(0.03)
        await action()
        await asyncio.sleep(0.03)
        stop = True
        await ticker
        return max(gaps)

    async def main() -> None:
        # Without the library: transport.abort() = plain close() with SO_LINGER {1, 1}
        # and 8 MiB unacknowledged: the loop stops for about a second.
        server, made, addr = await holder_server(big)
        client = Client(read=False, after="hold")
        task = asyncio.ensure_future(client.run(addr))
        proto = await made.get()
        proto.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, linger
        )

        async def plain_close() -> None:
            proto.transport.abort()
            await asyncio.sleep(0.05)

        stalled = await stall_during(plain_close)
        client.release.set()
        await task
        assert stalled > 0.8, stalled
        # aclose: warned, and no stall.
        client = Client(read=False, after="hold")
        task = asyncio.ensure_future(client.run(addr))
        proto = await made.get()
        proto.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, linger
        )
        reports: list[CloseReport] = []

        async def policy_close() -> None:
            reports.append(
                await tcpclose.aio.aclose(
                    proto.transport, "graceful linger_time=200ms", allow_data_loss=True
                )
            )

        stalled = await stall_during(policy_close)
        client.release.set()
        await task
        server.close()
        await server.wait_closed()
        assert stalled < 0.5, stalled
        assert "TC201" in reports[0].warnings
        assert reports[0].outcome is Outcome.LINGER_TIME

    with pytest.warns(BlockingCloseWarning, match="TC201") as record:
        run(loop_name, main)
    # The warning points at the caller's line (here, in this file).
    assert any(w.filename == __file__ for w in record)


def test_abort_warning_points_at_caller(loop_name: str) -> None:
    """aclose's warnings point at the line that awaited it; allow_data_loss=True
    silences the data-loss one."""
    big = payload(8 << 20, seed=8)

    async def main() -> list[CloseReport]:
        server, made, addr = await holder_server(big)
        reports = []
        for allow in (False, True):
            client = Client(read=False, after="hold")
            task = asyncio.ensure_future(client.run(addr))
            proto = await made.get()
            report = await tcpclose.aio.aclose(proto.transport, "abort", allow_data_loss=allow)
            reports.append(report)
            client.release.set()
            await task
        server.close()
        await server.wait_closed()
        return reports

    with pytest.warns(DataLossWarning) as record:
        reports = run(loop_name, main)
    assert len(record) == 1
    assert record[0].filename == __file__
    assert reports[0].warnings == ("TC101",)
    assert reports[1].warnings == ()
    assert reports[1].discarded_bytes > 0


def test_cancelled_aclose_finishes_in_the_background(loop_name: str) -> None:
    """Cancelling the task awaiting aclose stops the wait, not the close: the
    connection still ends within the policy's bounds."""

    async def main() -> None:
        server, made, addr = await holder_server()
        client = Client(expect=len(RESPONSE), after="hold")
        task = asyncio.ensure_future(client.run(addr))
        proto = await made.get()
        try:
            closing = asyncio.ensure_future(
                tcpclose.aio.aclose(proto.transport, "graceful idle_timeout=300ms")
            )
            await asyncio.sleep(0)
            conn = connection_of(proto.transport)
            assert conn is not None
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
            started = time.monotonic()
            await wait_for(lambda: proto.lost, 2, "connection_lost")
            assert time.monotonic() - started < 0.6
            closer = conn.closer
            assert closer is not None
            await wait_for(lambda: closer.done, 2, "the report")
            assert closer.report is not None
            assert closer.report.outcome is Outcome.IDLE_TIMEOUT
        finally:
            client.release.set()
            await task
            server.close()
            await server.wait_closed()

    run(loop_name, main)


def test_report_off(loop_name: str) -> None:
    """report=False skips everything measured only for the report."""

    async def main() -> None:
        server, made, addr = await holder_server()
        task = asyncio.ensure_future(Client(expect=len(RESPONSE), after="eof-close").run(addr))
        proto = await made.get()
        report = await tcpclose.aio.aclose(proto.transport, report=False)
        await task
        server.close()
        await server.wait_closed()
        assert report.outcome is Outcome.PEER_EOF
        assert report.kernel_state is None
        assert report.tcp_info is None
        assert report.local is None
        assert report.state is TcpState.UNKNOWN

    run(loop_name, main)


def test_many_closes_no_leak(loop_name: str) -> None:
    """Hundreds of closes mixing every mode and outcome: no fd and no task is left
    (checked by ``run``), and every close reports."""
    policies = [
        "graceful",
        "peer-first timeout=100ms",
        "abort",
        "default",
        "peer-first timeout=30ms fallback=abort",
        "graceful idle_timeout=30ms",
    ]

    async def main() -> None:
        reports: list[CloseReport] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            line = await reader.readline()
            writer.write(b"x" * 1000)
            policy = policies[int(line) % len(policies)]
            reports.append(await tcpclose.aio.aclose(writer, policy, allow_data_loss=True))

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        addr = server.sockets[0].getsockname()[:2]

        async def client(i: int) -> None:
            reader, writer = await asyncio.open_connection(*addr)
            writer.write(b"%d\n" % i)
            try:
                await reader.readexactly(1000)
                if i % 3 == 0:  # some close first, some wait for our FIN
                    writer.close()
                else:
                    await reader.read()  # our FIN, or reset
                    writer.close()
                await writer.wait_closed()
            except (ConnectionError, asyncio.IncompleteReadError):
                # The reset is also kept for wait_closed(); retrieve it here, or the
                # stream's future reports it unretrieved when the GC finalises it first.
                writer.close()
                with contextlib.suppress(ConnectionError):
                    await writer.wait_closed()

        count = 300
        for start in range(0, count, 50):
            await asyncio.gather(*(client(i) for i in range(start, start + 50)))
        await wait_for(lambda: len(reports) == count, 10, "every report")
        server.close()
        await server.wait_closed()
        outcomes = {r.outcome for r in reports}
        assert {Outcome.PEER_EOF, Outcome.ABORTED, Outcome.CLOSED} <= outcomes

    run(loop_name, main, timeout=60)


def test_uvloop_socket_wrapper_refuses_shutdown() -> None:
    """uvloop's transport socket refuses shutdown(): a half-close must go through
    write_eof(), which is what the graceful close does there."""

    async def main() -> None:
        server, made, addr = await holder_server()
        task = asyncio.ensure_future(Client(expect=len(RESPONSE), after="eof-close").run(addr))
        proto = await made.get()
        with pytest.raises(TypeError, match="shutdown"):
            proto.transport.get_extra_info("socket").shutdown(socket.SHUT_WR)
        report = await tcpclose.aio.aclose(proto.transport, "graceful")
        peer = await task
        server.close()
        await server.wait_closed()
        assert peer.eof
        assert report.fin_sent
        assert report.state is TcpState.TIME_WAIT

    pytest.importorskip("uvloop")
    run("uvloop", main)


def test_default_does_not_wait_for_a_peer_that_never_reads(loop_name: str) -> None:
    """Mode default is the transport's own close, with no wait for the program: aclose()
    returns at once even while the transport still has 8 MiB to send to a peer that
    reads nothing (it waited up to 35 s, issue 20). The transport carries on by itself,
    and ends once the peer goes."""
    big = payload(8 * 1024 * 1024, seed=4)

    async def main() -> None:
        server, made, addr = await holder_server(big)
        client = Client(expect=0, after="hold")
        task = asyncio.ensure_future(client.run(addr))
        proto = await made.get()
        assert proto.transport.get_write_buffer_size() > 0  # the peer reads nothing
        started = time.monotonic()
        report = await tcpclose.aio.aclose(proto.transport, "default")
        took = time.monotonic() - started
        assert took < 0.5, took
        assert report.outcome is Outcome.CLOSED
        assert report.state is TcpState.ESTABLISHED  # still flushing, as plain close() is
        assert proto.lost == []
        client.release.set()
        await task
        await wait_for(lambda: proto.lost, 10, "the transport's own end")
        server.close()
        await server.wait_closed()

    run(loop_name, main)
