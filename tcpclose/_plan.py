"""The close plan: how a policy unfolds into steps, and how each result leads on.

This module is the one place where close logic lives. It is sans-I/O: it never
touches a socket or reads a clock. A driver (``_sync.py`` for blocking code,
``_aio.py`` for asyncio) asks :meth:`ClosePlan.next_action` what to do, does it, and
feeds back what happened with :meth:`ClosePlan.feed`, passing the current monotonic
time. The plan is finished when the action is :class:`Finished`.

What must live here: the phases, the transition table between them, the bounds
(deadlines and byte budget) and the outcome. What must not: sockets, clocks,
logging of payloads, platform checks.

The transitions are data (:data:`TRANSITIONS`), so the docs' state diagram is drawn
from the same table the drivers run.

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
    Receive(deadline=30.0, idle_timeout=5.0, max_bytes=1048576)
    >>> plan.feed(Event.DATA, now=0.1, nbytes=100)
    >>> plan.feed(Event.PEER_EOF, now=0.2)
    >>> plan.next_action()
    Close()
    >>> plan.feed(Event.DONE, now=0.2)
    >>> plan.next_action().result.outcome
    <Outcome.PEER_EOF: 'peer-eof'>

Bounds:

* ``graceful``: the whole close (flush, then drain after our FIN) ends by
  ``linger_time`` after it starts; the drain also ends after ``idle_timeout`` of
  silence, or once ``max_drain_bytes`` have been read and discarded.
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
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from ._policy import CloseMode, ClosePolicy, Fallback

__all__ = (
    "TRANSITIONS",
    "Action",
    "Close",
    "ClosePlan",
    "Event",
    "Finished",
    "Flush",
    "MeasureAcked",
    "MeasureUnacked",
    "Outcome",
    "Phase",
    "PlanResult",
    "PlanStateError",
    "Receive",
    "SetLingerZero",
    "ShutdownWrite",
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
    CLOSE = "close"  # close the fd
    DONE = "done"


class Event(enum.StrEnum):
    """What a driver reports back, plus the refinements the plan derives itself.

    Drivers feed ``FLUSHED``, ``DONE``, ``DATA``, ``PEER_EOF``, ``TIMEOUT``,
    ``RESET``, ``ERROR``, ``UNACKED_NONE``, ``UNACKED_SOME`` and ``ACKED``. The plan
    turns ``TIMEOUT`` into ``IDLE_TIMEOUT``, ``LINGER_TIME``, ``PEER_TIMEOUT`` or
    ``RECHECK`` by looking at its deadlines, ``DATA`` past a bound into ``BYTE_CAP``,
    ``LINGER_TIME``, ``PEER_TIMEOUT`` or ``RECHECK``, and ``ACKED`` into ``IDLE`` when
    the peer's grace was over before the close began; those refined events are what
    :data:`TRANSITIONS` is keyed on.
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
    # derived by the plan
    RECHECK = "recheck"  # peer-first: time to ask the kernel again
    IDLE = "idle"  # peer-first: the peer's last ACK is older than its grace
    IDLE_TIMEOUT = "idle-timeout"
    LINGER_TIME = "linger-time"
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


# -- the transition table --------------------------------------------------------------------
#
# Keyed by (phase, refined event). START is fed by the plan itself with the mode's
# entry phase; USE_* by the FALLBACK phase. Anything not in the table is a driver bug.

_ENDS_DRAIN: Final = (
    Event.IDLE_TIMEOUT,
    Event.LINGER_TIME,
    Event.BYTE_CAP,
    Event.RESET,
    Event.ERROR,
)

TRANSITIONS: Final[Mapping[tuple[Phase, Event], Phase]] = {
    # flush
    (Phase.FLUSH, Event.FLUSHED): Phase.SHUTDOWN,
    (Phase.FLUSH, Event.LINGER_TIME): Phase.CLOSE,
    (Phase.FLUSH, Event.RESET): Phase.CLOSE,
    (Phase.FLUSH, Event.ERROR): Phase.CLOSE,
    (Phase.FLUSH_NO_FIN, Event.FLUSHED): Phase.CHECK_ACKED,
    (Phase.FLUSH_NO_FIN, Event.PEER_TIMEOUT): Phase.FALLBACK,
    (Phase.FLUSH_NO_FIN, Event.RESET): Phase.CLOSE,
    (Phase.FLUSH_NO_FIN, Event.ERROR): Phase.CLOSE,
    # our FIN
    (Phase.SHUTDOWN, Event.DONE): Phase.DRAIN,
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
    # abort, close
    (Phase.ABORT, Event.DONE): Phase.CLOSE,
    (Phase.ABORT, Event.ERROR): Phase.CLOSE,
    (Phase.CLOSE, Event.DONE): Phase.DONE,
    (Phase.CLOSE, Event.ERROR): Phase.DONE,
}

#: Where each mode starts.
ENTRY: Final[Mapping[CloseMode, Phase]] = {
    CloseMode.GRACEFUL: Phase.FLUSH,
    CloseMode.PEER_FIRST: Phase.FLUSH_NO_FIN,
    CloseMode.ABORT: Phase.ABORT,
    CloseMode.DEFAULT: Phase.CLOSE,
}

_OUTCOME_OF: Final[Mapping[Event, Outcome]] = {
    Event.PEER_EOF: Outcome.PEER_EOF,
    Event.IDLE_TIMEOUT: Outcome.IDLE_TIMEOUT,
    Event.LINGER_TIME: Outcome.LINGER_TIME,
    Event.BYTE_CAP: Outcome.BYTE_CAP,
    Event.RESET: Outcome.RESET,
    Event.ERROR: Outcome.ERROR,
}
_FALLBACK_EVENT: Final[Mapping[Fallback, Event]] = {
    Fallback.GRACEFUL: Event.USE_GRACEFUL,
    Fallback.ABORT: Event.USE_ABORT,
    Fallback.AUTO: Event.USE_AUTO,
}


# -- actions ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Flush:
    """Wait until our buffered writes have gone to the kernel, until ``deadline``.

    Feed ``FLUSHED``, or ``TIMEOUT`` at the deadline, ``RESET``/``ERROR``. Plain
    sockets have no user-space buffer: feed ``FLUSHED`` at once.
    """

    deadline: float


@dataclass(frozen=True, slots=True)
class ShutdownWrite:
    """Send our FIN (``shutdown(SHUT_WR)``, ``write_eof()``, or TLS close_notify + FIN).
    Feed ``DONE``, ``RESET`` or ``ERROR``."""


@dataclass(frozen=True, slots=True)
class Receive:
    """Read and discard what the peer sends.

    Wait at most until ``deadline`` and, when ``idle_timeout`` is not None, at most
    that long since the last data; read at most ``max_bytes`` in all before feeding
    back. Feed ``DATA`` with the byte count (more ``Receive`` actions follow),
    ``PEER_EOF``, ``TIMEOUT``, ``RESET`` or ``ERROR``.
    """

    deadline: float
    idle_timeout: float | None
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
    """Close the fd (or the transport). Feed ``DONE`` or ``ERROR``."""


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
        finished: the driver's monotonic time at the last event.
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


_new_result: Final = PlanResult

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
ACK_POLL_MIN_S: Final = 0.001
ACK_POLL_MAX_S: Final = 0.05

#: The actions that carry no data are shared instances (they are frozen).
_FIXED_ACTIONS: Final[Mapping[Phase, Action]] = {
    Phase.SHUTDOWN: ShutdownWrite(),
    Phase.CHECK_UNACKED: MeasureUnacked(),
    Phase.CHECK_ACKED: MeasureAcked(),
    Phase.ABORT: SetLingerZero(),
    Phase.CLOSE: Close(),
}


class PlanStateError(RuntimeError):
    """A driver fed an event the current phase does not accept: a bug in the driver."""


# Enum members as module globals, for the hot paths of the plan. On Python 3.11
# ``Event.DONE`` is looked up through the enum's metaclass (about 80 ns, a global
# about 10), and a close makes dozens of such lookups.
_EVENT_ACKED = Event.ACKED
_EVENT_BYTE_CAP = Event.BYTE_CAP
_EVENT_DATA = Event.DATA
_EVENT_DONE = Event.DONE
_EVENT_ERROR = Event.ERROR
_EVENT_FLUSHED = Event.FLUSHED
_EVENT_IDLE = Event.IDLE
_EVENT_IDLE_TIMEOUT = Event.IDLE_TIMEOUT
_EVENT_LINGER_TIME = Event.LINGER_TIME
_EVENT_PEER_EOF = Event.PEER_EOF
_EVENT_PEER_TIMEOUT = Event.PEER_TIMEOUT
_EVENT_RECHECK = Event.RECHECK
_EVENT_START = Event.START
_EVENT_TIMEOUT = Event.TIMEOUT
_EVENT_UNACKED_SOME = Event.UNACKED_SOME
_EVENT_USE_GRACEFUL = Event.USE_GRACEFUL
_FALLBACK_ABORT = Fallback.ABORT
_FALLBACK_GRACEFUL = Fallback.GRACEFUL
_MODE_ABORT = CloseMode.ABORT
_MODE_DEFAULT = CloseMode.DEFAULT
_MODE_GRACEFUL = CloseMode.GRACEFUL
_MODE_PEER_FIRST = CloseMode.PEER_FIRST
_OUTCOME_ABORTED = Outcome.ABORTED
_OUTCOME_CLOSED = Outcome.CLOSED
_OUTCOME_ERROR = Outcome.ERROR
_PHASE_ABORT = Phase.ABORT
_PHASE_AWAIT_ACK = Phase.AWAIT_ACK
_PHASE_AWAIT_PEER = Phase.AWAIT_PEER
_PHASE_CHECK_ACKED = Phase.CHECK_ACKED
_PHASE_CHECK_UNACKED = Phase.CHECK_UNACKED
_PHASE_CLOSE = Phase.CLOSE
_PHASE_DONE = Phase.DONE
_PHASE_DRAIN = Phase.DRAIN
_PHASE_FALLBACK = Phase.FALLBACK
_PHASE_FLUSH = Phase.FLUSH
_PHASE_FLUSH_NO_FIN = Phase.FLUSH_NO_FIN
_PHASE_SHUTDOWN = Phase.SHUTDOWN


# -- the plan ----------------------------------------------------------------------------------


class ClosePlan:
    """Runs one close policy for one connection. See the module docstring.

    Args:
        policy: the policy to apply.
        now: the driver's monotonic clock at the start of the close.
        peer_eof: True when the driver already knows the peer's FIN arrived (for
            example the transport got ``eof_received`` before the close began).
        label: text identifying the connection in debug logs (e.g. the 4-tuple).
        half_close: the close was asked for by ``write_eof()``: the protocol wants
            its FIN sent, so a ``peer-first`` fallback is always ``graceful``.
    """

    __slots__ = (
        "_action",
        "_budget",
        "_deadline",
        "_drained",
        "_fallback",
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
        #: peer-first: the end of the current wait (the next look at the kernel while
        #: our bytes are unacknowledged; the end of the peer's grace after).
        self._wait_until = now
        #: peer-first: the kernel's last answer (seconds).
        self._rtt = 0.0
        self._since_sent = 0.0
        self._since_recv = math.inf
        self._fin_sent = False
        self._linger_zero = False
        self._fallback: Fallback | None = None
        self._mode_applied = policy.mode
        self._outcome: Outcome | None = None
        self._trace: list[tuple[Phase, Event]] = []
        mode = policy.mode
        self._phase = ENTRY[mode]
        if mode is _MODE_GRACEFUL:
            self._deadline = now + policy.linger_time
        elif mode is _MODE_PEER_FIRST:
            self._deadline = now + policy.timeout
        else:
            self._deadline = now
        self._trace.append((self._phase, _EVENT_START))
        if mode is _MODE_ABORT:
            self._outcome = _OUTCOME_ABORTED
        elif mode is _MODE_DEFAULT:
            self._outcome = _OUTCOME_CLOSED
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
        # (Made once per phase, here and not in a helper: this runs for every step of
        # every close, and a Python call costs about as much as the rest of it.)
        phase = self._phase
        action = _FIXED_ACTIONS.get(phase)
        if action is None:
            if phase is _PHASE_DRAIN:
                action = Receive(self._deadline, self.policy.idle_timeout, self._budget)
            elif phase is _PHASE_AWAIT_PEER or phase is _PHASE_AWAIT_ACK:
                action = Receive(self._wait_until, None, self._budget)
            elif phase is _PHASE_FLUSH or phase is _PHASE_FLUSH_NO_FIN:
                action = Flush(self._deadline)
            else:
                assert phase is _PHASE_DONE
                action = Finished(self.result())
        self._action = action
        return action

    def result(self) -> PlanResult:
        """How the close went (so far: final once the plan is :attr:`done`)."""
        return _new_result(
            self.policy.mode,
            self._mode_applied,
            self._outcome or _OUTCOME_ERROR,
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
        *,
        nbytes: int = 0,
        rtt: float = 0.0,
        since_sent: float = 0.0,
        since_recv: float = math.inf,
    ) -> None:
        """Tell the plan what happened at monotonic time ``now``.

        ``nbytes`` goes with ``DATA``: how many bytes were read and discarded.
        ``rtt``, ``since_sent`` and ``since_recv`` go with ``ACKED`` and
        ``UNACKED_SOME``: the kernel's round-trip time, the time since our last data
        segment left and since the peer's last data arrived, in seconds.

        Raises:
            PlanStateError: the event does not fit the current phase (a driver bug).
        """
        phase = self._phase
        # Only these four are ever refined (a flush refined only when it ended late);
        # the others are what the table is keyed on.
        if event is _EVENT_ACKED or event is _EVENT_UNACKED_SOME:
            self._rtt = rtt
            self._since_sent = since_sent
            self._since_recv = since_recv
        if (
            event is _EVENT_DATA
            or event is _EVENT_TIMEOUT
            or event is _EVENT_ACKED
            or (event is _EVENT_FLUSHED and now >= self._deadline)
        ):
            refined = self._refine(event, now, nbytes)
        else:
            refined = event
        target = TRANSITIONS.get((phase, refined))
        if target is None:
            raise PlanStateError(f"event {refined} is not expected in phase {phase}")
        self._trace.append((phase, refined))
        self._finished = now
        self._action = None
        if target is phase:  # more data while draining: only the budget moved
            return
        if self.debug:
            self._log("%s --%s--> %s", phase, refined, target)
        self._leave(phase, refined, target, now)

    # -- internals -----------------------------------------------------------------------

    def _refine(self, event: Event, now: float, nbytes: int) -> Event:
        phase = self._phase
        if event is _EVENT_ACKED:
            if phase is not _PHASE_CHECK_ACKED:
                return event  # (not expected: the table says so)
            if now >= self._deadline:
                return _EVENT_PEER_TIMEOUT
            if self._peer_eof:
                return event  # the FIN is here: the wait ends at once
            # Nothing sent or received for longer than the grace: idle.
            if self._quiet() >= self.policy.grace:
                return _EVENT_IDLE
            return event
        waiting_for_peer = (
            phase is _PHASE_AWAIT_PEER or phase is _PHASE_AWAIT_ACK or phase is _PHASE_FLUSH_NO_FIN
        )
        if event is _EVENT_DATA:
            if nbytes < 0:
                raise PlanStateError(f"DATA with a negative byte count {nbytes}")
            self._drained += nbytes
            self._budget = max(0, self._budget - nbytes)
            if self._budget == 0:
                return _EVENT_BYTE_CAP
            if now >= self._deadline:
                return _EVENT_PEER_TIMEOUT if waiting_for_peer else _EVENT_LINGER_TIME
            if waiting_for_peer and phase is not _PHASE_FLUSH_NO_FIN and now >= self._wait_until:
                return _EVENT_RECHECK if phase is _PHASE_AWAIT_ACK else _EVENT_PEER_TIMEOUT
            return _EVENT_DATA
        if event is _EVENT_TIMEOUT:
            if phase is _PHASE_AWAIT_ACK and now < self._deadline:
                return _EVENT_RECHECK
            if waiting_for_peer:
                return _EVENT_PEER_TIMEOUT
            if phase is _PHASE_DRAIN and now < self._deadline:
                return _EVENT_IDLE_TIMEOUT
            return _EVENT_LINGER_TIME
        if event is _EVENT_FLUSHED and now >= self._deadline:
            # flushed, but too late to wait for anything more
            if phase is _PHASE_FLUSH_NO_FIN:
                return _EVENT_PEER_TIMEOUT
            if phase is _PHASE_FLUSH:
                return _EVENT_LINGER_TIME
        return event

    def _leave(self, phase: Phase, event: Event, target: Phase, now: float) -> None:
        policy = self.policy
        if event is _EVENT_PEER_EOF:
            self._peer_eof = True
            # Known at the start (peer_eof=True), or the FIN came before ours.
            self._peer_closed_first = self._peer_closed_first or not self._fin_sent
        elif phase is _PHASE_SHUTDOWN and event is _EVENT_DONE:
            self._fin_sent = True
        elif phase is _PHASE_ABORT and event is _EVENT_DONE:
            self._linger_zero = True
        if target is _PHASE_CLOSE:
            if phase is _PHASE_ABORT:
                self._outcome = _OUTCOME_ABORTED if event is _EVENT_DONE else _OUTCOME_ERROR
            else:
                self._outcome = _OUTCOME_OF[event]
        if phase is _PHASE_CHECK_ACKED:
            self._wait_until = self._peer_wait_until(event, now)
        if phase is _PHASE_FALLBACK or phase is _PHASE_CHECK_UNACKED:
            if target is _PHASE_FLUSH:
                self._fallback = _FALLBACK_GRACEFUL
                self._mode_applied = _MODE_GRACEFUL
                self._deadline = now + policy.linger_time
            elif target is _PHASE_ABORT:
                self._fallback = _FALLBACK_ABORT
                self._mode_applied = _MODE_ABORT
        self._phase = target
        if target is _PHASE_DONE:
            self.done = True
        # Decisions that need no I/O are taken at once.
        if target is _PHASE_FALLBACK:
            # write_eof(): the protocol asked for a FIN; a reset would cut its stream.
            if self._half_close:
                self.feed(_EVENT_USE_GRACEFUL, now)
            else:
                self.feed(_FALLBACK_EVENT[policy.fallback], now)
        elif target is _PHASE_DRAIN and self._budget == 0:
            self.feed(_EVENT_BYTE_CAP, now)

    def _peer_wait_until(self, event: Event, now: float) -> float:
        """When the wait that follows a look at the kernel ends (bounded by timeout)."""
        if event is _EVENT_UNACKED_SOME:
            # A slow reader, or a round trip under way: look again in about one RTT.
            poll = min(max(self._rtt, ACK_POLL_MIN_S), ACK_POLL_MAX_S)
            return min(now + poll, self._deadline)
        if event is _EVENT_ACKED and not self._peer_eof:
            grace = self.policy.grace
            return min(now - self._quiet() + grace, now + grace, self._deadline)
        if event is _EVENT_ERROR:
            return min(now + self.policy.grace, self._deadline)  # cannot tell: from now
        return self._deadline

    def _quiet(self) -> float:
        """How long the peer has had nothing to answer: our last segment reached it
        about a round trip after it left (its ACK or FIN takes the way back), and its
        own last data, if later, shows it was still busy then."""
        return min(self._since_sent - self._rtt, self._since_recv)

    def _log(self, message: str, *args: object) -> None:
        logger.debug("close %s: " + message, self._label or "-", *args)
