"""hypercorn with a close policy: tcpclose.aio.install_policy on its loop.

hypercorn takes no protocol hook: it calls asyncio.start_server. The loop-level
adapter wraps the loop's create_server so that the server hypercorn starts gets the
policy. The ASGI application answers without reading the request body. Exit status
0 when the client got the whole answer and the close drained the body.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any, cast

from hypercorn.asyncio import serve
from hypercorn.config import Config

import tcpclose.aio
import tcpclose.kernel
from tcpclose import CloseReport

ANSWER = hashlib.sha256(b"answer").digest() * (1 << 15)  # 1 MiB
Message = MutableMapping[str, Any]


async def app(
    scope: Message, receive: Callable[[], Awaitable[Message]], send: Callable[[Message], Any]
) -> None:
    if scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    headers = [(b"content-length", str(len(ANSWER)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": ANSWER})


def client(port: int) -> bytes:
    body = b"x" * (256 << 10)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        head = f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        threading.Thread(target=sock.sendall, args=(head.encode() + body,), daemon=True).start()
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
        return data.partition(b"\r\n\r\n")[2]


async def main() -> int:
    reports: list[CloseReport] = []
    with socket.socket() as probe:  # a free port for the example
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = config.errorlog = None
    stop = asyncio.Event()

    loop = asyncio.get_running_loop()
    with tcpclose.aio.install_policy("graceful", loop=loop, on_close=reports.append):
        task = asyncio.create_task(serve(cast(Any, app), config, shutdown_trigger=stop.wait))
        for _ in range(200):  # until it listens
            if any(True for _ in tcpclose.kernel.dump("LISTEN", port=port)):
                break
            await asyncio.sleep(0.01)
        answer = await asyncio.to_thread(client, port)
        while not reports:
            await asyncio.sleep(0.01)
        stop.set()
        await task
    print("client got", len(answer), "bytes, whole:", answer == ANSWER)
    print("server:", reports[0])
    return 0 if answer == ANSWER and not reports[0].rst_sent else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
