"""``with_policy`` in front of a real uvicorn server, with curl as the client (issue 6).

uvicorn closes with a plain ``transport.close()`` right after a ``Connection: close``
response, even when it has not read the request body: it stops reading once 64 KiB of
body wait in its buffer, so the rest stays unread in the kernel and the close sends
RST. curl, posting a body the application never reads, then loses part of the answer
("Connection reset by peer", exit 56). uvicorn adopts a policy without a change to its
code: ``http=with_policy(H11Protocol, policy)`` (uvicorn calls the factory with keyword
arguments only). Run on asyncio's loop and on uvloop.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager
from typing import Any

import pytest

import tcpclose.aio
from tcpclose import CloseReport, TcpState
from tcpclose._plan import Outcome
from tests._aio_support import curl, payload, run, sha256, wait_for

uvicorn = pytest.importorskip("uvicorn")
h11_impl = pytest.importorskip("uvicorn.protocols.http.h11_impl")

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")

#: The answer, and the request body the application never reads (more than uvicorn
#: buffers before it stops reading: 64 KiB).
HTTP_BODY = payload(4 << 20, seed=61)
REQUEST_BODY = payload(256 << 10, seed=62)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


async def app(scope: Scope, receive: Receive, send: Send) -> None:
    """Answer at once, without reading the request body, and ask for the close."""
    assert scope["type"] == "http"
    headers = [(b"content-length", str(len(HTTP_BODY)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": HTTP_BODY})


@asynccontextmanager
async def uvicorn_server(http: Any) -> AsyncIterator[str]:
    """uvicorn serving :func:`app` with protocol class or factory ``http``; yields its
    URL. Stopped the way uvicorn stops on a signal (``should_exit``)."""
    config = uvicorn.Config(
        app,
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
    try:
        await wait_for(lambda: server.started or task.done(), 10, "uvicorn to start")
        assert server.started, task.result()
        port = server.servers[0].sockets[0].getsockname()[1]
        yield f"http://127.0.0.1:{port}/"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 10)


def reports_at_least(reports: list[CloseReport], count: int) -> Callable[[], bool]:
    return lambda: len(reports) >= count


def test_plain_uvicorn_resets_curl(loop_name: str) -> None:
    """Without a policy: curl is reset and gets part of the answer (the race is one
    curl nearly always loses: up to ten tries; three were once not enough under load)."""

    async def main() -> None:
        outcomes = []
        async with uvicorn_server(h11_impl.H11Protocol) as url:
            for _ in range(10):
                code, out, err = await curl(url, body=REQUEST_BODY)
                outcomes.append((code, len(out)))
                if code == 56:
                    assert b"reset" in err.lower(), err
                    assert len(out) < len(HTTP_BODY)
                    return
        raise AssertionError(f"uvicorn's plain close never reset curl: {outcomes}")

    run(loop_name, main, timeout=60)


@pytest.mark.parametrize("policy", ["graceful", "peer-first timeout=5s fallback=auto"])
def test_uvicorn_with_policy_keeps_answers_whole(loop_name: str, policy: str) -> None:
    """The same server and client with ``with_policy``: every answer whole, no RST (what
    uvicorn left unread in the kernel is drained); TIME_WAIT here with graceful, at
    curl with peer-first."""

    async def main() -> None:
        reports: list[CloseReport] = []
        http = tcpclose.aio.with_policy(h11_impl.H11Protocol, policy, on_close=reports.append)
        async with uvicorn_server(http) as url:
            for attempt in range(1, 4):
                code, out, err = await curl(url, body=REQUEST_BODY)
                assert code == 0, err
                assert sha256(out) == sha256(HTTP_BODY)
                await wait_for(reports_at_least(reports, attempt), 10, "the report")
        assert len(reports) == 3
        for report in reports:
            assert report.outcome is Outcome.PEER_EOF, report
            assert not report.rst_sent, report
            assert report.trigger == "close", report  # uvicorn's own transport.close()
            if policy == "graceful":
                assert report.fin_sent, report
                assert report.state is TcpState.TIME_WAIT, report
            else:
                assert report.peer_closed_first, report
                assert report.state in (TcpState.LAST_ACK, TcpState.CLOSED), report

    run(loop_name, main, timeout=60)
