"""``with_policy`` in front of a real aiohttp server, with curl as the client (issue 6).

aiohttp closes a connection itself after a response it marked ``force_close()``: with a
client that reads to the end of the stream (HTTP/1.0 clients, close-delimited bodies)
the TIME_WAIT of every such connection lands on the server. (curl, which closes as soon
as it has Content-Length bytes, races aiohttp's FIN: it keeps most of them even without
a policy, so the baseline below uses a client that waits for the server's FIN.) Its
protocol class uses ``__slots__`` (no instance patching): it adopts a policy through
its protocol factory, ``loop.create_server(with_policy(runner.server, policy), ...)``.
With ``peer-first`` curl, which closes once it has the whole answer, keeps the
TIME_WAIT, and the server's side of the port shows none, as counted by
``tcpclose.kernel.dump``. Run on asyncio's loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import shutil
from typing import Any

import pytest

import tcpclose.aio
from tcpclose import CloseReport, TcpState, kernel
from tcpclose._plan import Outcome
from tests._aio_support import curl, payload, run, sha256, wait_for

web = pytest.importorskip("aiohttp.web")

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")

HTTP_BODY = payload(256 << 10, seed=71)
CONNECTIONS = 5


async def handler(request: Any) -> Any:
    response = web.Response(body=HTTP_BODY)
    response.force_close()  # aiohttp closes the connection after this answer
    return response


Entry = tuple[object, object]


def time_wait_entries(port: int) -> set[Entry]:
    """The 4-tuples in TIME_WAIT on ``port``, either end."""
    return {(s.local, s.peer) for s in kernel.dump(states="TIME_WAIT", port=port)}


def sides(entries: set[Entry], port: int) -> tuple[int, int]:
    """How many of ``entries`` are the server's (local port ``port``), how many the
    clients'."""
    server = sum(1 for local, _ in entries if isinstance(local, tuple) and local[1] == port)
    return server, len(entries) - server


async def read_to_eof(port: int) -> bytes:
    """A client that sends a request and closes only once the server has: it reads to
    the end of the stream, then closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
    answer = await reader.read()  # to EOF: the server's FIN
    writer.close()
    await writer.wait_closed()
    return answer.partition(b"\r\n\r\n")[2]


async def serve_and_count(
    policy: str | None, *, client: str = "curl"
) -> tuple[tuple[int, int], list[CloseReport]]:
    """Serve CONNECTIONS requests of ``client`` (curl, or ``"eof"``: :func:`read_to_eof`)
    with aiohttp (under ``policy``, or aiohttp's own close); return the TIME_WAIT counts
    of the port and the reports."""
    app = web.Application()
    app.router.add_get("/", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    reports: list[CloseReport] = []
    factory: Any = runner.server
    if policy is not None:
        factory = tcpclose.aio.with_policy(runner.server, policy, on_close=reports.append)
    server = await asyncio.get_running_loop().create_server(factory, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    # Left on this port number by an earlier test, if any: not ours.
    earlier = time_wait_entries(port)
    try:
        for _ in range(CONNECTIONS):
            if client == "eof":
                out = await read_to_eof(port)
            else:
                code, out, err = await curl(f"http://127.0.0.1:{port}/")
                assert code == 0, err
            assert sha256(out) == sha256(HTTP_BODY)
        if policy is not None:
            await wait_for(lambda: len(reports) == CONNECTIONS, 10, "every report")
        # Both closes are over once the kernel shows every connection in TIME_WAIT.
        await wait_for(
            lambda: len(time_wait_entries(port) - earlier) >= CONNECTIONS, 10, "TIME_WAIT"
        )
        return sides(time_wait_entries(port) - earlier, port), reports
    finally:
        server.close()
        await server.wait_closed()
        await runner.cleanup()


def test_aiohttp_keeps_time_wait_on_the_server(loop_name: str) -> None:
    """Without a policy: aiohttp closes first, and with a client that waits for its FIN
    the server keeps every TIME_WAIT."""

    async def main() -> None:
        (server_tw, client_tw), _ = await serve_and_count(None, client="eof")
        assert (server_tw, client_tw) == (CONNECTIONS, 0)

    run(loop_name, main, timeout=60)


def test_aiohttp_peer_first_moves_time_wait_to_the_client(loop_name: str) -> None:
    """``peer-first``: curl closes first and keeps every TIME_WAIT; the reports say so."""

    async def main() -> None:
        (server_tw, client_tw), reports = await serve_and_count("peer-first timeout=5s")
        assert server_tw == 0
        assert client_tw == CONNECTIONS
        for report in reports:
            assert report.outcome is Outcome.PEER_EOF, report
            assert report.peer_closed_first, report
            assert not report.rst_sent, report
            assert report.state in (TcpState.LAST_ACK, TcpState.CLOSED), report

    run(loop_name, main, timeout=60)
