"""The fast plan (a policy's course, with the interpreter taking over at the first
deviation) against the interpreter: the same actions, the same result, always.

Issue 16: the plan is cheap on the common path, and every path the drivers take gives
the result the full plan gives.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tcpclose import ClosePolicy
from tcpclose._plan import (
    ClosePlan,
    Course,
    Event,
    FastPlan,
    Finished,
    Flush,
    MeasureAcked,
    MeasureUnacked,
    Phase,
    PlanStateError,
    Receive,
    SetLingerZero,
    ShutdownWrite,
    course_of,
    course_result,
    start_plan,
)

POLICIES = [
    "graceful",
    "graceful idle_timeout=1s linger_time=3s max_drain_bytes=10KiB",
    "graceful linger_time=0s",
    "graceful max_drain_bytes=0",
    "peer-first",
    "peer-first timeout=2s fallback=graceful linger_time=3s max_drain_bytes=10KiB",
    "peer-first timeout=2s fallback=abort",
    "peer-first timeout=2s fallback=auto linger_time=3s",
    "peer-first timeout=2s grace=1s fallback=abort",
    "peer-first grace=0s",
    "peer-first timeout=0s",
    "abort",
    "default",
]

#: What a driver may answer to each action (the expected answer first).
ANSWERS: dict[type, list[Event]] = {
    Flush: [Event.FLUSHED, Event.TIMEOUT, Event.PEER_EOF, Event.RESET, Event.ERROR],
    ShutdownWrite: [Event.DONE, Event.PEER_EOF, Event.RESET, Event.ERROR],
    Receive: [Event.PEER_EOF, Event.DATA, Event.TIMEOUT, Event.RESET, Event.ERROR],
    MeasureAcked: [Event.ACKED, Event.UNACKED_SOME, Event.ERROR],
    MeasureUnacked: [Event.UNACKED_NONE, Event.UNACKED_SOME, Event.ERROR],
    SetLingerZero: [Event.DONE, Event.RESET, Event.ERROR],
}
DRIVER_EVENTS = [
    Event.FLUSHED,
    Event.DONE,
    Event.DATA,
    Event.PEER_EOF,
    Event.TIMEOUT,
    Event.RESET,
    Event.ERROR,
    Event.UNACKED_NONE,
    Event.UNACKED_SOME,
    Event.ACKED,
    Event.PASSIVE_END,
    Event.PEER_FIN_FIRST,
]

_times = st.one_of(st.just(0.0), st.floats(0.0, 0.2), st.floats(0.0, 5.0))
_since = st.one_of(st.just(0.0), st.floats(0.0, 3.0), st.just(math.inf))


def _fast(plan: object) -> FastPlan:
    assert isinstance(plan, FastPlan)
    return plan


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(POLICIES),
    st.booleans(),
    st.booleans(),
    st.booleans(),
    st.floats(0.0, 1000.0),
    st.data(),
)
def test_fast_plan_gives_the_interpreters_result(
    text: str,
    peer_eof: bool,
    fin_deferred: bool,
    half_close: bool,
    start: float,
    data: st.DataObject,
) -> None:
    policy = ClosePolicy.parse(text)
    options = {"peer_eof": peer_eof, "half_close": half_close, "fin_deferred": fin_deferred}
    fast = _fast(start_plan(policy, start, **options))  # type: ignore[arg-type]
    full = ClosePlan(policy, start, **options)  # type: ignore[arg-type]
    now = start
    for _ in range(60):
        assert fast.done is full.done
        assert fast.phase is full.phase
        if full.done:
            break
        action = full.next_action()
        assert fast.next_action() == action
        choices = ANSWERS.get(type(action), [Event.DONE, Event.ERROR])
        # Mostly what is expected; any answer at any step; now and then one the
        # phase does not take (both must refuse it alike).
        event = data.draw(
            st.one_of(
                st.sampled_from(choices[:1]),
                st.sampled_from(choices),
                st.sampled_from(DRIVER_EVENTS),
            ),
            label="event",
        )
        now += data.draw(_times, label="delay")
        kwargs: dict[str, float] = {}
        if event is Event.DATA:
            kwargs["nbytes"] = data.draw(st.integers(0, 20000), label="nbytes")
        if event in (Event.ACKED, Event.UNACKED_SOME):
            kwargs["rtt"] = data.draw(st.floats(0.0, 0.3), label="rtt")
            kwargs["since_sent"] = data.draw(_since, label="since_sent")
            kwargs["since_recv"] = data.draw(_since, label="since_recv")
        errors = []
        for plan in (full, fast):
            try:
                plan.feed(event, now, **kwargs)  # type: ignore[arg-type]
            except PlanStateError as exc:
                errors.append(str(exc))
        assert len(errors) in (0, 2), errors
        if errors:
            assert errors[0] == errors[1]
            return
        if data.draw(st.integers(0, 20), label="ask for the result now") == 0:
            assert fast.result() == full.result()
    else:
        pytest.fail("the plan did not finish in 60 steps")
    assert isinstance(full.next_action(), Finished)
    assert fast.next_action() == full.next_action()
    after = data.draw(
        st.lists(st.sampled_from([Event.PASSIVE_END, Event.PEER_FIN_FIRST]), max_size=3),
        label="what the kernel showed, after the close",
    )
    for event in after:
        for plan in (full, fast):
            plan.feed(event, now + 1.0)
    assert fast.result() == full.result()


@pytest.mark.parametrize("text", POLICIES)
@pytest.mark.parametrize("peer_eof", [False, True])
def test_the_common_path_stays_on_the_course(text: str, peer_eof: bool) -> None:
    """Answered as expected, the fast plan never needs the interpreter (where the
    policy has a course to the end); its result is the interpreter's."""
    policy = ClosePolicy.parse(text)
    fast = _fast(start_plan(policy, 10.0, peer_eof=peer_eof))
    full = ClosePlan(policy, 10.0, peer_eof=peer_eof)
    course = Course.derive(policy, peer_eof=peer_eof, fin_deferred=False)
    now = 10.0
    for _ in range(20):
        if full.done:
            break
        action = full.next_action()
        assert fast.next_action() == action
        now += 0.001
        if isinstance(action, MeasureAcked):
            for plan in (full, fast):
                plan.feed(Event.ACKED, now, rtt=0.0001, since_sent=0.0)
        else:
            event = ANSWERS.get(type(action), [Event.DONE])[0]
            full.feed(event, now)
            fast.feed(event, now)
    assert fast.result() == full.result()
    assert fast.interpreted is not course.ends
    if policy.mode in ("graceful", "abort", "default") and policy.linger_time > 0:
        assert course.ends


@pytest.mark.parametrize("text", POLICIES)
@pytest.mark.parametrize("peer_eof", [False, True])
@pytest.mark.parametrize("passive", [False, True])
@pytest.mark.parametrize("peer_fin_first", [False, True])
def test_a_course_run_by_a_driver_has_the_interpreters_result(
    text: str, peer_eof: bool, passive: bool, peer_fin_first: bool
) -> None:
    """A driver that took a course's steps itself asks course_result (no replay): the
    interpreter fed the same events, then PASSIVE_END and PEER_FIN_FIRST in that
    order, gives the same result."""
    policy = ClosePolicy.parse(text)
    course = course_of(policy, peer_eof)
    if not course.ends:
        return  # (the interpreter's from some step on: nothing to compare)
    full = ClosePlan(policy, 10.0, peer_eof=peer_eof)
    now = 10.0
    for step in course.steps:
        now += 0.001
        if step.event is Event.ACKED:
            full.feed(Event.ACKED, now, rtt=0.0001, since_sent=0.0)
        else:
            full.feed(step.event, now)
    if passive:
        full.feed(Event.PASSIVE_END, now)
    if peer_fin_first:
        full.feed(Event.PEER_FIN_FIRST, now)
    result = course_result(course, 10.0, now, passive=passive, peer_fin_first=peer_fin_first)
    assert result == full.result()


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(POLICIES), st.floats(0.0, 1e6))
def test_a_drain_begun_with_the_close_ends_at_drain_s(text: str, start: float) -> None:
    """Course.drain_s is where the interpreter's Receive ends when every step before
    it is taken at the start (the quick close waits until ``start + drain_s``)."""
    policy = ClosePolicy.parse(text)
    course = course_of(policy)
    full = ClosePlan(policy, start)
    for step in course.steps:
        action = full.next_action()
        if isinstance(action, Receive):
            assert action.until == start + course.drain_s
            return
        if step.event is Event.ACKED:
            return  # (peer-first waits for the grace, not the drain's bound)
        full.feed(step.event, start)


def test_a_course_is_derived_once_per_policy() -> None:
    policy = ClosePolicy.parse("graceful idle_timeout=2s")
    first = _fast(start_plan(policy, 0.0))
    again = _fast(start_plan(ClosePolicy.parse("graceful idle_timeout=2s"), 5.0))
    assert first._course is again._course
    assert _fast(start_plan(policy, 0.0, peer_eof=True))._course is not first._course


def test_graceful_course() -> None:
    course = Course.derive(ClosePolicy.parse("graceful"), peer_eof=False, fin_deferred=False)
    assert [(step.phase, step.event) for step in course.steps] == [
        (Phase.FLUSH, Event.FLUSHED),
        (Phase.SHUTDOWN, Event.DONE),
        (Phase.DRAIN, Event.PEER_EOF),
        (Phase.CLOSE, Event.DONE),
    ]
    assert course.ends
    assert course.steps[1].action == ShutdownWrite()
    assert course.steps[0].action is None  # (a Flush carries its deadline: made per close)
    abort = Course.derive(ClosePolicy.abort(), peer_eof=False, fin_deferred=False)
    assert abort.steps[0].action == SetLingerZero()


def test_debug_logging_runs_the_interpreter(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("DEBUG", logger="tcpclose"):
        plan = start_plan(ClosePolicy.parse("graceful"), 0.0, label="x")
        assert isinstance(plan, ClosePlan)
        plan.feed(Event.FLUSHED, 0.0)
    assert "close x: flush --flushed--> shutdown" in caplog.text
