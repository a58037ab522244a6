"""The wrapper protocol and the proxy transport: how a policy stands between a
transport and the application's protocol.

:class:`PolicyProtocol` receives the transport's callbacks, forwards them to the
application's protocol and starts a close (:class:`~tcpclose._aio_closer._Closer`)
when the application, the peer or a server shutdown asks for one; the application
sees the transport through :class:`PolicyTransport`, whose ``close()``, ``abort()``
and ``write_eof()`` go through the policy. :class:`ConnectionRegistry` keeps a
server's open connections for its shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import weakref
from asyncio import constants as _asyncio_constants
from asyncio import transports as _asyncio_transports
from collections.abc import Callable, Iterable
from typing import Any, Final, TypeAlias, cast

from . import _kernel
from ._aio_closer import EAGER, KernelStateChoice, _Closer, _QuickClose, quick_course
from ._aio_transport import (
    _tcp_transport_under,
    _TransportLike,
    _transports_in_handshake,
    socket_view,
)
from ._kernel._types import TcpState
from ._plan import Course
from ._policy import CloseMode, ClosePolicy
from ._report import CloseReport

__all__ = (
    "ConnectionRegistry",
    "ListenerLinger",
    "OnClose",
    "PolicyProtocol",
    "PolicyTransport",
)

logger = logging.getLogger("tcpclose")

#: What receives each report: a plain function called in the event loop.
OnClose: TypeAlias = Callable[[CloseReport], object]

_ABORT_POLICY: Final = ClosePolicy(mode=CloseMode.ABORT)
#: (Bound once: on Python 3.11 an enum member read from its class costs about 960
#: instructions, a module global 50; callgrind.)
_MODE_PEER_FIRST: Final = CloseMode.PEER_FIRST
_MODE_ABORT: Final = CloseMode.ABORT
#: TCP states in which the peer's FIN has arrived.
_PEER_FIN_STATES: Final = frozenset(
    {TcpState.CLOSE_WAIT, TcpState.LAST_ACK, TcpState.CLOSING, TcpState.TIME_WAIT}
)
#: Discarded data lands here (shared: nobody ever reads it).
_SCRATCH: Final = memoryview(bytearray(256 * 1024))

#: ``PolicyProtocol._raw_tls`` before the first look.
_NOT_LOOKED_UP: Final = object()


class ListenerLinger:
    """What is known of the ``SO_LINGER`` that one server's (or one protocol
    factory's) accepted sockets inherit from their listener.

    Accepted sockets inherit the listener's ``SO_LINGER``; after that only code holding
    the socket can change it. So a connection's close checks it (a ``getsockopt``)
    only when the application had the socket (``get_extra_info("socket")`` on the
    proxy transport, ``aclose`` of a transport) or while its listener's setting is not
    known: the first close of a factory's connections tells it, or the server reads its
    listening sockets when it starts. A listener whose ``SO_LINGER`` is changed later
    must be shown to :meth:`listener_changed`.
    """

    __slots__ = ("inherited",)

    def __init__(self) -> None:
        #: The accepted sockets inherit ``SO_LINGER`` on with a time (True), not
        #: (False), or not known yet (None).
        self.inherited: bool | None = None

    def listener_changed(self) -> None:
        """The listener's ``SO_LINGER`` may have changed: the next close checks."""
        self.inherited = None


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
        "_kernel_state",
        "_listener",
        "_lost_reason",
        "_on_close",
        "_optsock",
        "_policy",
        "_raw_tls",
        "_report",
        "_shutdown_done",
        "_shutdown_timer",
        "eof_read",
        "lost",
        "peer_eof",
        "real",
        "registry",
        "sock",
        "socket_exposed",
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
        kernel_state: KernelStateChoice = EAGER,
        listener: ListenerLinger | None = None,
    ) -> None:
        self._inner = inner
        self._inner_buffered = isinstance(inner, asyncio.BufferedProtocol)
        self._inner_lost = False
        self._policy = policy
        self._on_close = on_close
        self._report = report
        self.registry = registry
        self._kernel_state = kernel_state
        #: Its listener's ``SO_LINGER``, as far as known (None: a listener of its own).
        self._listener = listener
        #: The application had the socket (``get_extra_info("socket")``, ``aclose``):
        #: it may have set ``SO_LINGER``.
        self.socket_exposed = False
        self._closer: _Closer | _QuickClose | None = None
        self._close_requested = False
        self._eof_by_policy = False
        #: The transport's socket (``TransportSocket`` or uvloop's pseudo-socket).
        self.sock: Any = None
        #: What socket options and ioctls go through: the ``socket.socket`` inside
        #: asyncio's ``TransportSocket`` (its methods are Python wrappers around it),
        #: else the transport's socket itself.
        self._optsock: Any = None
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
        # (The socket is looked up when first needed: see socket() and optsock.)

    @classmethod
    def adopt(
        cls,
        transport: _TransportLike,
        policy: ClosePolicy,
        *,
        report: bool,
        kernel_state: KernelStateChoice = EAGER,
    ) -> PolicyProtocol:
        """Put a wrapper in front of ``transport``'s current protocol (for aclose)."""
        inner = transport.get_protocol()
        wrapper = _new_wrapper(inner, policy, None, report, None, kernel_state, None)
        wrapper._attach(transport)
        wrapper.socket_exposed = True  # (the application had the transport all along)
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
            self._optsock = socket_view(sock)
        return sock

    @property
    def optsock(self) -> Any:
        """What socket options and ioctls go through (made on first use: a close on
        its course may need none)."""
        view = self._optsock
        if view is None:
            self.socket()
            view = self._optsock
        return view

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

    def divert_to_sink(self) -> None:
        """From now on a sink that reads at most the drain's budget left takes the
        transport's data (also in front of the buffered wrapper: uvloop drives any
        ``asyncio.Protocol`` subclass through ``data_received``, where nothing bounds
        a read)."""
        self.real.set_protocol(_DrainSink(self))

    @property
    def linger_check(self) -> bool:
        """``SO_LINGER`` may have been set where the library has not looked (see
        :class:`ListenerLinger`)."""
        listener = self._listener
        return self.socket_exposed or listener is None or listener.inherited is not False

    def linger_seen(self, lingers: bool) -> None:
        """A close's check found ``SO_LINGER`` on with a time (``lingers``) or not;
        unless the application had the socket, that is the listener's setting."""
        listener = self._listener
        if listener is not None and not self.socket_exposed:
            listener.inherited = lingers

    def close_finished(self, closer: _Closer | _QuickClose) -> None:
        """Called by the closer once it is over."""
        if self._shutdown_done is not None or self._shutdown_timer is not None:
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
    def closer(self) -> _Closer | _QuickClose | None:
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
        kernel_state: KernelStateChoice | None = None,
    ) -> _Closer | _QuickClose:
        """Start a close with ``policy`` unless one is under way; return the close.

        ``requested``: the application asked for it (its protocol then gets
        ``connection_lost(None)`` whatever ends the connection).
        """
        closer = self._closer
        if closer is not None:
            return closer
        if requested:
            self._close_requested = True
        registry = self.registry
        loop = registry.loop if registry is not None else None
        if report is None:
            report = self._report
        if kernel_state is None:
            kernel_state = self._kernel_state
        if not deliver and background:
            course = quick_course(policy, self)
            if course is not None:
                return self._start_quick(course, trigger, allow_data_loss, report, kernel_state)
        closer = _Closer(
            self,
            loop,
            policy,
            trigger,
            report,
            allow_data_loss,
            deliver,
            background,
            kernel_state,
        )
        self._closer = closer
        closer.start()
        return closer

    def _start_quick(
        self,
        course: Course,
        trigger: str,
        allow_data_loss: bool,
        report: bool,
        kernel_state: KernelStateChoice,
    ) -> _QuickClose:
        registry = self.registry
        loop = registry.loop if registry is not None else None
        quick = self._closer = _QuickClose(
            self,
            loop or asyncio.get_running_loop(),
            course,
            trigger,
            allow_data_loss,
            report,
            kernel_state,
        )
        quick.start()
        return quick

    def request_close(self, trigger: str = "close") -> _Closer | _QuickClose | None:
        """The application asked for the close (``close()``, handler returned, ...)."""
        if self._close_requested or self.lost:
            return self._closer
        self._close_requested = True
        closer = self._closer
        if closer is not None:  # write_eof() under peer-first: the protocol is done now
            closer.stop_delivering()
            return closer
        policy = self._policy
        course = quick_course(policy, self)
        if course is not None:  # (start_close's usual case, without its keywords)
            return self._start_quick(course, trigger, False, self._report, self._kernel_state)
        return self.start_close(policy, trigger=trigger)

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
        real: _TransportLike = transport  # type: ignore[assignment]  # (a TCP transport)
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
            inner: Any = self._inner  # (a Protocol or a BufferedProtocol)
            if self._inner_buffered:
                _feed_buffered(inner, data)
            else:
                inner.data_received(data)
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
        inner: asyncio.Protocol = self._inner  # type: ignore[assignment]
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
            if not self._inner_lost:
                self._inner_lost = True
                reason = self._lost_reason
                if reason is None and not self._close_requested:
                    reason = exc
                self._inner.connection_lost(reason)
        finally:
            if closer is not None:
                closer.on_lost(exc)
            else:
                self._shutdown_over()
                if self.registry is not None:
                    self.registry.discard(self)

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
        kernel_state: KernelStateChoice = EAGER,
        listener: ListenerLinger | None = None,
    ) -> None:
        super().__init__(inner, policy, on_close, report, registry, kernel_state, listener)
        self._handed_inner = False
        self._own_scratch: memoryview | None = None

    def get_buffer(self, sizehint: int) -> memoryview:
        closer = self._closer
        if (closer is None or closer.deliver) and not self._inner_lost:
            if self._inner_buffered:
                self._handed_inner = True
                inner: Any = self._inner  # (a BufferedProtocol; no cast(): a call each time)
                buffer: memoryview = inner.get_buffer(sizehint)
                return buffer
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
            inner: Any = self._inner
            inner.buffer_updated(nbytes)
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


def _new_wrapper(
    inner: asyncio.BaseProtocol,
    policy: ClosePolicy,
    on_close: OnClose | None,
    report: bool,
    registry: ConnectionRegistry | None,
    kernel_state: KernelStateChoice,
    listener: ListenerLinger | None,
) -> PolicyProtocol:
    cls = _BufferedPolicyProtocol if isinstance(inner, asyncio.BufferedProtocol) else PolicyProtocol
    return cls(inner, policy, on_close, report, registry, kernel_state, listener)


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
        # (The real transport's own attributes may lead to its socket.)
        self._conn.socket_exposed = True
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
        if conn._closer is None and not conn._close_requested:
            # (No close asked for, the usual case: checked without the properties
            # below, each a Python call.)
            self._real.write(data)
            return
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
        if name == "socket":
            self._conn.socket_exposed = True  # (it may set SO_LINGER: checked at the close)
        return self._real.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._conn.set_inner(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._conn.get_inner()

    @property
    def connection(self) -> PolicyProtocol:
        """The wrapper protocol this transport belongs to."""
        return self._conn


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
