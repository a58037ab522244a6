"""The close behaviours of the sync driver's issue, on asyncio (issue 6).

Each behaviour runs through the three ways tcpclose.aio applies a policy (``aclose``
on a StreamWriter, ``tcpclose.aio.start_server``, a protocol under ``with_policy``)
and on both event loops (asyncio's default loop and uvloop). Peers are real blocking
sockets; the kernel is read back with ``tcpclose.lookup`` and ``ss``.
"""

from __future__ import annotations

import asyncio
import socket

import pytest

import tcpclose
from tcpclose import CloseMode, DataLossWarning, Fallback, TcpState
from tcpclose._plan import Outcome
from tests._aio_support import (
    ENTRIES,
    AppServer,
    Client,
    payload,
    run,
    sha256,
    wait_for_state,
)
from tests._support import LOOPBACK, RESET_ERRORS, ss_lookup

pytestmark = pytest.mark.timeout(60)

RESPONSE = payload(256 * 1024)


@pytest.mark.parametrize("entry", ENTRIES)
def test_graceful_cooperating_peer_time_wait_here(loop_name: str, entry: str, family: int) -> None:
    """graceful + a peer that reads to the end and closes when it sees our FIN: every
    byte arrives, no RST, and TIME_WAIT is on our side (about 60 s left, as ss shows)."""

    async def main() -> None:
        async with AppServer(entry, "graceful", RESPONSE, host=LOOPBACK[family]) as app:
            client = Client(expect=len(RESPONSE), after="eof-close", family=family)
            port = app.address[1]
            peer = await client.run(app.address)
            report = await app.report()
        assert sha256(peer.data) == sha256(RESPONSE)
        assert peer.error is None
        assert report.outcome is Outcome.PEER_EOF
        assert report.mode is CloseMode.GRACEFUL
        assert report.fin_sent
        assert not report.peer_closed_first
        assert not report.rst_sent
        assert report.state is TcpState.TIME_WAIT
        assert report.kernel_state is not None
        assert report.kernel_state.seconds_left
        assert 55 < report.kernel_state.seconds_left <= 60
        assert report.tcp_info is not None
        local, peer_addr = report.local, report.peer
        assert local is not None
        assert peer_addr is not None
        assert peer.local is not None
        assert peer.eof
        assert (local[1], peer_addr[1]) == (port, peer.local[1])
        entry_ss = ss_lookup(local, peer_addr)
        assert entry_ss is not None
        assert entry_ss.state == "TIME-WAIT"
        assert tcpclose.lookup(local, peer_addr).state is TcpState.TIME_WAIT

    run(loop_name, main)


BODY = payload(1 << 20, seed=2)
BIG = payload(4 << 20, seed=3)


async def _rst_trap_once(entry: str, policy: str) -> tuple[bytes, str | None]:
    async with AppServer(entry, policy, BIG) as app:
        # A slow reader: our kernel send queue is full when the app closes.
        client = Client(
            body=BODY, expect=len(BIG), after="close", read_chunk=32 * 1024, read_pause_s=0.001
        )
        peer = await client.run(app.address)
        if entry not in ("plain",):
            await app.report()
    return peer.data, peer.error


@pytest.mark.parametrize("policy", ["graceful", "peer-first timeout=2s"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_rst_trap(loop_name: str, entry: str, policy: str) -> None:
    """The RST trap: the client sent a body the server never read; the server answers
    4 MiB and closes. With plain asyncio the unread body makes the close an RST and the
    client loses part of the answer (ECONNRESET); with the policy it gets all of it."""

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
        data, error = await _rst_trap_once(entry, policy)
        assert error is None
        assert len(data) == len(BIG)
        assert sha256(data) == sha256(BIG)

    run(loop_name, main)


@pytest.mark.parametrize("entry", ENTRIES)
def test_peer_first_cooperating_no_time_wait_here(loop_name: str, entry: str) -> None:
    """peer-first + a peer that closes after reading: our 4-tuple is CLOSED, the
    peer's is in TIME_WAIT; without the library the server closes first and keeps
    the TIME_WAIT entry itself."""

    async def main() -> None:
        # Without the library: the server closes first and keeps TIME_WAIT.
        async with AppServer("plain", response=RESPONSE) as plain:
            await Client(expect=len(RESPONSE), after="eof-close").run(plain.address)
            await wait_for_state(*plain.addrs[0], (TcpState.TIME_WAIT,))
        # peer-first: at the client.
        async with AppServer(entry, "peer-first timeout=2s", RESPONSE) as app:
            peer = await Client(expect=len(RESPONSE), after="close").run(app.address)
            report = await app.report()
        assert sha256(peer.data) == sha256(RESPONSE)
        assert report.outcome is Outcome.PEER_EOF
        assert report.peer_closed_first
        assert not report.fin_sent
        assert report.state is TcpState.CLOSED
        assert report.local is not None
        assert report.peer is not None
        assert ss_lookup(report.local, report.peer) is None
        assert peer.local is not None
        assert peer.peer is not None
        assert tcpclose.lookup(peer.local, peer.peer).state is TcpState.TIME_WAIT

    run(loop_name, main)


@pytest.mark.parametrize("fallback", ["graceful", "abort", "auto"])
@pytest.mark.parametrize("entry", ENTRIES)
def test_peer_first_silent_peer_falls_back(loop_name: str, entry: str, fallback: str) -> None:
    """peer-first + a peer that never closes first: the fallback starts ``grace``
    after the peer acknowledged our response (+10%; the kernel counts that moment in
    jiffies, up to 10 ms before the close began). graceful leaves TIME_WAIT here,
    abort resets the peer, auto aborts because the peer has acknowledged everything."""
    grace = 0.5

    async def main() -> None:
        policy = f"peer-first grace={grace}s fallback={fallback}"
        async with AppServer(entry, policy, RESPONSE) as app:
            client = Client(expect=len(RESPONSE), after="eof-close")
            peer = await client.run(app.address)
            report = await app.report()
        assert sha256(peer.data) == sha256(RESPONSE)
        assert report.outcome is not Outcome.PEER_EOF or fallback == "graceful"
        if fallback == "graceful":
            # The duration also holds the peer's reaction to our FIN.
            assert grace - 0.01 <= report.duration < grace * 1.1 + 0.15, report.duration
            assert report.fallback is Fallback.GRACEFUL
            assert report.mode is CloseMode.GRACEFUL
            assert peer.eof
            assert peer.error is None
            assert report.state is TcpState.TIME_WAIT
        else:
            # The abort is immediate: the duration is when the fallback started.
            assert grace - 0.01 <= report.duration < grace * 1.1 + 0.01, report.duration
            assert report.fallback is Fallback.ABORT
            assert report.mode is CloseMode.ABORT
            assert report.outcome is Outcome.ABORTED
            assert report.rst_sent
            assert peer.error == "ECONNRESET"
            assert report.state is TcpState.CLOSED
            assert report.discarded_bytes == 0  # the peer had acknowledged it all

    run(loop_name, main)


@pytest.mark.parametrize("entry", ENTRIES)
def test_peer_first_auto_keeps_unacknowledged_data(loop_name: str, entry: str) -> None:
    """fallback=auto with our data still unacknowledged (the peer does not read):
    graceful, not abort: no data is thrown away to save a TIME_WAIT entry."""

    async def main() -> None:
        policy = "peer-first timeout=300ms fallback=auto linger_time=300ms"
        big = payload(8 << 20, seed=4)
        async with AppServer(entry, policy, big) as app:
            client = Client(read=False, after="hold")
            task = asyncio.ensure_future(client.run(app.address))
            report = await app.report()
            client.release.set()
            await task
        assert report.fallback is Fallback.GRACEFUL
        assert report.mode is CloseMode.GRACEFUL
        # The peer never reads: when linger_time is over too, what is left is dropped,
        # counted and warned about.
        assert report.outcome is Outcome.LINGER_TIME
        assert report.discarded_bytes > 0
        assert "TC101" in report.warnings

    with pytest.warns(DataLossWarning, match="TC101"):
        run(loop_name, main)


@pytest.mark.parametrize("entry", ENTRIES)
def test_abort_resets_and_counts_discarded_bytes(loop_name: str, entry: str) -> None:
    """abort: RST (the peer sees ECONNRESET), nothing left here, the unsent bytes
    counted and a DataLossWarning; asyncio's own abort() sends a plain FIN instead."""

    async def main() -> None:
        big = payload(8 << 20, seed=5)
        # Without the library: transport.abort() drops the buffer but the peer sees a
        # clean EOF, and our side is not gone (FIN_WAIT/TIME_WAIT, not CLOSED).
        async with AppServer("plain-abort", response=big) as plain:
            peer = await Client(expect=len(big), after="eof-close").run(plain.address)
            assert peer.error is None
            assert peer.eof
            state = tcpclose.lookup(*plain.addrs[0]).state
            assert state is not TcpState.CLOSED
        # abort: the peer does not read, so its window is full and bytes are unsent.
        async with AppServer(entry, "abort", big) as app:
            client = Client(read=False, after="hold")
            task = asyncio.ensure_future(client.run(app.address))
            report = await app.report()
            client.release.set()
            peer = await task
        assert report.outcome is Outcome.ABORTED
        assert report.rst_sent
        assert 0 < report.discarded_bytes <= len(big)
        assert "TC101" in report.warnings
        assert report.state is TcpState.CLOSED
        assert peer.error == "ECONNRESET"

    with pytest.warns(DataLossWarning, match="TC101"):
        run(loop_name, main)


DRAIN_CASES = {
    "byte-cap": ("graceful max_drain_bytes=256KiB idle_timeout=5s linger_time=5s", "flood"),
    "linger-time": ("graceful linger_time=500ms idle_timeout=5s", "trickle"),
    "idle-timeout": ("graceful idle_timeout=300ms linger_time=5s", "hold"),
}


@pytest.mark.parametrize("bound", list(DRAIN_CASES))
@pytest.mark.parametrize("entry", ENTRIES)
def test_drain_bounds(loop_name: str, entry: str, bound: str) -> None:
    """A peer that keeps sending after our FIN is cut off at max_drain_bytes or
    linger_time, a silent one at idle_timeout; the report names the bound."""
    policy, after = DRAIN_CASES[bound]

    async def main() -> None:
        async with AppServer(entry, policy, RESPONSE) as app:
            client = Client(expect=len(RESPONSE), after=after)
            task = asyncio.ensure_future(client.run(app.address))
            report = await app.report()
            client.release.set()
            await task
        assert report.outcome.value == bound
        if bound == "byte-cap":
            assert report.drained_bytes == 256 * 1024  # the budget, not a byte more
        elif bound == "linger-time":
            assert 0.5 - 0.002 <= report.duration < 0.75
            assert report.drained_bytes > 0
        else:
            assert 0.3 - 0.002 <= report.duration < 0.5
            assert report.drained_bytes == 0

    run(loop_name, main)


@pytest.mark.parametrize("entry", ENTRIES)
def test_reset_during_drain(loop_name: str, entry: str) -> None:
    """The peer answers our FIN with RST: outcome ``reset``, no exception."""

    async def main() -> None:
        async with AppServer(entry, "graceful idle_timeout=5s", RESPONSE) as app:
            await Client(expect=len(RESPONSE), after="reset").run(app.address)
            report = await app.report()
        assert report.outcome is Outcome.RESET
        assert report.error in RESET_ERRORS
        assert report.state is TcpState.CLOSED

    run(loop_name, main)


def test_ipv6_addresses_in_report(loop_name: str) -> None:
    """Reports carry (host, port) for IPv6 too, and the lookup finds the 4-tuple."""
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    from tests._support import has_ipv6_loopback

    if not has_ipv6_loopback():
        pytest.skip("no IPv6 loopback")

    async def main() -> None:
        async with AppServer("aclose", "graceful", RESPONSE, host="::1") as app:
            client = Client(expect=len(RESPONSE), after="eof-close", family=socket.AF_INET6)
            await client.run(app.address)
            report = await app.report()
        assert report.local is not None
        assert report.local[0] == "::1"
        assert report.state is TcpState.TIME_WAIT

    run(loop_name, main)
