"""The blocking driver: runs the close plan on a plain socket.

``close(sock, policy)`` carries out the plan's steps with ``shutdown``, ``poll`` and
``recv_into``; it works on blocking sockets, non-blocking ones and sockets with a
timeout (the socket is switched to non-blocking for the close: every wait is a
``poll`` bounded by the plan's deadlines). The fd is closed on every path once the
close has begun, errors included.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import struct
import time
from collections.abc import Callable
from types import TracebackType
from typing import Final, Self

from . import _checks, _observe
from ._kernel._sockopt import borrow, fileno_of
from ._plan import (
    Close,
    ClosePlan,
    Event,
    Finished,
    Flush,
    MeasureAcked,
    MeasureUnacked,
    Receive,
    SetLingerZero,
    ShutdownWrite,
)
from ._policy import ClosePolicy, PolicyLike, as_policy
from ._report import CloseReport, build_report

__all__ = ("ClosingHandle", "close", "closing")

logger = logging.getLogger("tcpclose")

_LINGER_ZERO: Final = struct.pack("ii", 1, 0)
_DRAIN_CHUNK: Final = 64 * 1024
_RESET_ERRNOS: Final = frozenset(
    {errno.ECONNRESET, errno.EPIPE, errno.ENOTCONN, errno.ECONNABORTED}
)
_POLL_IN: Final = select.POLLIN | select.POLLERR | select.POLLHUP

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
        ValueError: ``sock`` is listening or already closed.

    Example::

        report = tcpclose.close(conn, "peer-first timeout=2s fallback=auto")
        log.info("closed: %s", report)   # e.g. "peer-first peer-eof ... now CLOSED ..."
    """
    resolved = as_policy(policy)
    owned = _take_socket(sock)
    driver = _Driver(owned, resolved, report=report, allow_data_loss=allow_data_loss)
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

    __slots__ = ("_allow_data_loss", "_report_on", "on_error", "policy", "report", "sock")

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

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
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

    Raises:
        PolicyError, TypeError, ValueError: as :func:`close`, when entering.

    Example::

        with tcpclose.closing(conn, "graceful", on_error="abort") as handle:
            handle.sock.sendall(response)
        print(handle.report)
    """
    resolved = as_policy(policy)
    resolved_on_error = as_policy(on_error) if on_error is not None else None
    owned = _take_socket(sock)
    return ClosingHandle(
        owned, resolved, resolved_on_error, report=report, allow_data_loss=allow_data_loss
    )


def _take_socket(obj: object) -> socket.socket:
    """A ``socket.socket`` for ``obj`` that the close may shut down and close.

    A ``socket.socket`` is used as it is; any other object is wrapped around its fd
    (``socket.socket(fileno=...)``), so closing closes that fd.

    Raises:
        NotTcpSocketError: not a TCP socket.
        ValueError: closed, or listening.
    """
    with borrow(obj) as view:  # type: ignore[arg-type]
        if view.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ValueError("expected a connected TCP socket, got a listening socket")
    if isinstance(obj, socket.socket):
        return obj
    # asyncio's TransportSocket wraps a real socket: close that one, so that it does
    # not linger as an object holding a stale fd number.
    inner = getattr(obj, "_sock", None)
    if isinstance(inner, socket.socket) and inner.fileno() == fileno_of(obj):
        return inner
    return socket.socket(fileno=fileno_of(obj))


class _Driver:
    """Carries out one plan on one socket."""

    __slots__ = (
        "_allow_data_loss",
        "_buf",
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
    ) -> None:
        self._sock = sock
        self._clock = clock
        self._report = report
        self._allow_data_loss = allow_data_loss
        self._trigger = trigger
        self._buf = bytearray(0)
        self._pending: Event | None = None  # an error met after data, fed next time
        self._seen = _observe.Watch(sock, report=report)
        self._plan = ClosePlan(
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
            # A socket in non-blocking or timeout mode is O_NONBLOCK, yet Linux's close()
            # still blocks under SO_LINGER with a non-zero time: warn (TC201).
            self._seen.check_linger(nonblocking=sock.gettimeout() is not None)
            sock.setblocking(False)
            while True:
                action = plan.next_action()
                if isinstance(action, Finished):
                    break
                self._step(action)
        finally:
            if sock.fileno() != -1:  # an exception escaped mid-plan: still release the fd
                sock.close()
        kernel_state = self._seen.after_close()
        observed = self._seen.observed(trigger=self._trigger, kernel_state=kernel_state)
        return build_report(plan.policy, action.result, observed)

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
            self._seen.error = errno.errorcode.get(exc.errno or 0, str(exc))
            return Event.RESET if exc.errno in _RESET_ERRNOS else Event.ERROR
        return Event.DONE

    def _receive(self, action: Receive) -> tuple[Event, int]:
        """Wait for and discard what the peer sends, within the action's bounds.

        Returns the event to feed and the bytes discarded. Reads in chunks into one
        reused buffer; never more than ``action.max_bytes``.
        """
        sock = self._sock
        if self._pending is not None:
            event, self._pending = self._pending, None
            return event, 0
        now = self._clock()
        wait = action.deadline - now
        if action.idle_timeout is not None:
            wait = min(wait, action.idle_timeout)
        if wait <= 0:
            return Event.TIMEOUT, 0
        poller = select.poll()
        poller.register(sock.fileno(), _POLL_IN)
        if not poller.poll(_poll_ms(wait)):
            return Event.TIMEOUT, 0
        if not self._buf:
            self._buf = bytearray(_DRAIN_CHUNK)
        view = memoryview(self._buf)
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
                self._seen.error = errno.errorcode.get(exc.errno or 0, str(exc))
                event = Event.RESET if exc.errno in _RESET_ERRNOS else Event.ERROR
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
                return Event.PEER_EOF, 0
            total += n
            if self._clock() >= action.deadline:
                break
        if total == 0:
            # poll said readable, recv said nothing yet (e.g. urgent data or a spurious
            # wake-up): report no data; the plan asks again with fresh bounds.
            return Event.DATA, 0
        return Event.DATA, total


def _poll_ms(seconds: float) -> int:
    # poll() takes whole milliseconds: round up so that we never wake before the bound.
    return max(1, int(seconds * 1000 + 0.999))
