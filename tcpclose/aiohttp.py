"""aiohttp's ``TCPSite`` with a close policy.

    runner = aiohttp.web.AppRunner(app)
    await runner.setup()
    await tcpclose.aiohttp.TCPSite(runner, "0.0.0.0", 8080, close_policy="graceful").start()

See the "Your server" page of the docs.
"""

from __future__ import annotations

from ._aiohttp import TCPSite as TCPSite

__all__ = ("TCPSite",)
