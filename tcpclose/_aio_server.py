"""Drop-in asyncio servers whose connections close with a policy.

:func:`start_server` is ``asyncio.start_server`` plus the policy, applied when the
handler returns, raises, is cancelled or calls ``writer.close()``;
:func:`create_server` is ``loop.create_server`` with the protocol factory wrapped by
:func:`~tcpclose.aio.with_policy`. Both return a :class:`PolicyServer`, whose
``close()`` also closes the open connections with the policy and whose
``wait_closed()`` waits for those closes (each bounded by the policy), on every
Python version and on uvloop (whose own ``wait_closed()`` returns at once).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import struct
import sys
from collections.abc import Awaitable, Callable, Coroutine
from types import CoroutineType
from typing import Any, Final, TypedDict

from typing_extensions import Unpack

from ._aio import OnClose, PolicyProtocolFactory, connection_of
from ._aio_proxy import ConnectionRegistry, ListenerLinger, PolicyTransport
from ._policy import PolicyLike, as_policy

__all__ = (
    "ClientConnectedCallback",
    "PolicyServer",
    "ServerOptions",
    "create_server",
    "start_server",
)

logger = logging.getLogger("tcpclose")

#: ``asyncio.start_server``'s callback: a function or coroutine function.
ClientConnectedCallback = Callable[
    [asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None
]

_DEFAULT_LIMIT = 2**16  # asyncio.streams._DEFAULT_LIMIT


class _ServerOptions(TypedDict, total=False):
    family: int
    flags: int
    sock: socket.socket | None
    backlog: int
    ssl: ssl.SSLContext | bool | None
    reuse_address: bool | None
    reuse_port: bool | None
    ssl_handshake_timeout: float | None
    ssl_shutdown_timeout: float | None
    start_serving: bool


if sys.version_info >= (3, 13):

    class ServerOptions(_ServerOptions, total=False):
        """The keywords :func:`create_server` and :func:`start_server` pass on to
        ``loop.create_server``, typed as the standard library's stubs type them, so
        that a type checker rejects a misspelt one (``reuse_prt=True``) instead of the
        loop at run time."""

        keep_alive: bool | None

else:

    class ServerOptions(_ServerOptions, total=False):
        """The keywords :func:`create_server` and :func:`start_server` pass on to
        ``loop.create_server``, typed as the standard library's stubs type them, so
        that a type checker rejects a misspelt one (``reuse_prt=True``) instead of the
        loop at run time. (Python 3.13 adds ``keep_alive``.)"""


class PolicyServer(asyncio.AbstractServer):
    """An asyncio server whose shutdown closes its open connections with the policy.

    Wraps the loop's server object (asyncio's or uvloop's) and behaves like it:
    ``sockets``, ``is_serving()``, ``start_serving()``, ``serve_forever()``,
    ``get_loop()``, ``async with``; anything else is looked up on the wrapped server.

    * ``close()`` stops listening and starts the policy's close on every open
      connection (trigger ``"server-shutdown"``);
    * ``wait_closed()`` returns once the listening sockets are closed and every close
      has finished: at most the policy's bound after ``close()``. Keep that bound below
      the graceful-shutdown timeout of whatever runs the server;
    * ``close_clients()`` / ``abort_clients()`` (as in Python 3.13) close the open
      connections with the policy / abort them, without closing the listener.
    """

    def __init__(self, server: asyncio.AbstractServer, registry: ConnectionRegistry) -> None:
        self._server = server
        self._registry = registry
        self._serving_forever: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<PolicyServer {self._server!r}>"

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("_server", "_registry", "_serving_forever"):
            raise AttributeError(name)
        return getattr(self._server, name)

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        """The listening sockets (as the wrapped server gives them)."""
        return tuple(getattr(self._server, "sockets", ()) or ())

    @property
    def open_connections(self) -> int:
        """Connections open or still closing."""
        return len(self._registry.conns)

    def close(self) -> None:
        self._server.close()
        fut = self._serving_forever
        if fut is not None and not fut.done():
            fut.cancel()
        self._registry.close_all()

    def close_clients(self) -> None:
        """Close every open connection with the policy; keep listening."""
        self._registry.close_all()
        self._registry.closing = False

    def abort_clients(self) -> None:
        """Abort every open connection (RST); keep listening."""
        self._registry.close_all(abort=True)
        self._registry.closing = False

    async def wait_closed(self) -> None:
        await self._server.wait_closed()
        while True:
            pending = self._registry.pending()
            if not pending:
                return
            await asyncio.wait(pending)

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self._server.get_loop()

    def is_serving(self) -> bool:
        return self._server.is_serving()

    async def start_serving(self) -> None:
        await self._server.start_serving()

    async def serve_forever(self) -> None:
        """Serve until cancelled; then close as :meth:`close` and :meth:`wait_closed` do.

        (The wrapped server's own ``serve_forever`` is not used: on cancellation it
        would wait for connections that only our close would end.)
        """
        if self._serving_forever is not None:
            raise RuntimeError(f"server {self!r} is already being awaited on serve_forever()")
        if not self.sockets:
            raise RuntimeError(f"server {self!r} is closed")
        await self.start_serving()
        self._serving_forever = self.get_loop().create_future()
        try:
            await self._serving_forever
        except asyncio.CancelledError:
            try:
                self.close()
                await self.wait_closed()
            finally:
                raise
        finally:
            self._serving_forever = None


async def create_server(
    protocol_factory: Callable[..., asyncio.BaseProtocol],
    host: str | list[str] | None = None,
    port: int | None = None,
    *,
    close_policy: PolicyLike = "graceful",
    on_close: OnClose | None = None,
    report: bool | None = None,
    kernel_state: str = "eager",
    **kwargs: Unpack[ServerOptions],
) -> PolicyServer:
    """``loop.create_server`` whose connections close with ``close_policy``.

    The protocol's ``transport.close()``/``abort()``/``write_eof()`` go through the
    policy exactly as with :func:`~tcpclose.aio.with_policy`; server shutdown closes the
    open connections with it.

    Args:
        protocol_factory: as for ``loop.create_server``: a protocol class or any
            callable returning a protocol.
        host: as for ``loop.create_server``.
        port: as for ``loop.create_server``.
        close_policy: a :class:`~tcpclose.ClosePolicy`, policy text or mapping.
        on_close: called with each :class:`~tcpclose.CloseReport`; its exceptions are
            logged, never raised into the loop.
        report: build reports; default only when ``on_close`` is given.
        kernel_state: when the reports' kernel state is looked up: ``"eager"``
            (default), ``"lazy"`` or ``"sampled:F"``, as for
            :func:`~tcpclose.aio.with_policy`.
        **kwargs: as for ``loop.create_server`` (``ssl=``, ``reuse_port=``,
            ``start_serving=`` ...): the keys of :class:`ServerOptions`.

    Raises:
        PolicyError: ``close_policy`` or ``kernel_state`` is invalid.
        OSError: as ``loop.create_server``.

    Example::

        server = await tcpclose.aio.create_server(MyProtocol, "0.0.0.0", 8080,
                                                  close_policy="peer-first timeout=5s")
    """
    policy = as_policy(close_policy)
    loop = asyncio.get_running_loop()
    registry = ConnectionRegistry(loop, tls=kwargs.get("ssl") is not None)
    factory = PolicyProtocolFactory(
        protocol_factory,
        policy,
        on_close,
        report=report,
        registry=registry,
        kernel_state=kernel_state,
    )
    options: dict[str, Any] = dict(kwargs)  # typed by ServerOptions; the overloads split by sock
    server = await loop.create_server(factory, host, port, **options)
    _read_listener_linger(server, factory.listener)
    return PolicyServer(server, registry)


_LINGER: Final = struct.Struct("ii")


def _read_listener_linger(server: asyncio.AbstractServer, listener: ListenerLinger) -> None:
    """What ``SO_LINGER`` the server's accepted sockets inherit: read once from its
    listening sockets, so that no close has to ask (see ``ListenerLinger``)."""
    lingers = False
    for sock in getattr(server, "sockets", None) or ():
        try:
            on, seconds = _LINGER.unpack(
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER.size)
            )
        except (OSError, ValueError, TypeError, struct.error):
            return  # not known: the first close tells
        lingers = lingers or bool(on and seconds)
    listener.inherited = lingers


async def start_server(
    client_connected_cb: ClientConnectedCallback,
    host: str | list[str] | None = None,
    port: int | None = None,
    *,
    close_policy: PolicyLike = "graceful",
    on_close: OnClose | None = None,
    report: bool | None = None,
    kernel_state: str = "eager",
    limit: int = _DEFAULT_LIMIT,
    **kwargs: Unpack[ServerOptions],
) -> PolicyServer:
    """``asyncio.start_server`` whose connections close with ``close_policy``.

    Same signature and behaviour as ``asyncio.start_server``; in addition the policy
    is applied when the handler calls ``writer.close()``, and when a coroutine handler
    returns, raises or is cancelled (an exception still propagates as asyncio reports
    it). The handler's task ends at once; the close goes on, bounded by the policy,
    and ``writer.wait_closed()`` or the server's ``wait_closed()`` wait for it.
    Server shutdown closes the open connections with the policy.

    Args:
        client_connected_cb: called with ``(reader, writer)`` for each connection; a
            plain function or a coroutine function.
        host: as for ``asyncio.start_server``.
        port: as for ``asyncio.start_server``.
        close_policy: a :class:`~tcpclose.ClosePolicy`, policy text or mapping.
        on_close: called with each :class:`~tcpclose.CloseReport`; its exceptions are
            logged, never raised into the loop.
        report: build reports; default only when ``on_close`` is given.
        kernel_state: when the reports' kernel state is looked up: ``"eager"``
            (default), ``"lazy"`` or ``"sampled:F"``, as for
            :func:`~tcpclose.aio.with_policy`.
        limit: the buffer limit of each ``StreamReader``, as for
            ``asyncio.start_server``.
        **kwargs: as for ``asyncio.start_server`` (``ssl=``, ``backlog=`` ...): the
            keys of :class:`ServerOptions`.

    Raises:
        PolicyError: ``close_policy`` or ``kernel_state`` is invalid.
        OSError: as ``asyncio.start_server``.

    Example::

        async def handle(reader, writer):
            await reader.readuntil(b"\\r\\n\\r\\n")
            writer.write(response)          # returning closes with the policy

        server = await tcpclose.aio.start_server(handle, "0.0.0.0", 8080,
                                                 close_policy="peer-first timeout=5s")
    """
    loop = asyncio.get_running_loop()
    handler = _ClientConnected(client_connected_cb)

    def factory() -> asyncio.StreamReaderProtocol:
        reader = asyncio.StreamReader(limit=limit, loop=loop)
        return asyncio.StreamReaderProtocol(reader, handler, loop=loop)

    return await create_server(
        factory,
        host,
        port,
        close_policy=close_policy,
        on_close=on_close,
        report=report,
        kernel_state=kernel_state,
        **kwargs,
    )


class _ClientConnected:
    """The callback given to ``StreamReaderProtocol``: runs the user's callback and,
    for a coroutine, closes the connection with the policy when it ends."""

    __slots__ = ("callback",)

    def __init__(self, callback: ClientConnectedCallback) -> None:
        self.callback = callback

    def __call__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> Awaitable[None] | None:
        result = self.callback(reader, writer)
        # (The isinstance first: asyncio.iscoroutine is a Python call.)
        if isinstance(result, CoroutineType) or asyncio.iscoroutine(result):
            return _run_handler(result, writer)
        return result


async def _run_handler(handler: Coroutine[Any, Any, Any], writer: asyncio.StreamWriter) -> None:
    trigger = "handler-return"
    try:
        await handler
    except asyncio.CancelledError:
        trigger = "handler-cancelled"
        raise
    except BaseException:
        trigger = "handler-error"
        raise
    finally:
        # The close runs on its own (the server's shutdown waits for it); the task
        # need not wait for the peer.
        transport = writer.transport
        conn = (
            transport.connection  # (the usual case, without connection_of()'s checks)
            if type(transport) is PolicyTransport
            else connection_of(transport)
        )
        if conn is not None:
            conn.request_close(trigger)
