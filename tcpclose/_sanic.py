"""Sanic's protocol classes with a close policy from the environment."""

from __future__ import annotations

import asyncio

from ._protocol_class import PolicyProtocolBase

__all__ = ("HttpProtocol", "WebSocketProtocol")


class HttpProtocol(PolicyProtocolBase, asyncio.Protocol):
    """Sanic's ``HttpProtocol`` with the close policy of ``TCPCLOSE_POLICY``
    (``graceful`` when unset), for an application without websocket routes::

        app.run(host="0.0.0.0", port=8000, protocol=tcpclose.sanic.HttpProtocol)

    Subclass it (at module level: Sanic's worker processes import it by name) to fix
    the policy with ``close_policy`` or receive reports with ``on_close``.
    """

    wrapped = "sanic.server.protocols.http_protocol:HttpProtocol"


class WebSocketProtocol(PolicyProtocolBase, asyncio.Protocol):
    """Sanic's ``WebSocketProtocol`` (what Sanic uses when the application has
    websocket routes) with the close policy of ``TCPCLOSE_POLICY``. Sanic finds its
    websocket methods and settings through this class, as on its own.
    """

    wrapped = "sanic.server.protocols.websocket_protocol:WebSocketProtocol"
