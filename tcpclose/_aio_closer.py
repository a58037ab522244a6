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
import dataclasses
import enum
import errno
import functools
import logging
import socket
import struct
import time
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any, Final, Protocol, cast

from . import _checks, _kernel, _observe
from ._aio_transport import _Addressed, _TransportLike
from ._errors import PolicyError
from ._kernel._types import KernelState, TcpState
from ._linger import LINGER_OFF
from ._plan import (
    Close,
    ClosePlan,
    Event,
    Flush,
    MeasureAcked,
    MeasureUnacked,
    PlanResult,
    Receive,
    SetLingerZero,
    ShutdownWrite,
)
from ._policy import CloseMode, ClosePolicy
from ._report import CloseReport, build_report

logger = logging.getLogger("tcpclose")

_LINGER_ZERO: Final = struct.pack("ii", 1, 0)
#: How long to wait for ``connection_lost`` after ``close()``/``abort()`` of a
#: transport with nothing left to send (it normally comes on the next loop turn).
_CLOSE_GRACE_S: Final = 1.0
#: Flush polling: first interval and the cap of its doubling.
_FLUSH_POLL_FIRST_S: Final = 0.002
_FLUSH_POLL_MAX_S: Final = 0.05
#: Errors that mean the peer reset the connection (as the sync driver counts them).
_RESET_ERRNOS: Final = frozenset(
    {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ECONNABORTED}
)
#: Where a socket that closed second ends: it has nothing to keep (CLOSED: no socket).
_PASSIVE_END_STATES: Final = frozenset({TcpState.LAST_ACK, TcpState.CLOSED})
#: The most a TCP transport hands to ``data_received`` at once: asyncio's selector
#: transport reads 256 KiB at a time, uvloop's 256,000 bytes. While more than this is
#: left of the drain's byte budget, what arrives cannot overshoot it and the wrapper
#: counts it as it comes; below, a sink reading at most the budget left takes over (a
#: ``BufferedProtocol``: the transport reads into its buffer). TLS transports join
#: what they decrypted into one ``data_received`` of any size: the sink from the start.
_LARGEST_READ: Final = 256 * 1024


class _Wait(enum.Enum):
    NONE = "none"
    FLUSH = "flush"
    QUIET = "quiet"  # over TLS, before close_notify: until nothing more is readable
    RECEIVE = "receive"
    CLOSE = "close"
    DONE = "done"


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
_SLOT_S: Final = 0.005
_SLOTS_PER_S: Final = 200
#: Where a loop keeps its slots (an attribute of the loop object).
_DEADLINES_ATTR: Final = "_tcpclose_deadlines"


#: How long the end of a loop waits for the closes it cut short to be reported.
_LOOP_END_WAIT_S: Final = 1.0


class _Deadlines:
    """The deadline slots of one event loop's closes (see :data:`_SLOT_S`), and the
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

    __slots__ = ("_completing", "_loop", "_loop_end", "_slots", "active", "clock")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        #: The loop's clock. asyncio's ``loop.time()`` is a Python method returning
        #: ``time.monotonic()``: on that loop the closes call the latter directly.
        self.clock: Callable[[], float] = (
            time.monotonic if type(loop).time is asyncio.BaseEventLoop.time else loop.time
        )
        #: slot number -> the closes waiting in it (a dict: ordered, like the heap)
        self._slots: dict[int, dict[_Closer, None]] = {}
        #: The closes under way on this loop.
        self.active: set[_Closer] = set()
        #: The closes to complete on the next loop turn (:meth:`complete_soon`).
        self._completing: list[_Closer] = []
        self._loop_end = _at_loop_end(self)
        _start_async_generator(self._loop_end)

    @classmethod
    def of(cls, loop: asyncio.AbstractEventLoop) -> _Deadlines:
        """The loop's slots, made on first use. (On a loop that takes no attributes
        every close gets slots of its own: correct, only not shared.)"""
        deadlines = getattr(loop, _DEADLINES_ATTR, None)
        if deadlines is None:
            deadlines = cls(loop)
            with contextlib.suppress(AttributeError, TypeError):
                setattr(loop, _DEADLINES_ATTR, deadlines)
        return cast(_Deadlines, deadlines)

    def add(self, closer: _Closer, when: float) -> int:
        """Wake ``closer.on_deadline(slot)`` at the end of the slot holding ``when``."""
        slot = int(when * _SLOTS_PER_S) + 1
        waiting = self._slots.get(slot)
        if waiting is None:
            waiting = self._slots[slot] = {}
            self._loop.call_at(slot / _SLOTS_PER_S, self._expire, slot)
        waiting[closer] = None
        return slot

    def discard(self, closer: _Closer, slot: int) -> None:
        waiting = self._slots.get(slot)
        if waiting is not None:
            waiting.pop(closer, None)

    def _expire(self, slot: int) -> None:
        waiting = self._slots.pop(slot, None)
        if waiting:
            for closer in waiting:
                try:
                    closer.on_deadline(slot)
                except Exception as exc:  # one close's bug must not stall the others
                    self._loop.call_exception_handler(
                        {"message": "tcpclose: a close failed at its deadline", "exception": exc}
                    )

    def complete_soon(self, closer: _Closer) -> None:
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
            await asyncio.wait(waiting, timeout=_LOOP_END_WAIT_S)


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

    def close_finished(self, closer: _Closer) -> None:
        """The close is over (its report can be had)."""

    @property
    def linger_check(self) -> bool:
        """``SO_LINGER`` may have been set where the library has not looked: the
        application had the socket, or the listener's setting, which accepted sockets
        inherit, is not known yet."""

    def linger_seen(self, lingers: bool) -> None:
        """What a check found: ``SO_LINGER`` on with a time (``lingers``) or not."""


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

    def close_finished(self, closer: _Closer) -> None:
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
        "_fin_sent",
        "_forced",
        "_kernel_mode",
        "_kernel_state",
        "_kernel_when",
        "_last_data",
        "_linger_zero",
        "_loop",
        "_lost_exc",
        "_measured",
        "_pending_bytes",
        "_plan",
        "_poll",
        "_quiet_deadline",
        "_receiving",
        "_report",
        "_resumed",
        "_sink",
        "_slot",
        "_timer",
        "_tls",
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
    ) -> None:
        # (Positional parameters, and few calls below: a busy server makes thousands
        # of these a second, and a Python call and its few lines cost about 0.3 us.)
        if loop is None:
            loop = asyncio.get_running_loop()
        self._loop = loop
        self._conn: ClosingConnection = conn
        self._trigger = trigger
        self._allow_data_loss = allow_data_loss
        self._tls = conn.ssl
        #: While True (``write_eof()`` under peer-first, before the protocol's own
        #: close) data and EOF still reach the application's protocol.
        self.deliver = deliver
        #: True: issue the warnings when done (no caller is there to point at).
        self.background = background
        #: When the kernel state is looked up: "eager" (once the fd is closed), "lazy"
        #: (when the report's kernel_state is first read) or "skip"; and what the
        #: report says of it.
        how = kernel_state.how
        if not report:
            self._kernel_when, self._kernel_mode = "skip", "off"
        elif how == "eager" or (how == "lazy" and self._tls):
            # (Over TLS the state after the close tells who closed first.)
            self._kernel_when = self._kernel_mode = "eager"
        elif how == "lazy":
            self._kernel_when = self._kernel_mode = "lazy"
        else:
            self._kernel_when = "eager" if kernel_state.sample() else "skip"
            self._kernel_mode = kernel_state.text
        sock = conn.optsock
        self._watch = (
            _observe.Watch(_Addressed(conn.real, sock), report=True, peer_fin=conn.peer_eof)
            if report
            else _observe.Watch(sock, report=False)
        )
        deadlines = self._deadlines = _Deadlines.of(loop)
        clock = self._clock = deadlines.clock
        now = clock()
        # (deliver: write_eof() under peer-first, whose fallback is always our FIN)
        self._plan = ClosePlan(
            policy, now, peer_eof=conn.peer_eof, label=self._watch.label, half_close=deliver
        )
        self._last_data = now
        self._deadline = now
        self._poll = _FLUSH_POLL_FIRST_S
        self._quiet_deadline = now
        self._wait = _Wait.NONE
        self._timer: asyncio.TimerHandle | None = None
        self._slot: int | None = None
        self._pending_bytes = 0
        self._receiving: Receive | None = None
        self._lost_exc: BaseException | None = None
        self._measured = False
        self._resumed = False
        self._sink = False
        self._forced = False
        #: close() or abort() was called on the real transport.
        self.closed_transport = False
        self._fin_sent = False
        self._linger_zero = False
        self._waiters: list[asyncio.Future[CloseReport]] | None = None
        self.findings: tuple[_checks.Finding, ...] = ()
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
            lookup = None
            if self._kernel_when == "lazy" and watch.local is not None and watch.peer is not None:
                # (The lookup's own parameters, not the watch: it refers to the transport.
                # The cookie makes sure a later connection on the 4-tuple is not taken
                # for ours.)
                lookup = functools.partial(
                    _kernel.lookup, watch.local, watch.peer, cookie=watch._cookie
                )
            self._report = build_report(
                self._plan.policy,
                self._plan_result(),
                observed,
                kernel_state_mode=self._kernel_mode,
                lookup=lookup,
            )
        return self._report

    def start(self) -> None:
        self._deadlines.active.add(self)
        conn = self._conn
        if conn.linger_check:
            self._check_linger(conn)
        self._advance(self._last_data)  # (the time the close started)

    def _check_linger(self, conn: ClosingConnection) -> None:
        """``SO_LINGER`` with a time would block the loop in the fd's close: turn it
        off (TC201), unless the policy aborts (it sets its own {1, 0})."""
        lingers = self._watch.check_linger(nonblocking=True, event_loop=True)
        conn.linger_seen(lingers)
        if lingers and self._plan.policy.mode is not CloseMode.ABORT:
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
        fut: asyncio.Future[CloseReport] = self._loop.create_future()
        report = self.report
        if report is not None:
            fut.set_result(report)
        elif self._waiters is None:
            self._waiters = [fut]
        else:
            self._waiters.append(fut)
        return fut

    def on_data(self, nbytes: int) -> None:
        """``nbytes`` arrived and were discarded."""
        if self._resumed and not self._sink and self.budget_left() - nbytes < _LARGEST_READ:
            self._install_sink()
        wait = self._wait
        if wait is _Wait.RECEIVE:
            now = self._clock()
            self._last_data = now
            plan = self._plan
            phase = plan.phase
            plan.feed(Event.DATA, now, nbytes=nbytes)
            if plan.phase is phase:
                return  # keep waiting; the timer re-arms itself for the new idle bound
            self._stop_waiting()
            self._advance()
        elif wait is not _Wait.DONE:
            self._pending_bytes += nbytes
            if not self.budget_left():
                # Not reading for the drain yet (still flushing) and nothing more may
                # be read: let the kernel hold the rest.
                with contextlib.suppress(Exception):
                    self._conn.real.pause_reading()

    def on_activity(self) -> None:
        """Data reached the application's protocol (deliver mode): the peer is not idle."""
        self._last_data = self._clock()

    def on_eof(self) -> None:
        """The peer's FIN (or TLS close_notify) arrived; ``conn.peer_eof`` is set."""
        if self._wait is _Wait.RECEIVE:
            self._stop_waiting()
            now = self._clock()
            self._plan.feed(Event.PEER_EOF, now)
            self._advance(now)

    def on_lost(self, exc: BaseException | None) -> None:
        """The transport called ``connection_lost``: its fd is closed right after."""
        if exc is not None or self._lost_exc is None:  # (else cut_short() said why)
            self._lost_exc = exc
        self._measure_before_close()  # the fd is still open inside connection_lost
        wait = self._wait
        if wait is _Wait.RECEIVE or wait is _Wait.FLUSH:
            self._stop_waiting()
            self._plan.feed(self._lost_event(receiving=wait is _Wait.RECEIVE), self._clock())
            self._advance()
        elif wait is _Wait.CLOSE:
            self._stop_waiting()
            now = self._clock()
            self._plan.feed(Event.DONE, now)
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
                    plan.feed(Event.FLUSHED, now)
                elif now >= action.deadline:
                    plan.feed(Event.TIMEOUT, now)
                else:
                    self._resume_reading()
                    self._notify_when_flushed()
                    self._deadline = action.deadline
                    self._poll = _FLUSH_POLL_FIRST_S
                    self._sleep(_Wait.FLUSH, min(action.deadline, now + self._poll), precise=True)
                    return
            elif kind is ShutdownWrite:
                if conn.ssl and not self._quiet(now):
                    return
                if not conn.peer_eof:
                    self._fin_sent = True
                plan.feed(self._shutdown_write(), now)
                # A Receive usually follows: start its idle clock at our FIN.
                self._last_data = now
            elif kind is Receive:
                assert isinstance(action, Receive)
                if self._pending_bytes:
                    nbytes, self._pending_bytes = self._pending_bytes, 0
                    self._last_data = now
                    plan.feed(Event.DATA, now, nbytes=nbytes)
                elif conn.peer_eof:
                    plan.feed(Event.PEER_EOF, now)
                elif conn.lost:
                    plan.feed(self._lost_event(receiving=True), now)
                else:
                    deadline = self._receive_deadline(action)
                    if now >= deadline:
                        plan.feed(Event.TIMEOUT, now)
                        continue
                    self._resume_reading()
                    self._receiving = action
                    self._sleep(_Wait.RECEIVE, deadline)
                    return
            elif kind is Close:
                if conn.lost:
                    plan.feed(Event.DONE, now)
                    continue
                self._close_transport(now)
                return
            elif kind is SetLingerZero:
                plan.feed(self._set_linger_zero(), now)
            elif kind is MeasureAcked:
                acked = None if conn.lost else self._watch.acked()
                if acked is None:
                    plan.feed(Event.ERROR, now)
                else:
                    unacked, rtt, since_sent, since_recv = acked
                    event = Event.UNACKED_SOME if unacked else Event.ACKED
                    plan.feed(event, now, rtt=rtt, since_sent=since_sent, since_recv=since_recv)
            else:
                assert isinstance(action, MeasureUnacked)
                # Ours and unacknowledged: the kernel's queue (SIOCOUTQ) and what the
                # transport has not even handed to the kernel yet.
                outgoing = None if conn.lost else self._watch.outgoing()
                if outgoing is None:
                    plan.feed(Event.ERROR, now)
                else:
                    outgoing += conn.buffered()
                    plan.feed(Event.UNACKED_SOME if outgoing else Event.UNACKED_NONE, now)
        self._wait = _Wait.DONE
        if self._watch.local is not None and self._kernel_when != "skip":
            # We may be inside connection_lost, before the transport closes the fd:
            # look the 4-tuple up on the next loop turn (with the other closes that
            # end in this one).
            self._deadlines.complete_soon(self)
        else:
            self._complete()

    def _receive_deadline(self, action: Receive) -> float:
        deadline = action.deadline
        if action.idle_timeout is not None:
            deadline = min(deadline, self._last_data + action.idle_timeout)
        return deadline

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
        self._sleep(_Wait.QUIET, now + _FLUSH_POLL_FIRST_S, precise=True)
        return False

    def _shutdown_write(self) -> Event:
        conn = self._conn
        real = conn.real
        if conn.lost:
            if conn.ssl and self._lost_exc is None:
                # The peer closed while we waited to send close_notify (uvloop's TLS
                # layer reports that as connection_lost alone): nothing left to end;
                # the drain step reads how the peer ended it.
                return Event.DONE
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
            return Event.RESET if exc.errno in _RESET_ERRNOS else Event.ERROR
        except (RuntimeError, NotImplementedError, TypeError, AttributeError, ValueError) as exc:
            self._watch.error = f"{type(exc).__name__}: {exc}"
            return Event.ERROR
        return Event.DONE

    def _set_linger_zero(self) -> Event:
        conn = self._conn
        if conn.lost:
            return Event.ERROR
        self._watch.before_abort(allow_data_loss=self._allow_data_loss, buffered=conn.buffered())
        try:
            conn.optsock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
        except OSError as exc:
            self._watch.error = _observe.errno_name(exc)
            return Event.ERROR
        except ValueError as exc:
            # uvloop's socket wrapper once its transport has closed the fd and not yet
            # reported it: "negative file descriptor" (a ValueError, not an OSError).
            self._watch.error = f"ValueError: {exc}"
            return Event.ERROR
        self._linger_zero = True
        return Event.DONE

    def _close_transport(self, now: float) -> None:
        conn = self._conn
        real = conn.real
        self._measure_before_close()
        self.closed_transport = True
        default = self._plan.policy.mode is CloseMode.DEFAULT
        # A TCP transport with nothing buffered calls connection_lost on the next loop
        # turn after close() or abort() (asyncio's and uvloop's alike): no timer then.
        certain = False
        try:
            if self._linger_zero:
                real.abort()  # SO_LINGER {1, 0}: the fd's close sends RST
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
                if buffered and not default:
                    # The flush ran out of time: what is left cannot go out within the
                    # bounds. Reset, so that the peer learns its stream was cut (a FIN
                    # would look like a complete response); everything of ours still
                    # unacknowledged is lost with it, and the report counts it.
                    self._watch.before_abort(
                        allow_data_loss=self._allow_data_loss, buffered=buffered
                    )
                    with contextlib.suppress(OSError, ValueError):
                        conn.socket().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
                        self._linger_zero = True
                    real.abort()
                    certain = True
                else:
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
            self._plan.feed(Event.DONE, now)
            self._advance(now)
        else:
            self._sleep(_Wait.CLOSE, now + _CLOSE_GRACE_S)

    def _close_timed_out(self) -> None:
        if not self._forced:
            self._forced = True
            self._watch.error = self._watch.error or "close-timeout"
            self._conn.real.abort()
            self._sleep(_Wait.CLOSE, self._clock() + _CLOSE_GRACE_S)
            return
        # The transport never reported connection_lost: stop waiting for it.
        logger.warning("close: transport %r never called connection_lost", self._conn.real)
        self._plan.feed(Event.ERROR, self._clock())
        self._advance()

    # -- waiting ------------------------------------------------------------------------

    def _sleep(self, wait: _Wait, when: float, *, precise: bool = False) -> None:
        """Wait for ``wait`` until ``when``: on the loop's shared deadline slots (up to
        :data:`_SLOT_S` late), or with a timer of its own when ``precise``."""
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
            self._deadlines.discard(self, slot)
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
                plan.feed(Event.FLUSHED, now)
            elif now >= self._deadline:
                plan.feed(Event.TIMEOUT, now)
            else:
                self._poll = min(self._poll * 2, _FLUSH_POLL_MAX_S)
                self._sleep(_Wait.FLUSH, min(self._deadline, now + self._poll), precise=True)
                return
        elif wait is _Wait.RECEIVE:
            # The plan's Receive bounds are fixed while it stays in one phase (DATA
            # keeps the phase): the one we waited on still holds.
            action = self._receiving
            assert action is not None
            deadline = self._receive_deadline(action)
            if now < deadline:  # data came since the timer was set: wait on
                self._sleep(_Wait.RECEIVE, deadline)
                return
            plan.feed(Event.TIMEOUT, now)
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
                    return Event.RESET
                return Event.PEER_EOF
            self._watch.error = self._watch.error or "connection-lost"
            return Event.ERROR
        if isinstance(exc, OSError):
            self._watch.error = _observe.errno_name(exc)
            return Event.RESET if exc.errno in _RESET_ERRNOS else Event.ERROR
        self._watch.error = f"{type(exc).__name__}: {exc}"
        return Event.ERROR

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

    def _plan_result(self) -> PlanResult:
        """The plan's result, with what only this driver saw."""
        result = self._plan.result()
        if result.peer_eof and not result.peer_closed_first and not self._fin_sent:
            # The peer's FIN came before ours, but while our buffer drained, where the
            # plan does not take it: the peer closed first.
            result = dataclasses.replace(result, peer_closed_first=True)
        elif (
            self._tls
            and result.peer_eof
            and not result.peer_closed_first
            and self._kernel_state is not None
            and self._kernel_state.state in _PASSIVE_END_STATES
        ):
            # Over TLS our FIN waits for the peer's answer to our close_notify (the
            # TLS layer sends it); a peer that closes its socket once it has answered
            # sends its FIN first, as the kernel's passive-close state shows.
            result = dataclasses.replace(result, peer_closed_first=True)
        if self._linger_zero and not result.linger_zero:
            # The close itself reset the connection (a bounded flush gave up).
            result = dataclasses.replace(result, linger_zero=True)
        return result

    def _complete(self) -> None:
        self._deadlines.active.discard(self)
        watch = self._watch
        kernel_state = None
        if self._kernel_when == "eager":
            try:
                kernel_state = watch.after_close()
            except Exception:  # the report must not fail the close
                logger.exception("close: kernel lookup after close failed")
        self._kernel_state = kernel_state
        self.done = True
        findings = watch.findings
        if findings:
            self.findings = tuple(findings)
            if self.background:
                _emit_in_loop(self.findings, self._loop)
        if self._plan.debug:
            logger.debug("closed: %s", self.report)
        conn = self._conn
        # The connection keeps its closer (for the report); the closer lets go of the
        # connection, so that no cycle outlives the close. Nothing here touches it
        # again once the plan is finished.
        self._conn = _DETACHED
        conn.close_finished(self)
        waiters = self._waiters
        if waiters:
            self._waiters = None
            report = self.report
            assert report is not None
            for fut in waiters:
                if not fut.done():
                    fut.set_result(report)


def _emit_in_loop(findings: Iterable[_checks.Finding], loop: asyncio.AbstractEventLoop) -> None:
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
