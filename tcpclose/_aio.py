"""The asyncio driver: runs the close plan on asyncio transports.

The close logic lives in ``_plan.py``; this module only carries out its steps on a
transport, with every wait going through the event loop:

* ``Flush``: wait until the transport's write buffer is empty (polled with a short
  back-off and woken early by ``resume_writing``), bounded by the plan's deadline.
* ``ShutdownWrite``: ``transport.write_eof()``. Over TLS: once nothing the peer sent
  is left unread, the TLS transport's ``close()`` sends close_notify; the TLS layer
  sends our FIN when the peer has answered it (see :meth:`_Closer._quiet`).
* ``Receive``: what the peer sends arrives through the protocol callbacks of
  :class:`PolicyProtocol`, which stands between the transport and the application's
  protocol; while the policy drains, data is counted and discarded, never delivered.
* ``SetLingerZero``: ``SO_LINGER {1, 0}`` on the transport's socket, then
  ``transport.abort()`` (asyncio's and uvloop's ``abort()`` alone send a FIN).
* ``Close``: ``transport.close()`` (or ``abort()`` when something must be dropped),
  then wait for ``connection_lost``; the kernel state is looked up once the fd is gone.

The driver is callback-driven: no task runs per close. :func:`aclose` and the
servers wait on a future the driver resolves; cancelling the waiter does not stop
the close, which always ends within the policy's bounds. The bounds are kept in the
loop's shared deadline slots (:class:`_Deadlines`, 5 ms wide), not one timer per close.

A busy server runs this once per connection, so the hot paths are written for
CPython's costs (a Python call and its few lines cost about 0.3 us here): enum
members are read from module globals, each step makes few calls, and nothing is
measured that neither the plan nor the report needs. ``benchmarks/bench_aio.py``
measures it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import errno
import gc
import logging
import socket
import struct
import time
import weakref
from asyncio import constants as _asyncio_constants
from asyncio import transports as _asyncio_transports
from collections.abc import AsyncGenerator, Callable, Iterable
from typing import Any, Final, Protocol, TypeAlias, cast

from . import _checks, _kernel, _observe
from ._errors import NotTcpSocketError
from ._kernel._types import KernelState, TcpState
from ._linger import disarm_linger
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
from ._policy import CloseMode, ClosePolicy, PolicyLike, as_policy
from ._report import CloseReport, build_report

__all__ = (
    "OnClose",
    "PolicyProtocol",
    "PolicyProtocolFactory",
    "PolicyTransport",
    "aclose",
    "connection_of",
    "with_policy",
)

logger = logging.getLogger("tcpclose")

#: What receives each report: a plain function called in the event loop.
OnClose: TypeAlias = Callable[[CloseReport], object]

_LINGER_ZERO: Final = struct.pack("ii", 1, 0)
_ABORT_POLICY: Final = ClosePolicy(mode=CloseMode.ABORT)
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
#: TCP states in which the peer's FIN has arrived.
_PEER_FIN_STATES: Final = frozenset(
    {TcpState.CLOSE_WAIT, TcpState.LAST_ACK, TcpState.CLOSING, TcpState.TIME_WAIT}
)
#: Where a socket that closed second ends: it has nothing to keep (CLOSED: no socket).
_PASSIVE_END_STATES: Final = frozenset({TcpState.LAST_ACK, TcpState.CLOSED})
#: Discarded data lands here (shared: nobody ever reads it).
_SCRATCH: Final = memoryview(bytearray(256 * 1024))
#: The most a TCP transport hands to ``data_received`` at once: asyncio's selector
#: transport reads 256 KiB at a time, uvloop's 256,000 bytes. While more than this is
#: left of the drain's byte budget, what arrives cannot overshoot it and the wrapper
#: counts it as it comes; below, a sink reading at most the budget left takes over (a
#: ``BufferedProtocol``: the transport reads into its buffer). TLS transports join
#: what they decrypted into one ``data_received`` of any size: the sink from the start.
_LARGEST_READ: Final = 256 * 1024


class _TransportLike(Protocol):
    """The transport surface the driver uses (asyncio's and uvloop's transports;
    uvloop's do not subclass ``asyncio.Transport``)."""

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...
    def is_closing(self) -> bool: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None: ...
    def get_protocol(self) -> asyncio.BaseProtocol: ...
    def get_write_buffer_size(self) -> int: ...
    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def write_eof(self) -> None: ...
    def can_write_eof(self) -> bool: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def is_reading(self) -> bool: ...


class _Wait(enum.Enum):
    NONE = "none"
    FLUSH = "flush"
    QUIET = "quiet"  # over TLS, before close_notify: until nothing more is readable
    RECEIVE = "receive"
    CLOSE = "close"
    DONE = "done"


# Enum members as module globals for the hot paths (on Python 3.11 ``Event.DONE`` is
# looked up through the enum's metaclass: about 80 ns, a global about 10).
_EVENT_ACKED = Event.ACKED
_EVENT_DATA = Event.DATA
_EVENT_DONE = Event.DONE
_EVENT_ERROR = Event.ERROR
_EVENT_FLUSHED = Event.FLUSHED
_EVENT_PEER_EOF = Event.PEER_EOF
_EVENT_RESET = Event.RESET
_EVENT_TIMEOUT = Event.TIMEOUT
_EVENT_UNACKED_NONE = Event.UNACKED_NONE
_EVENT_UNACKED_SOME = Event.UNACKED_SOME
_MODE_ABORT = CloseMode.ABORT
_MODE_DEFAULT = CloseMode.DEFAULT
_MODE_PEER_FIRST = CloseMode.PEER_FIRST
_WAIT_CLOSE = _Wait.CLOSE
_WAIT_DONE = _Wait.DONE
_WAIT_FLUSH = _Wait.FLUSH
_WAIT_NONE = _Wait.NONE
_WAIT_QUIET = _Wait.QUIET
_WAIT_RECEIVE = _Wait.RECEIVE


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

    __slots__ = ("_loop", "_loop_end", "_slots", "active", "clock")

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


# -- the driver ---------------------------------------------------------------------------


class _Closer:
    """Runs one close plan on one connection, driven by loop callbacks and timers.

    The connection (:class:`PolicyProtocol`) reports what happens on the transport
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
        "_kernel_state",
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
        conn: PolicyProtocol,
        policy: ClosePolicy,
        trigger: str,
        report: bool,
        allow_data_loss: bool = False,
        deliver: bool = False,
        background: bool = True,
    ) -> None:
        # (Positional parameters, and few calls below: a busy server makes thousands
        # of these a second, and a Python call and its few lines cost about 0.3 us.)
        registry = conn.registry
        loop = registry.loop if registry is not None else None
        if loop is None:
            loop = asyncio.get_running_loop()
        self._loop = loop
        self._conn = conn
        self._trigger = trigger
        self._allow_data_loss = allow_data_loss
        self._tls = conn.ssl
        #: While True (``write_eof()`` under peer-first, before the protocol's own
        #: close) data and EOF still reach the application's protocol.
        self.deliver = deliver
        #: True: issue the warnings when done (no caller is there to point at).
        self.background = background
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
        self._wait = _WAIT_NONE
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
            observed = self._watch.observed(trigger=self._trigger, kernel_state=self._kernel_state)
            self._report = build_report(self._plan.policy, self._plan_result(), observed)
        return self._report

    def start(self) -> None:
        self._deadlines.active.add(self)
        # (SO_LINGER with a time would block the loop in the fd's close: off, TC201.)
        disarm_linger(
            self._watch,
            self._conn.optsock,
            self._plan.policy.mode,
            nonblocking=True,
            event_loop=True,
        )
        self._advance(self._last_data)  # (the time the close started)

    def cut_short(self) -> None:
        """The loop is ending: stop waiting for the peer; the transport is aborted now
        and the close ends when it reports ``connection_lost``."""
        if self.done or self._wait is _WAIT_DONE:
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
        if wait is _WAIT_RECEIVE:
            now = self._clock()
            self._last_data = now
            plan = self._plan
            phase = plan.phase
            plan.feed(_EVENT_DATA, now, nbytes=nbytes)
            if plan.phase is phase:
                return  # keep waiting; the timer re-arms itself for the new idle bound
            self._stop_waiting()
            self._advance()
        elif wait is not _WAIT_DONE:
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
        if self._wait is _WAIT_RECEIVE:
            self._stop_waiting()
            now = self._clock()
            self._plan.feed(_EVENT_PEER_EOF, now)
            self._advance(now)

    def on_lost(self, exc: BaseException | None) -> None:
        """The transport called ``connection_lost``: its fd is closed right after."""
        if exc is not None or self._lost_exc is None:  # (else cut_short() said why)
            self._lost_exc = exc
        self._measure_before_close()  # the fd is still open inside connection_lost
        wait = self._wait
        if wait is _WAIT_RECEIVE or wait is _WAIT_FLUSH:
            self._stop_waiting()
            self._plan.feed(self._lost_event(receiving=wait is _WAIT_RECEIVE), self._clock())
            self._advance()
        elif wait is _WAIT_CLOSE:
            self._stop_waiting()
            now = self._clock()
            self._plan.feed(_EVENT_DONE, now)
            self._advance(now)

    def on_resume_writing(self) -> None:
        if self._wait is _WAIT_FLUSH and self._conn.buffered() == 0:
            # Not from here: the transport is inside its write callback, which goes on
            # after resume_writing() (CPython's shuts the socket down there if write_eof()
            # was called). Finish the flush on the next loop turn instead.
            self._stop_waiting()
            self._sleep(_WAIT_FLUSH, self._clock(), precise=True)

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
                    self._poll = _FLUSH_POLL_FIRST_S
                    self._sleep(_WAIT_FLUSH, min(action.deadline, now + self._poll), precise=True)
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
                    plan.feed(_EVENT_DATA, now, nbytes=nbytes)
                elif conn.peer_eof:
                    plan.feed(_EVENT_PEER_EOF, now)
                elif conn.lost:
                    plan.feed(self._lost_event(receiving=True), now)
                else:
                    deadline = self._receive_deadline(action)
                    if now >= deadline:
                        plan.feed(_EVENT_TIMEOUT, now)
                        continue
                    self._resume_reading()
                    self._receiving = action
                    self._sleep(_WAIT_RECEIVE, deadline)
                    return
            elif kind is Close:
                if conn.lost:
                    plan.feed(_EVENT_DONE, now)
                    continue
                self._close_transport(now)
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
        self._wait = _WAIT_DONE
        if self._watch.local is not None:
            # We may be inside connection_lost, before the transport closes the fd:
            # look the 4-tuple up on the next loop turn.
            self._loop.call_soon(self._complete)
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
        if self._wait is not _WAIT_QUIET:  # the first look: start reading
            self._quiet_deadline = now + self._plan.policy.idle_timeout
            self._resume_reading()
        elif now >= self._quiet_deadline or not self.budget_left() or not self._watch.unread():
            return True  # (past the byte budget nothing more is read: waiting cannot help)
        self._sleep(_WAIT_QUIET, now + _FLUSH_POLL_FIRST_S, precise=True)
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
            return _EVENT_RESET if exc.errno in _RESET_ERRNOS else _EVENT_ERROR
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
        self._linger_zero = True
        return _EVENT_DONE

    def _close_transport(self, now: float) -> None:
        conn = self._conn
        real = conn.real
        self._measure_before_close()
        self.closed_transport = True
        default = self._plan.policy.mode is _MODE_DEFAULT
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
            self._wait = _WAIT_CLOSE
        elif default:
            # Mode default is the transport's own close, and no wait for the program:
            # the transport goes on flushing its buffer (to a peer that may never
            # read) and, over TLS, waiting for the peer's close_notify (asyncio's
            # ssl_shutdown_timeout: 30 s) on its own. The report says what the kernel
            # holds now.
            self._plan.feed(_EVENT_DONE, now)
            self._advance(now)
        else:
            self._sleep(_WAIT_CLOSE, now + _CLOSE_GRACE_S)

    def _close_timed_out(self) -> None:
        if not self._forced:
            self._forced = True
            self._watch.error = self._watch.error or "close-timeout"
            self._conn.real.abort()
            self._sleep(_WAIT_CLOSE, self._clock() + _CLOSE_GRACE_S)
            return
        # The transport never reported connection_lost: stop waiting for it.
        logger.warning("close: transport %r never called connection_lost", self._conn.real)
        self._plan.feed(_EVENT_ERROR, self._clock())
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
        self._wait = _WAIT_NONE
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
        wait, self._wait = self._wait, _WAIT_NONE
        now = self._clock()
        plan = self._plan
        if wait is _WAIT_FLUSH:
            if self._conn.buffered() == 0:
                plan.feed(_EVENT_FLUSHED, now)
            elif now >= self._deadline:
                plan.feed(_EVENT_TIMEOUT, now)
            else:
                self._poll = min(self._poll * 2, _FLUSH_POLL_MAX_S)
                self._sleep(_WAIT_FLUSH, min(self._deadline, now + self._poll), precise=True)
                return
        elif wait is _WAIT_RECEIVE:
            # The plan's Receive bounds are fixed while it stays in one phase (DATA
            # keeps the phase): the one we waited on still holds.
            action = self._receiving
            assert action is not None
            deadline = self._receive_deadline(action)
            if now < deadline:  # data came since the timer was set: wait on
                self._sleep(_WAIT_RECEIVE, deadline)
                return
            plan.feed(_EVENT_TIMEOUT, now)
        elif wait is _WAIT_CLOSE:
            self._close_timed_out()
            return
        elif wait is _WAIT_QUIET:
            self._wait = _WAIT_QUIET  # (_quiet() tells the first look from the next)
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
            return _EVENT_RESET if exc.errno in _RESET_ERRNOS else _EVENT_ERROR
        self._watch.error = f"{type(exc).__name__}: {exc}"
        return _EVENT_ERROR

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
        # (Also in front of the buffered wrapper: uvloop drives any asyncio.Protocol
        # subclass through data_received, where nothing bounds a read.)
        try:
            conn.real.set_protocol(_DrainSink(conn))
        except Exception as exc:  # closing or closed: nothing to read any more
            logger.debug("close: set_protocol failed: %s", exc)

    def stop_delivering(self) -> None:
        """The application's protocol asked for the close: from now on what arrives
        is the policy's to drain."""
        if not self.deliver:
            return
        self.deliver = False
        if self._wait is _WAIT_RECEIVE or self._wait is _WAIT_FLUSH:
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
        try:
            kernel_state = watch.after_close()
        except Exception:  # the report must not fail the close
            logger.exception("close: kernel lookup after close failed")
            kernel_state = None
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


class _Addressed:
    """The transport's socket, answering getsockname/getpeername from what the
    transport recorded when it was made (saves two syscalls per reported close)."""

    __slots__ = ("_sock", "_transport")

    def __init__(self, transport: _TransportLike, sock: Any) -> None:
        self._transport = transport
        self._sock = sock

    def fileno(self) -> int:
        return int(self._sock.fileno())

    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes:
        return cast(bytes, self._sock.getsockopt(level, option, buflen))

    def getsockname(self) -> object:
        return self._transport.get_extra_info("sockname") or self._sock.getsockname()

    def getpeername(self) -> object:
        return self._transport.get_extra_info("peername") or self._sock.getpeername()


#: ``PolicyProtocol._raw_tls`` before the first look.
_NOT_LOOKED_UP: Final = object()


def _tcp_transport_under(tls: _TransportLike) -> _TransportLike | None:
    """The TCP transport a TLS transport writes to, or None.

    CPython's TLS transport names it (``_ssl_protocol._transport``). uvloop's keeps it
    in C-level fields of its TLS protocol object, which the garbage collector's
    ``get_referents`` reaches: it is the referent that can write an EOF (the TLS
    transport itself cannot) over the same socket (not, say, the application's
    protocol, which is a referent too).
    """
    raw = getattr(getattr(tls, "_ssl_protocol", None), "_transport", None)
    if raw is not None:
        return cast(_TransportLike, raw) if hasattr(raw, "write_eof") else None
    try:
        fd = tls.get_extra_info("socket").fileno()
    except Exception:  # no socket (closed): nothing to find
        return None
    for tls_protocol in gc.get_referents(tls):
        if type(tls_protocol).__name__ != "SSLProtocol":
            continue
        for candidate in gc.get_referents(tls_protocol):
            if candidate is tls or not callable(getattr(candidate, "write_eof", None)):
                continue
            with contextlib.suppress(Exception):
                if candidate.can_write_eof() and candidate.get_extra_info("socket").fileno() == fd:
                    return cast(_TransportLike, candidate)
    return None


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


# -- the wrapper protocol and the proxy transport -------------------------------------------


class PolicyProtocol(asyncio.Protocol):
    """Stands between a transport and the application's protocol ``P``.

    Forwards every callback to ``P`` and hands ``P`` a :class:`PolicyTransport`, whose
    ``close()``, ``abort()`` and ``write_eof()`` go through the close policy. While the
    policy drains, what arrives is counted and discarded. ``P`` receives
    ``connection_lost`` exactly once, when the real connection is finished (``None``
    when the close was asked for on our side).

    Not instantiated directly: :func:`with_policy` returns a factory of these, and
    :func:`aclose` puts one in front of a transport's protocol.
    """

    __slots__ = (
        "__weakref__",  # (a TLS server's registry holds connections in handshake weakly)
        "_by_server",
        "_close_requested",
        "_closer",
        "_eof_by_policy",
        "_inner",
        "_inner_buffered",
        "_inner_lost",
        "_lost_reason",
        "_on_close",
        "_policy",
        "_raw_tls",
        "_report",
        "_shutdown_done",
        "_shutdown_timer",
        "eof_read",
        "lost",
        "optsock",
        "peer_eof",
        "real",
        "registry",
        "sock",
        "ssl",
    )

    real: _TransportLike

    def __init__(
        self,
        inner: asyncio.BaseProtocol,
        policy: ClosePolicy,
        on_close: OnClose | None = None,
        report: bool = True,
        registry: ConnectionRegistry | None = None,
    ) -> None:
        self._inner = inner
        self._inner_buffered = isinstance(inner, asyncio.BufferedProtocol)
        self._inner_lost = False
        self._policy = policy
        self._on_close = on_close
        self._report = report
        self.registry = registry
        self._closer: _Closer | None = None
        self._close_requested = False
        self._eof_by_policy = False
        #: The transport's socket (``TransportSocket`` or uvloop's pseudo-socket).
        self.sock: Any = None
        #: What socket options and ioctls go through: the ``socket.socket`` inside
        #: asyncio's ``TransportSocket`` (its methods are Python wrappers around it),
        #: else the transport's socket itself.
        self.optsock: Any = None
        #: The peer's FIN (or close_notify) arrived through ``eof_received``.
        self.peer_eof = False
        #: ``eof_received`` was called: the transport read everything up to the EOF.
        self.eof_read = False
        self.lost = False
        self.ssl = False
        self._raw_tls: object = _NOT_LOOKED_UP
        #: Server shutdown: resolved once this connection is finished; the timer that
        #: resets it if the application has not finished within the policy's bound.
        self._shutdown_done: asyncio.Future[None] | None = None
        self._shutdown_timer: asyncio.TimerHandle | None = None
        #: What the application's protocol is told in connection_lost when the close
        #: was not its own choice (a shutdown that cut its response short).
        self._lost_reason: Exception | None = None
        #: The close was the server's (a shutdown), not the application's choice.
        self._by_server = False

    def __repr__(self) -> str:
        return f"<PolicyProtocol {self._policy} around {self._inner!r}>"

    # -- attaching -------------------------------------------------------------------------

    def _attach(self, transport: _TransportLike) -> None:
        self.real = transport
        self.ssl = transport.get_extra_info("sslcontext") is not None
        self.socket()

    @classmethod
    def adopt(
        cls, transport: _TransportLike, policy: ClosePolicy, *, report: bool
    ) -> PolicyProtocol:
        """Put a wrapper in front of ``transport``'s current protocol (for aclose)."""
        inner = transport.get_protocol()
        wrapper = _new_wrapper(inner, policy, None, report, None)
        wrapper._attach(transport)
        # The application may have had the peer's FIN already (a handler that read to
        # EOF): the transport will not report it again. The kernel knows.
        try:
            info = _kernel.tcp_info(wrapper.socket())
        except (OSError, ValueError, TypeError):
            info = None
        if info is not None and info.state in _PEER_FIN_STATES:
            wrapper.peer_eof = True
        transport.set_protocol(wrapper)
        return wrapper

    # -- what the closer uses ----------------------------------------------------------------

    def socket(self) -> Any:
        """The transport's socket (``TransportSocket`` or uvloop's pseudo-socket)."""
        sock = self.sock
        if sock is None:
            sock = self.sock = self.real.get_extra_info("socket")
            inner = getattr(sock, "_sock", None)
            self.optsock = inner if isinstance(inner, socket.socket) else sock
        return sock

    def raw_under_tls(self) -> _TransportLike | None:
        """The TCP transport under a TLS transport, or None (found once, then kept)."""
        raw = self._raw_tls
        if raw is _NOT_LOOKED_UP:
            raw = self._raw_tls = _tcp_transport_under(self.real)
        return cast("_TransportLike | None", raw)

    def buffered(self) -> int:
        """Bytes of ours still in user-space buffers (the TLS layer's and the TCP
        transport's under it, when reachable)."""
        try:
            size = self.real.get_write_buffer_size()
            if self.ssl:
                raw = self.raw_under_tls()
                if raw is not None:
                    size += raw.get_write_buffer_size()
        except Exception:  # a transport already torn down
            return 0
        return size

    def close_finished(self, closer: _Closer) -> None:
        """Called by the closer once it is over."""
        self._shutdown_over()
        if self.registry is not None:
            self.registry.conns.discard(self)
        on_close = self._on_close
        if on_close is not None:
            report = closer.report
            assert report is not None
            try:
                on_close(report)
            except Exception:
                logger.exception("on_close(%s) raised", report)

    # -- closes ------------------------------------------------------------------------------

    @property
    def closer(self) -> _Closer | None:
        return self._closer

    def start_close(
        self,
        policy: ClosePolicy,
        *,
        trigger: str,
        report: bool | None = None,
        allow_data_loss: bool = False,
        deliver: bool = False,
        background: bool = True,
        requested: bool = False,
    ) -> _Closer:
        """Start a close with ``policy`` unless one is under way; return the close.

        ``requested``: the application asked for it (its protocol then gets
        ``connection_lost(None)`` whatever ends the connection).
        """
        closer = self._closer
        if closer is not None:
            return closer
        if requested:
            self._close_requested = True
        closer = _Closer(
            self,
            policy,
            trigger,
            self._report if report is None else report,
            allow_data_loss,
            deliver,
            background,
        )
        self._closer = closer
        closer.start()
        return closer

    def request_close(self, trigger: str = "close") -> _Closer | None:
        """The application asked for the close (``close()``, handler returned, ...)."""
        if self._close_requested or self.lost:
            return self._closer
        self._close_requested = True
        closer = self._closer
        if closer is not None:  # write_eof() under peer-first: the protocol is done now
            closer.stop_delivering()
            return closer
        return self.start_close(self._policy, trigger=trigger)

    def request_abort(self) -> None:
        if self.lost:
            return
        self._close_requested = True
        closer = self._closer
        if closer is not None:
            closer.stop_delivering()  # the pending close finishes within its bounds
            return
        self.start_close(_ABORT_POLICY, trigger="abort", allow_data_loss=True)

    def request_write_eof(self) -> None:
        if self._close_requested or self.lost or self._closer is not None:
            return
        if self._policy.mode is _MODE_PEER_FIRST and self.real.can_write_eof():
            # The peer's grace first, then our FIN (the plan's half close); data and
            # EOF still reach the protocol.
            self._eof_by_policy = True
            self.start_close(self._policy, trigger="write-eof", deliver=True)
            return
        self.real.write_eof()

    # -- server shutdown ---------------------------------------------------------------------

    def shut_down(self, trigger: str) -> None:
        """The server is shutting down: close now if the application has nothing in
        flight (:meth:`idle`); else let it finish its response and close as usual,
        within the policy's ``linger_time``, and reset the connection at that bound.

        A shutdown never ends a response it cut short with a FIN, which to a
        close-delimited protocol says "complete": the client sees every byte, or a reset.
        """
        if self.lost or self._close_requested or self._closer is not None:
            return
        if self._policy.mode is _MODE_ABORT or self.idle():
            self._by_server = True
            self.start_close(self._policy, trigger=trigger)
            return
        if self._shutdown_done is not None:
            return  # already waiting for the application
        registry = self.registry
        loop = registry.loop if registry is not None and registry.loop else None
        loop = loop or asyncio.get_running_loop()
        self._shutdown_done = loop.create_future()
        self._shutdown_timer = loop.call_later(
            self._policy.linger_time, self._shutdown_overdue, trigger
        )

    def idle(self) -> bool:
        """Nothing of the application's in flight: nothing buffered to send and, for an
        ``asyncio.start_server`` handler, the handler waiting to read (between requests).
        Any other protocol counts as idle once its writes are flushed."""
        if self.buffered():
            return False
        inner = self._inner
        if isinstance(inner, asyncio.StreamReaderProtocol):
            reader = getattr(inner, "_stream_reader", None)
            return getattr(reader, "_waiter", None) is not None
        return True

    def _shutdown_overdue(self, trigger: str) -> None:
        self._shutdown_timer = None
        if self.lost or self._close_requested or self._closer is not None:
            return
        logger.warning(
            "server shutdown: %r still had its response in flight after %gs: reset",
            self._inner,
            self._policy.linger_time,
        )
        self._lost_reason = ConnectionAbortedError(
            errno.ECONNABORTED,
            f"reset by server shutdown: the response was not finished within "
            f"linger_time={self._policy.linger_time:g}s",
        )
        self._by_server = True
        self.start_close(_ABORT_POLICY, trigger=trigger, allow_data_loss=True)

    def shutdown_pending(self) -> asyncio.Future[None] | None:
        """While the shutdown waits for the application: a future resolved when the
        connection is finished."""
        done = self._shutdown_done
        return done if done is not None and not done.done() else None

    def _shutdown_over(self) -> None:
        timer, self._shutdown_timer = self._shutdown_timer, None
        if timer is not None:
            timer.cancel()
        done = self._shutdown_done
        if done is not None and not done.done():
            done.set_result(None)

    @property
    def cut_by_server(self) -> bool:
        """The close was the server's (a shutdown), not the application's choice."""
        return self._by_server and not self._close_requested

    @property
    def eof_by_policy(self) -> bool:
        """``write_eof()`` was taken by the policy: writing is over."""
        return self._eof_by_policy

    @property
    def closing(self) -> bool:
        """A close was asked for, or one is under way that no longer delivers data."""
        if self._close_requested:
            return True
        closer = self._closer
        return closer is not None and not closer.deliver

    # -- the protocol callbacks ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        real = cast(_TransportLike, transport)
        self._attach(real)
        registry = self.registry
        if registry is not None:
            registry.conns.add(self)
            if registry.handshaking is not None:
                registry.handshaking.discard(self)
        # (The proxy is not kept here: it refers to us, and a cycle would leave every
        # finished connection to the cyclic garbage collector.)
        self._inner.connection_made(PolicyTransport(self, real))
        if registry is not None and registry.closing and not self.lost:
            self.shut_down(registry.trigger)

    def data_received(self, data: bytes) -> None:
        closer = self._closer
        if closer is None or closer.deliver:
            if self._inner_lost:
                return
            if self._inner_buffered:
                _feed_buffered(cast(asyncio.BufferedProtocol, self._inner), data)
            else:
                cast(asyncio.Protocol, self._inner).data_received(data)
            if closer is not None:
                closer.on_activity()
        else:
            closer.on_data(len(data))

    def eof_received(self) -> bool | None:
        self.peer_eof = True
        self.eof_read = True
        closer = self._closer
        # A TLS transport ignores the answer (and warns on True). Once the close has
        # closed the transport, False: the transport's own close() is then a no-op,
        # where True would make it stop reading an fd it no longer watches.
        keep_open = not self.ssl
        if closer is not None and not closer.deliver:
            closer.on_eof()
            return keep_open and not closer.closed_transport
        inner = cast(asyncio.Protocol, self._inner)
        inner_keeps_open = inner.eof_received() if not self._inner_lost else False
        if closer is not None:  # write_eof() under peer-first: both sides are done
            closer.stop_delivering()
            closer.on_eof()
            return keep_open and not closer.closed_transport
        if inner_keeps_open and not self.ssl:
            return True
        # The protocol expects the transport to close now (or TLS closes anyway):
        # that close is the policy's.
        self._close_requested = True
        self.start_close(self._policy, trigger="peer-eof")
        return keep_open

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lost:
            return
        self.lost = True
        closer = self._closer
        try:
            # None when the close was asked for on our side: what ended it (a reset
            # during the drain, say) is in the report, not the protocol's business.
            if self._lost_reason is not None:
                self._call_inner_lost(self._lost_reason)
            else:
                self._call_inner_lost(None if self._close_requested else exc)
        finally:
            if closer is not None:
                closer.on_lost(exc)
            else:
                self._shutdown_over()
                if self.registry is not None:
                    self.registry.discard(self)

    def _call_inner_lost(self, exc: Exception | None) -> None:
        if self._inner_lost:
            return
        self._inner_lost = True
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if not self._inner_lost:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        try:
            if not self._inner_lost:
                self._inner.resume_writing()
        finally:
            if self._closer is not None:
                self._closer.on_resume_writing()

    # -- the inner protocol ------------------------------------------------------------------

    def set_inner(self, protocol: asyncio.BaseProtocol) -> None:
        self._inner = protocol
        self._inner_buffered = isinstance(protocol, asyncio.BufferedProtocol)

    def get_inner(self) -> asyncio.BaseProtocol:
        return self._inner

    def draining(self) -> bool:
        """The policy is reading for itself: the application's reading choice is moot."""
        closer = self._closer
        return closer is not None and not closer.deliver


class _DrainSink(asyncio.BufferedProtocol):
    """Takes the real transport's data while the policy drains: reads at most the
    budget left (``max_drain_bytes``) into scratch space, and hands the other
    callbacks to the connection. (A ``BufferedProtocol`` and not an
    ``asyncio.Protocol``: uvloop treats any ``Protocol`` as a simple one.)"""

    __slots__ = ("conn",)

    def __init__(self, conn: PolicyProtocol) -> None:
        self.conn = conn

    def get_buffer(self, sizehint: int) -> memoryview:
        closer = self.conn.closer
        left = closer.budget_left() if closer is not None else len(_SCRATCH)
        # Never empty (transports treat that as an error); at 0 the plan has stopped.
        return _SCRATCH[: max(1, min(left, len(_SCRATCH)))]

    def buffer_updated(self, nbytes: int) -> None:
        closer = self.conn.closer
        if closer is not None:
            closer.on_data(nbytes)

    def eof_received(self) -> bool | None:
        return self.conn.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.connection_lost(exc)

    def pause_writing(self) -> None:
        self.conn.pause_writing()

    def resume_writing(self) -> None:
        self.conn.resume_writing()


class _BufferedPolicyProtocol(PolicyProtocol, asyncio.BufferedProtocol):
    """The wrapper for a ``BufferedProtocol``: the transport reads into the inner
    protocol's buffer directly (or into scratch space while the policy drains)."""

    __slots__ = ("_handed_inner", "_own_scratch")

    def __init__(
        self,
        inner: asyncio.BaseProtocol,
        policy: ClosePolicy,
        on_close: OnClose | None = None,
        report: bool = True,
        registry: ConnectionRegistry | None = None,
    ) -> None:
        super().__init__(inner, policy, on_close=on_close, report=report, registry=registry)
        self._handed_inner = False
        self._own_scratch: memoryview | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        closer = self._closer
        if (closer is None or closer.deliver) and not self._inner_lost:
            if self._inner_buffered:
                self._handed_inner = True
                inner = cast(asyncio.BufferedProtocol, self._inner)
                return cast(memoryview, inner.get_buffer(sizehint))
            # set_protocol() re-targeted us to a plain protocol: read into our own
            # buffer (not the shared scratch: that one may be written by other threads).
            self._handed_inner = False
            if self._own_scratch is None:
                self._own_scratch = memoryview(bytearray(64 * 1024))
            return self._own_scratch
        self._handed_inner = False
        left = closer.budget_left() if closer is not None else len(_SCRATCH)
        # Never empty (transports treat that as an error); at 0 the plan has stopped.
        return _SCRATCH[: max(1, min(left, len(_SCRATCH)))]

    def buffer_updated(self, nbytes: int) -> None:
        closer = self._closer
        if self._handed_inner:
            self._handed_inner = False
            cast(asyncio.BufferedProtocol, self._inner).buffer_updated(nbytes)
            if closer is not None:
                closer.on_activity()
            return
        if (closer is None or closer.deliver) and not self._inner_lost:
            assert self._own_scratch is not None
            cast(asyncio.Protocol, self._inner).data_received(bytes(self._own_scratch[:nbytes]))
            if closer is not None:
                closer.on_activity()
            return
        if closer is not None:
            closer.on_data(nbytes)

    def data_received(self, data: bytes) -> None:  # pragma: no cover - buffered transports
        super().data_received(data)


def _detached_connection() -> PolicyProtocol:
    """What a finished closer holds instead of its connection: lost, with no
    transport, no registry and no report to deliver."""
    conn = PolicyProtocol(asyncio.Protocol(), ClosePolicy(), report=False)
    conn.lost = True
    return conn


_DETACHED: Final = _detached_connection()


def _new_wrapper(
    inner: asyncio.BaseProtocol,
    policy: ClosePolicy,
    on_close: OnClose | None,
    report: bool,
    registry: ConnectionRegistry | None,
) -> PolicyProtocol:
    cls = _BufferedPolicyProtocol if isinstance(inner, asyncio.BufferedProtocol) else PolicyProtocol
    return cls(inner, policy, on_close, report, registry)


def _feed_buffered(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    """Deliver ``data`` to a buffered protocol through its own buffers."""
    view = memoryview(data)
    while view:
        buf = memoryview(protocol.get_buffer(len(view)))
        n = min(len(buf), len(view))
        if n == 0:
            raise RuntimeError("get_buffer() returned an empty buffer")
        buf[:n] = view[:n]
        protocol.buffer_updated(n)
        view = view[n:]


class PolicyTransport(_asyncio_transports._FlowControlMixin):
    """The transport the application's protocol sees under :func:`with_policy`.

    ``close()`` starts the close policy (a second call, or one after the connection is
    gone, does nothing); ``abort()`` with no close under way is an abortive close, and
    while one is under way it does not cut it short; ``write_eof()`` under
    ``peer-first`` gives the peer its grace to close first, then sends our FIN.
    ``is_closing()`` is
    true as soon as a close is asked for. Everything else is the real transport's:
    ``get_extra_info("socket")`` is the real socket, and unknown attributes are looked
    up on the real transport. ``set_protocol()``/``get_protocol()`` change and return
    the protocol behind the wrapper.
    """

    __slots__ = ("_conn", "_real")

    #: loop.sendfile() must not try the native path: it needs the real transport class.
    _sendfile_compatible = _asyncio_constants._SendfileMode.FALLBACK

    def __init__(self, conn: PolicyProtocol, real: _TransportLike) -> None:
        # _FlowControlMixin.__init__ is not called: every method that would use its
        # state is forwarded to the real transport.
        self._conn = conn
        self._real = real

    def __repr__(self) -> str:
        return f"<PolicyTransport {self._conn._policy} over {self._real!r}>"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_conn", "_real"):
            raise AttributeError(name)
        return getattr(self._real, name)

    @property
    def _protocol_paused(self) -> bool:
        # loop.sendfile()'s fallback reads it to restore flow control afterwards.
        return bool(getattr(self._real, "_protocol_paused", False))

    # -- the policy ------------------------------------------------------------------------

    def close(self) -> None:
        self._conn.request_close("close")

    def abort(self) -> None:
        self._conn.request_abort()

    def write_eof(self) -> None:
        self._conn.request_write_eof()

    def is_closing(self) -> bool:
        return self._conn.closing or self._real.is_closing()

    # -- writing ---------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        conn = self._conn
        if conn.closing:
            if conn.cut_by_server:
                raise _server_closed(conn)
            return  # the application's own close is under way: like TLS, drop it
        if conn.eof_by_policy:
            raise RuntimeError("Cannot call write() after write_eof()")
        self._real.write(data)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        conn = self._conn
        if conn.closing:
            if conn.cut_by_server:
                raise _server_closed(conn)
            return
        if conn.eof_by_policy:
            raise RuntimeError("Cannot call writelines() after write_eof()")
        cast(asyncio.WriteTransport, self._real).writelines(list_of_data)

    def can_write_eof(self) -> bool:
        return self._real.can_write_eof()

    def get_write_buffer_size(self) -> int:
        return self._real.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return cast(asyncio.WriteTransport, self._real).get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        cast(asyncio.WriteTransport, self._real).set_write_buffer_limits(high, low)

    # -- reading ---------------------------------------------------------------------------

    def pause_reading(self) -> None:
        if self._conn.draining():
            return  # the policy reads until its bounds; the protocol gets nothing more
        self._real.pause_reading()

    def resume_reading(self) -> None:
        if self._conn.draining():
            return
        self._real.resume_reading()

    def is_reading(self) -> bool:
        return self._real.is_reading()

    # -- the rest --------------------------------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._real.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._conn.set_inner(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._conn.get_inner()

    @property
    def connection(self) -> PolicyProtocol:
        """The wrapper protocol this transport belongs to."""
        return self._conn


def _transports_in_handshake(conns: list[PolicyProtocol]) -> list[asyncio.Transport]:
    """The TCP transports under TLS handshakes whose application protocols are
    ``conns``. Neither CPython's nor uvloop's TLS layer lets a protocol reach it before
    the handshake is over; the TLS protocol object that holds ours also holds the TCP
    transport (CPython names it ``_transport``; uvloop keeps it in a C-level field,
    which ``gc.get_referents`` reaches). One ``gc.get_referrers`` pass, at shutdown only.
    """
    if not conns:
        return []
    found: list[asyncio.Transport] = []
    holders = gc.get_referrers(*conns)
    # (CPython's SSLProtocol keeps ours in its instance dict: the dict refers to ours.)
    dicts = [h for h in holders if type(h) is dict]
    if dicts:
        holders += gc.get_referrers(*dicts)
    for holder in holders:
        if type(holder).__name__ != "SSLProtocol":
            continue
        raw = getattr(holder, "_transport", None)
        candidates = [raw] if raw is not None else gc.get_referents(holder)
        for candidate in candidates:
            if (
                candidate is not None
                and not isinstance(candidate, PolicyProtocol)
                and callable(getattr(candidate, "abort", None))
                and callable(getattr(candidate, "get_extra_info", None))
            ):
                found.append(cast(asyncio.Transport, candidate))
                break
    return found


def _server_closed(conn: PolicyProtocol) -> ConnectionAbortedError:
    """What a write after the server closed the connection raises: it was not sent."""
    reason = conn._lost_reason
    if reason is not None:
        return ConnectionAbortedError(*reason.args)
    return ConnectionAbortedError(
        errno.ECONNABORTED, "closed by server shutdown: this write was not sent"
    )


# -- servers' bookkeeping -----------------------------------------------------------------------


class ConnectionRegistry:
    """The open connections of one server, so that its shutdown can close them."""

    __slots__ = ("closing", "conns", "handshaking", "loop", "trigger")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None, *, tls: bool = False) -> None:
        self.conns: set[PolicyProtocol] = set()
        #: TLS servers: connections accepted whose handshake is not over (their
        #: protocol has no transport yet), held weakly: a failed handshake just goes.
        self.handshaking: weakref.WeakSet[PolicyProtocol] | None = (
            weakref.WeakSet() if tls else None
        )
        self.closing = False
        self.trigger = "server-shutdown"
        #: The server's loop (its closes need not ask for the running loop: on
        #: CPython that asks the kernel for the process id every time).
        self.loop = loop

    def add(self, conn: PolicyProtocol) -> None:
        self.conns.add(conn)

    def discard(self, conn: PolicyProtocol) -> None:
        self.conns.discard(conn)

    def close_all(self, *, abort: bool = False) -> None:
        """Close every open connection: with the policy once the application has
        nothing in flight (see :meth:`PolicyProtocol.shut_down`), or abort them."""
        self.closing = True
        if self.handshaking:
            # No response can be in flight before the handshake: end them now (else
            # they would live on until the loop's ssl_handshake_timeout, 60 s).
            for transport in _transports_in_handshake(list(self.handshaking)):
                with contextlib.suppress(Exception):
                    transport.abort()
        for conn in list(self.conns):
            if conn.lost:
                continue
            if abort:
                conn.request_abort()
            else:
                conn.shut_down(self.trigger)

    def pending(self) -> list[asyncio.Future[Any]]:
        """Futures of the closes still running, and of the connections whose
        application the shutdown is waiting for."""
        futures: list[asyncio.Future[Any]] = []
        for conn in list(self.conns):
            closer = conn.closer
            if closer is not None and not closer.done:
                futures.append(closer.wait())
            else:
                waiting = conn.shutdown_pending()
                if waiting is not None:
                    futures.append(waiting)
        return futures


# -- the factory for with_policy ------------------------------------------------------------


class PolicyProtocolFactory:
    """A protocol factory applying a close policy; what :func:`with_policy` returns.

    Calling it calls the wrapped factory with the same arguments and puts a
    :class:`PolicyProtocol` in front of the protocol it made. Attributes it does not
    have are looked up on the wrapped factory. Instances pickle (when the wrapped
    factory and ``on_close`` do), so servers that send their protocol factory to worker
    processes keep working.

    Attributes:
        protocol_factory: the wrapped factory.
        policy: the close policy.
        on_close: receives each :class:`CloseReport`, or None.
        report: whether reports are built (the kernel lookups cost a few microseconds
            per close).
    """

    __slots__ = ("_registry", "on_close", "policy", "protocol_factory", "report")

    def __init__(
        self,
        protocol_factory: Callable[..., asyncio.BaseProtocol],
        policy: PolicyLike = "graceful",
        on_close: OnClose | None = None,
        *,
        report: bool | None = None,
        registry: ConnectionRegistry | None = None,
    ) -> None:
        if not callable(protocol_factory):
            raise TypeError(
                f"expected a protocol factory, got {type(protocol_factory).__qualname__} instead"
            )
        if on_close is not None and not callable(on_close):
            raise TypeError(f"on_close must be callable, got {type(on_close).__qualname__}")
        self.protocol_factory = protocol_factory
        self.policy = as_policy(policy)
        self.on_close = on_close
        self.report = (on_close is not None) if report is None else report
        self._registry = registry

    def __call__(self, *args: Any, **kwargs: Any) -> PolicyProtocol:
        inner = self.protocol_factory(*args, **kwargs)
        registry = self._registry
        wrapper = _new_wrapper(inner, self.policy, self.on_close, self.report, registry)
        if registry is not None and registry.handshaking is not None:
            registry.handshaking.add(wrapper)
        return wrapper

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in PolicyProtocolFactory.__slots__:
            raise AttributeError(name)
        return getattr(self.protocol_factory, name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild_factory, (self.protocol_factory, self.policy, self.on_close, self.report))

    def __repr__(self) -> str:
        return f"with_policy({self.protocol_factory!r}, {str(self.policy)!r})"


def _rebuild_factory(
    protocol_factory: Callable[..., asyncio.BaseProtocol],
    policy: ClosePolicy,
    on_close: OnClose | None,
    report: bool,
) -> PolicyProtocolFactory:
    return PolicyProtocolFactory(protocol_factory, policy, on_close, report=report)


def with_policy(
    protocol_factory: Callable[..., asyncio.BaseProtocol],
    policy: PolicyLike,
    on_close: OnClose | None = None,
    *,
    report: bool | None = None,
) -> PolicyProtocolFactory:
    """Wrap an asyncio protocol factory so that its connections close with ``policy``.

    The protocol's own ``transport.close()`` and ``transport.abort()`` go through the
    policy; nothing else changes for it (``write``, ``get_extra_info``,
    ``pause_reading``, ``set_protocol`` ... keep working). This is how a server that
    takes a protocol class or factory adopts a policy.

    Semantics (docs: asyncio API, #semantics): a second ``close()`` is a no-op; ``abort()``
    during a pending close does not cut it short; ``write_eof()`` under ``peer-first``
    gives the peer its grace to close first, then sends our FIN, while data still
    reaches the protocol;
    while the policy drains, reading is resumed and what arrives is discarded; the
    protocol's ``connection_lost`` is called exactly once, when the connection is
    finished.

    Args:
        protocol_factory: what ``loop.create_server()`` would take: a protocol class
            or any callable returning a protocol. Called with the arguments the
            returned factory is called with.
        policy: a :class:`ClosePolicy`, policy text or mapping.
        on_close: called with each :class:`CloseReport` in the event loop; its
            exceptions are logged on the ``tcpclose`` logger, never raised.
        report: build reports (kernel state lookups). Default: only when ``on_close``
            is given.

    Returns:
        A picklable :class:`PolicyProtocolFactory`.

    Raises:
        PolicyError: ``policy`` is invalid.
        TypeError: ``protocol_factory`` or ``on_close`` is not callable.

    Example::

        server = await loop.create_server(
            tcpclose.aio.with_policy(HttpProtocol, "peer-first timeout=5s"), host, port
        )
    """
    return PolicyProtocolFactory(protocol_factory, policy, on_close, report=report)


# -- aclose -----------------------------------------------------------------------------------


def connection_of(transport: object) -> PolicyProtocol | None:
    """The wrapper protocol of ``transport`` (a :class:`PolicyTransport` or a real
    transport whose protocol is a :class:`PolicyProtocol`), or None."""
    if isinstance(transport, PolicyTransport):
        return transport.connection
    get_protocol = getattr(transport, "get_protocol", None)
    if get_protocol is None:
        return None
    protocol = get_protocol()
    if isinstance(protocol, _DrainSink):
        return protocol.conn
    return protocol if isinstance(protocol, PolicyProtocol) else None


_TRANSPORT_METHODS: Final = ("get_extra_info", "get_protocol", "set_protocol", "close", "abort")


def _transport_of(obj: object) -> _TransportLike:
    if isinstance(obj, asyncio.StreamWriter):
        obj = obj.transport
    if isinstance(obj, asyncio.BaseTransport) or all(
        callable(getattr(obj, name, None)) for name in _TRANSPORT_METHODS
    ):
        return cast(_TransportLike, obj)
    raise TypeError(
        f"expected an asyncio transport or StreamWriter, got {type(obj).__qualname__} instead"
    )


def _check_tcp_transport(transport: _TransportLike) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        raise NotTcpSocketError(
            f"expected a TCP transport, got {type(transport).__qualname__} without a socket"
        )
    family = getattr(sock, "family", None)
    kind = getattr(sock, "type", None)
    if family not in (socket.AF_INET, socket.AF_INET6) or kind != socket.SOCK_STREAM:
        raise NotTcpSocketError(f"expected a TCP transport, got one over {sock!r}")
    if transport.is_closing():
        raise ValueError("the transport is already closing")


async def aclose(
    obj: object,
    policy: PolicyLike = "graceful",
    *,
    report: bool = True,
    allow_data_loss: bool = False,
) -> CloseReport:
    """Close an asyncio connection with ``policy`` and report what happened.

    Never blocks the event loop: every wait goes through the loop, bounded by the
    policy. Cancelling the awaiting task does not stop the close, which finishes in
    the background within its bounds.

    Args:
        obj: an asyncio transport (selector or TLS, asyncio's or uvloop's) or an
            ``asyncio.StreamWriter``. The application's protocol gets
            ``connection_lost`` when the connection is finished; what arrives while
            the policy drains is discarded.
        policy: a :class:`ClosePolicy`, policy text or mapping. Default ``"graceful"``.
        report: when False, skip the measurements made only for the report.
        allow_data_loss: do not warn when an abort discards queued bytes.

    Returns:
        The :class:`CloseReport`. When the connection is already closing under a
        policy (:func:`with_policy`, the servers here), that close's report.

    Raises:
        PolicyError: ``policy`` is invalid.
        TypeError: ``obj`` is not an asyncio transport or StreamWriter, or not over
            TCP (:class:`NotTcpSocketError`).
        ValueError: the transport is already closing or closed.

    Example::

        writer.write(response)
        report = await tcpclose.aio.aclose(writer, "peer-first timeout=5s")
        log.info("%s", report)
    """
    resolved = as_policy(policy)
    transport = _transport_of(obj)
    conn = connection_of(transport)
    if conn is None:
        _check_tcp_transport(transport)
        conn = PolicyProtocol.adopt(transport, resolved, report=report)
    elif conn.closer is None and conn.lost:
        raise ValueError("the connection is already closed")
    started = conn.closer is None
    closer = conn.start_close(
        resolved,
        trigger="aclose",
        report=report,
        allow_data_loss=allow_data_loss,
        background=False,
        requested=True,
    )
    if closer.deliver:  # write_eof() under peer-first was pending: now it is a close
        conn.request_close("aclose")
    try:
        result = await closer.wait()
    except asyncio.CancelledError:
        if started and not closer.done:
            closer.background = True  # nobody will be there to see the warnings
        raise
    if started:
        _observe.emit_findings(list(closer.findings), stacklevel=2)
    return result
