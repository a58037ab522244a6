"""``peer-first`` under uvicorn with ``with_policy``: idle keep-alive connections (issue 14).

uvicorn closes an idle keep-alive connection from the server side when its keep-alive
timeout passes, and every idle connection when it shuts down; the client sends nothing
and will not close first. The old rule waited the whole ``timeout`` for a FIN no client
sends, then ``fallback=auto`` reset the idle client; shutdown waited it out too. The new
rule sees in the kernel that the connection is idle (our last segment left long ago)
and sends our FIN at once: the client's pool sees an end of stream.
"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import pytest

import tcpclose.aio
from tcpclose import CloseReport, Fallback
from tests._aio_support import run, wait_for

uvicorn = pytest.importorskip("uvicorn")
h11_impl = pytest.importorskip("uvicorn.protocols.http.h11_impl")

RECOMMENDED = "peer-first timeout=5s grace=50ms fallback=graceful"
#: The old rule, with a 1 s wait instead of 5 s (a grace longer than the timeout
#: leaves the timeout alone to end the wait).
OLD = "peer-first timeout=1s grace=1h fallback=auto"
BODY = b"hello, keep-alive\n"

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    assert scope["type"] == "http"
    headers = [(b"content-length", str(len(BODY)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": BODY})


@asynccontextmanager
async def uvicorn_server(
    policy: str, reports: list[CloseReport], keep_alive: float
) -> AsyncIterator[tuple[int, Any, asyncio.Task[None]]]:
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        http=tcpclose.aio.with_policy(h11_impl.H11Protocol, policy, on_close=reports.append),
        lifespan="off",
        log_config=None,
        access_log=False,
        log_level="warning",
        timeout_keep_alive=keep_alive,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        await wait_for(lambda: server.started or task.done(), 10, "uvicorn to start")
        assert server.started, task.result()
        yield server.servers[0].sockets[0].getsockname()[1], server, task
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def idle_client(port: int, ready: threading.Event | None = None) -> tuple[str, float]:
    """One request, the response, then idle: how the connection ended ("eof" or
    "reset") and how long after the response."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        while not data.endswith(BODY):
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
        answered = time.monotonic()
        if ready is not None:
            ready.set()
        try:
            ending = "eof" if sock.recv(4096) == b"" else "data"
        except ConnectionResetError:
            ending = "reset"
        return ending, time.monotonic() - answered


def test_idle_keep_alive_expiry_ends_with_fin(loop_name: str) -> None:
    keep_alive = 0.3

    async def one(policy: str) -> tuple[str, float, CloseReport]:
        reports: list[CloseReport] = []
        async with uvicorn_server(policy, reports, keep_alive) as (port, _, _):
            ending, after = await asyncio.to_thread(idle_client, port)
            await wait_for(lambda: reports, 10, "the report")
        return ending, after, reports[0]

    async def main() -> None:
        ending, after, report = await one(OLD)
        assert ending == "reset"  # after keep-alive + the whole timeout
        assert after >= keep_alive + 0.99
        ending, after, report = await one(RECOMMENDED)
        assert ending == "eof"
        assert after < keep_alive + 0.1  # nothing waited for: the connection was idle
        assert not report.rst_sent
        assert report.fallback is Fallback.GRACEFUL
        assert report.duration < 0.05  # (the drain included: the client closes at once)

    run(loop_name, main, timeout=60)


@pytest.mark.parametrize("policy", [OLD, RECOMMENDED])
def test_shutdown_with_idle_clients(loop_name: str, policy: str) -> None:
    """uvicorn's shutdown closes every idle connection: with 10 open, the new rule
    ends in under 1 s, each client seeing an end of stream; the old one waits."""
    clients = 10

    async def main() -> None:
        reports: list[CloseReport] = []
        async with uvicorn_server(policy, reports, keep_alive=30) as (port, server, task):
            ready = [threading.Event() for _ in range(clients)]
            results: list[tuple[str, float]] = []
            threads = [
                threading.Thread(target=lambda e=event: results.append(idle_client(port, e)))
                for event in ready
            ]
            for thread in threads:
                thread.start()
            await wait_for(lambda: all(e.is_set() for e in ready), 10, "every client answered")
            started = time.monotonic()
            server.should_exit = True
            await asyncio.wait_for(asyncio.shield(task), 10)
            took = time.monotonic() - started
            await wait_for(lambda: len(results) == clients, 10, "every client's ending")
        if policy == RECOMMENDED:
            assert took < 1.0, took
            assert [ending for ending, _ in results] == ["eof"] * clients
            assert sum(r.rst_sent for r in reports) == 0
        else:
            assert took >= 0.99, took
            assert [ending for ending, _ in results] == ["reset"] * clients

    run(loop_name, main, timeout=60)


async def ws_app(scope: Scope, receive: Receive, send: Send) -> None:
    """A WebSocket echo (uvicorn upgrades the HTTP connection with ``set_protocol``)."""
    assert scope["type"] == "websocket"
    assert (await receive())["type"] == "websocket.connect"
    await send({"type": "websocket.accept"})
    while (message := await receive())["type"] != "websocket.disconnect":
        await send({"type": "websocket.send", "text": message.get("text")})


def test_websocket_upgrade_close(loop_name: str) -> None:
    """uvicorn's WebSocket upgrade: after the close frames uvicorn closes the transport
    and the websockets client waits for the server's FIN. The old rule made every close
    take the whole timeout and end in RST; the new one: the grace, then our FIN."""
    ws_client = pytest.importorskip("websockets.asyncio.client")

    async def closes(policy: str | None, n: int) -> tuple[list[float], list[CloseReport]]:
        reports: list[CloseReport] = []
        http: Any = h11_impl.H11Protocol
        if policy is not None:
            http = tcpclose.aio.with_policy(http, policy, on_close=reports.append)
        config = uvicorn.Config(
            ws_app,
            host="127.0.0.1",
            port=0,
            http=http,
            lifespan="off",
            log_config=None,
            access_log=False,
            log_level="warning",
        )
        server = uvicorn.Server(config)
        task = asyncio.create_task(server.serve())
        took = []
        try:
            await wait_for(lambda: server.started or task.done(), 10, "uvicorn to start")
            port = server.servers[0].sockets[0].getsockname()[1]
            for _ in range(n):
                async with ws_client.connect(f"ws://127.0.0.1:{port}/") as ws:
                    await ws.send("hello")
                    assert await ws.recv() == "hello"
                    started = time.monotonic()
                    await ws.close()
                    took.append(time.monotonic() - started)
            if policy is not None:
                await wait_for(lambda: len(reports) >= n, 10, "the reports")
        finally:
            server.should_exit = True
            await asyncio.wait_for(task, 10)
        return took, reports

    async def main() -> None:
        plain, _ = await closes(None, 3)
        old, reports = await closes(OLD, 1)
        assert old[0] >= 0.99
        assert reports[0].rst_sent
        new, reports = await closes(RECOMMENDED, 3)
        assert max(new) <= max(plain) + 0.05 + 0.05, (new, plain)
        assert all(not r.rst_sent and r.fallback is Fallback.GRACEFUL for r in reports)

    run(loop_name, main, timeout=60)
