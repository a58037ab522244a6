"""The sans-I/O close plan: every mode and every way a close can end, without sockets."""

from __future__ import annotations

import doctest
import errno

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tcpclose._plan as plan_module
from tcpclose import CloseMode, ClosePolicy, Fallback
from tcpclose._plan import (
    AUTOMATIC,
    EFFECTS,
    TRANSITIONS,
    Close,
    ClosePlan,
    Event,
    Finished,
    Flush,
    MeasureAcked,
    MeasureUnacked,
    Outcome,
    Phase,
    PlanResult,
    PlanStateError,
    Receive,
    SetLingerZero,
    ShutdownWrite,
    error_event,
)


def finish(plan: ClosePlan, now: float) -> PlanResult:
    """Feed DONE to Close (and SetLingerZero) until the plan is finished."""
    while True:
        action = plan.next_action()
        if isinstance(action, Finished):
            return action.result
        assert isinstance(action, Close | SetLingerZero), action
        plan.feed(Event.DONE, now)


def graceful_to_drain(policy: str = "graceful", now: float = 0.0) -> ClosePlan:
    plan = ClosePlan(ClosePolicy.parse(policy), now)
    assert isinstance(plan.next_action(), Flush)
    plan.feed(Event.FLUSHED, now)
    assert plan.next_action() == ShutdownWrite()
    plan.feed(Event.DONE, now)
    assert isinstance(plan.next_action(), Receive)
    return plan


def test_module_docstring_example() -> None:
    failures, _ = doctest.testmod(plan_module)
    assert failures == 0


def test_graceful_peer_eof() -> None:
    plan = graceful_to_drain()
    plan.feed(Event.DATA, 1.0, nbytes=10)
    plan.feed(Event.PEER_EOF, 1.5)
    result = finish(plan, 1.5)
    assert result.outcome is Outcome.PEER_EOF
    assert result.mode_applied is CloseMode.GRACEFUL
    assert result.fin_sent
    assert result.peer_eof
    assert not result.peer_closed_first
    assert result.drained_bytes == 10
    assert result.duration == 1.5


def test_graceful_receive_bounds() -> None:
    plan = graceful_to_drain("graceful idle_timeout=2s linger_time=10s max_drain_bytes=100")
    # The wait ends idle_timeout after our FIN, or after the peer's last data.
    assert plan.next_action() == Receive(until=2.0, deadline=10.0, max_bytes=100)
    plan.feed(Event.DATA, 1.0, nbytes=40)
    assert plan.next_action() == Receive(until=3.0, deadline=10.0, max_bytes=60)
    plan.feed(Event.DATA, 9.5, nbytes=10)
    assert plan.next_action() == Receive(until=10.0, deadline=10.0, max_bytes=50)


@pytest.mark.parametrize(
    ("now", "outcome"), [(3.0, Outcome.IDLE_TIMEOUT), (30.0, Outcome.LINGER_TIME)]
)
def test_graceful_timeout_is_idle_or_linger(now: float, outcome: Outcome) -> None:
    plan = graceful_to_drain()
    plan.feed(Event.TIMEOUT, now)
    assert finish(plan, now).outcome is outcome


def test_graceful_flooding_peer_hits_byte_cap() -> None:
    plan = graceful_to_drain("graceful max_drain_bytes=1000")
    plan.feed(Event.DATA, 0.1, nbytes=600)
    plan.feed(Event.DATA, 0.2, nbytes=400)
    result = finish(plan, 0.2)
    assert result.outcome is Outcome.BYTE_CAP
    assert result.drained_bytes == 1000


def test_graceful_trickling_peer_hits_linger_time() -> None:
    """Issue 9: a peer sending a byte just inside idle_timeout cannot pass linger_time."""
    plan = graceful_to_drain("graceful idle_timeout=1s linger_time=5s")
    now = 0.0
    for _ in range(100):
        now += 0.9
        plan.feed(Event.DATA, now, nbytes=1)
        if plan.phase is not Phase.DRAIN:
            break
    result = finish(plan, now)
    assert result.outcome is Outcome.LINGER_TIME
    assert 5.0 <= result.duration < 5.9


@pytest.mark.parametrize("event", [Event.RESET, Event.ERROR])
def test_graceful_reset_or_error_during_drain(event: Event) -> None:
    plan = graceful_to_drain()
    plan.feed(event, 0.5)
    assert finish(plan, 0.5).outcome.value == event.value


def test_graceful_flush_too_slow() -> None:
    """Issue 16: our bytes still buffered when linger_time is over: the plan resets
    (the peer must see its stream cut, not a FIN that looks like a whole response)."""
    plan = ClosePlan(ClosePolicy.parse("graceful linger_time=1s"), 0.0)
    assert plan.next_action() == Flush(deadline=1.0)
    plan.feed(Event.TIMEOUT, 1.0)
    assert plan.phase is Phase.DROP
    assert plan.next_action() == SetLingerZero()
    plan.feed(Event.DONE, 1.0)
    assert plan.next_action() == Close(drop=True)
    result = finish(plan, 1.0)
    assert result.outcome is Outcome.LINGER_TIME
    assert result.linger_zero
    assert result.mode_applied is CloseMode.GRACEFUL
    assert not result.fin_sent


def test_graceful_flushed_too_late_closes_without_reset() -> None:
    """Flushed, but at the deadline: nothing is left to drop, and no time for a FIN."""
    plan = ClosePlan(ClosePolicy.parse("graceful linger_time=1s"), 0.0)
    plan.feed(Event.FLUSHED, 1.0)
    assert plan.next_action() == Close(drop=False)
    result = finish(plan, 1.0)
    assert (result.outcome, result.linger_zero) == (Outcome.LINGER_TIME, False)


def test_drop_that_fails_still_drops_and_keeps_its_outcome() -> None:
    plan = ClosePlan(ClosePolicy.parse("graceful linger_time=1s"), 0.0)
    plan.feed(Event.TIMEOUT, 1.0)
    plan.feed(Event.ERROR, 1.0)
    assert plan.next_action() == Close(drop=True)
    result = finish(plan, 1.0)
    assert (result.outcome, result.linger_zero) == (Outcome.LINGER_TIME, False)


@pytest.mark.parametrize("policy", ["graceful", "peer-first"])
def test_peer_fin_during_the_flush_is_the_peer_closing_first(policy: str) -> None:
    """Issue 16: the peer's FIN while our buffer drains (the asyncio driver kept a
    flag of its own and rewrote the result): the plan notes it, the flush goes on."""
    plan = ClosePlan(ClosePolicy.parse(policy), 0.0)
    flush = plan.next_action()
    plan.feed(Event.PEER_EOF, 0.1)
    assert plan.next_action() == flush
    plan.feed(Event.FLUSHED, 0.2)
    if plan.next_action() == MeasureAcked():
        plan.feed(Event.ACKED, 0.2, rtt=0.001, since_sent=0.0)
    if plan.next_action() == ShutdownWrite():
        plan.feed(Event.DONE, 0.2)
    plan.feed(Event.PEER_EOF, 0.2)  # the drain reads it at once
    result = finish(plan, 0.2)
    assert (result.outcome, result.peer_eof, result.peer_closed_first) == (
        Outcome.PEER_EOF,
        True,
        True,
    )


def test_peer_fin_before_our_shutdown_is_the_peer_closing_first() -> None:
    plan = ClosePlan(ClosePolicy.parse("graceful"), 0.0)
    plan.feed(Event.FLUSHED, 0.0)
    plan.feed(Event.PEER_EOF, 0.1)  # (over TLS: while waiting to send close_notify)
    plan.feed(Event.DONE, 0.1)
    plan.feed(Event.PEER_EOF, 0.1)
    result = finish(plan, 0.1)
    assert result.fin_sent
    assert result.peer_closed_first


@pytest.mark.parametrize(("deferred", "first"), [(True, True), (False, False)])
def test_passive_end_settles_who_closed_first_when_our_fin_waited(
    deferred: bool, first: bool
) -> None:
    """Issue 16: over TLS our FIN waits for the peer's answer to our close_notify; a
    kernel that shows us as the passive closer means the peer's FIN came first. A
    plain FIN goes at once: a missing TIME_WAIT is something else (a full table)."""
    plan = ClosePlan(ClosePolicy.parse("graceful"), 0.0, fin_deferred=deferred)
    plan.feed(Event.FLUSHED, 0.0)
    plan.feed(Event.DONE, 0.0)
    plan.feed(Event.PEER_EOF, 0.5)
    plan.feed(Event.DONE, 0.5)
    assert not plan.result().peer_closed_first
    plan.feed(Event.PASSIVE_END, 9.0)
    result = plan.result()
    assert result.peer_closed_first is first
    assert result.finished == 0.5  # what the kernel showed later is not the close's time
    assert result.trace[-1] == (Phase.DONE, Event.PASSIVE_END)


@pytest.mark.parametrize(
    ("exc", "event"),
    [
        (ConnectionResetError(errno.ECONNRESET, "reset"), Event.RESET),
        (BrokenPipeError(errno.EPIPE, "pipe"), Event.RESET),
        (OSError(errno.ENOTCONN, "not connected"), Event.RESET),
        (ConnectionAbortedError(errno.ECONNABORTED, "aborted"), Event.RESET),
        (OSError(errno.EBADF, "bad fd"), Event.ERROR),
        (OSError("no errno"), Event.ERROR),
        (RuntimeError("closing"), Event.ERROR),
        (None, Event.ERROR),
    ],
)
def test_error_event_classifies_once(exc: BaseException | None, event: Event) -> None:
    assert error_event(exc) is event


def test_a_reset_where_no_reset_ends_anything_is_an_error() -> None:
    plan = ClosePlan(ClosePolicy.abort(), 0.0)
    plan.feed(Event.RESET, 0.0)  # e.g. setsockopt(SO_LINGER) met ECONNRESET
    result = finish(plan, 0.0)
    assert result.outcome is Outcome.ERROR
    assert (Phase.ABORT, Event.ERROR) in result.trace


def peer_first_to_grace(policy: str, *, since_sent: float = 0.0, now: float = 0.0) -> ClosePlan:
    """A peer-first plan whose data is flushed and acknowledged: in the peer's grace."""
    plan = ClosePlan(ClosePolicy.parse(policy), now)
    assert isinstance(plan.next_action(), Flush)
    plan.feed(Event.FLUSHED, now)
    assert plan.next_action() == MeasureAcked()
    plan.feed(Event.ACKED, now, rtt=0.001, since_sent=since_sent)
    return plan


def test_peer_first_cooperating_peer() -> None:
    plan = ClosePlan(ClosePolicy.parse("peer-first timeout=5s"), 0.0)
    assert plan.next_action() == Flush(deadline=5.0)
    plan.feed(Event.FLUSHED, 0.0)
    assert plan.next_action() == MeasureAcked()
    plan.feed(Event.ACKED, 0.0, rtt=0.0001, since_sent=0.0)
    # The peer's grace runs from the ACK of our last byte.
    assert plan.next_action() == Receive(until=0.05, deadline=0.05, max_bytes=1 << 20)
    plan.feed(Event.PEER_EOF, 0.003)
    result = finish(plan, 0.003)
    assert result.outcome is Outcome.PEER_EOF
    assert result.mode_applied is CloseMode.PEER_FIRST
    assert result.peer_closed_first
    assert not result.fin_sent
    assert result.fallback is None


def test_peer_first_defaults() -> None:
    """Issue 14: the default fallback is our FIN, after a grace of 50 ms."""
    policy = ClosePolicy.parse("peer-first")
    assert (policy.fallback, policy.grace, policy.timeout) == (Fallback.GRACEFUL, 0.05, 5.0)


def test_peer_first_grace_counts_from_our_last_segment() -> None:
    """Issue 14: our last segment left 30 ms before the close, the round trip is 1 ms:
    the peer's FIN was due at -29 ms, give or take 50 ms of grace: 21 ms are left. (Not
    from the peer's ACK: a delayed ACK would add its 40 ms to every wait.)"""
    plan = peer_first_to_grace("peer-first grace=50ms", since_sent=0.03, now=10.0)
    action = plan.next_action()
    assert isinstance(action, Receive)
    assert action.deadline == pytest.approx(10.021)


def test_peer_first_wait_is_at_most_grace() -> None:
    plan = ClosePlan(ClosePolicy.parse("peer-first grace=50ms"), 0.0)
    plan.feed(Event.FLUSHED, 0.0)
    plan.feed(Event.ACKED, 0.0, rtt=0.2, since_sent=0.0)
    assert plan.next_action() == Receive(until=0.05, deadline=0.05, max_bytes=1 << 20)


def test_peer_first_slow_reader_waits_for_the_ack_then_grace() -> None:
    """Issue 14: the wait for the peer's FIN starts once our bytes are acknowledged;
    until then the plan looks at the kernel again about every RTT, bounded by timeout."""
    plan = ClosePlan(ClosePolicy.parse("peer-first timeout=5s grace=100ms"), 0.0)
    plan.feed(Event.FLUSHED, 0.0)
    plan.feed(Event.UNACKED_SOME, 0.0, rtt=0.02, since_sent=0.0)
    assert plan.phase is Phase.AWAIT_ACK
    assert plan.next_action() == Receive(until=0.02, deadline=0.02, max_bytes=1 << 20)
    plan.feed(Event.DATA, 0.01, nbytes=10)  # the peer may talk meanwhile
    assert plan.phase is Phase.AWAIT_ACK
    plan.feed(Event.TIMEOUT, 0.02)
    assert plan.next_action() == MeasureAcked()
    plan.feed(Event.UNACKED_SOME, 0.02, rtt=1.0, since_sent=0.0)  # capped at 50 ms
    left = (1 << 20) - 10
    assert plan.next_action() == Receive(until=0.07, deadline=0.07, max_bytes=left)
    plan.feed(Event.TIMEOUT, 0.07)
    plan.feed(Event.ACKED, 3.0, rtt=0.02, since_sent=0.0)
    assert plan.next_action() == Receive(until=3.1, deadline=3.1, max_bytes=left)
    plan.feed(Event.TIMEOUT, 3.1)
    assert plan.next_action() == Flush(deadline=33.1)  # the graceful fallback
    assert [event for _, event in plan.result().trace].count(Event.RECHECK) == 2


def test_peer_first_slow_reader_bounded_by_timeout() -> None:
    plan = ClosePlan(ClosePolicy.parse("peer-first timeout=1s"), 0.0)
    plan.feed(Event.FLUSHED, 0.0)
    plan.feed(Event.UNACKED_SOME, 0.0, rtt=0.05, since_sent=0.0)
    plan.feed(Event.TIMEOUT, 1.0)
    assert plan.next_action() == Flush(deadline=31.0)
    assert plan.result().fallback is Fallback.GRACEFUL


def test_peer_first_idle_connection_is_not_waited_on() -> None:
    """Issue 14: keep-alive expiry, server shutdown: the peer's last ACK is older than
    its grace, so no FIN is waited for; the fallback runs at once."""
    plan = ClosePlan(ClosePolicy.parse("peer-first"), 0.0)
    plan.feed(Event.FLUSHED, 0.0)
    plan.feed(Event.ACKED, 0.0, rtt=0.0001, since_sent=5.0)
    assert plan.next_action() == Flush(deadline=30.0)
    plan.feed(Event.FLUSHED, 0.0)
    assert plan.next_action() == ShutdownWrite()
    assert (Phase.CHECK_ACKED, Event.IDLE) in plan.result().trace


def test_peer_first_recent_data_from_the_peer_is_not_idle() -> None:
    """Issue 14, client side: our request left 2 s ago, the server's response arrived
    just now; the server's FIN may follow it: the grace counts from its data."""
    plan = ClosePlan(ClosePolicy.parse("peer-first grace=50ms"), 0.0)
    plan.feed(Event.FLUSHED, 0.0)
    plan.feed(Event.ACKED, 0.0, rtt=0.001, since_sent=2.0, since_recv=0.01)
    assert plan.next_action() == Receive(until=0.04, deadline=0.04, max_bytes=1 << 20)
    # nothing sent or received for a while: idle
    plan = ClosePlan(ClosePolicy.parse("peer-first grace=50ms"), 0.0)
    plan.feed(Event.FLUSHED, 0.0)
    plan.feed(Event.ACKED, 0.0, rtt=0.001, since_sent=2.0, since_recv=0.5)
    assert plan.next_action() == Flush(deadline=30.0)


def test_peer_first_kernel_cannot_tell_grace_from_now() -> None:
    plan = ClosePlan(ClosePolicy.parse("peer-first grace=20ms"), 0.0)
    plan.feed(Event.FLUSHED, 1.0)
    plan.feed(Event.ERROR, 1.0)
    assert plan.next_action() == Receive(until=1.02, deadline=1.02, max_bytes=1 << 20)


def test_peer_first_silence_is_not_a_reason_to_stop() -> None:
    plan = peer_first_to_grace("peer-first timeout=5s idle_timeout=1s")
    action = plan.next_action()
    assert isinstance(action, Receive)
    assert action.until == action.deadline == pytest.approx(0.05)  # the grace, not idle


def test_peer_first_fallback_graceful() -> None:
    plan = peer_first_to_grace("peer-first timeout=2s fallback=graceful linger_time=3s")
    plan.feed(Event.TIMEOUT, 0.05)
    assert plan.next_action() == Flush(deadline=3.05)  # a whole graceful close: writes first
    plan.feed(Event.FLUSHED, 0.05)
    assert plan.next_action() == ShutdownWrite()
    plan.feed(Event.DONE, 0.05)
    assert plan.next_action() == Receive(until=3.05, deadline=3.05, max_bytes=1 << 20)
    plan.feed(Event.PEER_EOF, 0.1)
    result = finish(plan, 0.1)
    assert result.mode_applied is CloseMode.GRACEFUL
    assert result.fallback is Fallback.GRACEFUL
    assert result.outcome is Outcome.PEER_EOF
    assert not result.peer_closed_first


def test_graceful_fallback_flushes_before_its_fin() -> None:
    """Issue 9 (found by the fault matrix): the graceful fallback skipped the flush, so
    over asyncio the drain's idle timeout ran while the transport still held our data,
    and a peer reading through a slow link lost the end of its response."""
    plan = ClosePlan(ClosePolicy.parse("peer-first timeout=1s fallback=graceful"), 0.0)
    plan.feed(Event.TIMEOUT, 1.0)  # the flush without FIN ran out of time
    assert plan.next_action() == Flush(deadline=31.0)
    plan.feed(Event.TIMEOUT, 31.0)  # ... and so did the graceful one: no FIN, a reset
    assert plan.next_action() == SetLingerZero()
    result = finish(plan, 31.0)
    assert result.outcome is Outcome.LINGER_TIME
    assert result.fallback is Fallback.GRACEFUL
    assert result.linger_zero
    assert not result.fin_sent


def test_peer_first_fallback_abort() -> None:
    plan = peer_first_to_grace("peer-first timeout=2s fallback=abort")
    plan.feed(Event.TIMEOUT, 0.05)
    assert plan.next_action() == SetLingerZero()
    result = finish(plan, 0.05)
    assert result.outcome is Outcome.ABORTED
    assert result.mode_applied is CloseMode.ABORT
    assert result.fallback is Fallback.ABORT
    assert result.linger_zero


@pytest.mark.parametrize("fallback", ["abort", "auto"])
def test_half_close_always_falls_back_to_our_fin(fallback: str) -> None:
    """Issue 14: write_eof() under peer-first: grace, then our FIN (RFC 6455 servers
    half-close and wait for the client, which waits for our TCP close)."""
    plan = ClosePlan(ClosePolicy.parse(f"peer-first fallback={fallback}"), 0.0, half_close=True)
    plan.feed(Event.FLUSHED, 0.0)
    plan.feed(Event.ACKED, 0.0, rtt=0.0001, since_sent=0.0)
    plan.feed(Event.TIMEOUT, 0.05)
    assert plan.next_action() == Flush(deadline=30.05)
    plan.feed(Event.FLUSHED, 0.05)
    assert plan.next_action() == ShutdownWrite()


@pytest.mark.parametrize(
    ("measured", "mode", "first"),
    [
        (Event.UNACKED_NONE, CloseMode.ABORT, SetLingerZero()),
        (Event.UNACKED_SOME, CloseMode.GRACEFUL, Flush(deadline=1.0 + 30.0)),
        (Event.ERROR, CloseMode.GRACEFUL, Flush(deadline=1.0 + 30.0)),
    ],
)
def test_peer_first_fallback_auto(measured: Event, mode: CloseMode, first: object) -> None:
    plan = ClosePlan(ClosePolicy.parse("peer-first timeout=1s grace=1s fallback=auto"), 0.0)
    plan.feed(Event.FLUSHED, 0.0)
    plan.feed(Event.ACKED, 0.0, rtt=0.0001, since_sent=0.0)
    plan.feed(Event.TIMEOUT, 1.0)
    assert plan.next_action() == MeasureUnacked()
    plan.feed(measured, 1.0)
    assert plan.next_action() == first
    assert plan.next_action() == first


def test_peer_first_flood_spends_budget_then_fallback_closes_at_once() -> None:
    plan = peer_first_to_grace("peer-first max_drain_bytes=100 fallback=graceful")
    plan.feed(Event.DATA, 0.01, nbytes=100)
    plan.feed(Event.FLUSHED, 0.01)
    assert plan.next_action() == ShutdownWrite()
    plan.feed(Event.DONE, 0.01)
    result = finish(plan, 0.01)
    assert result.outcome is Outcome.BYTE_CAP
    assert result.drained_bytes == 100
    assert result.fin_sent


def test_peer_first_flushed_after_deadline_falls_back() -> None:
    plan = ClosePlan(ClosePolicy.parse("peer-first timeout=1s fallback=abort"), 0.0)
    plan.feed(Event.FLUSHED, 1.5)
    assert plan.next_action() == SetLingerZero()


def test_abort_and_default() -> None:
    plan = ClosePlan(ClosePolicy.abort(), 0.0)
    assert plan.next_action() == SetLingerZero()
    result = finish(plan, 0.0)
    assert (result.outcome, result.linger_zero) == (Outcome.ABORTED, True)

    plan = ClosePlan(ClosePolicy.parse("default"), 0.0)
    assert plan.next_action() == Close()
    result = finish(plan, 0.0)
    assert (result.outcome, result.linger_zero, result.fin_sent) == (Outcome.CLOSED, False, False)


@pytest.mark.parametrize("policy", ["peer-first", "graceful"])
def test_known_peer_eof_before_start(policy: str) -> None:
    plan = ClosePlan(ClosePolicy.parse(policy), 0.0, peer_eof=True)
    plan.feed(Event.FLUSHED, 0.0)
    if plan.next_action() == MeasureAcked():
        plan.feed(Event.ACKED, 0.0, rtt=0.0001, since_sent=60.0)  # idle, yet the FIN is here
    if plan.next_action() == ShutdownWrite():
        plan.feed(Event.DONE, 0.0)  # graceful sends its FIN after the peer's
    plan.feed(Event.PEER_EOF, 0.0)
    assert finish(plan, 0.0).peer_closed_first


def test_unexpected_event_is_a_driver_bug() -> None:
    plan = ClosePlan(ClosePolicy.parse("graceful"), 0.0)
    with pytest.raises(PlanStateError, match="not expected in phase flush"):
        plan.feed(Event.DONE, 0.0)
    with pytest.raises(PlanStateError, match="negative"):
        graceful_to_drain().feed(Event.DATA, 0.0, nbytes=-1)


def test_every_phase_is_in_the_table() -> None:
    sources = {phase for phase, _ in TRANSITIONS}
    assert sources == set(Phase)
    # ... and left by it, but the end (where only what the kernel shows is noted)
    assert {phase for (phase, _), target in TRANSITIONS.items() if target is not phase} == (
        set(Phase) - {Phase.DONE}
    )


def test_effects_and_automatic_moves_are_about_transitions_of_the_table() -> None:
    assert set(EFFECTS) <= set(TRANSITIONS)
    for phase, moves in AUTOMATIC.items():
        for _condition, event in moves:
            assert (phase, event) in TRANSITIONS
    # Every way to the close says how the close ended, but where the outcome is known.
    for key, target in TRANSITIONS.items():
        if target is Phase.CLOSE and key[0] is not Phase.DROP:
            assert EFFECTS[key].outcome is not None, key


# -- property: every close ends, within its bounds, whatever the peer does -------------------

_peer_events = st.lists(
    st.tuples(
        st.sampled_from([Event.DATA, Event.PEER_EOF, Event.TIMEOUT, Event.RESET, Event.ERROR]),
        st.floats(min_value=0.0, max_value=2.0),
        st.integers(min_value=0, max_value=5000),
    ),
    max_size=200,
)
_policies = st.sampled_from(
    [
        "graceful idle_timeout=1s linger_time=3s max_drain_bytes=10KiB",
        "peer-first timeout=2s fallback=graceful linger_time=3s max_drain_bytes=10KiB",
        "peer-first timeout=2s fallback=abort",
        "peer-first timeout=2s fallback=auto linger_time=3s",
        "peer-first timeout=2s grace=1s fallback=abort",
        "abort",
        "default",
    ]
)


@given(_policies, _peer_events, st.booleans(), st.lists(st.floats(0.0, 3.0), max_size=50))
def test_every_close_ends_within_bounds(
    text: str, events: list[tuple[Event, float, int]], unacked: bool, acks: list[float]
) -> None:
    policy = ClosePolicy.parse(text)
    plan = ClosePlan(policy, 0.0)
    now = 0.0
    feed = iter(events)
    # Each look at the kernel: unacknowledged (negative) or acknowledged that long ago.
    kernel = iter([a - 1.5 for a in acks])
    for _ in range(1000):
        action = plan.next_action()
        if isinstance(action, Finished):
            break
        if isinstance(action, Receive):
            step = next(feed, None)
            if step is None:
                # The peer is silent from here on: the driver times out at the bound.
                now = max(action.until, now)
                plan.feed(Event.TIMEOUT, now)
                continue
            event, delay, nbytes = step
            # Whatever comes, comes before the wait's bound; a timeout, at it.
            bound = max(action.until, now)
            now = bound if event is Event.TIMEOUT else min(now + delay, bound)
            plan.feed(event, now, nbytes=min(nbytes, action.max_bytes))
        elif isinstance(action, Flush):
            plan.feed(Event.FLUSHED, now)
        elif isinstance(action, MeasureUnacked):
            plan.feed(Event.UNACKED_SOME if unacked else Event.UNACKED_NONE, now)
        elif isinstance(action, MeasureAcked):
            since = next(kernel, 0.0)
            event = Event.UNACKED_SOME if since < 0 else Event.ACKED
            plan.feed(event, now, rtt=0.05, since_sent=max(since, 0.0))
        else:
            plan.feed(Event.DONE, now)
    else:
        raise AssertionError("the plan did not finish in 1000 steps")
    result = action.result
    bound = {
        CloseMode.GRACEFUL: policy.linger_time,
        CloseMode.PEER_FIRST: policy.timeout + policy.linger_time,
    }.get(policy.mode, 0.0)
    assert result.duration <= bound + 1e-9
    assert result.drained_bytes <= policy.max_drain_bytes
