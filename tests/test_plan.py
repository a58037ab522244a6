"""The sans-I/O close plan: every mode and every way a close can end, without sockets."""

from __future__ import annotations

import doctest

import pytest
from hypothesis import given
from hypothesis import strategies as st

import tcpclose._plan as plan_module
from tcpclose import CloseMode, ClosePolicy, Fallback
from tcpclose._plan import (
    TRANSITIONS,
    Close,
    ClosePlan,
    Event,
    Finished,
    Flush,
    MeasureUnacked,
    Outcome,
    Phase,
    PlanResult,
    PlanStateError,
    Receive,
    SetLingerZero,
    ShutdownWrite,
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
    assert plan.next_action() == Receive(deadline=10.0, idle_timeout=2.0, max_bytes=100)
    plan.feed(Event.DATA, 1.0, nbytes=40)
    assert plan.next_action() == Receive(deadline=10.0, idle_timeout=2.0, max_bytes=60)


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
    plan = ClosePlan(ClosePolicy.parse("graceful linger_time=1s"), 0.0)
    assert plan.next_action() == Flush(deadline=1.0)
    plan.feed(Event.TIMEOUT, 1.0)
    result = finish(plan, 1.0)
    assert result.outcome is Outcome.LINGER_TIME
    assert not result.fin_sent


def test_peer_first_cooperating_peer() -> None:
    plan = ClosePlan(ClosePolicy.parse("peer-first timeout=5s"), 0.0)
    assert plan.next_action() == Flush(deadline=5.0)
    plan.feed(Event.FLUSHED, 0.0)
    assert plan.next_action() == Receive(deadline=5.0, idle_timeout=None, max_bytes=1 << 20)
    plan.feed(Event.PEER_EOF, 0.3)
    result = finish(plan, 0.3)
    assert result.outcome is Outcome.PEER_EOF
    assert result.mode_applied is CloseMode.PEER_FIRST
    assert result.peer_closed_first
    assert not result.fin_sent
    assert result.fallback is None


def test_peer_first_silence_is_not_a_reason_to_stop() -> None:
    plan = ClosePlan(ClosePolicy.parse("peer-first timeout=5s idle_timeout=1s"), 0.0)
    plan.feed(Event.FLUSHED, 0.0)
    action = plan.next_action()
    assert isinstance(action, Receive)
    assert action.idle_timeout is None


def test_peer_first_fallback_graceful() -> None:
    plan = ClosePlan(ClosePolicy.parse("peer-first timeout=2s fallback=graceful linger_time=3s"), 0)
    plan.feed(Event.FLUSHED, 0.0)
    plan.feed(Event.TIMEOUT, 2.0)
    assert plan.next_action() == Flush(deadline=5.0)  # a whole graceful close: writes first
    plan.feed(Event.FLUSHED, 2.0)
    assert plan.next_action() == ShutdownWrite()
    plan.feed(Event.DONE, 2.0)
    assert plan.next_action() == Receive(deadline=5.0, idle_timeout=5.0, max_bytes=1 << 20)
    plan.feed(Event.PEER_EOF, 2.1)
    result = finish(plan, 2.1)
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
    plan.feed(Event.TIMEOUT, 31.0)  # ... and so did the graceful one: no FIN, close
    assert plan.next_action() == Close()
    result = finish(plan, 31.0)
    assert result.outcome is Outcome.LINGER_TIME
    assert result.fallback is Fallback.GRACEFUL
    assert not result.fin_sent


def test_peer_first_fallback_abort() -> None:
    plan = ClosePlan(ClosePolicy.parse("peer-first timeout=2s fallback=abort"), 0.0)
    plan.feed(Event.FLUSHED, 0.0)
    plan.feed(Event.TIMEOUT, 2.0)
    assert plan.next_action() == SetLingerZero()
    result = finish(plan, 2.0)
    assert result.outcome is Outcome.ABORTED
    assert result.mode_applied is CloseMode.ABORT
    assert result.fallback is Fallback.ABORT
    assert result.linger_zero


@pytest.mark.parametrize(
    ("measured", "mode", "first"),
    [
        (Event.UNACKED_NONE, CloseMode.ABORT, SetLingerZero()),
        (Event.UNACKED_SOME, CloseMode.GRACEFUL, Flush(deadline=1.0 + 30.0)),
        (Event.ERROR, CloseMode.GRACEFUL, Flush(deadline=1.0 + 30.0)),
    ],
)
def test_peer_first_fallback_auto(measured: Event, mode: CloseMode, first: object) -> None:
    plan = ClosePlan(ClosePolicy.parse("peer-first timeout=1s fallback=auto"), 0.0)
    plan.feed(Event.FLUSHED, 0.0)
    plan.feed(Event.TIMEOUT, 1.0)
    assert plan.next_action() == MeasureUnacked()
    plan.feed(measured, 1.0)
    assert plan.next_action() == first
    assert plan.next_action() == first


def test_peer_first_flood_spends_budget_then_fallback_closes_at_once() -> None:
    plan = ClosePlan(ClosePolicy.parse("peer-first max_drain_bytes=100 fallback=graceful"), 0.0)
    plan.feed(Event.FLUSHED, 0.0)
    plan.feed(Event.DATA, 0.1, nbytes=100)
    plan.feed(Event.FLUSHED, 0.1)
    assert plan.next_action() == ShutdownWrite()
    plan.feed(Event.DONE, 0.1)
    result = finish(plan, 0.1)
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
    if plan.next_action() == ShutdownWrite():
        plan.feed(Event.DONE, 0.0)  # graceful sends its FIN after the peer's
    plan.feed(Event.PEER_EOF, 0.0)
    assert finish(plan, 0.0).peer_closed_first


def test_unexpected_event_is_a_driver_bug() -> None:
    plan = ClosePlan(ClosePolicy.parse("graceful"), 0.0)
    with pytest.raises(PlanStateError, match="not expected in phase flush"):
        plan.feed(Event.PEER_EOF, 0.0)
    with pytest.raises(PlanStateError, match="negative"):
        graceful_to_drain().feed(Event.DATA, 0.0, nbytes=-1)


def test_every_phase_but_done_is_left_by_the_table() -> None:
    sources = {phase for phase, _ in TRANSITIONS}
    assert sources == set(Phase) - {Phase.DONE}


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
        "abort",
        "default",
    ]
)


@given(_policies, _peer_events, st.booleans())
def test_every_close_ends_within_bounds(
    text: str, events: list[tuple[Event, float, int]], unacked: bool
) -> None:
    policy = ClosePolicy.parse(text)
    plan = ClosePlan(policy, 0.0)
    now = 0.0
    feed = iter(events)
    for _ in range(1000):
        action = plan.next_action()
        if isinstance(action, Finished):
            break
        if isinstance(action, Receive):
            step = next(feed, None)
            if step is None:
                # The peer is silent from here on: the driver times out at the bound.
                wait = action.deadline - now
                if action.idle_timeout is not None:
                    wait = min(wait, action.idle_timeout)
                now += max(wait, 0.0)
                plan.feed(Event.TIMEOUT, now)
                continue
            event, delay, nbytes = step
            if action.idle_timeout is not None and event is Event.TIMEOUT:
                delay = min(delay, action.idle_timeout)
            now = min(now + delay, max(action.deadline, now))
            plan.feed(event, now, nbytes=min(nbytes, action.max_bytes))
        elif isinstance(action, Flush):
            plan.feed(Event.FLUSHED, now)
        elif isinstance(action, MeasureUnacked):
            plan.feed(Event.UNACKED_SOME if unacked else Event.UNACKED_NONE, now)
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
