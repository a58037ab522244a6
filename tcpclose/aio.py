"""Close policies for asyncio: :func:`aclose`, :func:`with_policy` and drop-in servers.

    import tcpclose.aio

    report = await tcpclose.aio.aclose(writer, "peer-first timeout=5s")

    server = await tcpclose.aio.start_server(handle, host, port, close_policy="graceful")

    server = await loop.create_server(
        tcpclose.aio.with_policy(MyProtocol, "peer-first timeout=5s"), host, port
    )

Works on asyncio's default loop and on uvloop, with and without TLS. Nothing here
blocks the event loop: every wait is bounded by the policy and goes through the loop.
"""

from __future__ import annotations

from ._aio import OnClose as OnClose
from ._aio import PolicyProtocol as PolicyProtocol
from ._aio import PolicyProtocolFactory as PolicyProtocolFactory
from ._aio import PolicyTransport as PolicyTransport
from ._aio import aclose as aclose
from ._aio import with_policy as with_policy
from ._aio_server import ClientConnectedCallback as ClientConnectedCallback
from ._aio_server import PolicyServer as PolicyServer
from ._aio_server import create_server as create_server
from ._aio_server import start_server as start_server
from ._loop_adapter import PolicyInstallation as PolicyInstallation
from ._loop_adapter import install_policy as install_policy

__all__ = (
    "ClientConnectedCallback",
    "OnClose",
    "PolicyInstallation",
    "PolicyProtocol",
    "PolicyProtocolFactory",
    "PolicyServer",
    "PolicyTransport",
    "aclose",
    "create_server",
    "install_policy",
    "start_server",
    "with_policy",
)
