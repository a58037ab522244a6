"""Close policies for ``socketserver`` servers: ``http.server``, ``wsgiref`` and the
development servers built on them.

``socketserver.TCPServer`` ends each connection in ``shutdown_request``: a
``shutdown(SHUT_WR)`` (our FIN: TIME_WAIT lands on the server) and a plain
``close()`` (RST when the handler left part of the request unread: the RST trap).
:class:`ClosePolicyMixIn` replaces that one method: the socket goes to a
:class:`~tcpclose.BackgroundCloser` with the server's policy, so the worker thread
(or the single-threaded server's loop) moves on at once while the policy waits for
the peer. ``close_request`` is left alone: ``ForkingMixIn``'s parent uses it to drop
its copy of a connection its child serves.

A forking server's child closes inline instead (it exits right after, which would
cut a background close short); a datagram server's "request" is not a connection
and is passed on unchanged.
"""

from __future__ import annotations

import logging
import socket
import socketserver
from typing import Any, ClassVar, TypeVar

from ._background import BackgroundCloser, OnClose, default_closer
from ._policy import PolicyLike, as_policy
from ._report import CloseReport
from ._sync import close

__all__ = ("ClosePolicyMixIn", "with_close_policy")

logger = logging.getLogger("tcpclose")

_RequestType = socket.socket | tuple[bytes, socket.socket]
_ServerT = TypeVar("_ServerT", bound=socketserver.BaseServer)


class ClosePolicyMixIn(socketserver.BaseServer):
    """Give a ``socketserver`` TCP server a close policy. Put it first in the bases.

    Class attributes (override in the subclass, or set on an instance):

    * ``close_policy``: the policy (text, mapping or :class:`ClosePolicy`); default
      ``"graceful"``.
    * ``close_in_background``: hand each connection to a background closer (default
      True), so that no worker waits for the peer; False closes inline, holding the
      worker for up to the policy's bounds.
    * ``background_closer``: the :class:`BackgroundCloser` to use; None (default) is
      the process-wide one (:func:`tcpclose.close_in_background`).

    Override :meth:`on_close` to receive each :class:`CloseReport` (reports are
    only built when it is overridden); in the background it runs in the closer's
    thread.

    Example::

        class Server(tcpclose.socketserver.ClosePolicyMixIn, http.server.ThreadingHTTPServer):
            close_policy = "peer-first timeout=2s"

        Server(("", 8000), http.server.SimpleHTTPRequestHandler).serve_forever()
    """

    close_policy: ClassVar[PolicyLike] = "graceful"
    close_in_background: ClassVar[bool] = True
    background_closer: ClassVar[BackgroundCloser | None] = None

    def on_close(self, report: CloseReport) -> None:
        """Receives each close's report when overridden (the default builds none)."""

    def shutdown_request(self, request: _RequestType) -> None:
        """Close the connection with :attr:`close_policy` (replaces the FIN and plain
        close of ``socketserver.TCPServer``). Never raises: a socket the policy
        cannot take (the handler closed it, say) gets the stdlib's plain close."""
        if not isinstance(request, socket.socket):
            super().shutdown_request(request)
            return
        on_close = self._report_to()
        try:
            if self.close_in_background and not _in_forked_child(self):
                closer = self.background_closer or default_closer()
                closer.close(request, self.close_policy, on_close=on_close)
            else:
                report = close(request, self.close_policy, report=on_close is not None)
                if on_close is not None:
                    on_close(report)
        except Exception as exc:
            logger.debug("close policy not applied (%s): plain close", exc)
            if request.fileno() != -1:
                self.close_request(request)

    def _report_to(self) -> OnClose | None:
        if type(self).on_close is ClosePolicyMixIn.on_close:
            return None
        return self.on_close


def _in_forked_child(server: socketserver.BaseServer) -> bool:
    # ForkingMixIn serves each request in a child that exits right after
    # shutdown_request: a background close there would be cut short.
    return isinstance(server, socketserver.ForkingMixIn)


def with_close_policy(
    server_class: type[_ServerT],
    policy: PolicyLike,
    *,
    on_close: OnClose | None = None,
    background: bool = True,
    closer: BackgroundCloser | None = None,
) -> type[_ServerT]:
    """A subclass of ``server_class`` with :class:`ClosePolicyMixIn` and these settings,
    for code that takes a server class (``wsgiref.simple_server.make_server(...,
    server_class=...)``, ``http.server.test(ServerClass=...)``).

    Args:
        server_class: a ``socketserver.TCPServer`` subclass.
        policy: the close policy.
        on_close: receives each :class:`CloseReport` (in the closer's thread when
            ``background``).
        background: close through a background closer (default) or inline.
        closer: the :class:`BackgroundCloser`; None: the process-wide one.

    Raises:
        TypeError: ``server_class`` is not a ``socketserver.TCPServer`` subclass, or
            ``on_close`` is not callable.
        PolicyError: ``policy`` is invalid.

    Example::

        server = wsgiref.simple_server.make_server(
            "", 8000, app,
            server_class=tcpclose.socketserver.with_close_policy(
                wsgiref.simple_server.WSGIServer, "peer-first timeout=2s"
            ),
        )
    """
    if not (isinstance(server_class, type) and issubclass(server_class, socketserver.TCPServer)):
        raise TypeError(f"expected a socketserver.TCPServer subclass, got {server_class!r} instead")
    namespace: dict[str, Any] = {
        "close_policy": as_policy(policy),
        "close_in_background": background,
        "background_closer": closer,
        "__module__": server_class.__module__,
        "__qualname__": f"{server_class.__qualname__}WithClosePolicy",
    }
    if on_close is not None:
        if not callable(on_close):
            raise TypeError(f"on_close must be callable, got {type(on_close).__qualname__}")
        callback = on_close

        def report(self: ClosePolicyMixIn, report: CloseReport) -> None:
            callback(report)

        namespace["on_close"] = report
    name = f"{server_class.__name__}WithClosePolicy"
    return type(name, (ClosePolicyMixIn, server_class), namespace)
