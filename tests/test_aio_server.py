"""tcpclose.aio.start_server / create_server: the policy when the handler returns,
raises, is cancelled or closes; server shutdown with open connections (issue 6)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

import tcpclose.aio
from tcpclose import CloseReport, TcpState
from tcpclose._plan import Outcome
from tests._aio_support import Client, payload, run, sha256, wait_for
from tests._support import RESET_ERRORS

pytestmark = pytest.mark.timeout(60)

RESPONSE = payload(64 * 1024)

# CPython 3.11.7's StreamReaderProtocol calls task.exception() on a cancelled handler
# task, which raises inside its done callback; plain asyncio logs the same.
CANCELLED_CALLBACK_BUG = "Exception in callback"


def address(server: Any) -> tuple[str, int]:
    name = server.sockets[0].getsockname()
    return str(name[0]), int(name[1])


def test_handler_exception_closes_with_policy(loop_name: str) -> None:
    """A handler that raises after writing: the close is the policy's (the client
    gets everything, we end in TIME_WAIT after graceful), and the exception is still
    reported by asyncio as usual."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(RESPONSE)
        raise RuntimeError("handler failed")

    async def main() -> None:
        reports: list[CloseReport] = []
        server = await tcpclose.aio.start_server(
            handle, "127.0.0.1", 0, close_policy="graceful", on_close=reports.append
        )
        async with server:
            peer = await Client(expect=len(RESPONSE), after="eof-close").run(address(server))
            await wait_for(lambda: reports, 5, "the report")
        assert sha256(peer.data) == sha256(RESPONSE)
        assert reports[0].trigger == "handler-error"
        assert reports[0].outcome is Outcome.PEER_EOF
        assert reports[0].state is TcpState.TIME_WAIT

    expected = ("Unhandled exception in client_connected_cb", "exception was never retrieved")
    run(loop_name, main, expected_errors=expected)


def test_handler_cancellation_closes_with_policy(loop_name: str) -> None:
    """Cancelling the handler task (a timeout, an application shutdown) closes the
    connection with the policy; the task ends cancelled once the close is over."""
    tasks: list[asyncio.Task[Any]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(RESPONSE)
        task = asyncio.current_task()
        assert task is not None
        tasks.append(task)
        await asyncio.sleep(3600)

    async def main() -> None:
        reports: list[CloseReport] = []
        server = await tcpclose.aio.start_server(
            handle, "127.0.0.1", 0, close_policy="peer-first timeout=2s", on_close=reports.append
        )
        async with server:
            client = Client(expect=len(RESPONSE), after="close")
            run_client = asyncio.ensure_future(client.run(address(server)))
            await wait_for(lambda: tasks, 5, "the handler")
            await asyncio.to_thread(client.got_response.wait, 5)
            tasks[0].cancel()
            peer = await run_client
            await wait_for(lambda: reports, 5, "the report")
            await wait_for(lambda: tasks[0].done(), 5, "the handler task")
        assert tasks[0].cancelled()
        assert sha256(peer.data) == sha256(RESPONSE)
        assert reports[0].trigger == "handler-cancelled"
        assert reports[0].peer_closed_first
        assert reports[0].state is TcpState.CLOSED

    run(loop_name, main, expected_errors=(CANCELLED_CALLBACK_BUG,))


def test_client_disappears_mid_drain(loop_name: str) -> None:
    """The client sent a body, our answer is large, and the client vanishes (RST)
    while we drain: outcome reset, quickly, no exception anywhere."""
    big = payload(2 << 20, seed=12)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(big)

    async def main() -> None:
        reports: list[CloseReport] = []
        server = await tcpclose.aio.start_server(
            handle,
            "127.0.0.1",
            0,
            close_policy="graceful idle_timeout=5s linger_time=10s",
            on_close=reports.append,
        )
        async with server:
            body = payload(1 << 20, seed=13)
            # Reads a little, then resets the connection.
            client = Client(body=body, expect=100_000, after="reset")
            client.after = "close"
            started = time.monotonic()
            await asyncio.to_thread(_read_then_reset, client, address(server))
            await wait_for(lambda: reports, 5, "the report")
            took = time.monotonic() - started
        report = reports[0]
        assert report.outcome is Outcome.RESET
        assert report.error in RESET_ERRORS
        assert took < 2

    run(loop_name, main)


def _read_then_reset(client: Client, addr: tuple[str, int]) -> None:
    from tests._aio_support import connect, set_linger_zero

    with connect(addr) as sock:
        sock.sendall(client.request + client.body)
        got = 0
        while got < client.expect:
            chunk = sock.recv(65536)
            assert chunk
            got += len(chunk)
        set_linger_zero(sock)


@pytest.mark.parametrize(
    "policy", ["graceful idle_timeout=300ms", "peer-first timeout=300ms fallback=abort"]
)
def test_server_shutdown_with_100_open_connections(loop_name: str, policy: str) -> None:
    """server.close() + wait_closed() with 100 open connections, half of them with
    clients that close when they see our FIN and half with silent ones: every
    connection is closed with the policy, within its bound; wait_closed returns then;
    no task, fd or pending-task message is left."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"ok\n")
        await reader.read()  # until the client goes or the server shuts down

    async def main() -> None:
        reports: list[CloseReport] = []
        server = await tcpclose.aio.start_server(
            handle, "127.0.0.1", 0, close_policy=policy, on_close=reports.append
        )
        addr = address(server)
        release = asyncio.Event()
        ready = 0

        async def client(cooperating: bool) -> None:
            nonlocal ready
            reader, writer = await asyncio.open_connection(*addr)
            writer.write(b"hello\n")
            await reader.readline()
            ready += 1
            try:
                if cooperating:
                    await reader.read()  # our FIN (graceful), or our reset
                else:
                    await release.wait()  # silence
            except ConnectionError:
                pass
            finally:
                writer.close()
                try:
                    await writer.wait_closed()
                except ConnectionError:
                    pass

        clients = [asyncio.ensure_future(client(i % 2 == 0)) for i in range(100)]
        await wait_for(lambda: ready == 100, 10, "100 open connections")
        assert server.open_connections == 100
        started = time.monotonic()
        server.close()
        await server.wait_closed()
        took = time.monotonic() - started
        assert len(reports) == 100
        assert server.open_connections == 0
        assert took < 0.3 * 1.1 + 0.3, took
        assert all(r.trigger == "server-shutdown" for r in reports)
        assert all(r.duration < 0.3 * 1.1 + 0.1 for r in reports)
        release.set()
        await asyncio.gather(*clients)
        outcomes = {r.outcome for r in reports}
        if policy.startswith("graceful"):
            assert outcomes == {Outcome.PEER_EOF, Outcome.IDLE_TIMEOUT}
            assert sum(r.outcome is Outcome.PEER_EOF for r in reports) == 50
        else:
            assert outcomes == {Outcome.ABORTED}

    run(loop_name, main, timeout=30)


def test_serve_forever_cancelled_closes_with_policy(loop_name: str) -> None:
    """Cancelling serve_forever() closes the server and its connections with the
    policy, and waits for them (asyncio's own would wait for connections that only
    the policy's close ends)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"ok\n")
        await reader.read()

    async def main() -> None:
        reports: list[CloseReport] = []
        server = await tcpclose.aio.start_server(
            handle,
            "127.0.0.1",
            0,
            close_policy="graceful idle_timeout=300ms",
            on_close=reports.append,
            start_serving=False,
        )
        serving = asyncio.ensure_future(server.serve_forever())
        await wait_for(server.is_serving, 5, "serving")
        client = Client(request=b"hi\n", expect=3, after="eof-close")
        run_client = asyncio.ensure_future(client.run(address(server)))
        await asyncio.to_thread(client.got_response.wait, 5)
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await serving
        await run_client
        assert len(reports) == 1
        assert reports[0].trigger == "server-shutdown"
        assert reports[0].outcome is Outcome.PEER_EOF
        assert not server.is_serving()

    run(loop_name, main)


def test_plain_callback_and_writer_close(loop_name: str) -> None:
    """A plain (non-coroutine) callback keeps the connection; writer.close() then
    applies the policy, and writer.wait_closed() waits for it."""
    writers: list[asyncio.StreamWriter] = []

    def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)

    async def main() -> None:
        reports: list[CloseReport] = []
        server = await tcpclose.aio.start_server(
            handle, "127.0.0.1", 0, close_policy="peer-first timeout=2s", on_close=reports.append
        )
        async with server:
            client = Client(request=b"", expect=len(RESPONSE), after="close")
            run_client = asyncio.ensure_future(client.run(address(server)))
            await wait_for(lambda: writers, 5, "the connection")
            writer = writers[0]
            writer.write(RESPONSE)
            writer.close()
            assert writer.is_closing()
            await asyncio.wait_for(writer.wait_closed(), 5)
            await run_client
        assert reports[0].trigger == "close"
        assert reports[0].peer_closed_first

    run(loop_name, main)


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)  # type: ignore[attr-defined]


def test_create_server_shutdown_and_clients(loop_name: str) -> None:
    """create_server with a protocol factory: close_clients() closes the open
    connections with the policy and keeps listening; abort_clients() resets them;
    close() then closes the listener."""

    async def main() -> None:
        reports: list[CloseReport] = []
        server = await tcpclose.aio.create_server(
            Echo,
            "127.0.0.1",
            0,
            close_policy="graceful idle_timeout=300ms",
            on_close=reports.append,
        )
        addr = address(server)
        first = Client(request=b"1\n", expect=2, after="eof-close")
        task = asyncio.ensure_future(first.run(addr))
        await asyncio.to_thread(first.got_response.wait, 5)
        server.close_clients()
        await task
        await wait_for(lambda: reports, 5, "the first report")
        assert reports[0].outcome is Outcome.PEER_EOF
        assert server.is_serving()
        second = Client(request=b"2\n", expect=2, after="hold")
        task = asyncio.ensure_future(second.run(addr))
        await asyncio.to_thread(second.got_response.wait, 5)
        server.abort_clients()
        await wait_for(lambda: len(reports) == 2, 5, "the second report")
        second.release.set()
        peer = await task
        assert reports[1].outcome is Outcome.ABORTED
        assert peer.reset
        server.close()
        await server.wait_closed()
        assert not server.is_serving()

    run(loop_name, main)


def test_uvloop_wait_closed_returns_at_once_ours_waits() -> None:
    """uvloop's Server.wait_closed() returns at once even with connections open; ours
    waits until the policy's closes are over."""
    pytest.importorskip("uvloop")

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"ok\n")
        await reader.read()
        writer.close()

    async def main() -> None:
        plain = await asyncio.start_server(handle, "127.0.0.1", 0)
        client = Client(request=b"x\n", expect=3, after="hold-close")
        task = asyncio.ensure_future(client.run(address(plain)))
        await asyncio.to_thread(client.got_response.wait, 5)
        plain.close()
        await asyncio.wait_for(plain.wait_closed(), 1)  # returns: the connection is open
        client.release.set()
        await task

        reports: list[CloseReport] = []
        server = await tcpclose.aio.start_server(
            handle,
            "127.0.0.1",
            0,
            close_policy="graceful idle_timeout=300ms",
            on_close=reports.append,
        )
        client = Client(request=b"x\n", expect=3, after="hold-close")
        task = asyncio.ensure_future(client.run(address(server)))
        await asyncio.to_thread(client.got_response.wait, 5)
        server.close()
        started = time.monotonic()
        await server.wait_closed()
        assert time.monotonic() - started >= 0.29
        assert reports
        assert reports[0].outcome is Outcome.IDLE_TIMEOUT
        client.release.set()
        await task

    run("uvloop", main)


@pytest.mark.parametrize("policy", ["graceful", "peer-first timeout=2s", "abort", "default"])
@pytest.mark.parametrize("reports", [True, False], ids=["reports-on", "reports-off"])
def test_finished_connections_leave_no_cycles(loop_name: str, policy: str, reports: bool) -> None:
    """Once a connection's close is over, nothing of ours is left in a reference cycle:
    a busy server's closes are freed at once, not by the cyclic garbage collector
    (which cost about 8 µs per connection when the wrapper, its transport and its
    closer referred to each other)."""
    import gc

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"x" * 1000)

    async def main() -> list[str]:
        done: list[CloseReport] = []
        server = await tcpclose.aio.start_server(
            handle,
            "127.0.0.1",
            0,
            close_policy=policy,
            on_close=done.append,
            report=reports,
            backlog=64,
        )
        async with server:
            client = Client(expect=1000, after="close")
            await client.run(address(server))  # warm up: module-level objects made now
            await wait_for(lambda: done, 5, "the first close")
            gc.collect()
            gc.disable()
            gc.set_debug(gc.DEBUG_SAVEALL)
            try:
                for _ in range(20):
                    await Client(expect=1000, after="close").run(address(server))
                await wait_for(lambda: len(done) == 21, 5, "the closes")
                await asyncio.sleep(0)  # the last close's own callbacks
                gc.collect()
                ours = sorted(
                    {
                        type(o).__qualname__
                        for o in gc.garbage
                        if type(o).__module__.startswith("tcpclose")
                    }
                )
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
        assert all(r.mode is not None for r in done)
        return ours

    result: list[str] = []

    async def checked() -> None:
        result.extend(await main())

    run(loop_name, checked)
    assert result == []
