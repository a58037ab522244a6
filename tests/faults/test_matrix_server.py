"""The fault matrix through the drop-in server (issue 9): ``tcpclose.aio.start_server``
in the server namespace, on asyncio's loop and on uvloop, whose handler writes a
response and returns; returning closes the connection with the policy, and the report
arrives through ``on_close``.

Rows: silent peer, peer vanishing mid-drain, peer RST during the drain, a slow reader
whose response waits in our kernel, and a stuck reader whose response still waits in
the transport's own buffer when the bound runs out. Checks as in ``test_matrix.py``;
the bound is measured from the handler's return to ``on_close``.
"""

from __future__ import annotations

import hashlib
import socket

import pytest

from tcpclose import CloseMode, Fallback, Outcome, TcpState
from tests._support import RESET_ERRORS, Peer, recv_exactly, wait_until
from tests.faults._matrix_support import (
    IDLE_S,
    KIB,
    LINGER_S,
    TIMEOUT_S,
    Case,
    ServerRun,
    Streamer,
    bound_of,
    drained,
    read_until_end,
    reset,
    send_queue_empty,
    urandom,
    with_times,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.timeout(60),
    pytest.mark.parametrize("driver", ["asyncio", "uvloop"], indirect=True),
]

RESPONSE = urandom(32 * KIB)


def serve_one(
    case: Case, response: bytes, *, peer_rcvbuf: int | None = None, sndbuf: int | None = None
) -> tuple[ServerRun, socket.socket, tuple[str, int], tuple[str, int]]:
    """A server for one connection, and the peer connected to it: ``(run, peer, here,
    there)`` with ``here`` our end and ``there`` the peer's."""
    listener = case.server.listen()
    if sndbuf is not None:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)  # accepted ones inherit
    here = listener.getsockname()[:2]
    run = ServerRun(case.server, listener, case.policy, case.driver, response)
    peer = case.client.socket()
    case.track(peer)
    if peer_rcvbuf is not None:
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, peer_rcvbuf)
    peer.settimeout(5)
    peer.connect(here)
    peer.settimeout(None)
    there = peer.getsockname()[:2]
    run.peer_connected.set()
    assert run.started.wait(10), "the handler never ran"
    return run, peer, here, there


def test_silent_peer(case: Case) -> None:
    run, peer, here, there = serve_one(case, RESPONSE)
    name = case.policy_name
    if name == "abort":  # (the abort may cut the response: nothing to read first)
        case.close_and_check(run, outcome=Outcome.ABORTED, states={TcpState.CLOSED})
        return
    assert recv_exactly(peer, len(RESPONSE)) == RESPONSE
    if name == "graceful":
        case.close_and_check(
            run, outcome=Outcome.IDLE_TIMEOUT, states={TcpState.FIN_WAIT2}, min_duration=IDLE_S
        )
        case.client.wait_state(there, here, "CLOSE-WAIT")
    elif name == "peer-first/graceful":
        report = case.close_and_check(
            run,
            outcome=Outcome.IDLE_TIMEOUT,
            states={TcpState.FIN_WAIT2},
            min_duration=TIMEOUT_S + IDLE_S,
        )
        assert report.fallback is Fallback.GRACEFUL
    else:  # peer-first with fallback abort, or auto (all of ours is acknowledged)
        report = case.close_and_check(
            run, outcome=Outcome.ABORTED, states={TcpState.CLOSED}, min_duration=TIMEOUT_S
        )
        assert report.fallback is Fallback.ABORT
        assert read_until_end(peer) == (b"", "reset")


def test_peer_vanishes_mid_drain(case: Case) -> None:
    """The peer keeps sending while the close drains, then all its packets are dropped."""
    name = case.policy_name
    run, peer, here, there = serve_one(case, b"")
    if name == "abort":
        case.client.faults.drop_all()  # nothing to drain: the abort does not wait
    else:
        streamer = Streamer(peer, 1 * KIB, 0.005)
        wait_until(drained(case.server, here, there, streamer), message="the drain reading")
        if name == "graceful":
            case.server.wait_state(here, there, "FIN-WAIT-2")
        case.client.faults.drop_all()
        streamer.stop()
    if name == "graceful":
        report = case.close_and_check(
            run, outcome=Outcome.IDLE_TIMEOUT, states={TcpState.FIN_WAIT2}, min_duration=IDLE_S
        )
    elif name == "peer-first/graceful":
        report = case.close_and_check(
            run,
            outcome=Outcome.IDLE_TIMEOUT,
            states={TcpState.FIN_WAIT1},
            min_duration=TIMEOUT_S + IDLE_S,
        )
    elif name in ("peer-first/abort", "peer-first/auto"):
        report = case.close_and_check(
            run, outcome=Outcome.ABORTED, states={TcpState.CLOSED}, min_duration=TIMEOUT_S
        )
    else:
        report = case.close_and_check(run, outcome=Outcome.ABORTED, states={TcpState.CLOSED})
    if name != "abort":
        assert report.drained_bytes > 0


def test_peer_resets_during_drain(case: Case) -> None:
    run, peer, here, there = serve_one(case, RESPONSE)
    name = case.policy_name
    if name == "abort":
        case.close_and_check(run, outcome=Outcome.ABORTED, states={TcpState.CLOSED})
        return
    assert recv_exactly(peer, len(RESPONSE)) == RESPONSE
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
    assert report.mode is (CloseMode.GRACEFUL if name == "graceful" else CloseMode.PEER_FIRST)


def test_slow_reader_response_in_our_kernel(case: Case) -> None:
    """The response fits in our kernel's send buffer (the transport's is empty) but
    not in the peer's window: graceful and auto keep it, the peer reads it all after
    the close; abort discards it and says how much."""
    response = urandom(512 * KIB)
    run, peer, _, _ = serve_one(case, response, peer_rcvbuf=16 * KIB, sndbuf=2 << 20)
    name = case.policy_name
    if name in ("abort", "peer-first/abort"):
        report = case.close_and_check(
            run,
            outcome=Outcome.ABORTED,
            states={TcpState.CLOSED},
            min_duration=0.0 if name == "abort" else TIMEOUT_S,
            warnings_expected=("TC101",),
        )
        assert report.discarded_bytes > 0
        data, how = read_until_end(peer)
        assert how == "reset"
        assert len(data) + report.discarded_bytes >= len(response)
        return
    report = case.close_and_check(
        run,
        outcome=Outcome.IDLE_TIMEOUT,
        states={TcpState.FIN_WAIT1},
        min_duration=IDLE_S if name == "graceful" else TIMEOUT_S + IDLE_S,
    )
    assert report.discarded_bytes == 0
    data, how = read_until_end(peer)
    assert how == "eof"
    assert hashlib.sha256(data).digest() == hashlib.sha256(response).digest()


def test_stuck_reader_response_in_the_transport(case: Case) -> None:
    """The peer reads nothing until the close is over, and the response is too big for
    the kernel's buffers: part of it still waits in the transport's own buffer when
    the bound runs out. The close keeps its bound and drops that part, with a
    DataLossWarning; the report counts exactly what the peer then misses, and the peer
    must learn that its response was cut (RST), not see a clean end of stream."""
    response = urandom(8 << 20)
    run, peer, _, _ = serve_one(case, response, peer_rcvbuf=16 * KIB)
    name = case.policy_name
    result = run.result()
    report = result.get()
    bound = {"graceful": LINGER_S, "abort": 0.05}.get(name, TIMEOUT_S + LINGER_S)
    assert report.duration <= bound * 1.1, report
    assert report.discarded_bytes > 0, report
    assert result.warning_codes == ("TC101",), (result.warning_codes, report)
    if name == "graceful":
        assert report.outcome is Outcome.LINGER_TIME, report  # the flush used it all
    elif name in ("peer-first/graceful", "peer-first/auto"):
        assert report.outcome is Outcome.LINGER_TIME, report  # ... the fallback's flush
        assert report.fallback is Fallback.GRACEFUL, report
    else:
        assert report.outcome is Outcome.ABORTED, report
    assert report.rst_sent, report
    data, how = read_until_end(peer)
    assert response.startswith(data)
    # The peer learns that its response was cut (RST, not a clean end of stream), and
    # the report counts at least what it misses: the transport's buffer and what the
    # kernel still held unacknowledged, both dropped by the reset.
    assert how == "reset", "the peer saw a clean end after a cut response"
    assert len(data) + report.discarded_bytes >= len(response), (len(data), report)


@pytest.mark.usefixtures("needs_tc")
def test_peer_reading_through_a_slow_link(case: Case) -> None:
    """The peer reads all the time, but the link is slow and our kernel's send buffer
    small: most of the response still waits in the transport's buffer when
    peer-first's timeout passes, and getting it out takes longer than the idle
    timeout, less than linger_time. Every keeping policy must deliver all of it."""
    policy = with_times(case.policy, timeout=0.3, idle_timeout=0.2, linger_time=3.0)
    case.policy = policy
    response = urandom(1 << 20)
    slow = case.server.slow_link(rate="8mbit", burst="32kb", latency="50ms")
    run, peer, _, _ = serve_one(case, response, sndbuf=64 * KIB)

    def read_then_close() -> tuple[bytes, str]:
        data, how = read_until_end(peer)
        peer.close()
        return data, how

    reader = Peer(read_then_close)
    name = case.policy_name
    result = run.result()
    report = result.get()
    data, how = reader.result()
    slow.remove()
    if name in ("abort", "peer-first/abort"):
        assert report.outcome is Outcome.ABORTED, report
        assert how == "reset"
        return
    assert report.duration <= bound_of(policy, report.fallback) * 1.1, report
    assert (len(data), how, report.discarded_bytes) == (len(response), "eof", 0), report
    assert hashlib.sha256(data).digest() == hashlib.sha256(response).digest()
    assert report.outcome in (Outcome.PEER_EOF, Outcome.IDLE_TIMEOUT), report
    assert result.warning_codes == ()
