"""The close plan: how a policy unfolds into steps, and how each result leads on.

This module is the one place where close logic lives. It is sans-I/O: it never
touches a socket or reads a clock. A driver (``_sync.py`` for blocking code, the
asyncio closer for transports) starts a plan with :func:`start_plan`, asks
:meth:`ClosePlan.next_action` what to do, does it, and feeds back what happened with
:meth:`ClosePlan.feed`, passing the current monotonic time. The plan is finished when
its ``done`` is true (the action is then :class:`Finished`).

What must live here: the phases, the transition table between them and what each
transition records (:data:`EFFECTS`), the moves the plan makes by itself
(:data:`AUTOMATIC`), the bounds (deadlines, the idle bound, the byte budget), the
outcome, and what an error means for the close (:func:`error_event`). What must not:
sockets, clocks, logging of payloads, platform checks. A driver reports what it saw
and carries out what it is told; it never decides how a close goes on, and never
rewrites the result.

The transitions are data (:data:`TRANSITIONS`, :data:`EFFECTS`, :data:`AUTOMATIC`),
so the docs' state diagram is drawn from the same tables the drivers run.

Two runners share those tables. :class:`ClosePlan` interprets them, step by step,
whatever happens. :class:`FastPlan` follows the *course* a policy takes when every
step goes as expected (:class:`Course`: derived once per policy by running
:class:`ClosePlan` on the expected events), checking at each step that the
interpreter would have taken the same transition; at the first step that differs it
hands over to a :class:`ClosePlan` that replays what was seen so far. Its result is
the interpreter's, by construction (``tests/test_plan_course.py`` checks it on random
event sequences), for less: ``benchmarks/bench_plan.py`` counts 26k instructions per
graceful close on the course against 43k interpreted (Python 3.11); what is left is
mostly the per-step calls themselves (``feed`` and ``next_action``), the plan object
and the two actions that carry times (``Flush``, ``Receive``).

A ``graceful`` close of a cooperating peer, as the driver sees it::

    >>> from tcpclose._policy import ClosePolicy
    >>> plan = ClosePlan(ClosePolicy.parse("graceful"), now=0.0)
    >>> plan.next_action()
    Flush(deadline=30.0)
    >>> plan.feed(Event.FLUSHED, now=0.0)
    >>> plan.next_action()
    ShutdownWrite()
    >>> plan.feed(Event.DONE, now=0.0)
    >>> plan.next_action()
    Receive(until=5.0, deadline=30.0, max_bytes=1048576)
    >>> plan.feed(Event.DATA, now=0.1, nbytes=100)
    >>> plan.feed(Event.PEER_EOF, now=0.2)
    >>> plan.next_action()
    Close(drop=False)
    >>> plan.feed(Event.DONE, now=0.2)
    >>> plan.next_action().result.outcome
    <Outcome.PEER_EOF: 'peer-eof'>

Bounds:

* ``graceful``: the whole close (flush, then drain after our FIN) ends by
  ``linger_time`` after it starts; the drain also ends after ``idle_timeout`` of
  silence, or once ``max_drain_bytes`` have been read and discarded. A flush that
  runs out of time with our bytes still buffered (an asyncio transport's) resets
  the connection (``DROP``: SO_LINGER {1, 0}, then the close drops the buffer), so
  that the peer learns its stream was cut: a FIN would look like a complete response.
* ``peer-first``: the peer gets the first chance to close for as long as waiting
  costs nothing, and no longer. Our writes are flushed, then the driver asks the
  kernel whether our bytes are acknowledged (SIOCOUTQ, with TCP_INFO's round trip
  and the time since our last data segment left); while they are not (a slow
  reader), it asks again every RTT or so. Both waits end by ``timeout``. Once
  everything is acknowledged, a prompt peer's FIN is due one round trip after our
  last segment left, plus the peer's own reaction time: the wait ends ``grace``
  after that, and at most ``grace`` from now. (Counted from our last segment, not
  from the peer's ACK, so that a delayed ACK, 40 ms on Linux, is not added to every
  wait.) When the peer's own data came later (a client closing once it has the
  response), the grace counts from that. A connection on which nothing was sent or
  received for longer (idle: keep-alive expiry, server shutdown) is not waited on at
  all. Silence is not a
  reason to stop waiting, but the byte budget is. Then the fallback: ``graceful``
  (the default) runs a whole graceful close (flush, FIN, drain) with a fresh
  ``linger_time`` (so the worst case is ``timeout + linger_time``), ``abort``
  resets, ``auto`` asks the driver how much of ours is unacknowledged and aborts
  only at 0. A plan made for ``write_eof()`` (``half_close=True``) always falls
  back to ``graceful``: the protocol asked for a FIN, never a reset.
* The byte budget is shared by the whole close: a flooding peer can make us read at
  most ``max_drain_bytes``, whatever the fallback.
"""

from __future__ import annotations

import enum
import errno
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

from ._policy import CloseMode, ClosePolicy, Fallback

__all__ = (
    "AUTOMATIC",
    "EFFECTS",
    "ENTRY",
    "RESET_ERRNOS",
    "TRANSITIONS",
    "Action",
    "Close",
    "ClosePlan",
    "Condition",
    "Course",
    "Effects",
    "Event",
    "FastPlan",
    "Finished",
    "Flush",
    "MeasureAcked",
    "MeasureUnacked",
    "Outcome",
    "Phase",
    "Plan",
    "PlanResult",
    "PlanStateError",
    "Receive",
    "SetLingerZero",
    "ShutdownWrite",
    "acked_event",
    "course_of",
    "course_result",
    "drain_until",
    "error_event",
    "grace_until",
    "start_course",
    "start_plan",
)

logger = logging.getLogger("tcpclose")


class Phase(enum.StrEnum):
    """Where a close is."""

    FLUSH = "flush"  # our pending writes go out (asyncio buffers; a no-op for sockets)
    FLUSH_NO_FIN = "flush-no-fin"  # peer-first: the same, bounded by timeout, no FIN after
    CHECK_ACKED = "check-acked"  # peer-first: ask the kernel whether our bytes are acked
    AWAIT_ACK = "await-ack"  # peer-first: not yet (a slow reader): wait, ask again
    SHUTDOWN = "shutdown"  # send our FIN: shutdown(SHUT_WR) / write_eof()
    DRAIN = "drain"  # read and discard until the peer's FIN, bounded
    AWAIT_PEER = "await-peer"  # peer-first: all acked; the peer's grace for its FIN
    FALLBACK = "fallback"  # peer-first timed out: pick the fallback
    CHECK_UNACKED = "check-unacked"  # fallback=auto: ask the kernel (SIOCOUTQ)
    ABORT = "abort"  # SO_LINGER {1, 0}
    DROP = "drop"  # the flush ran out of time: SO_LINGER {1, 0}, so the peer sees a cut
    CLOSE = "close"  # close the fd
    DONE = "done"


class Event(enum.StrEnum):
    """What a driver reports back, plus the refinements the plan derives itself.

    Drivers feed ``FLUSHED``, ``DONE``, ``DATA``, ``PEER_EOF``, ``TIMEOUT``,
    ``RESET``, ``ERROR`` (:func:`error_event` tells the two apart), ``UNACKED_NONE``,
    ``UNACKED_SOME``, ``ACKED``, and after the close ``PASSIVE_END`` and
    ``PEER_FIN_FIRST``. The plan turns
    ``TIMEOUT`` into ``IDLE_TIMEOUT``, ``LINGER_TIME``, ``PEER_TIMEOUT``,
    ``FLUSH_TIMEOUT`` or ``RECHECK`` by looking at its deadlines, ``DATA`` past a
    bound into ``BYTE_CAP``, ``LINGER_TIME``, ``PEER_TIMEOUT`` or ``RECHECK``,
    ``ACKED`` into ``IDLE`` when the peer's grace was over before the close began, and
    ``RESET`` into ``ERROR`` in a phase that no reset ends; those refined events are
    what :data:`TRANSITIONS` is keyed on.
    """

    START = "start"
    FLUSHED = "flushed"
    DONE = "done"
    DATA = "data"
    PEER_EOF = "peer-eof"
    TIMEOUT = "timeout"
    RESET = "reset"
    ERROR = "error"
    UNACKED_NONE = "unacked-none"
    UNACKED_SOME = "unacked-some"
    ACKED = "acked"  # peer-first: every byte of ours is acknowledged
    #: After the close: the kernel shows our socket ended as the passive closer
    #: (LAST_ACK, or gone without TIME_WAIT).
    PASSIVE_END = "passive-end"
    #: After the close: the kernel showed the peer's FIN queued before the close began
    #: (CLOSE_WAIT), though the driver had not read it yet: the peer closed first.
    PEER_FIN_FIRST = "peer-fin-first"
    # derived by the plan
    RECHECK = "recheck"  # peer-first: time to ask the kernel again
    IDLE = "idle"  # peer-first: the peer's last ACK is older than its grace
    IDLE_TIMEOUT = "idle-timeout"
    LINGER_TIME = "linger-time"
    FLUSH_TIMEOUT = "flush-timeout"  # linger_time is over with our bytes still buffered
    PEER_TIMEOUT = "peer-timeout"
    BYTE_CAP = "byte-cap"
    USE_GRACEFUL = "use-graceful"
    USE_ABORT = "use-abort"
    USE_AUTO = "use-auto"


class Outcome(enum.StrEnum):
    """How a close ended (``CloseReport.outcome``)."""

    PEER_EOF = "peer-eof"  # the peer's FIN arrived within the bounds
    IDLE_TIMEOUT = "idle-timeout"  # the peer went quiet for idle_timeout
    LINGER_TIME = "linger-time"  # the total time bound passed
    BYTE_CAP = "byte-cap"  # max_drain_bytes were read and discarded
    RESET = "reset"  # the peer reset the connection
    ABORTED = "aborted"  # we reset it (abort, or the fallback chose abort)
    CLOSED = "closed"  # plain close (mode default), nothing waited for
    ERROR = "error"  # an unexpected socket error ended the close early


#: Errors that mean the peer reset the connection. (EPIPE: Linux's answer to a write
#: or shutdown after the peer's RST; ENOTCONN: a shutdown once the reset tore the
#: connection down.)
RESET_ERRNOS: Final = frozenset({errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ECONNABORTED})


def error_event(exc: BaseException | None) -> Event:
    """What an error a step met means for the close: ``RESET`` when it says the peer
    reset the connection, else ``ERROR``. (The one place errors are classified; the
    driver records the error's name for the report.)

    >>> error_event(ConnectionResetError(errno.ECONNRESET, "reset"))
    <Event.RESET: 'reset'>
    >>> error_event(OSError(errno.EBADF, "bad fd"))
    <Event.ERROR: 'error'>
    """
    if isinstance(exc, OSError) and exc.errno in RESET_ERRNOS:
        return Event.RESET
    return Event.ERROR


# -- the tables ----------------------------------------------------------------------------
#
# TRANSITIONS is keyed by (phase, refined event). START is fed by the plan itself with
# the mode's entry phase; USE_* and BYTE_CAP on entering a phase, by AUTOMATIC.
# Anything not in the table is a driver bug.

_ENDS_DRAIN: Final = (
    Event.IDLE_TIMEOUT,
    Event.LINGER_TIME,
    Event.BYTE_CAP,
    Event.RESET,
    Event.ERROR,
)

TRANSITIONS: Final[Mapping[tuple[Phase, Event], Phase]] = {
    # flush (the peer's FIN may come meanwhile: noted, the flush goes on)
    (Phase.FLUSH, Event.FLUSHED): Phase.SHUTDOWN,
    (Phase.FLUSH, Event.PEER_EOF): Phase.FLUSH,
    (Phase.FLUSH, Event.LINGER_TIME): Phase.CLOSE,  # flushed, but too late for a FIN
    (Phase.FLUSH, Event.FLUSH_TIMEOUT): Phase.DROP,  # bytes left: the peer must see a cut
    (Phase.FLUSH, Event.RESET): Phase.CLOSE,
    (Phase.FLUSH, Event.ERROR): Phase.CLOSE,
    (Phase.FLUSH_NO_FIN, Event.FLUSHED): Phase.CHECK_ACKED,
    (Phase.FLUSH_NO_FIN, Event.PEER_EOF): Phase.FLUSH_NO_FIN,
    (Phase.FLUSH_NO_FIN, Event.PEER_TIMEOUT): Phase.FALLBACK,
    (Phase.FLUSH_NO_FIN, Event.RESET): Phase.CLOSE,
    (Phase.FLUSH_NO_FIN, Event.ERROR): Phase.CLOSE,
    # our FIN (over TLS the driver may wait for the peer before it: its FIN is noted)
    (Phase.SHUTDOWN, Event.DONE): Phase.DRAIN,
    (Phase.SHUTDOWN, Event.PEER_EOF): Phase.SHUTDOWN,
    (Phase.SHUTDOWN, Event.RESET): Phase.CLOSE,
    (Phase.SHUTDOWN, Event.ERROR): Phase.CLOSE,
    # drain after our FIN
    (Phase.DRAIN, Event.DATA): Phase.DRAIN,
    (Phase.DRAIN, Event.PEER_EOF): Phase.CLOSE,
    **{(Phase.DRAIN, event): Phase.CLOSE for event in _ENDS_DRAIN},
    # peer-first: our bytes acknowledged? (a slow reader: wait, receiving, then ask again)
    (Phase.CHECK_ACKED, Event.ACKED): Phase.AWAIT_PEER,
    (Phase.CHECK_ACKED, Event.IDLE): Phase.FALLBACK,
    (Phase.CHECK_ACKED, Event.PEER_TIMEOUT): Phase.FALLBACK,
    (Phase.CHECK_ACKED, Event.UNACKED_SOME): Phase.AWAIT_ACK,
    (Phase.CHECK_ACKED, Event.ERROR): Phase.AWAIT_PEER,  # cannot tell: grace from now
    (Phase.AWAIT_ACK, Event.RECHECK): Phase.CHECK_ACKED,
    (Phase.AWAIT_ACK, Event.DATA): Phase.AWAIT_ACK,
    (Phase.AWAIT_ACK, Event.PEER_EOF): Phase.CLOSE,
    (Phase.AWAIT_ACK, Event.PEER_TIMEOUT): Phase.FALLBACK,
    (Phase.AWAIT_ACK, Event.BYTE_CAP): Phase.FALLBACK,
    (Phase.AWAIT_ACK, Event.RESET): Phase.CLOSE,
    (Phase.AWAIT_ACK, Event.ERROR): Phase.CLOSE,
    # peer-first: the peer's grace for its FIN
    (Phase.AWAIT_PEER, Event.DATA): Phase.AWAIT_PEER,
    (Phase.AWAIT_PEER, Event.PEER_EOF): Phase.CLOSE,
    (Phase.AWAIT_PEER, Event.PEER_TIMEOUT): Phase.FALLBACK,
    (Phase.AWAIT_PEER, Event.BYTE_CAP): Phase.FALLBACK,
    (Phase.AWAIT_PEER, Event.RESET): Phase.CLOSE,
    (Phase.AWAIT_PEER, Event.ERROR): Phase.CLOSE,
    # the fallback
    # A graceful fallback is a whole graceful close: our writes first, then the FIN
    # (else the drain's idle timeout would run while our own data still goes out).
    (Phase.FALLBACK, Event.USE_GRACEFUL): Phase.FLUSH,
    (Phase.FALLBACK, Event.USE_ABORT): Phase.ABORT,
    (Phase.FALLBACK, Event.USE_AUTO): Phase.CHECK_UNACKED,
    (Phase.CHECK_UNACKED, Event.UNACKED_NONE): Phase.ABORT,
    (Phase.CHECK_UNACKED, Event.UNACKED_SOME): Phase.FLUSH,
    (Phase.CHECK_UNACKED, Event.ERROR): Phase.FLUSH,  # cannot tell: keep the data
    # abort, drop, close
    (Phase.ABORT, Event.DONE): Phase.CLOSE,
    (Phase.ABORT, Event.ERROR): Phase.CLOSE,
    (Phase.DROP, Event.DONE): Phase.CLOSE,
    (Phase.DROP, Event.ERROR): Phase.CLOSE,
    (Phase.CLOSE, Event.DONE): Phase.DONE,
    (Phase.CLOSE, Event.ERROR): Phase.DONE,
    # after the close: what the kernel shows settles who closed first
    (Phase.DONE, Event.PASSIVE_END): Phase.DONE,
    (Phase.DONE, Event.PEER_FIN_FIRST): Phase.DONE,
}

#: Where each mode starts.
ENTRY: Final[Mapping[CloseMode, Phase]] = {
    CloseMode.GRACEFUL: Phase.FLUSH,
    CloseMode.PEER_FIRST: Phase.FLUSH_NO_FIN,
    CloseMode.ABORT: Phase.ABORT,
    CloseMode.DEFAULT: Phase.CLOSE,
}


@dataclass(frozen=True, slots=True)
class Effects:
    """What taking a transition records for the result, beside the move itself.

    Attributes:
        outcome: how the close ends (set on the way to the close).
        peer_eof: the peer's FIN arrived; it came first unless our FIN had gone.
        fin_sent: our FIN went out.
        linger_zero: SO_LINGER {1, 0} is set: the close sends RST.
        drop: the close drops whatever is still buffered (``transport.abort()``).
        fallback: the fallback taken; the mode applied becomes it, and a graceful
            fallback gets a fresh ``linger_time``.
        passive_end: the kernel shows we closed second; when our FIN waited for the
            peer (TLS: the TLS layer sends it once the peer answered our
            close_notify), the peer's FIN came first.
        peer_fin_first: the peer's FIN was queued before the close began: it came first.
    """

    outcome: Outcome | None = None
    peer_eof: bool = False
    fin_sent: bool = False
    linger_zero: bool = False
    drop: bool = False
    fallback: Fallback | None = None
    passive_end: bool = False
    peer_fin_first: bool = False

    def __str__(self) -> str:
        """Short words for the docs' diagram, e.g. ``"outcome=linger-time"``."""
        words = [f"outcome={self.outcome}"] if self.outcome is not None else []
        words += [
            name.replace("_", "-")
            for name in (
                "peer_eof",
                "fin_sent",
                "linger_zero",
                "drop",
                "passive_end",
                "peer_fin_first",
            )
            if getattr(self, name)
        ]
        if self.fallback is not None:
            words.append(f"fallback={self.fallback}")
        return ", ".join(words)


_OUTCOME_OF: Final[Mapping[Event, Outcome]] = {
    Event.PEER_EOF: Outcome.PEER_EOF,
    Event.IDLE_TIMEOUT: Outcome.IDLE_TIMEOUT,
    Event.LINGER_TIME: Outcome.LINGER_TIME,
    Event.BYTE_CAP: Outcome.BYTE_CAP,
    Event.RESET: Outcome.RESET,
    Event.ERROR: Outcome.ERROR,
}


def _effects() -> dict[tuple[Phase, Event], Effects]:
    effects: dict[tuple[Phase, Event], Effects] = {
        # The peer's FIN, wherever it is taken.
        **{
            key: Effects(peer_eof=True)
            for key, target in TRANSITIONS.items()
            if key[1] is Event.PEER_EOF and target is not Phase.CLOSE
        },
        (Phase.SHUTDOWN, Event.DONE): Effects(fin_sent=True),
        (Phase.FLUSH, Event.FLUSH_TIMEOUT): Effects(outcome=Outcome.LINGER_TIME),
        (Phase.ABORT, Event.DONE): Effects(outcome=Outcome.ABORTED, linger_zero=True, drop=True),
        (Phase.ABORT, Event.ERROR): Effects(outcome=Outcome.ERROR, drop=True),
        (Phase.DROP, Event.DONE): Effects(linger_zero=True, drop=True),
        (Phase.DROP, Event.ERROR): Effects(drop=True),
        (Phase.FALLBACK, Event.USE_GRACEFUL): Effects(fallback=Fallback.GRACEFUL),
        (Phase.FALLBACK, Event.USE_ABORT): Effects(fallback=Fallback.ABORT),
        (Phase.CHECK_UNACKED, Event.UNACKED_NONE): Effects(fallback=Fallback.ABORT),
        (Phase.CHECK_UNACKED, Event.UNACKED_SOME): Effects(fallback=Fallback.GRACEFUL),
        (Phase.CHECK_UNACKED, Event.ERROR): Effects(fallback=Fallback.GRACEFUL),
        (Phase.DONE, Event.PASSIVE_END): Effects(passive_end=True),
        (Phase.DONE, Event.PEER_FIN_FIRST): Effects(peer_fin_first=True),
    }
    # Every other way to the close ends the close the way its event says.
    for (phase, event), target in TRANSITIONS.items():
        if target is Phase.CLOSE and (phase, event) not in effects:
            outcome = _OUTCOME_OF[event]
            effects[phase, event] = Effects(outcome=outcome, peer_eof=event is Event.PEER_EOF)
    return effects


#: What each transition records (transitions not listed record nothing).
EFFECTS: Final[Mapping[tuple[Phase, Event], Effects]] = _effects()


class Condition(enum.StrEnum):
    """What decides an automatic move (see :data:`AUTOMATIC`)."""

    HALF_CLOSE = "half-close"  # the plan was made for write_eof(): a FIN, never a reset
    FALLBACK_GRACEFUL = "fallback=graceful"
    FALLBACK_ABORT = "fallback=abort"
    FALLBACK_AUTO = "fallback=auto"
    BUDGET_SPENT = "budget-spent"  # max_drain_bytes already read: nothing to drain


#: The moves the plan makes by itself on entering a phase (no I/O is needed to
#: decide them): the first condition that holds feeds its event.
AUTOMATIC: Final[Mapping[Phase, tuple[tuple[Condition, Event], ...]]] = {
    Phase.FALLBACK: (
        # write_eof(): the protocol asked for a FIN; a reset would cut its stream.
        (Condition.HALF_CLOSE, Event.USE_GRACEFUL),
        (Condition.FALLBACK_GRACEFUL, Event.USE_GRACEFUL),
        (Condition.FALLBACK_ABORT, Event.USE_ABORT),
        (Condition.FALLBACK_AUTO, Event.USE_AUTO),
    ),
    Phase.DRAIN: ((Condition.BUDGET_SPENT, Event.BYTE_CAP),),
}

#: One lookup per step: (phase, event) -> (target, effects or None).
_TABLE: Final[Mapping[tuple[Phase, Event], tuple[Phase, Effects | None]]] = {
    key: (target, EFFECTS.get(key)) for key, target in TRANSITIONS.items()
}


# -- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Flush:
    """Wait until our buffered writes have gone to the kernel, until ``deadline``.

    Feed ``FLUSHED``, or ``TIMEOUT`` at the deadline with bytes still buffered,
    ``RESET``/``ERROR`` (``PEER_EOF`` when the peer's FIN arrives meanwhile: the flush
    goes on). Plain sockets have no user-space buffer: feed ``FLUSHED`` at once.
    """

    deadline: float


@dataclass(frozen=True, slots=True)
class ShutdownWrite:
    """Send our FIN (``shutdown(SHUT_WR)``, ``write_eof()``, or TLS close_notify + FIN).
    Feed ``DONE``, ``RESET`` or ``ERROR`` (``PEER_EOF`` first, if the peer's FIN comes
    while the driver prepares it)."""


@dataclass(frozen=True, slots=True)
class Receive:
    """Read and discard what the peer sends.

    Wait until ``until`` at most: the bound on the wait, the earlier of the phase's
    deadline and the idle bound (``idle_timeout`` after the last data). While data
    keeps coming, read it until ``deadline``; read at most ``max_bytes`` in all
    before feeding back. Feed ``DATA`` with the byte count (a new ``Receive``
    follows, with the bounds moved on), ``PEER_EOF``, ``TIMEOUT`` once ``until`` is
    reached, ``RESET`` or ``ERROR``.
    """

    until: float
    deadline: float
    max_bytes: int


@dataclass(frozen=True, slots=True)
class MeasureUnacked:
    """Ask the kernel how many of our bytes are unacknowledged (SIOCOUTQ) and feed
    ``UNACKED_NONE`` or ``UNACKED_SOME`` (``ERROR`` when it cannot tell)."""


@dataclass(frozen=True, slots=True)
class MeasureAcked:
    """Ask the kernel whether every byte of ours is acknowledged (SIOCOUTQ = 0), with
    TCP_INFO's round-trip time and the time since our last data segment left. Feed
    ``ACKED`` or ``UNACKED_SOME`` with ``rtt``, ``since_sent`` and ``since_recv`` (the
    time since the peer's last data arrived) in seconds (``ERROR`` when the kernel
    cannot tell)."""


@dataclass(frozen=True, slots=True)
class SetLingerZero:
    """Set ``SO_LINGER {1, 0}`` so that the close sends RST. Measure what is still
    queued first (it will be discarded). Feed ``DONE`` or ``ERROR``."""


@dataclass(frozen=True, slots=True)
class Close:
    """Close the fd (or the transport). Feed ``DONE`` or ``ERROR``.

    ``drop``: what is still buffered is dropped, not sent (an asyncio transport is
    closed with ``abort()``): after an abort, or a flush that ran out of time.
    """

    drop: bool = False


@dataclass(frozen=True, slots=True)
class PlanResult:
    """What the plan decided, for the report.

    Attributes:
        mode_requested: the policy's mode.
        mode_applied: what was actually done: ``graceful``, ``peer-first`` (the peer
            closed first), ``abort`` or ``default``; differs from the request when a
            fallback ran.
        outcome: how it ended.
        fallback: the fallback taken (``graceful`` or ``abort``), or None.
        drained_bytes: bytes read and discarded.
        peer_eof: the peer's FIN was received.
        peer_closed_first: the peer's FIN came before ours (we were the passive closer).
        fin_sent: we sent a FIN before closing.
        linger_zero: SO_LINGER {1, 0} was set, so the close sent RST.
        started: the driver's monotonic time at the start.
        finished: the driver's monotonic time at the last event before the end.
        trace: ``(phase, event)`` pairs in order, for logs and tests.
    """

    mode_requested: CloseMode
    mode_applied: CloseMode
    outcome: Outcome
    fallback: Fallback | None
    drained_bytes: int
    peer_eof: bool
    peer_closed_first: bool
    fin_sent: bool
    linger_zero: bool
    started: float
    finished: float
    trace: tuple[tuple[Phase, Event], ...]

    @property
    def duration(self) -> float:
        """Seconds from the plan's start to its end."""
        return self.finished - self.started


@dataclass(frozen=True, slots=True)
class Finished:
    """The close is over; ``result`` says how."""

    result: PlanResult


# The frozen dataclasses a close makes, without their frozen ``__init__`` (which sets
# each field through ``object.__setattr__``): each is built as its twin, a class with
# the same slots and no frozen ``__setattr__``, and then takes its class (allowed
# between classes of identical slots), as ``_report`` builds a CloseReport.
# Measured (callgrind, Python 3.11): a PlanResult 3,600 instructions this way, 10,950
# with each slot set through its member descriptor, more with its own __init__.
_object_new: Final = object.__new__


def _twin(cls: type) -> type:
    """A class with ``cls``'s slots and nothing else."""
    return type(f"_Unfrozen{cls.__name__}", (), {"__slots__": cls.__dict__["__slots__"]})


_FlushTwin: Final = _twin(Flush)
_ReceiveTwin: Final = _twin(Receive)
_ResultTwin: Final = _twin(PlanResult)


def _new_flush(deadline: float) -> Flush:
    action: Any = _object_new(_FlushTwin)
    action.deadline = deadline
    action.__class__ = Flush
    built: Flush = action  # (typed by annotation: cast() would be a call each time)
    return built


def _new_receive(until: float, deadline: float, max_bytes: int) -> Receive:
    action: Any = _object_new(_ReceiveTwin)
    action.until = until
    action.deadline = deadline
    action.max_bytes = max_bytes
    action.__class__ = Receive
    built: Receive = action
    return built


def _new_result(
    mode_requested: CloseMode,
    mode_applied: CloseMode,
    outcome: Outcome,
    fallback: Fallback | None,
    drained_bytes: int,
    peer_eof: bool,
    peer_closed_first: bool,
    fin_sent: bool,
    linger_zero: bool,
    started: float,
    finished: float,
    trace: tuple[tuple[Phase, Event], ...],
) -> PlanResult:
    result: Any = _object_new(_ResultTwin)
    result.mode_requested = mode_requested
    result.mode_applied = mode_applied
    result.outcome = outcome
    result.fallback = fallback
    result.drained_bytes = drained_bytes
    result.peer_eof = peer_eof
    result.peer_closed_first = peer_closed_first
    result.fin_sent = fin_sent
    result.linger_zero = linger_zero
    result.started = started
    result.finished = finished
    result.trace = trace
    result.__class__ = PlanResult
    built: PlanResult = result
    return built


Action = (
    Flush
    | ShutdownWrite
    | Receive
    | MeasureAcked
    | MeasureUnacked
    | SetLingerZero
    | Close
    | Finished
)

#: While our bytes are not yet acknowledged, ask the kernel again after one RTT,
#: within these bounds (seconds): an ACK comes about one RTT after the data left.
ACK_POLL_MIN: Final = 0.001
ACK_POLL_MAX: Final = 0.05

_CLOSE: Final = Close()
_CLOSE_DROPPING: Final = Close(drop=True)
#: The actions that carry no data are shared instances (they are frozen).
_FIXED_ACTIONS: Final[Mapping[Phase, Action]] = {
    Phase.SHUTDOWN: ShutdownWrite(),
    Phase.CHECK_UNACKED: MeasureUnacked(),
    Phase.CHECK_ACKED: MeasureAcked(),
    Phase.ABORT: SetLingerZero(),
    Phase.DROP: SetLingerZero(),
}


class PlanStateError(RuntimeError):
    """A driver fed an event the current phase does not accept: a bug in the driver."""


# Enum members as module globals, for the hot paths of the plan. On Python 3.11
# ``Event.DONE`` is looked up through the enum's metaclass (about 80 ns, a global
# about 10), and a close makes dozens of such lookups.
_EVENT_ACKED = Event.ACKED
_EVENT_DATA = Event.DATA
_EVENT_DONE = Event.DONE
_EVENT_ERROR = Event.ERROR
_EVENT_FLUSHED = Event.FLUSHED
_EVENT_IDLE = Event.IDLE
_EVENT_PASSIVE_END = Event.PASSIVE_END
_EVENT_PEER_FIN_FIRST = Event.PEER_FIN_FIRST
_PEER_FIN_FIRST_TRACE: Final = ((Phase.DONE, Event.PEER_FIN_FIRST),)
_EVENT_PEER_TIMEOUT = Event.PEER_TIMEOUT
_EVENT_RESET = Event.RESET
_EVENT_TIMEOUT = Event.TIMEOUT
_EVENT_UNACKED_SOME = Event.UNACKED_SOME
_MODE_ABORT = CloseMode.ABORT
_MODE_DEFAULT = CloseMode.DEFAULT
_MODE_GRACEFUL = CloseMode.GRACEFUL
_MODE_PEER_FIRST = CloseMode.PEER_FIRST
_PHASE_AWAIT_ACK = Phase.AWAIT_ACK
_PHASE_AWAIT_PEER = Phase.AWAIT_PEER
_PHASE_CHECK_ACKED = Phase.CHECK_ACKED
_PHASE_DONE = Phase.DONE
_PHASE_DRAIN = Phase.DRAIN
_PHASE_FLUSH = Phase.FLUSH
_PHASE_FLUSH_NO_FIN = Phase.FLUSH_NO_FIN


# -- the arithmetic both runners use ------------------------------------------------------------


def _quiet(rtt: float, since_sent: float, since_recv: float) -> float:
    """How long the peer has had nothing to answer: our last segment reached it about
    a round trip after it left (its ACK or FIN takes the way back), and its own last
    data, if later, shows it was still busy then."""
    return min(since_sent - rtt, since_recv)


def acked_event(
    now: float,
    deadline: float,
    peer_eof: bool,
    grace: float,
    rtt: float,
    since_sent: float,
    since_recv: float,
) -> Event:
    """What ``ACKED`` means in ``CHECK_ACKED``: the wait for the peer's FIN is over
    (``PEER_TIMEOUT``), not worth starting (``IDLE``: nothing sent or received for
    longer than the grace), or ``ACKED``: the grace runs."""
    if now >= deadline:
        return _EVENT_PEER_TIMEOUT
    if peer_eof:
        return _EVENT_ACKED  # the FIN is here: the wait ends at once
    if _quiet(rtt, since_sent, since_recv) >= grace:
        return _EVENT_IDLE
    return _EVENT_ACKED


def grace_until(
    now: float, deadline: float, grace: float, rtt: float, since_sent: float, since_recv: float
) -> float:
    """The end of the peer's grace, once our bytes are acknowledged: ``grace`` after
    the peer had nothing left to answer, at most ``grace`` from now, within the
    deadline."""
    return min(now - _quiet(rtt, since_sent, since_recv) + grace, now + grace, deadline)


def drain_until(deadline: float, idle_from: float, idle_timeout: float) -> float:
    """The end of a wait in the drain: the deadline, or ``idle_timeout`` after the
    last thing that happened (our FIN, or the peer's last data)."""
    return min(deadline, idle_from + idle_timeout)


# -- the interpreter ---------------------------------------------------------------------------


class ClosePlan:
    """Runs one close policy for one connection, step by step. See the module docstring.

    Args:
        policy: the policy to apply.
        now: the driver's monotonic clock at the start of the close.
        peer_eof: True when the driver already knows the peer's FIN arrived (for
            example the transport got ``eof_received`` before the close began).
        label: text identifying the connection in debug logs (e.g. the 4-tuple).
        half_close: the close was asked for by ``write_eof()``: the protocol wants
            its FIN sent, so a ``peer-first`` fallback is always ``graceful``.
        fin_deferred: our FIN follows the peer's answer rather than our shutdown
            (TLS: the TLS layer sends it once the peer answered our close_notify),
            so a passive end (``PASSIVE_END``) means the peer's FIN came first.
    """

    __slots__ = (
        "_action",
        "_budget",
        "_deadline",
        "_drained",
        "_drop",
        "_fallback",
        "_fin_deferred",
        "_fin_sent",
        "_finished",
        "_half_close",
        "_label",
        "_linger_zero",
        "_mode_applied",
        "_outcome",
        "_peer_closed_first",
        "_peer_eof",
        "_phase",
        "_rtt",
        "_since_recv",
        "_since_sent",
        "_started",
        "_trace",
        "_wait_until",
        "debug",
        "done",
        "policy",
    )

    def __init__(
        self,
        policy: ClosePolicy,
        now: float,
        *,
        peer_eof: bool = False,
        label: str = "",
        half_close: bool = False,
        fin_deferred: bool = False,
    ) -> None:
        #: The policy being applied.
        self.policy = policy
        self._started = now
        self._finished = now
        self._label = label
        self._budget = policy.max_drain_bytes
        self._drained = 0
        self._peer_eof = peer_eof
        self._peer_closed_first = peer_eof
        self._half_close = half_close
        self._fin_deferred = fin_deferred
        #: peer-first: the end of the current wait (the next look at the kernel while
        #: our bytes are unacknowledged; the end of the peer's grace after).
        self._wait_until = now
        #: peer-first: the kernel's last answer (seconds).
        self._rtt = 0.0
        self._since_sent = 0.0
        self._since_recv = math.inf
        self._fin_sent = False
        self._linger_zero = False
        self._drop = False
        self._fallback: Fallback | None = None
        self._mode_applied = policy.mode
        self._outcome: Outcome | None = None
        mode = policy.mode
        self._phase = ENTRY[mode]
        self._trace: list[tuple[Phase, Event]] = [(self._phase, Event.START)]
        if mode is _MODE_GRACEFUL:
            self._deadline = now + policy.linger_time
        elif mode is _MODE_PEER_FIRST:
            self._deadline = now + policy.timeout
        else:
            self._deadline = now
        if mode is _MODE_ABORT:
            self._outcome = Outcome.ABORTED
        elif mode is _MODE_DEFAULT:
            self._outcome = Outcome.CLOSED
        #: The action for the current phase, made once (None: not made yet).
        self._action: Action | None = None
        #: The plan is finished (:meth:`next_action` would be :class:`Finished`).
        self.done = False
        #: Whether each step is logged, decided once: a close is short, and asking
        #: the logger is not free on the hot path of a busy server.
        self.debug = logger.isEnabledFor(logging.DEBUG)
        if self.debug:
            self._log("start %s", policy)

    @property
    def phase(self) -> Phase:
        """The current phase."""
        return self._phase

    @property
    def drained_bytes(self) -> int:
        """Bytes read and discarded so far."""
        return self._drained

    def next_action(self) -> Action:
        """What the driver should do now. Stays the same until :meth:`feed` moves on."""
        action = self._action
        if action is not None:
            return action
        phase = self._phase
        action = _FIXED_ACTIONS.get(phase)
        if action is None:
            if phase is _PHASE_DRAIN:
                deadline = self._deadline
                until = drain_until(deadline, self._finished, self.policy.idle_timeout)
                action = _new_receive(until, deadline, self._budget)
            elif phase is _PHASE_AWAIT_PEER or phase is _PHASE_AWAIT_ACK:
                action = _new_receive(self._wait_until, self._wait_until, self._budget)
            elif phase is _PHASE_FLUSH or phase is _PHASE_FLUSH_NO_FIN:
                action = Flush(self._deadline)
            elif phase is _PHASE_DONE:
                action = Finished(self.result())
            else:
                assert phase is Phase.CLOSE
                action = _CLOSE_DROPPING if self._drop else _CLOSE
        self._action = action
        return action

    def result(self) -> PlanResult:
        """How the close went (so far: final once the plan is :attr:`done`)."""
        return _new_result(
            self.policy.mode,
            self._mode_applied,
            self._outcome or Outcome.ERROR,
            self._fallback,
            self._drained,
            self._peer_eof,
            self._peer_closed_first,
            self._fin_sent,
            self._linger_zero,
            self._started,
            self._finished,
            tuple(self._trace),
        )

    def feed(
        self,
        event: Event,
        now: float,
        nbytes: int = 0,
        rtt: float = 0.0,
        since_sent: float = 0.0,
        since_recv: float = math.inf,
    ) -> None:
        """Tell the plan what happened at monotonic time ``now``.

        (``nbytes`` and the rest are not keyword-only: on Python 3.11 a keyword-only
        parameter with a default costs about 650 instructions per call, callgrind
        says, and this runs for every step of every close. Pass them by name.)

        ``nbytes`` goes with ``DATA``: how many bytes were read and discarded.
        ``rtt``, ``since_sent`` and ``since_recv`` go with ``ACKED`` and
        ``UNACKED_SOME``: the kernel's round-trip time, the time since our last data
        segment left and since the peer's last data arrived, in seconds.

        Raises:
            PlanStateError: the event does not fit the current phase (a driver bug).
        """
        phase = self._phase
        if event is _EVENT_ACKED or event is _EVENT_UNACKED_SOME:
            self._rtt = rtt
            self._since_sent = since_sent
            self._since_recv = since_recv
        # Only these are ever refined (a flush only when it ended late); the others
        # are what the table is keyed on.
        if (
            event is _EVENT_DATA
            or event is _EVENT_TIMEOUT
            or event is _EVENT_ACKED
            or (event is _EVENT_FLUSHED and now >= self._deadline)
        ):
            event = self._refine(event, now, nbytes)
        entry = _TABLE.get((phase, event))
        if entry is None and event is _EVENT_RESET:
            event = _EVENT_ERROR  # a reset where nothing ends by one: an error
            entry = _TABLE.get((phase, event))
        if entry is None:
            raise PlanStateError(f"event {event} is not expected in phase {phase}")
        target, effects = entry
        self._trace.append((phase, event))
        if phase is not _PHASE_DONE:  # (what comes after the close is not its time)
            self._finished = now
        self._action = None
        if effects is not None:
            self._record(effects, now)
        if target is phase:  # more data while draining, the peer's FIN while flushing
            return
        if self.debug:
            self._log("%s --%s--> %s", phase, event, target)
        if phase is _PHASE_CHECK_ACKED:
            self._wait_until = self._peer_wait_until(event, now)
        self._phase = target
        if target is _PHASE_DONE:
            self.done = True
        moves = AUTOMATIC.get(target)
        if moves is not None:
            for condition, automatic in moves:
                if self._holds(condition):
                    self.feed(automatic, now)
                    break

    # -- internals -----------------------------------------------------------------------

    def _record(self, effects: Effects, now: float) -> None:
        if effects.outcome is not None:
            self._outcome = effects.outcome
        if effects.peer_eof:
            self._peer_eof = True
            # Known at the start (peer_eof=True), or the FIN came before ours.
            self._peer_closed_first = self._peer_closed_first or not self._fin_sent
        if effects.fin_sent:
            self._fin_sent = True
        if effects.linger_zero:
            self._linger_zero = True
        if effects.drop:
            self._drop = True
        fallback = effects.fallback
        if fallback is not None:
            self._fallback = fallback
            if fallback is Fallback.GRACEFUL:
                self._mode_applied = _MODE_GRACEFUL
                self._deadline = now + self.policy.linger_time
            else:
                self._mode_applied = _MODE_ABORT
        if effects.passive_end and self._fin_deferred and self._peer_eof:
            self._peer_closed_first = True
        if effects.peer_fin_first:
            self._peer_closed_first = True

    def _holds(self, condition: Condition) -> bool:
        fallback = self.policy.fallback
        if condition is Condition.HALF_CLOSE:
            return self._half_close
        if condition is Condition.BUDGET_SPENT:
            return self._budget == 0
        if condition is Condition.FALLBACK_GRACEFUL:
            return fallback is Fallback.GRACEFUL
        if condition is Condition.FALLBACK_ABORT:
            return fallback is Fallback.ABORT
        assert condition is Condition.FALLBACK_AUTO
        return fallback is Fallback.AUTO

    def _refine(self, event: Event, now: float, nbytes: int) -> Event:
        phase = self._phase
        if event is _EVENT_ACKED:
            if phase is not _PHASE_CHECK_ACKED:
                return event  # (not expected: the table says so)
            return acked_event(
                now,
                self._deadline,
                self._peer_eof,
                self.policy.grace,
                self._rtt,
                self._since_sent,
                self._since_recv,
            )
        waiting_for_peer = (
            phase is _PHASE_AWAIT_PEER or phase is _PHASE_AWAIT_ACK or phase is _PHASE_FLUSH_NO_FIN
        )
        if event is _EVENT_DATA:
            if nbytes < 0:
                raise PlanStateError(f"DATA with a negative byte count {nbytes}")
            self._drained += nbytes
            self._budget = max(0, self._budget - nbytes)
            if self._budget == 0:
                return Event.BYTE_CAP
            if now >= self._deadline:
                return _EVENT_PEER_TIMEOUT if waiting_for_peer else Event.LINGER_TIME
            if waiting_for_peer and phase is not _PHASE_FLUSH_NO_FIN and now >= self._wait_until:
                return Event.RECHECK if phase is _PHASE_AWAIT_ACK else _EVENT_PEER_TIMEOUT
            return _EVENT_DATA
        if event is _EVENT_TIMEOUT:
            if phase is _PHASE_AWAIT_ACK and now < self._deadline:
                return Event.RECHECK
            if waiting_for_peer:
                return _EVENT_PEER_TIMEOUT
            if phase is _PHASE_DRAIN and now < self._deadline:
                return Event.IDLE_TIMEOUT
            if phase is _PHASE_FLUSH:
                # Our bytes are still buffered: they cannot go out within the bounds.
                return Event.FLUSH_TIMEOUT
            return Event.LINGER_TIME
        if event is _EVENT_FLUSHED and now >= self._deadline:
            # flushed, but too late to wait for anything more
            if phase is _PHASE_FLUSH_NO_FIN:
                return _EVENT_PEER_TIMEOUT
            if phase is _PHASE_FLUSH:
                return Event.LINGER_TIME
        return event

    def _peer_wait_until(self, event: Event, now: float) -> float:
        """When the wait that follows a look at the kernel ends (bounded by timeout)."""
        if event is _EVENT_UNACKED_SOME:
            # A slow reader, or a round trip under way: look again in about one RTT.
            poll = min(max(self._rtt, ACK_POLL_MIN), ACK_POLL_MAX)
            return min(now + poll, self._deadline)
        if event is _EVENT_ACKED and not self._peer_eof:
            return grace_until(
                now,
                self._deadline,
                self.policy.grace,
                self._rtt,
                self._since_sent,
                self._since_recv,
            )
        if event is _EVENT_ERROR:
            return min(now + self.policy.grace, self._deadline)  # cannot tell: from now
        return self._deadline

    def _log(self, message: str, *args: object) -> None:
        logger.debug("close %s: " + message, self._label or "-", *args)


# -- the common path -----------------------------------------------------------------------------

#: What each action is answered with when everything goes as expected.
_EXPECTED: Final[Mapping[type, Event]] = {
    Flush: Event.FLUSHED,
    ShutdownWrite: Event.DONE,
    Receive: Event.PEER_EOF,
    MeasureAcked: Event.ACKED,
    SetLingerZero: Event.DONE,
    Close: Event.DONE,
}

#: The transitions a :class:`FastPlan` takes by itself: each leaves the deadlines as
#: they were, except the peer's grace, which the fast plan computes as the
#: interpreter does. A course stops before any other (its last step hands over).
_ON_COURSE: Final = frozenset(
    {
        (Phase.FLUSH, Event.FLUSHED),
        (Phase.FLUSH_NO_FIN, Event.FLUSHED),
        (Phase.SHUTDOWN, Event.DONE),
        (Phase.DRAIN, Event.PEER_EOF),
        (Phase.CHECK_ACKED, Event.ACKED),
        (Phase.AWAIT_PEER, Event.PEER_EOF),
        (Phase.ABORT, Event.DONE),
        (Phase.CLOSE, Event.DONE),
    }
)


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a :class:`Course`: in ``phase`` the driver is asked for an action
    of type ``kind`` (``action`` itself when it carries no times) and answers
    ``event``."""

    phase: Phase
    kind: type
    action: Action | None
    event: Event


@dataclass(frozen=True, slots=True)
class Course:
    """The path a close takes when every step goes as expected, derived once per
    policy (and whether the peer's FIN is known at the start, and whether our FIN is
    deferred) by running :class:`ClosePlan` on the expected events.

    Attributes:
        policy, peer_eof, fin_deferred: what it was derived for.
        steps: the steps in order.
        ends: the steps reach the end of the close (else the last one hands over).
        bound_s: the deadline of the first phases, from the start.
        drain_s: the end of a drain begun at the start, from the start.
        result: the result at the end (``started``/``finished`` 0), when ``ends``.
        passive_result: the same after ``PASSIVE_END``.
    """

    policy: ClosePolicy
    peer_eof: bool
    fin_deferred: bool
    steps: tuple[Step, ...]
    ends: bool
    bound_s: float
    result: PlanResult | None
    passive_result: PlanResult | None
    #: The action type of each step, in order (how drivers recognise a course).
    kinds: tuple[type, ...] = ()
    #: A drain that starts with the close ends this long after it at the latest
    #: (:func:`drain_until` from the start: ``bound_s``, or ``idle_timeout`` if sooner).
    drain_s: float = 0.0

    @classmethod
    def derive(cls, policy: ClosePolicy, *, peer_eof: bool, fin_deferred: bool) -> Course:
        """Run the interpreter along the expected events and keep what it did."""
        plan = ClosePlan(policy, 0.0, peer_eof=peer_eof, fin_deferred=fin_deferred)
        plan.debug = False
        steps: list[Step] = []
        while not plan.done:
            phase = plan.phase
            action = plan.next_action()
            event = _EXPECTED.get(type(action))
            if event is None or (phase, event) not in _ON_COURSE:
                break
            # The expected answer of the kernel at the start: acknowledged just now.
            if (
                event is _EVENT_ACKED
                and acked_event(0.0, plan._deadline, peer_eof, policy.grace, 0.0, 0.0, math.inf)
                is not _EVENT_ACKED
            ):
                break  # idle at once (grace 0): the fallback is not the fast path's
            if event is _EVENT_FLUSHED and plan._deadline <= 0.0:
                break  # no time at all: the interpreter's
            fixed = None if isinstance(action, Flush | Receive) else action
            steps.append(Step(phase, type(action), fixed, event))
            plan.feed(event, 0.0)
        result = passive = None
        if plan.done:
            result = plan.result()
            plan.feed(_EVENT_PASSIVE_END, 0.0)
            passive = plan.result()
        if policy.mode is _MODE_GRACEFUL:
            bound = policy.linger_time
        elif policy.mode is _MODE_PEER_FIRST:
            bound = policy.timeout
        else:
            bound = 0.0
        return cls(
            policy,
            peer_eof,
            fin_deferred,
            tuple(steps),
            plan.done,
            bound,
            result,
            passive,
            tuple(step.kind for step in steps),
            drain_until(bound, 0.0, policy.idle_timeout),
        )


class FastPlan:
    """Runs a :class:`Course`, with the interface of :class:`ClosePlan`.

    At each step it checks that the interpreter would take the course's transition
    (the event is the expected one and the bounds hold: a flush in time, the peer not
    idle); at the first step where it would not, it makes a :class:`ClosePlan`,
    replays the steps taken so far, and passes everything on to it from then on.
    Start one with :func:`start_plan`.

    The replay needs no list of what happened: on the course the interpreter keeps
    only the time of the last step (the idle bound counts from it) and of the
    kernel's answer (kept here); a flush's time only decides whether it came before
    the deadline (it did, or it would not be on the course). So every step is
    replayed at the time of the last one, but the kernel's answer at its own and a
    flush followed by other steps at the start.
    """

    __slots__ = (
        "_acked",
        "_action",
        "_course",
        "_deadline",
        "_finished",
        "_full",
        "_half_close",
        "_index",
        "_label",
        "_passive",
        "_peer_fin_first",
        "_started",
        "_wait_until",
        "done",
        "policy",
    )

    #: Steps are never logged here: a plan made while debug logging is on is a
    #: :class:`ClosePlan`.
    debug: Final = False

    def __init__(
        self, course: Course, now: float, label: str = "", half_close: bool = False
    ) -> None:
        self._course = course
        self.policy = course.policy
        self._started = now
        self._finished = now
        self._deadline = now + course.bound_s
        self._wait_until = now
        self._index = 0
        #: The kernel's answer to MeasureAcked and its time (for a replay).
        self._acked: tuple[float, float, float, float] | None = None
        self._action: Action | None = None
        self._full: ClosePlan | None = None
        self._passive = False
        self._peer_fin_first = False
        self._label = label
        self._half_close = half_close
        self.done = False

    @property
    def phase(self) -> Phase:
        """The current phase."""
        full = self._full
        if full is None:
            steps = self._course.steps
            if self._index < len(steps):
                return steps[self._index].phase
            if self.done:
                return _PHASE_DONE
            full = self._take_over()
        return full.phase

    @property
    def drained_bytes(self) -> int:
        """Bytes read and discarded so far."""
        full = self._full
        return 0 if full is None else full.drained_bytes

    @property
    def interpreted(self) -> bool:
        """The interpreter has taken over (a step went other than expected)."""
        return self._full is not None

    def next_action(self) -> Action:
        """What the driver should do now (see :meth:`ClosePlan.next_action`)."""
        action = self._action
        if action is not None:
            return action
        full = self._full
        if full is not None:
            return full.next_action()
        steps = self._course.steps
        index = self._index
        if index < len(steps):
            step = steps[index]
            action = step.action
            if action is None:
                # (The arithmetic of drain_until and the interpreter's actions, inline:
                # this runs for every step of every close.)
                if step.kind is Flush:
                    action = _new_flush(self._deadline)
                elif step.phase is _PHASE_DRAIN:
                    policy = self.policy
                    deadline = self._deadline
                    until = self._finished + policy.idle_timeout
                    action = _new_receive(
                        until if until < deadline else deadline, deadline, policy.max_drain_bytes
                    )
                else:  # the peer's grace
                    until = self._wait_until
                    action = _new_receive(until, until, self.policy.max_drain_bytes)
        elif self.done:
            action = Finished(self.result())
        else:
            return self._take_over().next_action()
        self._action = action
        return action

    def feed(
        self,
        event: Event,
        now: float,
        nbytes: int = 0,
        rtt: float = 0.0,
        since_sent: float = 0.0,
        since_recv: float = math.inf,
    ) -> None:
        """Tell the plan what happened (see :meth:`ClosePlan.feed`)."""
        full = self._full
        if full is None:
            steps = self._course.steps
            index = self._index
            if index < len(steps) and event is steps[index].event:
                if event is _EVENT_ACKED:
                    course = self._course
                    deadline = self._deadline
                    grace = self.policy.grace
                    if (
                        acked_event(
                            now, deadline, course.peer_eof, grace, rtt, since_sent, since_recv
                        )
                        is _EVENT_ACKED
                    ):
                        self._acked = (now, rtt, since_sent, since_recv)
                        self._wait_until = (
                            deadline
                            if course.peer_eof
                            else grace_until(now, deadline, grace, rtt, since_sent, since_recv)
                        )
                        self._took(index, now)
                        return
                elif event is not _EVENT_FLUSHED or now < self._deadline:
                    # The step is taken (as _took, inline: the common case), and the
                    # next action is at hand when it carries no times.
                    self._finished = now
                    index += 1
                    self._index = index
                    if index < len(steps):
                        self._action = steps[index].action
                    else:
                        self._action = None
                        self.done = self._course.ends
                    return
            elif event is _EVENT_PASSIVE_END and self.done and not self._passive:
                if not self._peer_fin_first:  # (else the trace's order: the interpreter's)
                    self._passive = True
                    return
            elif event is _EVENT_PEER_FIN_FIRST and self.done and not self._peer_fin_first:
                self._peer_fin_first = True
                return
            full = self._take_over()
        full.feed(event, now, nbytes=nbytes, rtt=rtt, since_sent=since_sent, since_recv=since_recv)
        self.done = full.done

    def result(self) -> PlanResult:
        """How the close went (see :meth:`ClosePlan.result`)."""
        if self._full is None and self.done:
            return course_result(
                self._course,
                self._started,
                self._finished,
                passive=self._passive,
                peer_fin_first=self._peer_fin_first,
            )
        return self._take_over().result()

    def _took(self, index: int, now: float) -> None:
        """The course's step ``index`` was taken at ``now``."""
        self._finished = now
        self._action = None
        index += 1
        self._index = index
        if index == len(self._course.steps) and self._course.ends:
            self.done = True

    def _take_over(self) -> ClosePlan:
        """The interpreter, brought to where this plan is by replaying its steps."""
        full = self._full
        if full is not None:
            return full
        course = self._course
        full = ClosePlan(
            course.policy,
            self._started,
            peer_eof=course.peer_eof,
            label=self._label,
            half_close=self._half_close,
            fin_deferred=course.fin_deferred,
        )
        last = self._finished
        taken = self._index
        for number, step in enumerate(course.steps[:taken], 1):
            event = step.event
            if event is _EVENT_ACKED:
                assert self._acked is not None
                when, rtt, since_sent, since_recv = self._acked
                full.feed(event, when, rtt=rtt, since_sent=since_sent, since_recv=since_recv)
            elif event is _EVENT_FLUSHED and number < taken:
                full.feed(event, self._started)  # (its time was before the deadline)
            else:
                full.feed(event, last)
        if self._passive:
            full.feed(_EVENT_PASSIVE_END, last)
        if self._peer_fin_first:
            full.feed(_EVENT_PEER_FIN_FIRST, last)
        self._full = full
        self._action = None  # (from here on the interpreter's)
        self.done = full.done
        return full


#: What a driver runs: the fast plan, or the interpreter when steps are logged.
Plan: TypeAlias = ClosePlan | FastPlan


class _Courses:
    """The courses derived so far, by policy; the last policy's at hand without
    hashing it (a server closes with one policy over and over)."""

    __slots__ = ("by_policy", "last", "last_policy")

    #: Policies remembered at most (a program makes few; a bound all the same).
    LIMIT: Final = 256

    def __init__(self) -> None:
        self.by_policy: dict[ClosePolicy, list[Course | None]] = {}
        self.last_policy: ClosePolicy | None = None
        self.last: list[Course | None] = [None, None, None, None]

    def get(self, policy: ClosePolicy, peer_eof: bool, fin_deferred: bool) -> Course:
        if policy is self.last_policy:
            courses = self.last
        else:
            found = self.by_policy.get(policy)
            if found is None:
                if len(self.by_policy) >= self.LIMIT:
                    self.by_policy.clear()
                found = self.by_policy[policy] = [None, None, None, None]
            courses = self.last = found
            self.last_policy = policy
        slot = 2 * peer_eof + fin_deferred
        course = courses[slot]
        if course is None:
            course = courses[slot] = Course.derive(
                policy, peer_eof=peer_eof, fin_deferred=fin_deferred
            )
        return course


_COURSES: Final = _Courses()


def course_of(policy: ClosePolicy, peer_eof: bool = False, fin_deferred: bool = False) -> Course:
    """The course of ``policy`` (derived once, then shared)."""
    courses = _COURSES
    if policy is courses.last_policy:
        course = courses.last[2 * peer_eof + fin_deferred]
        if course is not None:
            return course
    return courses.get(policy, peer_eof, fin_deferred)


def course_result(
    course: Course,
    started: float,
    finished: float,
    *,
    passive: bool = False,
    peer_fin_first: bool = False,
) -> PlanResult:
    """The result of a close that took every step of ``course`` (which ``ends``), the
    first at ``started`` and the last at ``finished``; then told ``PASSIVE_END`` if
    ``passive``, and ``PEER_FIN_FIRST`` if ``peer_fin_first``, in that order. What a
    :class:`FastPlan` fed those events gives, without the feeding."""
    template = course.passive_result if passive else course.result
    assert template is not None
    return _new_result(
        template.mode_requested,
        template.mode_applied,
        template.outcome,
        template.fallback,
        0,
        template.peer_eof,
        template.peer_closed_first or peer_fin_first,
        template.fin_sent,
        template.linger_zero,
        started,
        finished,
        template.trace + _PEER_FIN_FIRST_TRACE if peer_fin_first else template.trace,
    )


def start_course(course: Course, now: float, label: str = "", half_close: bool = False) -> Plan:
    """:func:`start_plan` for a course at hand (its policy is not looked up again)."""
    if logger.isEnabledFor(logging.DEBUG):
        return ClosePlan(
            course.policy,
            now,
            peer_eof=course.peer_eof,
            label=label,
            half_close=half_close,
            fin_deferred=course.fin_deferred,
        )
    return FastPlan(course, now, label, half_close)


def start_plan(
    policy: ClosePolicy,
    now: float,
    peer_eof: bool = False,
    label: str = "",
    half_close: bool = False,
    fin_deferred: bool = False,
) -> Plan:
    """The plan a driver runs for one close (arguments as :class:`ClosePlan`'s): a
    :class:`FastPlan` on its policy's course, or, while debug logging is on, the
    interpreter, which logs every step."""
    if logger.isEnabledFor(logging.DEBUG):
        return ClosePlan(
            policy,
            now,
            peer_eof=peer_eof,
            label=label,
            half_close=half_close,
            fin_deferred=fin_deferred,
        )
    courses = _COURSES
    if policy is courses.last_policy:  # (no hashing of the policy: the usual case)
        course = courses.last[2 * peer_eof + fin_deferred]
        if course is not None:
            return FastPlan(course, now, label, half_close)
    course = courses.get(policy, peer_eof, fin_deferred)
    return FastPlan(course, now, label, half_close)
