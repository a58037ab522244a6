"""The asyncio driver: runs the close plan on one connection's transport.

The close logic lives in ``_plan.py``; this module only carries out its steps on a
transport, with every wait going through the event loop:

* ``Flush``: wait until the transport's write buffer is empty (polled with a short
  back-off and woken early by ``resume_writing``), bounded by the plan's deadline.
* ``ShutdownWrite``: ``transport.write_eof()``. Over TLS: once nothing the peer sent
  is left unread, the TLS transport's ``close()`` sends close_notify; the TLS layer
  sends our FIN when the peer has answered it (see :meth:`_Closer._quiet`).
* ``Receive``: what the peer sends arrives through the protocol callbacks of
  :class:`~tcpclose._aio_proxy.PolicyProtocol`, which stands between the transport and
  the application's protocol; while the policy drains, data is counted and discarded,
  never delivered.
* ``SetLingerZero``: ``SO_LINGER {1, 0}`` on the transport's socket, then
  ``transport.abort()`` (asyncio's and uvloop's ``abort()`` alone send a FIN).
* ``Close``: ``transport.close()`` (or ``abort()`` when something must be dropped),
  then wait for ``connection_lost``; the kernel state is looked up once the fd is gone.

The driver is callback-driven: no task runs per close. :func:`aclose` and the
servers wait on a future the driver resolves; cancelling the waiter does not stop
the close, which always ends within the policy's bounds. The bounds are kept in the
loop's shared deadline slots (:class:`_Deadlines`, 5 ms wide), not one timer per close.

The closer sees its connection through :class:`ClosingConnection` (implemented by
the wrapper protocol) and calls nothing above it. A busy server runs this once per
connection: each step makes few calls, and nothing is measured that neither the plan
nor the report needs. ``benchmarks/bench_aio.py`` measures it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
import struct
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any, Final, Protocol, cast

from . import _findings, _kernel, _observe
from ._aio_transport import _TransportLike
from ._errors import PolicyError
from ._kernel._sockopt import read_outgoing, read_unread
from ._kernel._types import KernelState, TcpState
from ._linger import LINGER_OFF
from ._observe import read_acked
from ._plan import (
    Close,
    Course,
    Event,
    Flush,
    MeasureAcked,
    MeasureUnacked,
    Plan,
    Receive,
    SetLingerZero,
    ShutdownWrite,
    acked_event,
    course_of,
    course_result,
    error_event,
    grace_until,
    start_course,
    start_plan,
)
from ._policy import CloseMode, ClosePolicy
from ._report import CloseReport, Observed, build_report

logger = logging.getLogger("tcpclose")

#: The members the closes use, bound once (on Python 3.11 an enum member read from its
#: class costs about 960 instructions, a module global 50: callgrind).
_EVENT_ACKED: Final = Event.ACKED
_EVENT_DATA: Final = Event.DATA
_EVENT_DONE: Final = Event.DONE
_EVENT_ERROR: Final = Event.ERROR
_EVENT_FLUSHED: Final = Event.FLUSHED
_EVENT_PASSIVE_END: Final = Event.PASSIVE_END
_EVENT_PEER_EOF: Final = Event.PEER_EOF
_EVENT_PEER_FIN_FIRST: Final = Event.PEER_FIN_FIRST
_EVENT_RESET: Final = Event.RESET
_EVENT_TIMEOUT: Final = Event.TIMEOUT
_EVENT_UNACKED_NONE: Final = Event.UNACKED_NONE
_EVENT_UNACKED_SOME: Final = Event.UNACKED_SOME
_MODE_ABORT: Final = CloseMode.ABORT
_MODE_DEFAULT: Final = CloseMode.DEFAULT

_LINGER_ZERO: Final = struct.pack("ii", 1, 0)
#: How long to wait for ``connection_lost`` after ``close()``/``abort()`` of a
#: transport with nothing left to send (it normally comes on the next loop turn).
_CLOSE_GRACE: Final = 1.0
#: Flush polling: first interval and the cap of its doubling.
_FLUSH_POLL_FIRST: Final = 0.002
_FLUSH_POLL_MAX: Final = 0.05
#: Where a socket that closed second ends: it has nothing to keep (CLOSED: no socket).
#: The plan hears of it (``PASSIVE_END``) and decides what it means.
_PASSIVE_END_STATES: Final = frozenset({TcpState.LAST_ACK, TcpState.CLOSED})
#: The most a TCP transport hands to ``data_received`` at once: asyncio's selector
#: transport reads 256 KiB at a time, uvloop's 256,000 bytes. While more than this is
#: left of the drain's byte budget, what arrives cannot overshoot it and the wrapper
#: counts it as it comes; below, a sink reading at most the budget left takes over (a
#: ``BufferedProtocol``: the transport reads into its buffer). TLS transports join
#: what they decrypted into one ``data_received`` of any size: the sink from the start.
_LARGEST_READ: Final = 256 * 1024


class _Wait:
    """What a close waits for. (Plain strings, not an enum: a close reads these a dozen
    times, and on Python 3.11 reading an enum member from its class costs about 960
    instructions against 60 for a plain class attribute; callgrind.)"""

    NONE: Final = "none"
    FLUSH: Final = "flush"
    QUIET: Final = "quiet"  # over TLS, before close_notify: until nothing more is readable
    RECEIVE: Final = "receive"
    CLOSE: Final = "close"
    DONE: Final = "done"


# -- when the kernel state is looked up ---------------------------------------------------


class KernelStateChoice:
    """When a report's kernel state (the 4-tuple's, just after the close) is looked up:
    the ``kernel_state`` keyword of :func:`~tcpclose.aio.with_policy`,
    :func:`~tcpclose.aio.aclose` and the servers.

    * ``"eager"`` (default): once the fd is closed, before the report is delivered.
    * ``"lazy"``: when the report's ``kernel_state`` is first read (never, when
      nothing reads it). TLS connections are looked up eagerly: over TLS the kernel's
      state tells who closed first.
    * ``"sampled:F"``: eagerly for a fraction ``F`` (0 < F <= 1) of the closes, the
      first one included; the others report no kernel state.

    Made by :func:`kernel_state_choice`; one object per spelling, shared by every
    close that uses it (the sampling counts across them).
    """

    __slots__ = ("_credit", "fraction", "how", "text")

    def __init__(self, how: str, fraction: float = 1.0) -> None:
        #: ``"eager"``, ``"lazy"`` or ``"sampled"``.
        self.how = how
        self.fraction = fraction
        #: The canonical spelling, which reports state (``CloseReport.kernel_state_mode``).
        self.text = f"sampled:{fraction:g}" if how == "sampled" else how
        self._credit = 1.0  # (so that the first close is sampled)

    def __repr__(self) -> str:
        return f"KernelStateChoice({self.text!r})"

    def sample(self) -> bool:
        """For ``sampled``: whether this close is looked up (every 1/F-th close)."""
        credit = self._credit
        if credit >= 1.0 - 1e-9:
            self._credit = credit - 1.0 + self.fraction
            return True
        self._credit = credit + self.fraction
        return False


_KERNEL_STATE_ACCEPTED: Final = ("eager", "lazy", "sampled:FRACTION (0 < FRACTION <= 1)")


@functools.lru_cache(maxsize=64)
def _parse_kernel_state(text: str) -> KernelStateChoice:
    how, sep, rest = text.strip().lower().partition(":")
    if not sep and how in ("eager", "lazy"):
        return KernelStateChoice(how)
    if how == "sampled" and sep:
        try:
            fraction = float(rest)
        except ValueError:
            fraction = -1.0
        if 0.0 < fraction <= 1.0:
            return KernelStateChoice("sampled", fraction)
        raise PolicyError(
            f"kernel_state: the fraction must be a number in (0, 1], got {rest.strip()!r}",
            word=text,
            accepted=_KERNEL_STATE_ACCEPTED,
        )
    raise PolicyError(
        f"kernel_state: unknown value {text!r}", word=text, accepted=_KERNEL_STATE_ACCEPTED
    )


def kernel_state_choice(value: str | KernelStateChoice) -> KernelStateChoice:
    """The :class:`KernelStateChoice` for ``value``: ``"eager"``, ``"lazy"`` or
    ``"sampled:F"`` (case and spaces around it ignored).

    Raises:
        PolicyError: an unknown value, or a fraction outside (0, 1].
        TypeError: ``value`` is not a string.
    """
    if isinstance(value, KernelStateChoice):
        return value
    if not isinstance(value, str):
        raise TypeError(
            "kernel_state: expected 'eager', 'lazy' or 'sampled:FRACTION', "
            f"got {type(value).__qualname__} instead"
        )
    return _parse_kernel_state(value)


EAGER: Final = kernel_state_choice("eager")


# -- deadlines ----------------------------------------------------------------------------

#: The closes on one loop wait in deadline slots this long, each slot with one loop
#: timer. A busy server starts thousands of closes a second and nearly every wait
#: ends early (the peer's FIN comes): a timer per close, made, pushed on the loop's
#: heap and cancelled, cost more than the rest of the wait. A wait therefore ends up
#: to one slot after its deadline.
_SLOT: Final = 0.005
_SLOTS_PER_S: Final = 200
#: Where a loop keeps its slots (an attribute of the loop object).
_DEADLINES_ATTR: Final = "_tcpclose_deadlines"


#: How long the end of a loop waits for the closes it cut short to be reported.
_LOOP_END_WAIT: Final = 1.0


class _Deadlines:
    """The deadline slots of one event loop's closes (see :data:`_SLOT`), and the
    closes under way on it, so that they end cleanly with the loop.

    When ``asyncio.run()`` (or any ``asyncio.Runner``, uvloop's too) ends while closes
    are still waiting for peers, those closes are cut short instead of leaving open
    transports to a closed loop ("unclosed transport" ResourceWarnings): their
    transports are aborted (the fd is closed at once: a FIN, or RST where input is
    unread), each report says ``error="RuntimeError: event loop closing"`` and
    ``on_close`` gets it. The hook is an async generator the loop knows (its
    ``shutdown_asyncgens()``, which runners call, closes it): no task, no per-close cost
    but a set entry.
    """

    __slots__ = ("_completing", "_loop", "_loop_end", "active", "clock", "slots")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        #: The loop's clock. asyncio's ``loop.time()`` is a Python method returning
        #: ``time.monotonic()``: on that loop the closes call the latter directly.
        self.clock: Callable[[], float] = (
            time.monotonic if type(loop).time is asyncio.BaseEventLoop.time else loop.time
        )
        #: slot number -> the closes waiting in it (a dict: ordered, like the heap)
        self.slots: dict[int, dict[_Closer | _QuickClose, None]] = {}
        #: The closes under way on this loop.
        self.active: set[_Closer | _QuickClose] = set()
        #: The closes to complete on the next loop turn (:meth:`complete_soon`).
        self._completing: list[_Closer | _QuickClose] = []
        self._loop_end = _at_loop_end(self)
        _start_async_generator(self._loop_end)

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Deadlines:
        """The loop's slots, made on first use. (On a loop that takes no attributes
        every close gets slots of its own: correct, only not shared.)"""
        # (Typed by annotation, not cast(): that is a Python call, on every close.)
        deadlines: _Deadlines | None = getattr(loop, _DEADLINES_ATTR, None)
        if deadlines is None:
            deadlines = cls(loop)
            with contextlib.suppress(AttributeError, TypeError):
                setattr(loop, _DEADLINES_ATTR, deadlines)
        return deadlines

    def add(self, closer: _Closer | _QuickClose, when: float) -> int:
        """Wake ``closer.on_deadline(slot)`` at the end of the slot holding ``when``."""
        slot = int(when * _SLOTS_PER_S) + 1
        waiting = self.slots.get(slot)
        if waiting is None:
            waiting = self.slots[slot] = {}
            self._loop.call_at(slot / _SLOTS_PER_S, self._expire, slot)
        waiting[closer] = None
        return slot

    def _expire(self, slot: int) -> None:
        waiting = self.slots.pop(slot, None)
        if waiting:
            for closer in waiting:
                try:
                    closer.on_deadline(slot)
                except Exception as exc:  # one close's bug must not stall the others
                    self._loop.call_exception_handler(
                        {"message": "tcpclose: a close failed at its deadline", "exception": exc}
                    )

    def complete_soon(self, closer: _Closer | _QuickClose) -> None:
        """Complete ``closer`` on the next loop turn, with every close that ends in
        this one: one loop callback for all of them, not one each."""
        completing = self._completing
        if not completing:
            self._loop.call_soon(self._complete_all)
        completing.append(closer)

    def _complete_all(self) -> None:
        completing, self._completing = self._completing, []
        for closer in completing:
            try:
                closer._complete()
            except Exception as exc:  # one close's bug must not stall the others
                self._loop.call_exception_handler(
                    {"message": "tcpclose: completing a close failed", "exception": exc}
                )

    async def end_all(self) -> None:
        """The loop is ending: cut every close under way short and wait (bounded) for
        their reports."""
        closers = list(self.active)
        for closer in closers:
            closer.cut_short()
        waiting = [closer.wait() for closer in closers if not closer.done]
        if waiting:
            await asyncio.wait(waiting, timeout=_LOOP_END_WAIT)


async def _at_loop_end(deadlines: _Deadlines) -> AsyncGenerator[None, None]:
    """Suspended for the loop's lifetime; its ``finally`` runs when the loop's
    ``shutdown_asyncgens()`` closes it."""
    try:
        yield
    finally:
        await deadlines.end_all()


def _start_async_generator(agen: AsyncGenerator[None, None]) -> None:
    """Run ``agen`` to its first ``yield`` now (it awaits nothing before it). Its first
    step calls the running loop's ``firstiter`` hook, which registers it with the loop."""
    step = agen.asend(None)
    try:
        step.send(None)
    except StopIteration:
        return
    raise RuntimeError("the loop-end hook did not stop at its yield")  # pragma: no cover


class ClosingConnection(Protocol):
    """What the closer sees of its connection (the wrapper protocol,
    :class:`~tcpclose._aio_proxy.PolicyProtocol`, implements it). Read-only: the
    closer changes nothing of the connection's; the connection tells it what happens
    through the closer's ``on_*`` methods."""

    @property
    def real(self) -> _TransportLike:
        """The transport."""

    @property
    def ssl(self) -> bool:
        """The transport is a TLS transport."""

    @property
    def optsock(self) -> Any:
        """What socket options and ioctls go through."""

    @property
    def peer_eof(self) -> bool:
        """The peer's FIN (or TLS close_notify) has arrived."""

    @property
    def eof_read(self) -> bool:
        """The transport read everything up to the peer's EOF."""

    @property
    def lost(self) -> bool:
        """The transport called ``connection_lost``."""

    def socket(self) -> Any:
        """The transport's socket."""

    def buffered(self) -> int:
        """Bytes of ours still in user-space buffers."""

    def divert_to_sink(self) -> None:
        """From now on the transport's data goes to a sink that reads at most the
        drain's budget left (:meth:`_Closer.budget_left`)."""

    def close_finished(self, closer: _Closer | _QuickClose) -> None:
        """The close is over (its report can be had)."""

    @property
    def linger_check(self) -> bool:
        """``SO_LINGER`` may have been set where the library has not looked: the
        application had the socket, or the listener's setting, which accepted sockets
        inherit, is not known yet."""

    def linger_seen(self, lingers: bool) -> None:
        """What a check found: ``SO_LINGER`` on with a time (``lingers``) or not."""


def _kernel_timing(
    conn: ClosingConnection, report: bool, kernel_state: KernelStateChoice
) -> tuple[str, str]:
    """When a close's kernel state is looked up ("eager": once the fd is closed,
    "lazy": when the report's kernel_state is first read, "skip"), and what the report
    says of it."""
    how = kernel_state.how
    if not report:
        return "skip", "off"
    if how == "eager" or (how == "lazy" and conn.ssl):
        return "eager", "eager"  # (over TLS the state after the close tells who closed first)
    if how == "lazy":
        return "lazy", "lazy"
    return ("eager" if kernel_state.sample() else "skip"), kernel_state.text


def _watch(conn: ClosingConnection, report: bool) -> _observe.Watch:
    """The measurements of one close. With a report, the kernel is asked whether the
    peer's FIN is already queued, unread by the loop (CLOSE_WAIT): then the peer closed
    first, whatever order the plan sees the FIN in (it is told after the close,
    PEER_FIN_FIRST)."""
    sock = conn.optsock
    if not report:
        return _observe.Watch(sock, report=False)
    return _observe.Watch(
        sock,
        report=True,
        peer_fin=True if conn.peer_eof else None,
        extra_info=conn.real.get_extra_info,  # (the addresses as recorded)
    )


def _lazy_lookup(watch: _observe.Watch) -> Callable[[], KernelState | None] | None:
    """What a ``lazy`` report's kernel state is looked up by. (The lookup's own
    parameters, not the watch: it refers to the transport. The cookie makes sure a
    later connection on the 4-tuple is not taken for ours.)"""
    if watch.local is None or watch.peer is None:
        return None
    return functools.partial(_kernel.lookup, watch.local, watch.peer, cookie=watch._cookie)


class _Detached:
    """What a finished closer holds instead of its connection: lost, with no
    transport (so that no cycle outlives the close)."""

    __slots__ = ()

    ssl = False
    optsock = None
    peer_eof = False
    eof_read = False
    lost = True

    @property
    def real(self) -> _TransportLike:
        raise AttributeError("the close is over: no transport")

    def socket(self) -> Any:
        raise AttributeError("the close is over: no socket")

    def buffered(self) -> int:
        return 0

    def divert_to_sink(self) -> None:
        pass

    def close_finished(self, closer: _Closer | _QuickClose) -> None:
        pass

    linger_check = False

    def linger_seen(self, lingers: bool) -> None:
        pass


_DETACHED: Final = _Detached()


# -- the driver ---------------------------------------------------------------------------


class _Closer:
    """Runs one close plan on one connection, driven by loop callbacks and timers.

    The connection (a :class:`ClosingConnection`) reports what happens on the transport
    through ``on_data``, ``on_eof``, ``on_lost`` and ``on_resume_writing``; timers
    bound every wait. When the plan is finished the report is built, ``on_close``
    called and every waiter resolved.
    """

    __slots__ = (
        "_allow_data_loss",
        "_clock",
        "_conn",
        "_deadline",
        "_deadlines",
        "_fin_queued",
        "_forced",
        "_kernel_mode",
        "_kernel_state",
        "_kernel_when",
        "_loop",
        "_lost_exc",
        "_measured",
        "_pending_bytes",
        "_plan",
        "_poll",
        "_quiet_deadline",
        "_report",
        "_resumed",
        "_sink",
        "_slot",
        "_started",
        "_timer",
        "_trigger",
        "_wait",
        "_waiters",
        "_watch",
        "background",
        "closed_transport",
        "deliver",
        "done",
        "findings",
    )

    def __init__(
        self,
        conn: ClosingConnection,
        loop: asyncio.AbstractEventLoop | None,
        policy: ClosePolicy,
        trigger: str,
        report: bool,
        allow_data_loss: bool = False,
        deliver: bool = False,
        background: bool = True,
        kernel_state: KernelStateChoice = EAGER,
        started: float | None = None,
    ) -> None:
        # (Positional parameters, and few calls below: a busy server makes thousands
        # of these a second, and a Python call and its few lines cost about 0.3 us.)
        # ``started``: when a quick close that hands over to this one began.
        if loop is None:
            loop = asyncio.get_running_loop()
        self._loop = loop
        self._conn: ClosingConnection = conn
        self._trigger = trigger
        self._allow_data_loss = allow_data_loss
        #: While True (``write_eof()`` under peer-first, before the protocol's own
        #: close) data and EOF still reach the application's protocol.
        self.deliver = deliver
        #: True: issue the warnings when done (no caller is there to point at).
        self.background = background
        #: When the kernel state is looked up: "eager" (once the fd is closed), "lazy"
        #: (when the report's kernel_state is first read) or "skip"; and what the
        #: report says of it.
        self._kernel_when, self._kernel_mode = _kernel_timing(conn, report, kernel_state)
        self._watch = _watch(conn, report)
        self._fin_queued = report and not conn.peer_eof and self._watch.peer_fin_first
        deadlines = self._deadlines = _Deadlines.of(loop)
        clock = self._clock = deadlines.clock
        now = clock() if started is None else started
        # (deliver: write_eof() under peer-first, whose fallback is always our FIN;
        # over TLS our FIN waits for the peer's answer to our close_notify)
        self._plan = start_plan(
            policy,
            now,
            peer_eof=conn.peer_eof,
            label=self._watch.label,
            half_close=deliver,
            fin_deferred=conn.ssl,
        )
        self._started = now
        self._deadline = now
        self._poll = _FLUSH_POLL_FIRST
        self._quiet_deadline = now
        self._wait = _Wait.NONE
        self._timer: asyncio.TimerHandle | None = None
        self._slot: int | None = None
        self._pending_bytes = 0
        self._lost_exc: BaseException | None = None
        self._measured = False
        self._resumed = False
        self._sink = False
        self._forced = False
        #: close() or abort() was called on the real transport.
        self.closed_transport = False
        self._waiters: list[asyncio.Future[CloseReport]] | None = None
        self.findings: tuple[_findings.Finding, ...] = ()
        #: The close is over (its report can be had from :attr:`report`).
        self.done = False
        self._kernel_state: KernelState | None = None
        self._report: CloseReport | None = None

    # -- public to the connection -----------------------------------------------------

    @property
    def report(self) -> CloseReport | None:
        """The report once the close is over (built when first asked for: on the
        server path with no ``on_close`` nobody may ever ask)."""
        if self._report is None and self.done:
            watch = self._watch
            observed = watch.observed(trigger=self._trigger, kernel_state=self._kernel_state)
            self._report = build_report(
                self._plan.policy,
                self._plan.result(),
                observed,
                kernel_state_mode=self._kernel_mode,
                lookup=_lazy_lookup(watch) if self._kernel_when == "lazy" else None,
            )
        return self._report

    def start(self) -> None:
        self._deadlines.active.add(self)
        conn = self._conn
        if conn.linger_check:
            self._check_linger(conn)
        self._advance(self._started)

    def _check_linger(self, conn: ClosingConnection) -> None:
        """``SO_LINGER`` with a time would block the loop in the fd's close: turn it
        off (TC201), unless the policy aborts (it sets its own {1, 0})."""
        lingers = self._watch.check_linger(nonblocking=True, event_loop=True)
        conn.linger_seen(lingers)
        if lingers and self._plan.policy.mode is not _MODE_ABORT:
            try:
                conn.optsock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_OFF)
            except (OSError, ValueError) as exc:
                logger.debug("close: could not turn SO_LINGER off: %s", exc)

    def cut_short(self) -> None:
        """The loop is ending: stop waiting for the peer; the transport is aborted now
        and the close ends when it reports ``connection_lost``."""
        if self.done or self._wait is _Wait.DONE:
            return
        self._forced = True
        self._lost_exc = RuntimeError("event loop closing")
        with contextlib.suppress(Exception):
            self._conn.real.abort()

    def wait(self) -> asyncio.Future[CloseReport]:
        """A future resolved with the report; cancelling it leaves the close running."""
        return _awaiting(self)

    def on_data(self, nbytes: int) -> None:
        """``nbytes`` arrived and were discarded."""
        if self._resumed and not self._sink and self.budget_left() - nbytes < _LARGEST_READ:
            self._install_sink()
        wait = self._wait
        if wait is _Wait.RECEIVE:
            self._received(nbytes)
        elif wait is not _Wait.DONE:
            self._pending_bytes += nbytes
            if not self.budget_left():
                # Not reading for the drain yet (still flushing) and nothing more may
                # be read: let the kernel hold the rest.
                with contextlib.suppress(Exception):
                    self._conn.real.pause_reading()

    def on_activity(self) -> None:
        """Data reached the application's protocol (deliver mode): the peer is not idle
        (told to the plan as data of no bytes for the drain)."""
        if self._wait is _Wait.RECEIVE:
            self._received(0)

    def _received(self, nbytes: int) -> None:
        """While waiting to receive: ``nbytes`` were discarded."""
        plan = self._plan
        phase = plan.phase
        plan.feed(_EVENT_DATA, self._clock(), nbytes=nbytes)
        if plan.phase is phase:
            return  # keep waiting; the timer re-arms itself for the new bounds
        self._stop_waiting()
        self._advance()

    def on_eof(self) -> None:
        """The peer's FIN (or TLS close_notify) arrived; ``conn.peer_eof`` is set."""
        wait = self._wait
        if wait is _Wait.RECEIVE:
            self._stop_waiting()
            now = self._clock()
            self._plan.feed(_EVENT_PEER_EOF, now)
            self._advance(now)
        elif wait is _Wait.FLUSH or wait is _Wait.QUIET:
            # Before our FIN (our buffer still drains, or over TLS we wait to send
            # close_notify): the plan notes it; the wait goes on.
            self._plan.feed(_EVENT_PEER_EOF, self._clock())

    def on_lost(self, exc: BaseException | None) -> None:
        """The transport called ``connection_lost``: its fd is closed right after."""
        if exc is not None or self._lost_exc is None:  # (else cut_short() said why)
            self._lost_exc = exc
        if not self._measured:
            self._measure_before_close()  # the fd is still open inside connection_lost
        wait = self._wait
        if wait is _Wait.RECEIVE or wait is _Wait.FLUSH:
            self._stop_waiting()
            self._plan.feed(self._lost_event(receiving=wait is _Wait.RECEIVE), self._clock())
            self._advance()
        elif wait is _Wait.CLOSE:
            self._wait = _Wait.NONE
            if self._slot is not None or self._timer is not None:
                self._stop_waiting()
            now = self._clock()
            self._plan.feed(_EVENT_DONE, now)
            self._advance(now)

    def on_resume_writing(self) -> None:
        if self._wait is _Wait.FLUSH and self._conn.buffered() == 0:
            # Not from here: the transport is inside its write callback, which goes on
            # after resume_writing() (CPython's shuts the socket down there if write_eof()
            # was called). Finish the flush on the next loop turn instead.
            self._stop_waiting()
            self._sleep(_Wait.FLUSH, self._clock(), precise=True)

    # -- the plan's steps ---------------------------------------------------------------

    def _advance(self, now: float | None = None) -> None:
        plan = self._plan
        conn = self._conn
        if now is None:
            now = self._clock()
        while not plan.done:
            action = plan.next_action()
            kind = type(action)  # (``is`` on the exact type: the hot path of every close)
            if kind is Flush:
                assert isinstance(action, Flush)
                if conn.lost:
                    plan.feed(self._lost_event(receiving=False), now)
                elif (conn.buffered() if conn.ssl else conn.real.get_write_buffer_size()) == 0:
                    plan.feed(_EVENT_FLUSHED, now)
                elif now >= action.deadline:
                    plan.feed(_EVENT_TIMEOUT, now)
                else:
                    self._resume_reading()
                    self._notify_when_flushed()
                    self._deadline = action.deadline
                    self._poll = _FLUSH_POLL_FIRST
                    self._sleep(_Wait.FLUSH, min(action.deadline, now + self._poll), precise=True)
                    return
            elif kind is ShutdownWrite:
                if conn.ssl and not self._quiet(now):
                    return
                plan.feed(self._shutdown_write(), now)
            elif kind is Receive:
                assert isinstance(action, Receive)
                if self._pending_bytes:
                    nbytes, self._pending_bytes = self._pending_bytes, 0
                    plan.feed(_EVENT_DATA, now, nbytes=nbytes)
                elif conn.peer_eof:
                    plan.feed(_EVENT_PEER_EOF, now)
                elif conn.lost:
                    plan.feed(self._lost_event(receiving=True), now)
                elif now >= action.until:
                    plan.feed(_EVENT_TIMEOUT, now)
                else:
                    self._resume_reading()
                    self._sleep(_Wait.RECEIVE, action.until)
                    return
            elif kind is Close:
                assert isinstance(action, Close)
                if conn.lost:
                    plan.feed(_EVENT_DONE, now)
                    continue
                self._close_transport(now, drop=action.drop)
                return
            elif kind is SetLingerZero:
                plan.feed(self._set_linger_zero(), now)
            elif kind is MeasureAcked:
                acked = None if conn.lost else self._watch.acked()
                if acked is None:
                    plan.feed(_EVENT_ERROR, now)
                else:
                    unacked, rtt, since_sent, since_recv = acked
                    event = _EVENT_UNACKED_SOME if unacked else _EVENT_ACKED
                    plan.feed(event, now, rtt=rtt, since_sent=since_sent, since_recv=since_recv)
            else:
                assert isinstance(action, MeasureUnacked)
                # Ours and unacknowledged: the kernel's queue (SIOCOUTQ) and what the
                # transport has not even handed to the kernel yet.
                outgoing = None if conn.lost else self._watch.outgoing()
                if outgoing is None:
                    plan.feed(_EVENT_ERROR, now)
                else:
                    outgoing += conn.buffered()
                    plan.feed(_EVENT_UNACKED_SOME if outgoing else _EVENT_UNACKED_NONE, now)
        self._wait = _Wait.DONE
        if self._watch.local is not None and self._kernel_when != "skip":
            # We may be inside connection_lost, before the transport closes the fd:
            # look the 4-tuple up on the next loop turn (with the other closes that
            # end in this one).
            self._deadlines.complete_soon(self)
        else:
            self._complete()

    def _quiet(self, now: float) -> bool:
        """Over TLS, before our close_notify: True once nothing the peer sent is left
        unread (else wait for it, reading for the drain, and return False).

        A TLS layer that has sent close_notify refuses application data behind it
        (OpenSSL: "application data after close notify") and ends the connection at
        once; the FIN that follows then cut uvloop TLS clients' responses short. So
        what has already arrived (an unread request body, say) is read and
        discarded first; the wait is bounded by the drain's idle bound.
        """
        conn = self._conn
        if conn.peer_eof or conn.lost:
            return True
        if self._wait is not _Wait.QUIET:  # the first look: start reading
            self._quiet_deadline = now + self._plan.policy.idle_timeout
            self._resume_reading()
        elif now >= self._quiet_deadline or not self.budget_left() or not self._watch.unread():
            return True  # (past the byte budget nothing more is read: waiting cannot help)
        self._sleep(_Wait.QUIET, now + _FLUSH_POLL_FIRST, precise=True)
        return False

    def _shutdown_write(self) -> Event:
        conn = self._conn
        real = conn.real
        if conn.lost:
            if conn.ssl and self._lost_exc is None:
                # The peer closed while we waited to send close_notify (uvloop's TLS
                # layer reports that as connection_lost alone): nothing left to end;
                # the drain step reads how the peer ended it.
                return _EVENT_DONE
            return self._lost_event(receiving=False)
        try:
            if conn.ssl:
                if not real.is_closing():
                    # close_notify only: the TLS layer sends our FIN once the peer has
                    # answered it (or the drain's bounds end and the close aborts).
                    # A FIN right behind the close_notify made uvloop's TLS client end
                    # the stream before it handed over data it had already received.
                    real.close()
                # else: the TLS layer is already shutting down (the peer's close_notify)
            elif real.can_write_eof():
                real.write_eof()
            else:
                conn.socket().shutdown(socket.SHUT_WR)
        except OSError as exc:
            self._watch.error = _observe.errno_name(exc)
            return error_event(exc)
        except (RuntimeError, NotImplementedError, TypeError, AttributeError, ValueError) as exc:
            self._watch.error = f"{type(exc).__name__}: {exc}"
            return _EVENT_ERROR
        return _EVENT_DONE

    def _set_linger_zero(self) -> Event:
        conn = self._conn
        if conn.lost:
            return _EVENT_ERROR
        self._watch.before_abort(allow_data_loss=self._allow_data_loss, buffered=conn.buffered())
        try:
            conn.optsock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        except OSError as exc:
            self._watch.error = _observe.errno_name(exc)
            return _EVENT_ERROR
        except ValueError as exc:
            # uvloop's socket wrapper once its transport has closed the fd and not yet
            # reported it: "negative file descriptor" (a ValueError, not an OSError).
            self._watch.error = f"ValueError: {exc}"
            return _EVENT_ERROR
        return _EVENT_DONE

    def _close_transport(self, now: float, *, drop: bool) -> None:
        conn = self._conn
        real = conn.real
        self._measure_before_close()
        self.closed_transport = True
        default = self._plan.policy.mode is _MODE_DEFAULT
        # A TCP transport with nothing buffered calls connection_lost on the next loop
        # turn after close() or abort() (asyncio's and uvloop's alike): no timer then.
        certain = False
        try:
            if drop:
                # The plan drops what is left (an abort, or a flush that ran out of
                # time): after SO_LINGER {1, 0} the fd's close sends RST.
                real.abort()
                certain = not conn.ssl
            elif conn.ssl:
                if default or (conn.peer_eof and not real.is_closing()):
                    real.close()  # asyncio's TLS close / answer the peer's close_notify
                elif conn.peer_eof:
                    pass  # the TLS layer is completing its shutdown: let it
                else:
                    real.abort()  # our bounds are over: stop waiting for the peer
            else:
                buffered = real.get_write_buffer_size()
                real.close()  # (default: asyncio flushes what is buffered first)
                certain = not buffered
        except Exception as exc:  # a broken transport: make sure it goes
            self._watch.error = f"{type(exc).__name__}: {exc}"
            real.abort()
            certain = False
        if certain:
            self._wait = _Wait.CLOSE
        elif default:
            # Mode default is the transport's own close, and no wait for the program:
            # the transport goes on flushing its buffer (to a peer that may never
            # read) and, over TLS, waiting for the peer's close_notify (asyncio's
            # ssl_shutdown_timeout: 30 s) on its own. The report says what the kernel
            # holds now.
            self._plan.feed(_EVENT_DONE, now)
            self._advance(now)
        else:
            self._sleep(_Wait.CLOSE, now + _CLOSE_GRACE)

    def _close_timed_out(self) -> None:
        if not self._forced:
            self._forced = True
            self._watch.error = self._watch.error or "close-timeout"
            self._conn.real.abort()
            self._sleep(_Wait.CLOSE, self._clock() + _CLOSE_GRACE)
            return
        # The transport never reported connection_lost: stop waiting for it.
        logger.warning("close: transport %r never called connection_lost", self._conn.real)
        self._plan.feed(_EVENT_ERROR, self._clock())
        self._advance()

    # -- waiting ------------------------------------------------------------------------

    def _sleep(self, wait: str, when: float, *, precise: bool = False) -> None:
        """Wait for ``wait`` until ``when``: on the loop's shared deadline slots (up to
        :data:`_SLOT` late), or with a timer of its own when ``precise``."""
        self._wait = wait
        if precise:
            self._timer = self._loop.call_at(when, self._on_timer)
        else:
            self._slot = self._deadlines.add(self, when)

    def _stop_waiting(self) -> None:
        self._wait = _Wait.NONE
        slot = self._slot
        if slot is not None:
            self._slot = None
            # (_Deadlines.discard, inline: every close stops a wait this way.)
            waiting = self._deadlines.slots.get(slot)
            if waiting is not None:
                waiting.pop(self, None)
        elif self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def on_deadline(self, slot: int) -> None:
        """The deadline slot ``slot`` is over (ignored unless still waiting on it)."""
        if self._slot == slot:
            self._slot = None
            self._on_timer()

    def _on_timer(self) -> None:
        self._timer = None
        wait, self._wait = self._wait, _Wait.NONE
        now = self._clock()
        plan = self._plan
        if wait is _Wait.FLUSH:
            if self._conn.buffered() == 0:
                plan.feed(_EVENT_FLUSHED, now)
            elif now >= self._deadline:
                plan.feed(_EVENT_TIMEOUT, now)
            else:
                self._poll = min(self._poll * 2, _FLUSH_POLL_MAX)
                self._sleep(_Wait.FLUSH, min(self._deadline, now + self._poll), precise=True)
                return
        elif wait is _Wait.RECEIVE:
            action = plan.next_action()
            assert isinstance(action, Receive)
            if now < action.until:  # data came since the timer was set: wait on
                self._sleep(_Wait.RECEIVE, action.until)
                return
            plan.feed(_EVENT_TIMEOUT, now)
        elif wait is _Wait.CLOSE:
            self._close_timed_out()
            return
        elif wait is _Wait.QUIET:
            self._wait = _Wait.QUIET  # (_quiet() tells the first look from the next)
        else:  # pragma: no cover - a cancelled timer never runs
            return
        self._advance()

    # -- observations -------------------------------------------------------------------

    def _measure_before_close(self) -> None:
        if self._measured:
            return
        self._measured = True
        conn = self._conn
        # Once the transport has read the peer's FIN the kernel holds nothing unread
        # (TCP delivers nothing after a FIN): no need to ask. Over TLS the EOF may be
        # the close_notify alone, with raw bytes behind it: ask.
        unread = 0 if conn.eof_read and not conn.ssl else None
        self._watch.before_close(self._plan.policy.mode, unread=unread)

    def _lost_event(self, *, receiving: bool) -> Event:
        exc = self._lost_exc
        if exc is None:
            if receiving:
                # The transport ended without an error while we waited for the peer:
                # the peer closed (uvloop's TLS layer reports a bare FIN this way) or
                # reset it (TLS layers in their shutdown report that as no error too):
                # the kernel tells the two apart.
                if self._watch.reset_received():
                    self._watch.error = "ECONNRESET"
                    return _EVENT_RESET
                return _EVENT_PEER_EOF
            self._watch.error = self._watch.error or "connection-lost"
            return _EVENT_ERROR
        if isinstance(exc, OSError):
            self._watch.error = _observe.errno_name(exc)
        else:
            self._watch.error = f"{type(exc).__name__}: {exc}"
        return error_event(exc)

    def _notify_when_flushed(self) -> None:
        """Ask for ``resume_writing`` once the buffer is empty (low-water mark 0), so
        that the flush ends without waiting for the next poll. Transports that only
        resume a protocol they paused (uvloop) are covered by the polling."""
        try:
            cast(asyncio.WriteTransport, self._conn.real).set_write_buffer_limits(0, 0)
        except Exception as exc:
            logger.debug("close: set_write_buffer_limits failed: %s", exc)

    def _resume_reading(self) -> None:
        """Read for the policy: reading is resumed (the application may have paused
        it) and what arrives is discarded, never more than the byte budget allows
        (see :data:`_LARGEST_READ`)."""
        if self._resumed or self.deliver or self._conn.lost:
            return
        self._resumed = True
        # (A TLS transport joins what it decrypted into one data_received.)
        if self._conn.ssl or self.budget_left() < _LARGEST_READ:
            self._install_sink()
        try:
            self._conn.real.resume_reading()
        except Exception as exc:  # closing or closed: nothing to read any more
            logger.debug("close: resume_reading failed: %s", exc)

    def _install_sink(self) -> None:
        """From now on a sink that reads at most the budget left takes the data."""
        self._sink = True
        conn = self._conn
        if conn.lost:
            return
        try:
            conn.divert_to_sink()
        except Exception as exc:  # closing or closed: nothing to read any more
            logger.debug("close: set_protocol failed: %s", exc)

    def stop_delivering(self) -> None:
        """The application's protocol asked for the close: from now on what arrives
        is the policy's to drain."""
        if not self.deliver:
            return
        self.deliver = False
        if self._wait is _Wait.RECEIVE or self._wait is _Wait.FLUSH:
            self._resume_reading()

    def budget_left(self) -> int:
        """Bytes the drain may still read."""
        left = self._plan.policy.max_drain_bytes - self._plan.drained_bytes - self._pending_bytes
        return max(left, 0)

    # -- the end ------------------------------------------------------------------------

    def _complete(self) -> None:
        self._deadlines.active.discard(self)
        watch = self._watch
        kernel_state = self._kernel_state = _state_after_close(watch, self._kernel_when)
        if kernel_state is not None and kernel_state.state in _PASSIVE_END_STATES:
            self._plan.feed(_EVENT_PASSIVE_END, self._clock())
        if self._fin_queued:
            self._plan.feed(_EVENT_PEER_FIN_FIRST, self._clock())
        self.done = True
        if watch.findings:
            self.findings = _issued(watch.findings, self.background, self._loop)
        if self._plan.debug:
            logger.debug("closed: %s", self.report)
        conn = self._conn
        # The connection keeps its closer (for the report); the closer lets go of the
        # connection, so that no cycle outlives the close. Nothing here touches it
        # again once the plan is finished.
        self._conn = _DETACHED
        conn.close_finished(self)
        waiters, self._waiters = self._waiters, None
        if waiters:
            _resolve(waiters, self.report)


def _state_after_close(watch: _observe.Watch, when: str) -> KernelState | None:
    """The 4-tuple's kernel state once the fd is closed, when looked up ``"eager"``."""
    if when != "eager":
        return None
    try:
        return watch.after_close()
    except Exception:  # the report must not fail the close
        logger.exception("close: kernel lookup after close failed")
        return None


def _issued(
    findings: Iterable[_findings.Finding], background: bool, loop: asyncio.AbstractEventLoop
) -> tuple[_findings.Finding, ...]:
    """A close's findings, issued as warnings now when nobody awaits its report."""
    found = tuple(findings)
    if background:
        _emit_in_loop(found, loop)
    return found


def _awaiting(closer: _Closer | _QuickClose) -> asyncio.Future[CloseReport]:
    """A future resolved with ``closer``'s report: now when it is there, else by
    :func:`_resolve` when the close completes."""
    fut: asyncio.Future[CloseReport] = closer._loop.create_future()
    report = closer.report
    if report is not None:
        fut.set_result(report)
    elif closer._waiters is None:
        closer._waiters = [fut]
    else:
        closer._waiters.append(fut)
    return fut


def _resolve(waiters: list[asyncio.Future[CloseReport]], report: CloseReport | None) -> None:
    """Hand the close's report to those awaiting it."""
    assert report is not None
    for fut in waiters:
        if not fut.done():
            fut.set_result(report)


# -- the quick close ----------------------------------------------------------------------

#: The courses a quick close runs, by their steps' action types.
_GRACEFUL_COURSE: Final = (Flush, ShutdownWrite, Receive, Close)
_DEFAULT_COURSE: Final = (Close,)
_ABORT_COURSE: Final = (SetLingerZero, Close)
_PEER_FIRST_COURSE: Final = (Flush, MeasureAcked, Receive, Close)
_QUICK_COURSES: Final = (_GRACEFUL_COURSE, _PEER_FIRST_COURSE, _DEFAULT_COURSE, _ABORT_COURSE)

#: Where a quick close is: not waiting (before its first wait, or from the peer's FIN to
#: the fd's close), draining (our FIN sent, waiting for the peer's), closing (the
#: transport closed, waiting for ``connection_lost``), done.
_Q_START: Final = "start"
_Q_DRAIN: Final = "drain"
_Q_CLOSE: Final = "close"
_Q_DONE: Final = "done"


def quick_course(policy: ClosePolicy, conn: ClosingConnection) -> Course | None:
    """The course a :class:`_QuickClose` can run for ``policy`` on ``conn`` now, or
    None (then a :class:`_Closer` runs the close)."""
    if conn.ssl or conn.lost or conn.linger_check or logger.isEnabledFor(logging.DEBUG):
        return None
    course = course_of(policy, conn.peer_eof)
    kinds = course.kinds
    if not course.ends or kinds not in _QUICK_COURSES:
        return None
    if kinds != _DEFAULT_COURSE and conn.real.get_write_buffer_size():
        return None  # (a flush to wait for, or bytes an abort would drop: the closer's)
    if Receive in kinds and policy.max_drain_bytes < _LARGEST_READ:
        return None  # (a drain that must read through the sink)
    return course


class _QuickClose:
    """A close that follows its policy's course, for the usual case on a busy server:
    a TCP (not TLS) transport, nothing left in its buffer, ``SO_LINGER`` known to be
    off (see :func:`quick_course`).

    It does what the course's steps say with the transport's own calls and keeps only
    the times of the steps and what the report measures (with reports on, the same
    :class:`~tcpclose._observe.Watch` as the closer's): no plan object.
    At the first event off the course (data during the drain, a deadline, a reset, the
    loop's end, anyone waiting for the report) it hands over to a :class:`_Closer`,
    which replays the steps taken through the plan and goes on from there; a finished
    quick close's report replays them too. So the plan decides what every close
    means; this only saves asking it, step by step, what it has already derived.
    (bench_aio.py: a graceful close through a ``_Closer`` cost about 90,000
    instructions more than the same close by hand on uvloop; see docs/benchmarks.md.)
    """

    __slots__ = (
        "_acked",
        "_allow_data_loss",
        "_conn",
        "_course",
        "_deadlines",
        "_discarded",
        "_done_at",
        "_eof_at",
        "_fin_queued",
        "_full",
        "_kernel_mode",
        "_kernel_state",
        "_kernel_when",
        "_loop",
        "_measured",
        "_passive",
        "_report",
        "_slot",
        "_started",
        "_state",
        "_taken",
        "_trigger",
        "_unread",
        "_waiters",
        "_watch",
        "background",
        "closed_transport",
        "deliver",
        "done",
        "findings",
    )

    def __init__(
        self,
        conn: ClosingConnection,
        loop: asyncio.AbstractEventLoop,
        course: Course,
        trigger: str,
        allow_data_loss: bool,
        report: bool = False,
        kernel_state: KernelStateChoice = EAGER,
    ) -> None:
        self._conn = conn
        self._loop = loop
        self._course = course
        # (As the closer's: see _Closer.__init__.)
        self._kernel_when, self._kernel_mode = _kernel_timing(conn, report, kernel_state)
        watch = self._watch = _watch(conn, True) if report else None
        self._fin_queued = watch is not None and not conn.peer_eof and watch.peer_fin_first
        self._kernel_state: KernelState | None = None
        #: The kernel says the socket closed second (PASSIVE_END, told to the plan).
        self._passive = False
        #: The measurements before the fd's close are made.
        self._measured = False
        self._waiters: list[asyncio.Future[CloseReport]] | None = None
        self._trigger = trigger
        self._allow_data_loss = allow_data_loss
        deadlines = self._deadlines = _Deadlines.of(loop)
        self._started = self._eof_at = self._done_at = deadlines.clock()
        #: Steps of the course taken so far.
        self._taken = 0
        self._state = _Q_START
        self._slot: int | None = None
        self._full: _Closer | None = None
        self._unread: int | None = None
        self._discarded = 0
        #: The kernel's answer to the peer-first course's MeasureAcked, and its time.
        self._acked = (0.0, 0.0, 0.0, 0.0)
        self._report: CloseReport | None = None
        self.background = True
        self.closed_transport = False
        self.deliver = False
        self.done = False
        self.findings: tuple[_findings.Finding, ...] = ()

    def start(self) -> None:
        self._deadlines.active.add(self)
        kinds = self._course.kinds
        if kinds == _GRACEFUL_COURSE:
            # (Written out here, as are on_eof's and on_lost's usual cases: a Python
            # call is about 850 instructions on CPython 3.11; see docs/benchmarks.md.)
            real = self._conn.real
            try:
                real.write_eof()
            except Exception:  # the closer's to tell what it means
                self._taken = 1  # (the flush: nothing was buffered)
                self._hand_over()._advance(self._started)
                return
            self._taken = 2
            if self._conn.peer_eof:
                self._eof_at = self._started
                self._taken = 3
                self._close(self._started)
            else:
                # The drain's bound, as the plan's Receive says (Course.drain_s).
                self._wait_for_peer(self._started + self._course.drain_s)
        elif kinds == _PEER_FIRST_COURSE:
            self._start_peer_first()
        elif kinds == _DEFAULT_COURSE:
            self._close(self._started)
        else:
            self._start_abort()

    def _start_peer_first(self) -> None:
        conn = self._conn
        now = self._started
        self._taken = 1  # (the flush: nothing was buffered)
        acked = read_acked(conn.optsock)
        course = self._course
        deadline = now + course.bound_s
        grace = course.policy.grace
        if acked is not None:
            unacked, rtt, since_sent, since_recv = acked
            if not unacked and (
                acked_event(now, deadline, conn.peer_eof, grace, rtt, since_sent, since_recv)
                is _EVENT_ACKED
            ):
                self._acked = (now, rtt, since_sent, since_recv)
                self._taken = 2
                if conn.peer_eof:
                    self._eof_at = now
                    self._taken = 3
                    self._close(now)
                else:
                    self._wait_for_peer(
                        grace_until(now, deadline, grace, rtt, since_sent, since_recv)
                    )
                return
        # (bytes unacknowledged, a peer already idle, no answer: the closer's, which
        # asks the kernel again and lets the plan decide)
        self._hand_over()._advance(now)

    def _wait_for_peer(self, until: float) -> None:
        """The course's Receive step: read (and wait) for the peer's FIN until ``until``."""
        try:
            self._conn.real.resume_reading()
        except Exception:  # (closing: nothing more to read)
            pass
        self._state = _Q_DRAIN
        self._slot = self._deadlines.add(self, until)

    def _start_abort(self) -> None:
        conn = self._conn
        try:
            discarded = read_outgoing(conn.optsock.fileno())
        except (OSError, ValueError):
            discarded = None
        if discarded is None or (discarded and not self._allow_data_loss):
            self._hand_over()._advance(self._started)  # (it measures and warns)
            return
        try:
            conn.optsock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        except (OSError, ValueError):
            self._hand_over()._advance(self._started)
            return
        self._discarded = discarded
        if self._watch is not None:
            self._watch.discarded_bytes = discarded
        self._taken = 1
        self._close(self._started)

    def _close(self, now: float) -> None:
        """The course's Close step."""
        conn = self._conn
        real = conn.real
        watch = self._watch
        unread: int | None
        if watch is not None:
            # (The closer's measurement: TCP_INFO for the report, the unread bytes;
            # passed on at a hand-over.)
            watch.before_close(self._course.policy.mode, unread=0 if conn.eof_read else None)
            self._measured = True
            unread = watch.unread_bytes
        elif conn.eof_read:
            unread = 0
        else:
            try:
                unread = read_unread(conn.optsock.fileno())
            except (OSError, ValueError):
                unread = None
        default = self._course.kinds == _DEFAULT_COURSE
        action = self._course.steps[-1].action
        assert isinstance(action, Close)
        # (Only the default course may have bytes buffered: the others started with
        # none, and PolicyTransport takes no more writes once a close is under way.)
        buffered = real.get_write_buffer_size() if default else 0
        if unread is None or (unread and default):
            # (a close that will reset the peer, or whose bytes would wait: the
            # closer measures, warns and bounds the wait)
            self._hand_over()._advance(now)
            return
        self._unread = unread
        try:
            if action.drop:
                real.abort()
            else:
                real.close()  # (default: the transport flushes what is buffered first)
        except Exception:
            self._hand_over()._advance(now)
            return
        self.closed_transport = True
        if buffered:
            # Mode default with bytes still buffered: the transport's own close, not
            # waited for (see _Closer._close_transport).
            self._done_at = now
            self._taken += 1
            self._finish()
            return
        self._state = _Q_CLOSE

    # -- what the connection tells ------------------------------------------------------

    def on_eof(self) -> None:
        full = self._full
        if full is not None:
            full.on_eof()
        elif self._state is _Q_DRAIN:
            slot = self._slot  # (_stop_waiting, written out)
            if slot is not None:
                self._slot = None
                waiting = self._deadlines.slots.get(slot)
                if waiting is not None:
                    waiting.pop(self, None)
            self._state = _Q_START  # (not waiting: a hand-over now waits for nothing)
            now = self._eof_at = self._deadlines.clock()
            self._taken += 1
            self._close(now)

    def on_lost(self, exc: BaseException | None) -> None:
        full = self._full
        state = self._state
        if full is None and state is _Q_CLOSE:
            self._done_at = self._deadlines.clock()
            self._taken += 1
            if self._watch is None:  # (_finish, written out)
                self._state = _Q_DONE
                self._complete()
            else:
                self._finish()
            return
        if full is None:
            if state is _Q_DONE:
                return
            full = self._hand_over()
        full.on_lost(exc)

    def on_data(self, nbytes: int) -> None:
        if self._full is not None or self._state is not _Q_DONE:
            (self._full or self._hand_over()).on_data(nbytes)

    def on_activity(self) -> None:
        if self._full is not None:
            self._full.on_activity()

    def on_resume_writing(self) -> None:
        if self._full is not None:
            self._full.on_resume_writing()

    def stop_delivering(self) -> None:
        if self._full is not None:
            self._full.stop_delivering()

    def on_deadline(self, slot: int) -> None:
        if self._full is None and self._slot == slot:
            self._slot = None
            full = self._hand_over(wait=False)
            full._on_timer()

    def cut_short(self) -> None:
        if self._state is not _Q_DONE:  # (once the fd is closed nothing is left to cut)
            (self._full or self._hand_over()).cut_short()

    def budget_left(self) -> int:
        full = self._full
        return self._course.policy.max_drain_bytes if full is None else full.budget_left()

    def wait(self) -> asyncio.Future[CloseReport]:
        full = self._full
        if full is None and self._state is _Q_DONE:
            # Done, or the fd closed and the report's lookup due on the next loop turn.
            return _awaiting(self)
        return (full or self._hand_over()).wait()

    @property
    def report(self) -> CloseReport | None:
        full = self._full
        if full is not None:
            return full.report
        if not self.done:
            return None
        if self._report is None:
            course = self._course
            # Every step was taken (else the closer would have it): the plan's result
            # for the course, with what the closer's _complete tells its plan after
            # the close (PASSIVE_END, then PEER_FIN_FIRST), without a replay.
            assert self._taken == len(course.steps)
            result = course_result(
                course,
                self._started,
                self._done_at,
                passive=self._passive,
                peer_fin_first=self._fin_queued,
            )
            watch = self._watch
            if watch is None:
                seen = Observed(
                    unread_bytes=self._unread,
                    discarded_bytes=self._discarded,
                    trigger=self._trigger,
                )
                lookup = None
            else:
                seen = watch.observed(trigger=self._trigger, kernel_state=self._kernel_state)
                lookup = _lazy_lookup(watch) if self._kernel_when == "lazy" else None
            self._report = build_report(
                course.policy,
                result,
                seen,
                kernel_state_mode=self._kernel_mode,
                lookup=lookup,
            )
        return self._report

    # -- the end, and the hand-over -----------------------------------------------------

    def _finish(self) -> None:
        """The fd's close is done (or under way, in mode default)."""
        self._state = _Q_DONE
        watch = self._watch
        if watch is not None and watch.local is not None and self._kernel_when != "skip":
            # As the closer: we may be inside connection_lost, before the transport
            # closes the fd: the lookup runs on the next loop turn.
            self._deadlines.complete_soon(self)
        else:
            self._complete()

    def _complete(self) -> None:
        """As :meth:`_Closer._complete`."""
        self._deadlines.active.discard(self)
        watch = self._watch
        if watch is not None:
            kernel_state = self._kernel_state = _state_after_close(watch, self._kernel_when)
            if kernel_state is not None and kernel_state.state in _PASSIVE_END_STATES:
                self._passive = True
            if watch.findings:
                self.findings = _issued(watch.findings, self.background, self._loop)
        self.done = True
        conn = self._conn
        self._conn = _DETACHED  # (no cycle outlives the close)
        conn.close_finished(self)
        waiters, self._waiters = self._waiters, None
        if waiters:
            _resolve(waiters, self.report)

    def _stop_waiting(self) -> None:
        slot = self._slot
        if slot is not None:
            self._slot = None
            waiting = self._deadlines.slots.get(slot)
            if waiting is not None:
                waiting.pop(self, None)

    def _replayed(self) -> Plan:
        """The plan, told the steps taken (each at its time)."""
        course = self._course
        plan = start_course(course, self._started)
        for step in course.steps[: self._taken]:
            kind = step.kind
            if kind is Receive:
                plan.feed(step.event, self._eof_at)
            elif kind is Close:
                plan.feed(step.event, self._done_at)
            elif kind is MeasureAcked:
                when, rtt, since_sent, since_recv = self._acked
                plan.feed(step.event, when, rtt=rtt, since_sent=since_sent, since_recv=since_recv)
            else:
                plan.feed(step.event, self._started)
        return plan

    def _hand_over(self, *, wait: bool = True) -> _Closer:
        """A :class:`_Closer` where this close is, running from now on. ``wait``: it
        waits as this one did (else the caller tells it the wait is over)."""
        full = self._full
        if full is not None:
            return full
        self._stop_waiting()
        deadlines = self._deadlines
        deadlines.active.discard(self)
        course = self._course
        full = self._full = _Closer(
            self._conn,
            self._loop,
            course.policy,
            self._trigger,
            False,  # (its watch and report timing are this close's: set below)
            self._allow_data_loss,
            False,
            self.background,
            EAGER,
            started=self._started,
        )
        full._plan = self._replayed()
        full.closed_transport = self.closed_transport
        watch = self._watch
        if watch is not None:
            full._watch = watch
            full._measured = self._measured
            full._kernel_when, full._kernel_mode = self._kernel_when, self._kernel_mode
            full._fin_queued = self._fin_queued
        full._watch.discarded_bytes = self._discarded
        state = self._state
        if state is _Q_DRAIN:
            full._resumed = True
            if wait:
                action = full._plan.next_action()
                assert isinstance(action, Receive)
                full._sleep(_Wait.RECEIVE, action.until)
            else:
                full._wait = _Wait.RECEIVE
        elif state is _Q_CLOSE:
            full._measured = True
            if watch is None:
                full._watch.unread_bytes = self._unread
            full._wait = _Wait.CLOSE
        deadlines.active.add(full)
        return full


def _emit_in_loop(findings: Iterable[_findings.Finding], loop: asyncio.AbstractEventLoop) -> None:
    """Issue warnings from a loop callback, where no caller's line exists to point at.
    A filter turning them into errors must not break the loop: such errors go to the
    loop's exception handler."""
    for finding in findings:
        try:
            _observe.emit_findings([finding], stacklevel=1)
        except Warning as exc:
            loop.call_exception_handler(
                {"message": f"tcpclose warning raised as an error: {exc}", "exception": exc}
            )
