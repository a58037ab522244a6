"""What only an asyncio application has: the RST trap with a StreamReader's flow
control and a transport's write buffer (issue 6).

The close behaviours every driver shares (cooperating, silent, flooding, trickling
and resetting peers, the RST trap with nothing read, peer-first's fallbacks, abort,
TLS, the report) are in ``tests/test_conformance.py``, which runs them through
``aclose`` on both loops, the loop adapter and ``tcpclose.aio.start_server``. Peers
are real blocking sockets; the kernel is read back with ``tcpclose.lookup``.
"""

from __future__ import annotations

import pytest

from tests._aio_support import AppServer, Client, payload, run, sha256

pytestmark = pytest.mark.timeout(60)

BODY = payload(1 << 20, seed=2)
BIG = payload(4 << 20, seed=3)


async def _rst_trap_once(entry: str, policy: str) -> tuple[bytes, str | None]:
    async with AppServer(entry, policy, BIG) as app:
        # A slow reader: our kernel send queue is full when the app closes.
        client = Client(
            body=BODY, expect=len(BIG), after="close", read_chunk=32 * 1024, read_pause_s=0.001
        )
        peer = await client.run(app.address)
        if entry != "plain":
            await app.report()
    return peer.data, peer.error


@pytest.mark.parametrize("policy", ["graceful", "peer-first timeout=2s"])
def test_rst_trap_through_stream_flow_control(loop_name: str, policy: str) -> None:
    """The client sent a 1 MiB body; the app read one line, so its StreamReader holds
    up to twice its limit and paused reading, and the rest waits in the kernel; the app
    answers 4 MiB (most of it in the transport's buffer) and closes. With plain
    asyncio the unread body makes the close an RST and the client loses part of the
    answer (ECONNRESET); with ``aclose`` it gets all of it."""

    async def main() -> None:
        # Without the library: the client is reset and loses data (retry: it is a race
        # the kernel nearly always loses; three plain attempts make the demo certain).
        lost = 0
        for _ in range(3):
            data, error = await _rst_trap_once("plain", policy)
            if error == "ECONNRESET" and sha256(data) != sha256(BIG):
                lost += 1
                break
        assert lost, "plain asyncio close did not lose data in 3 attempts"
        # With the policy: every byte, no reset.
        data, error = await _rst_trap_once("aclose", policy)
        assert error is None
        assert len(data) == len(BIG)
        assert sha256(data) == sha256(BIG)

    run(loop_name, main)
