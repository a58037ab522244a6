"""The loop-level adapter (issue 15, item 2): hypercorn, which takes no protocol hook
(it calls ``asyncio.start_server``), adopts a policy through
``tcpclose.aio.install_policy``, on asyncio's loop and on uvloop.

The RST trap (a 512 KiB body the application never reads, a 2 MiB ``Connection:
close`` answer) judged by curl and a checksumming client: hypercorn as it is loses
the answers; with the policy installed on its loop every answer is whole. TIME_WAIT
placement over 200 connections with ``peer-first``, judged by ``ss``. And the
adapter's own contract: explicit, reversible, never wrapping a factory twice.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest

import tcpclose.aio
import tcpclose.kernel
from tcpclose import CloseReport, Outcome, PolicyError, TcpState
from tests._adopt_support import (
    ANSWER,
    SMALL,
    checksum_post,
    curl_post,
    get_small,
    time_wait_count,
    wait_quiet,
)
from tests._aio_support import loop_factory, run, wait_for

hypercorn_asyncio = pytest.importorskip("hypercorn.asyncio")
hypercorn_config = pytest.importorskip("hypercorn.config")

pytestmark = [
    pytest.mark.skipif(shutil.which("curl") is None, reason="no curl"),
    pytest.mark.skipif(shutil.which("ss") is None, reason="no ss"),
    pytest.mark.timeout(180),
]

TRIES = 10
CONNECTIONS = 200

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answers without reading the request body, and asks for the close."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = SMALL if scope["path"] == "/small" else ANSWER
    headers = [(b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def free_port() -> int:
    # (The session runs in its own network namespace: nobody takes the port between.)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def listening(port: int) -> bool:
    return any(True for _ in tcpclose.kernel.dump(states="LISTEN", port=port))


@asynccontextmanager
async def hypercorn_server() -> AsyncIterator[int]:
    """hypercorn serving :func:`app` on the running loop, as ``hypercorn.asyncio.serve``
    runs it; yields its port."""
    port = free_port()
    config = hypercorn_config.Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = None
    config.graceful_timeout = 5
    stop = asyncio.Event()
    task = asyncio.create_task(
        hypercorn_asyncio.serve(cast(Any, app), config, shutdown_trigger=stop.wait)
    )
    try:
        await wait_for(lambda: listening(port) or task.done(), 10, "hypercorn to listen")
        assert not task.done(), task.result()
        yield port
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


async def trap(port: int) -> tuple[int, int, list[str]]:
    url = f"http://127.0.0.1:{port}/"
    errors: list[str] = []
    whole_curl = whole_client = 0
    for _ in range(TRIES):
        by_curl = await asyncio.to_thread(curl_post, url)
        whole_curl += by_curl.whole
        if by_curl.error:
            errors.append(f"curl: {by_curl.error} after {by_curl.got} bytes")
        by_client = await asyncio.to_thread(checksum_post, port)
        whole_client += by_client.whole
        if by_client.error:
            errors.append(f"client: {by_client.error} after {by_client.got} bytes")
    return whole_curl, whole_client, errors


def test_plain_hypercorn_loses_answers_in_the_rst_trap(loop_name: str) -> None:
    async def main() -> tuple[int, int, list[str]]:
        async with hypercorn_server() as port:
            return await trap(port)

    whole_curl, whole_client, errors = run(loop_name, main, timeout=120)
    print(
        f"plain hypercorn on {loop_name}: whole {whole_curl}/{TRIES} by curl, "
        f"{whole_client}/{TRIES} by the client"
    )
    assert whole_curl + whole_client < 2 * TRIES, (whole_curl, whole_client, errors[:3])
    assert any("reset" in error.lower() for error in errors), errors[:3]


@pytest.mark.parametrize("policy", ["graceful", "peer-first timeout=5s"])
def test_hypercorn_with_the_policy_installed_on_its_loop(loop_name: str, policy: str) -> None:
    """The route docs/servers.md gives: ``install_policy(..., loop=...)`` before
    ``hypercorn.asyncio.serve``. Every answer whole, no RST."""
    reports: list[CloseReport] = []

    async def main() -> tuple[int, int, list[str]]:
        loop = asyncio.get_running_loop()
        with tcpclose.aio.install_policy(policy, loop=loop, on_close=reports.append):
            async with hypercorn_server() as port:
                result = await trap(port)
                await wait_for(lambda: len(reports) >= 2 * TRIES, 10, "every report")
        assert "create_server" not in vars(loop)  # uninstalled
        return result

    whole_curl, whole_client, errors = run(loop_name, main, timeout=120)
    assert (whole_curl, whole_client) == (TRIES, TRIES), errors[:3]
    assert len(reports) == 2 * TRIES
    for report in reports:
        assert report.outcome is Outcome.PEER_EOF, report
        assert not report.rst_sent, report


def test_hypercorn_time_wait_placement_with_peer_first(loop_name: str) -> None:
    """200 connections, small answers: hypercorn as it is half-closes right after the
    answer, so its FIN races the client's and the server keeps a TIME_WAIT whenever
    it wins (measured: 3 of 200 on asyncio, 9 on uvloop); with ``peer-first``
    installed, none (the client's FIN always comes first)."""

    async def count(policy: str | None) -> tuple[int, int]:
        loop = asyncio.get_running_loop()
        installation = (
            tcpclose.aio.install_policy(policy, loop=loop) if policy is not None else None
        )
        try:
            async with hypercorn_server() as port:
                for _ in range(CONNECTIONS):
                    assert await asyncio.to_thread(get_small, port) == SMALL
                await asyncio.to_thread(wait_quiet, port)
                return (
                    time_wait_count(port, side="server"),
                    time_wait_count(port, side="clients"),
                )
        finally:
            if installation is not None:
                installation.uninstall()

    async def main() -> tuple[tuple[int, int], tuple[int, int]]:
        return await count(None), await count("peer-first timeout=5s")

    plain, peer_first = run(loop_name, main, timeout=150)
    print(
        f"hypercorn on {loop_name}, TIME_WAIT (server, clients): plain {plain}, "
        f"peer-first {peer_first}"
    )
    assert sum(plain) >= CONNECTIONS * 0.9, plain  # each one left somewhere
    assert peer_first[0] == 0, peer_first
    assert peer_first[1] >= CONNECTIONS * 0.9, peer_first


def test_process_wide_installation_reaches_new_loops_and_is_undone(loop_name: str) -> None:
    """Without ``loop=``: the loop classes are patched, so a loop made afterwards (of
    either kind) gives its servers the policy; uninstall puts the methods back."""
    original = asyncio.BaseEventLoop.__dict__["create_server"]
    reports: list[CloseReport] = []

    async def main() -> None:
        async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readexactly(5)
            writer.write(b"world")
            writer.close()

        server = await asyncio.start_server(answer, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]

        def client() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"hello")
                data = b""
                while chunk := sock.recv(100):
                    data += chunk
                return data

        assert await asyncio.to_thread(client) == b"world"
        await wait_for(lambda: reports, 10, "the report")
        server.close()
        await server.wait_closed()

    with tcpclose.aio.install_policy("graceful", on_close=reports.append) as installation:
        assert installation.loop is None
        assert asyncio.BaseEventLoop.__dict__["create_server"] is not original
        run(loop_name, main, timeout=30)
    assert asyncio.BaseEventLoop.__dict__["create_server"] is original
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        assert "create_server" not in uvloop.Loop.__dict__
    (report,) = reports
    assert report.outcome is Outcome.PEER_EOF, report
    assert report.state is TcpState.TIME_WAIT, report  # graceful: our FIN first


def test_installations_undo_in_order_and_never_wrap_twice(loop_name: str) -> None:
    loop = loop_factory(loop_name)()
    try:
        first = tcpclose.aio.install_policy("graceful", loop=loop)
        second = tcpclose.aio.install_policy("abort", loop=loop)
        with pytest.raises(RuntimeError, match="uninstall the later one first"):
            first.uninstall()
        second.uninstall()
        second.uninstall()  # idempotent
        assert not second.installed
        assert first.installed
        first.uninstall()
        assert "create_server" not in vars(loop)
        wrapped = tcpclose.aio.with_policy(asyncio.Protocol, "abort")
        assert first.wrap(wrapped) is wrapped  # already has a policy: left alone
        assert isinstance(first.wrap(asyncio.Protocol), tcpclose.aio.PolicyProtocolFactory)
        assert "graceful" in repr(first)
    finally:
        loop.close()
    with pytest.raises(PolicyError):
        tcpclose.aio.install_policy("gracefull")
    with pytest.raises(TypeError, match="on_close"):
        tcpclose.aio.install_policy("graceful", on_close=1)  # type: ignore[arg-type]
