"""Sanic protocol classes with a close policy.

    app.run(host="0.0.0.0", port=8000, protocol=tcpclose.sanic.HttpProtocol)

``WebSocketProtocol`` for applications with websocket routes. The policy comes from
``TCPCLOSE_POLICY`` (``graceful`` when unset) in each worker process, or from a
subclass's ``close_policy``. See the "Your server" page of the docs.
"""

from __future__ import annotations

from ._sanic import HttpProtocol as HttpProtocol
from ._sanic import WebSocketProtocol as WebSocketProtocol

__all__ = ("HttpProtocol", "WebSocketProtocol")
