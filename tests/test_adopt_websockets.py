"""websockets adopts a close policy through ``serve(create_connection=
tcpclose.websockets.ServerConnection)`` (issue 15, item 4).

What clients see: the handler sends a 2 MiB message and returns while the client is
still sending a 512 KiB message the handler never reads; the client checks the
message's digest (websockets' own close handshake reads what comes in, so it is whole
as it is too; the policy keeps it so). TIME_WAIT placement over 200 connections,
judged by ``ss``: RFC 6455 has the server close TCP first, and the client it is
talking to decides where TIME_WAIT lands, with or without a policy (see the test).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
import shutil
import socket
import threading
from typing import Any

import pytest

import tcpclose.websockets
from tcpclose import CloseReport
from tests._adopt_support import ANSWER, ANSWER_SHA, REQUEST_BODY, time_wait_count, wait_quiet
from tests._aio_support import run, wait_for

websockets_server = pytest.importorskip("websockets.asyncio.server")
websockets_client = pytest.importorskip("websockets.asyncio.client")

pytestmark = [
    pytest.mark.skipif(shutil.which("ss") is None, reason="no ss"),
    pytest.mark.timeout(120),
]

TRIES = 10
CONNECTIONS = 200
_lock = threading.Lock()
REPORTS: list[CloseReport] = []


def _collect(report: CloseReport) -> None:
    with _lock:
        REPORTS.append(report)


class Graceful(tcpclose.websockets.ServerConnection):
    close_policy = "graceful"
    on_close = _collect


class PeerFirst(tcpclose.websockets.ServerConnection):
    close_policy = "peer-first timeout=5s"
    on_close = _collect


async def send_big_and_leave(ws: Any) -> None:
    """Sends the 2 MiB answer and returns without reading what the client sends."""
    await ws.send(ANSWER)


async def close_at_once(ws: Any) -> None:
    await ws.close()


async def whole_messages(create: Any) -> int:
    """``TRIES`` clients, each sending 512 KiB while it reads the 2 MiB message;
    how many got it whole."""
    whole = 0
    async with websockets_server.serve(
        send_big_and_leave, "127.0.0.1", 0, create_connection=create, max_size=None
    ) as server:
        port = server.sockets[0].getsockname()[1]
        for _ in range(TRIES):
            try:
                async with websockets_client.connect(f"ws://127.0.0.1:{port}", max_size=None) as ws:
                    sending = asyncio.ensure_future(ws.send(REQUEST_BODY))
                    message = await ws.recv()
                    whole += hashlib.sha256(message).hexdigest() == ANSWER_SHA
                    sending.cancel()
            except Exception:
                pass
    return whole


@pytest.mark.parametrize(
    "create", [None, Graceful, PeerFirst], ids=["plain", "graceful", "peer-first"]
)
def test_messages_arrive_whole(loop_name: str, create: Any) -> None:
    REPORTS.clear()
    whole = run(loop_name, lambda: whole_messages(create), timeout=60)
    print(f"websockets {getattr(create, 'close_policy', 'plain')} on {loop_name}: {whole}/{TRIES}")
    if create is None:
        return  # (measured: websockets' own close handshake keeps them whole too)
    assert whole == TRIES
    assert len(REPORTS) == TRIES
    assert not any(report.rst_sent for report in REPORTS), REPORTS[:3]


def prompt_client(port: int) -> None:
    """A WebSocket client that opens, sends a close frame, reads the server's close
    frame and closes its socket at once."""
    key = base64.b64encode(os.urandom(16)).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(
            (
                f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
        assert data.startswith(b"HTTP/1.1 101"), data
        rest = data.partition(b"\r\n\r\n")[2]
        mask = os.urandom(4)
        payload = (1000).to_bytes(2, "big")
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        sock.sendall(bytes([0x88, 0x80 | len(payload)]) + mask + masked)
        while len(rest) < 2 or rest[0] != 0x88:
            chunk = sock.recv(4096)
            assert chunk, rest
            rest += chunk


async def echo(ws: Any) -> None:
    async for message in ws:
        await ws.send(message)


async def rfc_client(port: int) -> None:
    """websockets' own client: after the close frames it waits for the server's TCP
    close, as RFC 6455 asks."""
    async with websockets_client.connect(f"ws://127.0.0.1:{port}") as ws:
        await ws.send("hello")
        assert await ws.recv() == "hello"


def test_time_wait_placement(loop_name: str) -> None:
    """200 connections of each client kind. A client that closes its socket as soon as
    it has the server's close frame: TIME_WAIT on the clients, as it is and under
    ``peer-first``. websockets' own client, which waits for the server's TCP close:
    TIME_WAIT on the server as it is, and under ``peer-first`` too (our FIN goes out
    after the grace; ``write_eof()`` is never turned into a reset)."""

    async def count(create: Any, prompt: bool) -> tuple[int, int]:
        handler = close_at_once if prompt else echo
        async with websockets_server.serve(
            handler, "127.0.0.1", 0, create_connection=create
        ) as server:
            port = server.sockets[0].getsockname()[1]
            if prompt:
                for _ in range(CONNECTIONS):
                    await asyncio.to_thread(prompt_client, port)
            else:
                for _ in range(CONNECTIONS // 20):
                    await asyncio.gather(*(rfc_client(port) for _ in range(20)))
            await asyncio.to_thread(wait_quiet, port)
            return time_wait_count(port, side="server"), time_wait_count(port, side="clients")

    async def main() -> dict[str, tuple[int, int]]:
        counts = {
            "prompt, plain": await count(None, prompt=True),
            "prompt, peer-first": await count(PeerFirst, prompt=True),
            "RFC client, plain": await count(None, prompt=False),
            "RFC client, peer-first": await count(PeerFirst, prompt=False),
        }
        await wait_for(lambda: len(REPORTS) >= 2 * CONNECTIONS, 10, "the reports")
        return counts

    REPORTS.clear()
    counts = run(loop_name, main, timeout=90)
    print(f"websockets on {loop_name}, TIME_WAIT (server, clients): {counts}")
    # (As it is, the server's FIN now and then beats the prompt client's: 0 to 1 of 200.)
    assert counts["prompt, plain"][1] >= CONNECTIONS * 0.9, counts
    assert counts["prompt, peer-first"] == (0, CONNECTIONS), counts
    for kind in ("RFC client, plain", "RFC client, peer-first"):
        assert counts[kind][0] >= CONNECTIONS * 0.9, counts
    assert not any(report.rst_sent for report in REPORTS), REPORTS[:3]
