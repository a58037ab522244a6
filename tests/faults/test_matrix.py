"""The fault matrix (issue 9): every policy, through every driver, against peers and
networks that misbehave, across two network namespaces.

Rows (one test function each) by columns (``graceful``, ``peer-first`` with each
fallback, ``abort``) by drivers (the blocking driver, ``aclose()`` on asyncio's loop and
on uvloop). Each cell runs on a fresh pair of hosts and checks the bound, the outcome,
the kernel state (report and ``ss``), the warnings, fds and tasks: see
``tests/faults/_matrix_support.py``. The TLS rows are in ``test_matrix_tls.py``.

The policies use short times (idle 0.2 s, linger 0.6 s, peer-first timeout 0.3 s) so
that the matrix runs in about a minute.
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator

import pytest

from tcpclose import CloseMode, Fallback, Outcome, TcpState
from tests._netns import TwoHosts, nft_unavailable
from tests._support import RESET_ERRORS, Peer, recv_exactly, wait_until
from tests.faults._matrix_support import (
    CAP,
    IDLE_S,
    KIB,
    POLICY_NAMES,
    TIMEOUT_S,
    Case,
    DriverName,
    Streamer,
    case_of,
    drained,
    endpoints,
    fill_send_queue,
    read_until_end,
    reset,
    send_queue_empty,
    urandom,
    with_times,
)

pytestmark = [pytest.mark.netns, pytest.mark.timeout(60)]

RESPONSE = urandom(32 * KIB)


@pytest.fixture(params=POLICY_NAMES)
def case6(
    request: pytest.FixtureRequest, two_hosts: TwoHosts, driver: DriverName
) -> Iterator[Case]:
    """A cell over IPv6 (fd00:203::/64 across the veth)."""
    if not two_hosts.has_ipv6:
        pytest.skip("IPv6 is disabled in the test namespaces")
    with case_of(two_hosts, request.param, driver, socket.AF_INET6) as c:
        yield c


def _answer_and_wait_acked(case: Case, peer: socket.socket, ours: socket.socket) -> None:
    """We send RESPONSE, the peer reads it, and its ACK reaches us (SIOCOUTQ 0), so
    that ``fallback=auto`` sees nothing of ours unacknowledged."""
    ours.sendall(RESPONSE)
    assert recv_exactly(peer, len(RESPONSE)) == RESPONSE
    wait_until(send_queue_empty(case.server, *endpoints(ours)), message="response acknowledged")


# -- silent peer ----------------------------------------------------------------------------------


def test_silent_peer(case: Case) -> None:
    """The peer reads our response, then says nothing and keeps the connection open."""
    silent_peer(case)


def test_silent_peer_ipv6(case6: Case) -> None:
    silent_peer(case6)


def silent_peer(case: Case) -> None:
    peer, ours = case.connect()
    here, there = endpoints(ours)
    _answer_and_wait_acked(case, peer, ours)
    run = case.start_close(ours)
    name = case.policy_name
    if name == "graceful":
        report = case.close_and_check(
            run, outcome=Outcome.IDLE_TIMEOUT, states={TcpState.FIN_WAIT2}, min_duration=IDLE_S
        )
        assert report.fin_sent
        assert not report.rst_sent
        case.client.wait_state(there, here, "CLOSE-WAIT")
    elif name == "peer-first/graceful":
        report = case.close_and_check(
            run,
            outcome=Outcome.IDLE_TIMEOUT,
            states={TcpState.FIN_WAIT2},
            min_duration=TIMEOUT_S + IDLE_S,
        )
        assert report.fallback is Fallback.GRACEFUL
        assert report.mode is CloseMode.GRACEFUL
        case.client.wait_state(there, here, "CLOSE-WAIT")
    elif name in ("peer-first/abort", "peer-first/auto"):
        report = case.close_and_check(
            run, outcome=Outcome.ABORTED, states={TcpState.CLOSED}, min_duration=TIMEOUT_S
        )
        assert report.fallback is Fallback.ABORT
        assert report.discarded_bytes == 0
        assert read_until_end(peer) == (b"", "reset")
    else:
        report = case.close_and_check(run, outcome=Outcome.ABORTED, states={TcpState.CLOSED})
        assert report.discarded_bytes == 0
        assert read_until_end(peer) == (b"", "reset")
    assert not report.peer_eof
    assert report.drained_bytes == 0


def _skip_without_nft() -> None:
    """Skip before the case opens anything: a skip raised half way (by the fault
    fixture) left the case's sockets open, and its fd check failed instead."""
    reason = nft_unavailable()
    if reason is not None:
        pytest.skip(reason)


# -- the peer vanishes mid-drain ------------------------------------------------------------------


@pytest.mark.parametrize("how", ["drop-all", "link-down", "vanish"])
def test_peer_vanishes_mid_drain(case: Case, how: str) -> None:
    """The peer keeps sending while we drain, then disappears: all its packets dropped,
    its link down, or its whole host gone. Nothing it would say can reach us any more."""
    if how == "drop-all":
        _skip_without_nft()
    peer, ours = case.connect()
    here, there = endpoints(ours)
    _answer_and_wait_acked(case, peer, ours)
    streamer = Streamer(peer, 1 * KIB, 0.005)
    name = case.policy_name
    aborting = name == "abort"
    run = None if aborting else case.start_close(ours)
    if not aborting:
        # mid-drain: the close reads what the peer keeps sending ...
        wait_until(drained(case.server, here, there, streamer), message="the drain reading")
    if name == "graceful":
        # ... and our FIN is acknowledged
        case.server.wait_state(here, there, "FIN-WAIT-2")
    t_fault = time.monotonic()
    if how == "drop-all":
        case.client.faults.drop_all()
    elif how == "link-down":
        case.client.link_down()
    else:
        case.hosts.vanish(case.client)
    fault_s = time.monotonic() - t_fault
    if run is None:
        run = case.start_close(ours)
    streamer.stop()
    if name == "graceful":
        report = case.close_and_check(
            run, outcome=Outcome.IDLE_TIMEOUT, states={TcpState.FIN_WAIT2}, min_duration=IDLE_S
        )
    elif name == "peer-first/graceful":
        # the fallback's FIN goes nowhere: never acknowledged
        report = case.close_and_check(
            run,
            outcome=Outcome.IDLE_TIMEOUT,
            states={TcpState.FIN_WAIT1},
            min_duration=TIMEOUT_S + IDLE_S,
        )
        assert report.fallback is Fallback.GRACEFUL
    elif name in ("peer-first/abort", "peer-first/auto"):
        report = case.close_and_check(
            run, outcome=Outcome.ABORTED, states={TcpState.CLOSED}, min_duration=TIMEOUT_S
        )
        assert report.fallback is Fallback.ABORT
    else:
        report = case.close_and_check(run, outcome=Outcome.ABORTED, states={TcpState.CLOSED})
    if not aborting:
        assert report.drained_bytes > 0, report  # it was draining when the peer went
    assert fault_s < IDLE_S, f"the fault took {fault_s:.3f}s to apply"


# -- the peer resets the connection ---------------------------------------------------------------


def test_peer_resets_during_drain(case: Case) -> None:
    """Once the close is under way the peer sends more data, and resets the connection
    as soon as the close has read it."""
    peer, ours = case.connect()
    here, there = endpoints(ours)
    _answer_and_wait_acked(case, peer, ours)
    run = case.start_close(ours)
    name = case.policy_name
    if name == "abort":
        case.close_and_check(run, outcome=Outcome.ABORTED, states={TcpState.CLOSED})
        assert read_until_end(peer)[1] == "reset"
        return
    if name == "graceful":
        case.server.wait_state(here, there, "FIN-WAIT-2")
    peer.sendall(b"x" * (16 * KIB))
    wait_until(send_queue_empty(case.client, there, here), message="the data acknowledged")
    wait_until(drained(case.server, here, there), message="the drain read the data")
    reset(peer)
    report = case.close_and_check(run, outcome=Outcome.RESET, states={TcpState.CLOSED})
    # The sync driver meets the reset first; an event loop may have met it before us.
    assert report.error in ({"ECONNRESET"} if case.driver == "sync" else RESET_ERRORS)
    assert report.drained_bytes == 16 * KIB
    assert report.fallback is None
    assert report.mode is (CloseMode.GRACEFUL if name == "graceful" else CloseMode.PEER_FIRST)
    assert report.duration < TIMEOUT_S


def test_peer_reset_before_the_close(case: Case) -> None:
    """The peer's RST has already arrived when the close starts: no exception, and the
    outcome says reset (abort: aborted, the socket was dead anyway).

    Under asyncio the loop may read the RST first and close the transport itself;
    ``aclose()`` then raises its documented ``ValueError`` ("already closing"). uvloop
    reads at once and always gets there first; asyncio's loop only does on its next
    turn, after ``aclose()`` has begun.
    """
    peer, ours = case.connect()
    here, there = endpoints(ours)
    reset(peer)
    wait_until(lambda: case.server.ss(here, there) is None, message="our socket reset")
    run = case.start_close(ours)
    result = run.result()
    if case.driver == "uvloop":
        assert isinstance(result.error, ValueError), result
        assert "already closing" in str(result.error)
        return
    report = result.get()
    expected = Outcome.ABORTED if case.policy_name == "abort" else Outcome.RESET
    assert report.outcome is expected, report
    assert report.duration < 0.05, report
    assert result.warning_codes == ()


# -- a flooding peer ------------------------------------------------------------------------------


def test_flooding_peer(case: Case) -> None:
    """The peer sends as fast as it can, before and during the close."""
    peer, ours = case.connect()
    here, there = endpoints(ours)
    _answer_and_wait_acked(case, peer, ours)
    flooder = Streamer(peer, 64 * KIB, 0)
    wait_until(lambda: (e := case.server.ss(here, there)) is not None and e.recv_q > 0)
    run = case.start_close(ours)
    name = case.policy_name
    try:
        if name == "graceful":
            report = case.close_and_check(run, outcome=Outcome.BYTE_CAP, states={TcpState.CLOSED})
        elif name == "peer-first/graceful":
            report = case.close_and_check(run, outcome=Outcome.BYTE_CAP, states={TcpState.CLOSED})
            assert report.fallback is Fallback.GRACEFUL
        elif name in ("peer-first/abort", "peer-first/auto"):
            report = case.close_and_check(run, outcome=Outcome.ABORTED, states={TcpState.CLOSED})
            assert report.fallback is Fallback.ABORT
        else:
            report = case.close_and_check(run, outcome=Outcome.ABORTED, states={TcpState.CLOSED})
    finally:
        flooder.stop()
    # with the flood still queued, the close resets: the report says so
    assert report.unread_bytes
    assert report.rst_sent
    if name != "abort":
        assert report.drained_bytes == CAP, report


# -- a slow reader: our data is still queued when we close ----------------------------------------


def test_slow_reader(case: Case) -> None:
    """The peer's receive window is full: our response is still queued in our kernel.
    Graceful (and auto, which sees unacknowledged data) keeps it: the peer reads it all
    after the close returned. Abort throws it away and says how much."""
    peer, ours = case.connect(peer_rcvbuf=16 * KIB)
    here, there = endpoints(ours)
    payload = urandom(8 << 20)
    sent = fill_send_queue(ours, payload)
    wait_until(lambda: (e := case.server.ss(here, there)) is not None and e.send_q > 0)
    name = case.policy_name
    losing = name in ("abort", "peer-first/abort")
    run = case.start_close(ours)
    if losing:
        report = case.close_and_check(
            run,
            outcome=Outcome.ABORTED,
            states={TcpState.CLOSED},
            min_duration=TIMEOUT_S if name != "abort" else 0.0,
            warnings_expected=("TC101",),
        )
        assert report.discarded_bytes > 0
        assert report.warnings == ("TC101",)
        data, how = read_until_end(peer)
        assert how == "reset"
        assert len(data) < sent
        assert len(data) + report.discarded_bytes >= sent
        return
    min_duration = IDLE_S if name == "graceful" else TIMEOUT_S + IDLE_S
    report = case.close_and_check(
        run,
        outcome=Outcome.IDLE_TIMEOUT,
        states={TcpState.FIN_WAIT1},
        min_duration=min_duration,
    )
    assert report.discarded_bytes == 0
    assert report.mode is CloseMode.GRACEFUL
    if name != "graceful":
        assert report.fallback is Fallback.GRACEFUL
    # the kernel still holds our data and delivers it once the peer reads
    data, how = read_until_end(peer)
    assert how == "eof"
    assert hashlib.sha256(data).digest() == hashlib.sha256(payload[:sent]).digest()
    peer.close()
    case.server.wait_state(here, there, "TIME-WAIT")


# -- one lost FIN, one lost final ACK -------------------------------------------------------------

#: Losing a segment costs one retransmission timeout (≥ 200 ms on Linux): these rows
#: wait longer than the others.
_SLOW = {"idle_timeout": 1.0, "linger_time": 2.0, "timeout": 1.0}


def test_peer_fin_lost_once(case: Case) -> None:
    """The peer's first FIN never reaches us; its retransmission does."""
    _skip_without_nft()
    peer, ours = case.connect()
    here, there = endpoints(ours)
    name = case.policy_name
    policy = with_times(case.policy, **_SLOW)
    lost = case.server.faults.drop_first_fin()
    ours.sendall(RESPONSE)
    if name == "graceful":
        # a peer that answers our FIN with its own
        def answer() -> None:
            data, how = read_until_end(peer)
            assert (data, how) == (RESPONSE, "eof")
            peer.close()

    else:
        # a peer that closes first once it has the response
        def answer() -> None:
            assert recv_exactly(peer, len(RESPONSE)) == RESPONSE
            peer.close()

    if name == "abort":
        run = case.start_close(ours, policy)
        case.close_and_check(run, outcome=Outcome.ABORTED, states={TcpState.CLOSED})
        return
    answering = Peer(answer)
    run = case.start_close(ours, policy)
    if name == "graceful":
        report = case.close_and_check(
            run, outcome=Outcome.PEER_EOF, states={TcpState.TIME_WAIT}, min_duration=0.15
        )
        assert not report.peer_closed_first
    else:
        report = case.close_and_check(
            run, outcome=Outcome.PEER_EOF, states={TcpState.LAST_ACK, TcpState.CLOSED}
        )
        assert report.peer_closed_first
        assert report.mode is CloseMode.PEER_FIRST
        assert report.fallback is None
        case.server.wait_state(here, there, None)
        case.client.wait_state(there, here, "TIME-WAIT")
    answering.result()
    assert lost.packets() == 1


def test_final_ack_lost_once(case: Case) -> None:
    """The last ACK of the close is lost once: the side that closed second stays in
    LAST-ACK, retransmits its FIN, and the answer to that ends it."""
    final_ack_lost_once(case)


def test_final_ack_lost_once_ipv6(case6: Case) -> None:
    final_ack_lost_once(case6)


def final_ack_lost_once(case: Case) -> None:
    _skip_without_nft()
    peer, ours = case.connect()
    here, there = endpoints(ours)
    name = case.policy_name
    policy = with_times(case.policy, **_SLOW)
    ours.sendall(RESPONSE)
    if name == "abort":
        run = case.start_close(ours, policy)
        case.close_and_check(run, outcome=Outcome.ABORTED, states={TcpState.CLOSED})
        return
    if name == "graceful":
        # we close first, the peer second: our final ACK is lost at the peer
        lost = case.client.faults.drop_final_ack()

        def answer() -> None:
            data, how = read_until_end(peer)
            assert (data, how) == (RESPONSE, "eof")
            peer.close()

        answering = Peer(answer)
        run = case.start_close(ours, policy)
        report = case.close_and_check(run, outcome=Outcome.PEER_EOF, states={TcpState.TIME_WAIT})
        answering.result()
        wait_until(lambda: lost.packets() == 1, message="our final ACK dropped")
        # the peer sits in LAST-ACK until its FIN, sent again, is answered
        case.client.wait_state(there, here, None)
    else:
        # the peer closes first, we second: its final ACK is lost here
        lost = case.server.faults.drop_final_ack()

        def answer() -> None:
            assert recv_exactly(peer, len(RESPONSE)) == RESPONSE
            wait_until(send_queue_empty(case.server, here, there), message="response acknowledged")
            peer.close()

        answering = Peer(answer)
        run = case.start_close(ours, policy)
        # the peer's ACK of our FIN is dropped: the report must see LAST-ACK
        report = case.close_and_check(run, outcome=Outcome.PEER_EOF, states={TcpState.LAST_ACK})
        answering.result()
        assert report.peer_closed_first
        wait_until(lambda: lost.packets() == 1, message="the peer's final ACK dropped")
        case.server.wait_state(here, there, None)  # our FIN retransmitted, then acknowledged
        case.client.wait_state(there, here, "TIME-WAIT")
    assert lost.packets() == 1
