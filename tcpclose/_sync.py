"""The blocking driver: runs the close plan on a plain socket.

``close(sock, policy)`` carries out the plan's steps with ``shutdown``, ``poll`` and
``recv_into``; it works on blocking sockets, non-blocking ones and sockets with a
timeout (the socket is switched to non-blocking for the close: every wait is a
``poll`` bounded by the plan's deadlines). The fd is closed on every path once the
close has begun, errors included.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Final, Self

from . import _checks, _observe
from ._kernel._sockopt import borrow, fileno_of, read_tcp_info, read_tcp_state
from ._kernel._types import TcpState
from ._linger import disarm_linger
from ._plan import (
    Close,
    Event,
    Finished,
    Flush,
    MeasureAcked,
    MeasureUnacked,
    Receive,
    SetLingerZero,
    ShutdownWrite,
    error_event,
    start_plan,
)
from ._policy import ClosePolicy, PolicyLike, as_policy
from ._report import CloseReport, build_report

__all__ = ("ClosingHandle", "close", "closing")

logger = logging.getLogger("tcpclose")

_LINGER_ZERO: Final = struct.pack("ii", 1, 0)
_DRAIN_CHUNK: Final = 64 * 1024
_POLL_IN: Final = select.POLLIN | select.POLLERR | select.POLLHUP
#: States in which the peer's FIN has not arrived: a read that returns EOF there
#: met our own read shutdown. (After the peer's FIN: CLOSE_WAIT, CLOSING, LAST_ACK, or
#: CLOSE once both FINs are done.)
_NO_PEER_FIN: Final = frozenset(
    {TcpState.ESTABLISHED, TcpState.FIN_WAIT1, TcpState.FIN_WAIT2, TcpState.SYN_RECV}
)

Clock = Callable[[], float]


def close(
    sock: object,
    policy: PolicyLike = "graceful",
    *,
    report: bool = True,
    allow_data_loss: bool = False,
) -> CloseReport:
    """Close a TCP socket with ``policy`` and report what happened.

    Args:
        sock: a ``socket.socket``, an asyncio ``TransportSocket``, a TCP fd, or any
            object with ``fileno()``. It is closed when this returns. (A socket an
            event loop still uses belongs to :func:`tcpclose.aio.aclose` instead.)
        policy: a :class:`ClosePolicy`, policy text (``"peer-first timeout=2s"``) or a
            mapping. Default ``"graceful"``.
        report: when False, skip every measurement made only for the report (TCP_INFO,
            the kernel lookup after close): the hot-path setting. The returned report
            then has ``tcp_info`` and ``kernel_state`` set to None.
        allow_data_loss: do not warn when an abort discards queued bytes.

    Returns:
        A :class:`CloseReport`.

    Raises:
        PolicyError: ``policy`` is invalid (the socket is left untouched).
        TypeError: ``sock`` is not a TCP socket (:class:`NotTcpSocketError`).
        ValueError: ``sock`` is listening, already closed, still connecting, or
            never connected (the socket is left untouched).

    Example::

        report = tcpclose.close(conn, "peer-first timeout=2s grace=50ms")
        log.info("closed: %s", report)   # e.g. "peer-first peer-eof ... now CLOSED ..."
    """
    resolved = as_policy(policy)
    owned, state = _take_socket(sock)
    driver = _Driver(owned, resolved, report=report, allow_data_loss=allow_data_loss, state=state)
    result = driver.run()
    _observe.emit_findings(driver.findings, stacklevel=2)
    return result


class ClosingHandle:
    """The value of ``with closing(sock, policy) as handle``.

    Attributes:
        sock: the socket being managed.
        policy: the policy applied on a normal exit.
        on_error: the policy applied when the block raised (None: ``policy``).
        report: the :class:`CloseReport`, set when the block exits (None before).
    """

    __slots__ = (
        "_allow_data_loss",
        "_identity",
        "_report_on",
        "on_error",
        "policy",
        "report",
        "sock",
    )

    def __init__(
        self,
        sock: socket.socket,
        policy: ClosePolicy,
        on_error: ClosePolicy | None,
        *,
        report: bool,
        allow_data_loss: bool,
    ) -> None:
        self.sock = sock
        self.policy = policy
        self.on_error = on_error
        self.report: CloseReport | None = None
        self._report_on = report
        self._allow_data_loss = allow_data_loss
        #: What the fd names on entry, to know at exit that it still names it.
        self._identity = _identity(sock.fileno())

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        gone = self._gone()
        if gone is not None:
            # The block took the socket's end into its own hands: nothing of ours to
            # close, and no report. Never raise over the block's own exception.
            if exc is None:
                raise ValueError(
                    f"the socket was {gone} inside the with block, "
                    "so the close policy could not be applied"
                )
            logger.debug("closing(): the block raised after the socket was %s", gone)
            return
        policy = self.on_error if exc is not None and self.on_error is not None else self.policy
        trigger = "error" if exc is not None else "close"
        driver = _Driver(
            self.sock,
            policy,
            report=self._report_on,
            allow_data_loss=self._allow_data_loss,
            trigger=trigger,
        )
        self.report = driver.run()
        _observe.emit_findings(driver.findings, stacklevel=2)

    def _gone(self) -> str | None:
        """How the block disposed of the socket, or None when it is still ours."""
        sock = self.sock
        fd = sock.fileno()
        if fd == -1:
            return "closed or detached"
        identity = _identity(fd)
        if identity is not None and identity == self._identity:
            return None
        # The fd was closed behind the socket object's back: drop the number without
        # closing it, or a later close would close whatever now has that number.
        sock.detach()
        if identity is None:
            return "closed (its fd is no longer open)"
        return "closed (its fd number now names another file)"


def _identity(fd: int) -> tuple[int, int] | None:
    """``(st_dev, st_ino)`` of what ``fd`` names (each socket has its own inode), or
    None when it is not open."""
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def closing(
    sock: object,
    policy: PolicyLike = "graceful",
    *,
    on_error: PolicyLike | None = None,
    report: bool = True,
    allow_data_loss: bool = False,
) -> ClosingHandle:
    """A context manager that closes ``sock`` with ``policy`` when the block exits.

    ``on_error`` (optional) is the policy used instead when the block raised, e.g.
    ``"abort"`` to reset a connection whose request failed half way. The exception
    still propagates. ``handle.report`` holds the report after the block.

    A block that closed or detached the socket itself (or closed its fd) leaves
    nothing to close: ``handle.report`` stays None, and the block's own exception,
    if it raised one, propagates untouched. A block that ended normally gets a
    ``ValueError`` saying the policy could not be applied. A socket object whose fd
    was closed behind its back is detached, so that nothing closes that number again.

    Raises:
        PolicyError, TypeError, ValueError: as :func:`close`, when entering.
        ValueError: on exit, when the block ended normally but had closed or
            detached the socket.

    Example::

        with tcpclose.closing(conn, "graceful", on_error="abort") as handle:
            handle.sock.sendall(response)
        print(handle.report)
    """
    resolved = as_policy(policy)
    resolved_on_error = as_policy(on_error) if on_error is not None else None
    owned, _ = _take_socket(sock)
    return ClosingHandle(
        owned,
        resolved,
        resolved_on_error,
        report=report,
        allow_data_loss=allow_data_loss,
    )


def _take_socket(obj: object) -> tuple[socket.socket, TcpState]:
    """A ``socket.socket`` for ``obj`` that the close may shut down and close, and
    its TCP state now (``UNKNOWN`` where the platform cannot tell).

    A ``socket.socket`` is used as it is; any other object is wrapped around its fd
    (``socket.socket(fileno=...)``), so closing closes that fd.

    Raises:
        NotTcpSocketError: not a TCP socket.
        ValueError: closed, listening, connecting, or never connected.
    """
    with borrow(obj) as view:  # type: ignore[arg-type]
        # (The state answers "listening?" too, where the platform gives it.)
        state = read_tcp_state(view)
        if state is TcpState.LISTEN or (
            state is TcpState.UNKNOWN and view.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
        ):
            raise ValueError("expected a connected TCP socket, got a listening socket")
        if state is TcpState.SYN_SENT:
            raise ValueError("expected a connected TCP socket, got one still connecting")
        if state is TcpState.CLOSE and _never_connected(view):
            raise ValueError(
                "expected a connected TCP socket, got one that never connected "
                "(nothing to close but the fd: use sock.close())"
            )
    if isinstance(obj, socket.socket):
        return obj, state
    # asyncio's TransportSocket wraps a real socket: close that one, so that it does
    # not linger as an object holding a stale fd number.
    inner = getattr(obj, "_sock", None)
    if isinstance(inner, socket.socket) and inner.fileno() == fileno_of(obj):
        return inner, state
    return socket.socket(fileno=fileno_of(obj)), state


def _never_connected(view: socket.socket) -> bool:
    """Whether a socket in TCP_CLOSE never completed a handshake (fresh, bound, or
    refused), as opposed to a connection that ended (reset, or both FINs done).

    TCP_INFO tells: a handshake leaves ``delivered`` (the SYN or SYN-ACK acknowledged)
    or traffic counts above 0. A kernel too old to report them answers "connected".
    """
    try:
        info = read_tcp_info(view)
    except OSError:
        return False
    if info is None:
        return False
    counts = (info.delivered, info.segs_in, info.bytes_acked, info.bytes_received)
    return all(count == 0 for count in counts)


class _Driver:
    """Carries out one plan on one socket."""

    __slots__ = (
        "_allow_data_loss",
        "_clock",
        "_pending",
        "_plan",
        "_report",
        "_seen",
        "_sock",
        "_trigger",
    )

    def __init__(
        self,
        sock: socket.socket,
        policy: ClosePolicy,
        *,
        report: bool,
        allow_data_loss: bool,
        trigger: str = "close",
        clock: Clock = time.monotonic,
        state: TcpState = TcpState.UNKNOWN,
    ) -> None:
        self._sock = sock
        self._clock = clock
        self._report = report
        self._allow_data_loss = allow_data_loss
        self._trigger = trigger
        self._pending: Event | None = None  # an error met after data, fed next time
        # (A state read just now answers the watch's "did the peer close first?")
        peer_fin = None if state is TcpState.UNKNOWN else state is TcpState.CLOSE_WAIT
        self._seen = _observe.Watch(sock, report=report, peer_fin=peer_fin)
        self._plan = start_plan(
            policy, clock(), peer_eof=self._seen.peer_fin_first, label=self._seen.label
        )

    @property
    def findings(self) -> list[_checks.Finding]:
        """Warnings found during the close, for the public entry point to issue."""
        return self._seen.findings

    def run(self) -> CloseReport:
        sock = self._sock
        plan = self._plan
        try:
            self._prepare()
            while True:
                action = plan.next_action()
                if isinstance(action, Finished):
                    break
                self._step(action)
        finally:
            if sock.fileno() != -1:  # an exception escaped mid-plan: still release the fd
                sock.close()
        return self._finish(action)

    def _prepare(self) -> None:
        """Before the first step (also used by the background closer's driver)."""
        sock = self._sock
        # Linux's close() blocks under SO_LINGER with a non-zero time, O_NONBLOCK or
        # not: turn it off so that the policy's bounds hold, and warn (TC201) where
        # the socket was meant not to block.
        disarm_linger(
            self._seen, sock, self._plan.policy.mode, nonblocking=sock.gettimeout() is not None
        )
        sock.setblocking(False)

    def _finish(self, action: Finished) -> CloseReport:
        """The report, once the plan is finished and the fd closed."""
        kernel_state = self._seen.after_close()
        observed = self._seen.observed(trigger=self._trigger, kernel_state=kernel_state)
        return build_report(self._plan.policy, action.result, observed)

    def _step(
        self,
        action: Flush
        | ShutdownWrite
        | Receive
        | MeasureAcked
        | MeasureUnacked
        | SetLingerZero
        | Close,
    ) -> None:
        plan = self._plan
        sock = self._sock
        if isinstance(action, Flush):
            # A plain socket has no user-space buffer: what was sent is in the kernel.
            plan.feed(Event.FLUSHED, self._clock())
        elif isinstance(action, ShutdownWrite):
            plan.feed(self._call(sock.shutdown, socket.SHUT_WR), self._clock())
        elif isinstance(action, Receive):
            event, nbytes = self._receive(action)
            plan.feed(event, self._clock(), nbytes=nbytes)
        elif isinstance(action, MeasureAcked):
            acked = self._seen.acked()
            if acked is None:
                plan.feed(Event.ERROR, self._clock())
            else:
                unacked, rtt, since_sent, since_recv = acked
                event = Event.UNACKED_SOME if unacked else Event.ACKED
                plan.feed(
                    event,
                    self._clock(),
                    rtt=rtt,
                    since_sent=since_sent,
                    since_recv=since_recv,
                )
        elif isinstance(action, MeasureUnacked):
            outgoing = self._seen.outgoing()
            if outgoing is None:
                plan.feed(Event.ERROR, self._clock())
            else:
                plan.feed(Event.UNACKED_SOME if outgoing else Event.UNACKED_NONE, self._clock())
        elif isinstance(action, SetLingerZero):
            self._seen.before_abort(allow_data_loss=self._allow_data_loss)
            event = self._call(sock.setsockopt, socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            plan.feed(event, self._clock())
        else:
            self._seen.before_close(plan.policy.mode)
            sock.close()
            plan.feed(Event.DONE, self._clock())

    def _call(self, func: Callable[..., object], *args: object) -> Event:
        try:
            func(*args)
        except OSError as exc:
            self._seen.error = _observe.errno_name(exc)
            return error_event(exc)
        return Event.DONE

    def _receive(self, action: Receive) -> tuple[Event, int]:
        """Wait for and discard what the peer sends, within the action's bounds.

        Returns the event to feed and the bytes discarded. Reads in chunks into the
        thread's scratch buffer; never more than ``action.max_bytes``.
        """
        sock = self._sock
        if self._pending is not None:
            event, self._pending = self._pending, None
            return event, 0
        wait = action.until - self._clock()
        if wait <= 0:
            return Event.TIMEOUT, 0
        poller = select.poll()
        poller.register(sock.fileno(), _POLL_IN)
        if not poller.poll(_poll_ms(wait)):
            return Event.TIMEOUT, 0
        return self._read_ready(action)

    def _read_ready(self, action: Receive) -> tuple[Event, int]:
        """Read and discard what a readable socket holds, within the action's bounds
        (never blocks; also used by the background closer's driver)."""
        sock = self._sock
        view = _scratch()
        total = 0
        limit = action.max_bytes
        while total < limit:
            try:
                n = sock.recv_into(view, min(len(view), limit - total))
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            except OSError as exc:
                self._seen.error = _observe.errno_name(exc)
                event = error_event(exc)
                if total:
                    # The kernel reports an error once: account for the data now and
                    # feed the error on the next Receive.
                    self._pending = event
                    return Event.DATA, total
                return event, 0
            if n == 0:
                if total:
                    # Report the data first; the next Receive reads the EOF again at once.
                    return Event.DATA, total
                if read_tcp_state(sock) in _NO_PEER_FIN:
                    # EOF without the peer's FIN: the application shut our read side
                    # (shutdown(SHUT_RD/SHUT_RDWR)). Reads end at once from now on, so
                    # nothing more can be waited for; say so rather than "peer-eof".
                    self._seen.error = "read-shutdown"
                    return Event.ERROR, 0
                return Event.PEER_EOF, 0
            total += n
            if self._clock() >= action.deadline:
                break
        if total == 0:
            # poll said readable, recv said nothing yet (e.g. urgent data or a spurious
            # wake-up): report no data; the plan asks again with fresh bounds.
            return Event.DATA, 0
        return Event.DATA, total


_local: Final = threading.local()


def _scratch() -> memoryview:
    """This thread's buffer for bytes a drain discards, made on its first drain.

    One per thread rather than one per close: a 64 KiB allocation per drain made
    2,000 drains allocate 135 MB (tracemalloc; 4.2 MB with this one). Its content is
    never read, so the closes of one thread may share it, even nested ones.
    """
    try:
        view: memoryview = _local.view
    except AttributeError:
        view = _local.view = memoryview(bytearray(_DRAIN_CHUNK))
    return view


def _poll_ms(seconds: float) -> int:
    # poll() takes whole milliseconds: round up so that we never wake before the bound.
    return max(1, int(seconds * 1000 + 0.999))
