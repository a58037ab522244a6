"""aiohttp adopts a close policy through ``tcpclose.aiohttp.TCPSite`` (issue 15, item 4):
the runner keeps its site, and ``runner.cleanup()`` stops it (no second server for the
user to close, as the earlier recipe left).

The RST trap (a 512 KiB body the handler never reads, a 2 MiB answer marked
``force_close()``), judged by curl and a checksumming client: aiohttp reads unread
bodies for its ``lingering_time`` itself, so answers are whole as it is and stay whole.
TIME_WAIT over 200 connections, judged by ``ss``: aiohttp closes after a
``force_close()`` answer, racing the client's FIN; with ``peer-first`` the server
keeps none.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

import tcpclose.aiohttp
from tcpclose import CloseReport, Outcome
from tests._adopt_support import ANSWER, SMALL, time_wait_placement, trap_runs
from tests._aio_support import run, wait_for

web = pytest.importorskip("aiohttp.web")

pytestmark = [
    pytest.mark.skipif(shutil.which("curl") is None, reason="no curl"),
    pytest.mark.skipif(shutil.which("ss") is None, reason="no ss"),
    pytest.mark.timeout(120),
]

TRIES = 10
CONNECTIONS = 200


async def answer(request: Any) -> Any:
    """Answers without reading the request body, and closes the connection after."""
    body = SMALL if request.path == "/small" else ANSWER
    response = web.Response(body=body, content_type="application/octet-stream")
    response.force_close()
    return response


@asynccontextmanager
async def site(policy: str | None, on_close: Any = None) -> AsyncIterator[tuple[int, Any]]:
    """The application on aiohttp's own ``TCPSite`` (``policy`` None) or on
    ``tcpclose.aiohttp.TCPSite``; yields the port and the runner."""
    app = web.Application(client_max_size=1 << 30)
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    if policy is None:
        server_site = web.TCPSite(runner, "127.0.0.1", 0)
    else:
        server_site = tcpclose.aiohttp.TCPSite(
            runner, "127.0.0.1", 0, close_policy=policy, on_close=on_close
        )
    await server_site.start()
    try:
        yield runner.addresses[0][1], runner
    finally:
        await runner.cleanup()
        # aiohttp's lingering read of an unread body (up to lingering_time, 10 s) can
        # outlive cleanup() when the client stopped sending half-way: end it here.
        left = [
            task
            for task in asyncio.all_tasks()
            if getattr(task.get_coro(), "__qualname__", "") == "RequestHandler.start"
        ]
        for task in left:
            task.cancel()
        await asyncio.gather(*left, return_exceptions=True)


def test_plain_aiohttp_in_the_rst_trap(loop_name: str) -> None:
    async def main() -> tuple[int, int, list[str]]:
        async with site(None) as (port, _):
            return await asyncio.to_thread(trap_runs, port, TRIES)

    whole_curl, whole_client, errors = run(loop_name, main, timeout=60)
    print(f"plain aiohttp on {loop_name}: whole {whole_curl}/{TRIES} by curl, {whole_client}")
    # aiohttp discards what is left of the body for lingering_time (10 s) itself.
    assert (whole_curl, whole_client) == (TRIES, TRIES), errors[:3]


@pytest.mark.parametrize("policy", ["graceful", "peer-first timeout=5s"])
def test_tcpsite_with_policy_answers_whole(loop_name: str, policy: str) -> None:
    reports: list[CloseReport] = []

    async def main() -> tuple[int, int, list[str]]:
        async with site(policy, reports.append) as (port, runner):
            assert len(runner.sites) == 1  # the runner owns it: cleanup() stops it
            result = await asyncio.to_thread(trap_runs, port, TRIES)
            await wait_for(lambda: len(reports) >= 2 * TRIES, 10, "every report")
        return result

    whole_curl, whole_client, errors = run(loop_name, main, timeout=60)
    assert (whole_curl, whole_client) == (TRIES, TRIES), errors[:3]
    assert len(reports) == 2 * TRIES
    for report in reports:
        assert report.outcome is Outcome.PEER_EOF, report
        assert not report.rst_sent, report


def test_time_wait_placement(loop_name: str) -> None:
    async def count(policy: str | None) -> tuple[int, int]:
        async with site(policy) as (port, _):
            return await asyncio.to_thread(time_wait_placement, port, CONNECTIONS)

    async def main() -> tuple[tuple[int, int], tuple[int, int]]:
        return await count(None), await count("peer-first timeout=5s")

    plain, peer_first = run(loop_name, main, timeout=90)
    print(f"aiohttp on {loop_name}, TIME_WAIT (server, clients): {plain}, {peer_first}")
    # As it is, aiohttp's close after a small answer races the client's FIN (measured:
    # 0 to 3 of 200 on the server); with larger answers it loses more often
    # (tests/test_aio_aiohttp.py shows the server keeping them with curl).
    assert sum(plain) >= CONNECTIONS * 0.9, plain
    assert peer_first[0] == 0, peer_first
    assert peer_first[1] >= CONNECTIONS * 0.9, peer_first


def test_policy_off_is_aiohttps_own_site(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCPCLOSE_POLICY", "off")

    async def main() -> None:
        app = web.Application()
        runner = web.AppRunner(app)
        await runner.setup()
        try:
            server_site = tcpclose.aiohttp.TCPSite(runner, "127.0.0.1", 0)
            assert server_site._tcpclose_factory is None
            await server_site.start()
        finally:
            await runner.cleanup()

    asyncio.run(main())
