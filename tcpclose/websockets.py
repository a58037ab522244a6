"""websockets' server connection with a close policy.

    async with websockets.asyncio.server.serve(
        handler, "0.0.0.0", 8765, create_connection=tcpclose.websockets.ServerConnection
    ):
        ...

The policy comes from ``TCPCLOSE_POLICY`` (``graceful`` when unset), or from a
subclass's ``close_policy``. See the "Your server" page of the docs.
"""

from __future__ import annotations

from ._websockets import ServerConnection as ServerConnection

__all__ = ("ServerConnection",)
