"""websockets' ``ServerConnection`` with a close policy from the environment."""

from __future__ import annotations

from websockets.asyncio.server import ServerConnection as _ServerConnection

from ._protocol_class import PolicyProtocolBase

__all__ = ("ServerConnection",)


class ServerConnection(PolicyProtocolBase, _ServerConnection):
    """websockets' ``ServerConnection`` with the close policy of ``TCPCLOSE_POLICY``
    (``graceful`` when unset), for ``serve(create_connection=...)``::

        async with websockets.asyncio.server.serve(
            handler, "0.0.0.0", 8765, create_connection=tcpclose.websockets.ServerConnection
        ):
            ...

    Each call builds websockets' own ``ServerConnection`` behind the policy; the
    handler receives that connection, unchanged. Subclass it to fix the policy with
    ``close_policy`` or receive reports with ``on_close``.
    """

    wrapped = "websockets.asyncio.server:ServerConnection"
