"""Server shutdown with a response in flight (issue 20).

``server.close()`` while a handler still streams its response: every byte arrives and
then the stream ends, or, when the handler does not finish within the policy's bound,
the client sees a reset and the handler learns it. Never a FIN after a cut (to a
close-delimited protocol a FIN says "complete"). On both loops, over TCP and TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

import tcpclose.aio
from tcpclose import CloseReport, Outcome
from tests._aio_support import run, tls, wait_for

pytestmark = pytest.mark.timeout(60)

CHUNK = 64 * 1024
TOTAL = 32 * 1024 * 1024  # 512 chunks


@dataclass
class Reading:
    """A blocking client reading slowly to the end: what it got and how it ended."""

    received: int = 0
    error: str | None = None
    ended: threading.Event = field(default_factory=threading.Event)


def _read_slowly(
    port: int, ctx: ssl.SSLContext | None, reading: Reading, pause_every: int = 8
) -> None:
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    with contextlib.ExitStack() as stack:
        sock: socket.socket = (
            stack.enter_context(
                ctx.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False)
            )
            if ctx is not None
            else stack.enter_context(raw)
        )
        try:
            sock.sendall(b"go\n")
            reads = 0
            while chunk := sock.recv(CHUNK):
                reading.received += len(chunk)
                reads += 1
                if reads % pause_every == 0:
                    time.sleep(0.002)  # pacing a slow reader, not synchronisation
        except (OSError, ssl.SSLError) as exc:
            reading.error = type(exc).__name__
        finally:
            reading.ended.set()


async def _shutdown_mid_response(
    *, tls_on: bool, policy: str, tmp: str, handler_total: int
) -> tuple[Reading, list[BaseException], list[CloseReport], float]:
    certs = tls(tmp) if tls_on else None
    reports: list[CloseReport] = []
    handler_errors: list[BaseException] = []

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        chunk = b"x" * CHUNK
        try:
            for _ in range(handler_total // CHUNK):
                writer.write(chunk)
                await writer.drain()
        except Exception as exc:
            handler_errors.append(exc)

    server = await tcpclose.aio.start_server(
        stream,
        "127.0.0.1",
        0,
        close_policy=policy,
        on_close=reports.append,
        ssl=certs.server if certs else None,
    )
    port = int(server.sockets[0].getsockname()[1])
    reading = Reading()
    client = threading.Thread(
        target=_read_slowly, args=(port, certs.client if certs else None, reading)
    )
    client.start()
    try:
        await wait_for(lambda: reading.received >= 1024 * 1024, 10, "the first MiB")
        started = time.monotonic()
        server.close()
        await server.wait_closed()
        took = time.monotonic() - started
        await asyncio.to_thread(reading.ended.wait, 20)
    finally:
        await asyncio.to_thread(client.join, 20)
    await wait_for(lambda: reports, 5, "the report")
    return reading, handler_errors, reports, took


@pytest.mark.parametrize("tls_on", [False, True], ids=["tcp", "tls"])
def test_shutdown_lets_the_response_finish(loop_name: str, tls_on: bool, tmp_path: Any) -> None:
    """The handler still streams 32 MiB when the server shuts down: the client gets every
    byte, then a clean end of stream; the handler saw no error."""

    async def main() -> None:
        reading, errors, reports, _ = await _shutdown_mid_response(
            tls_on=tls_on, policy="graceful", tmp=str(tmp_path), handler_total=TOTAL
        )
        assert (reading.received, reading.error) == (TOTAL, None)
        assert errors == []
        assert reports[0].trigger == "handler-return"
        assert not reports[0].rst_sent

    run(loop_name, main, timeout=40)


@pytest.mark.parametrize("tls_on", [False, True], ids=["tcp", "tls"])
def test_shutdown_bound_resets_an_unfinished_response(
    loop_name: str, tls_on: bool, tmp_path: Any
) -> None:
    """A handler that would stream far longer than the policy's bound: at the bound the
    connection is reset (the client sees the cut, not a FIN), the handler's next write
    or drain raises, and wait_closed() returns."""

    async def main() -> None:
        reading, errors, reports, took = await _shutdown_mid_response(
            tls_on=tls_on,
            policy="graceful linger_time=500ms",
            tmp=str(tmp_path),
            handler_total=64 * TOTAL,  # 2 GiB: far longer than the bound
        )
        assert reading.received < 64 * TOTAL
        assert reading.error is not None, "a cut stream ended with a clean EOF"
        assert errors, "the handler was not told its writes went nowhere"
        assert isinstance(errors[0], ConnectionError)
        assert reports[0].trigger == "server-shutdown"
        assert reports[0].outcome is Outcome.ABORTED
        assert reports[0].rst_sent
        # (Not before the bound, give or take the timer's clock: uvloop's timers count
        # from libuv's loop time, in milliseconds and read at the start of the loop
        # turn, so one may fire a millisecond before time.monotonic() says; seen:
        # 0.49975 s.)
        assert 0.5 - 0.005 <= took < 2.0, took

    run(loop_name, main, timeout=40)


def test_shutdown_ends_a_stalled_tls_handshake(loop_name: str, tmp_path: Any) -> None:
    """A client that connects to a TLS server and never says hello: server.close() ends
    that connection too (it lived on for the loop's 60 s ssl_handshake_timeout)."""
    certs = tls(str(tmp_path))

    async def main() -> None:
        server = await tcpclose.aio.start_server(
            _never_called, "127.0.0.1", 0, close_policy="graceful", ssl=certs.server
        )
        port = int(server.sockets[0].getsockname()[1])
        stalled = socket.create_connection(("127.0.0.1", port), timeout=10)
        with stalled:
            await wait_for(lambda: server._registry.handshaking, 5, "the accepted connection")
            started = time.monotonic()
            server.close()
            await server.wait_closed()
            stalled.settimeout(3)

            def ended() -> bool:
                try:
                    return stalled.recv(1) == b""
                except ConnectionResetError:
                    return True

            assert await asyncio.to_thread(ended)
            assert time.monotonic() - started < 2

    run(loop_name, main)


async def _never_called(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    raise AssertionError("no handshake, no handler")  # pragma: no cover
