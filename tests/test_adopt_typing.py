"""The ready-made pieces type-check where their servers take them (issue 15, item 4):
``mypy --strict`` runs over this file with the rest of the tests. The functions are
never called; the test below only checks at run time what mypy is told.

``tcpclose.aio.with_policy(...)`` returns a factory object: it works at run time but a
type checker rejects it where uvicorn, Sanic and websockets declare a class. The
classes of ``tcpclose.uvicorn``, ``tcpclose.sanic`` and ``tcpclose.websockets`` are
classes of the declared kind.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

for _name in ("uvicorn", "sanic", "websockets", "aiohttp"):
    pytest.importorskip(_name)

# (Imported by name, not through importorskip, so that mypy sees their types.)
import uvicorn  # noqa: E402
import uvicorn.protocols.http.h11_impl  # noqa: E402
import websockets.asyncio.server as websockets_server  # noqa: E402
from aiohttp import web  # noqa: E402
from sanic import Sanic  # noqa: E402

import tcpclose.aio  # noqa: E402
import tcpclose.aiohttp  # noqa: E402
import tcpclose.sanic  # noqa: E402
import tcpclose.uvicorn  # noqa: E402
import tcpclose.websockets  # noqa: E402


async def asgi_app(scope: Any, receive: Any, send: Any) -> None:
    pass


def run_uvicorn() -> None:
    # The problem: a factory object is not a class (the ignore is checked: mypy's
    # --strict reports an ignore that silences nothing).
    factory = tcpclose.aio.with_policy(uvicorn.protocols.http.h11_impl.H11Protocol, "graceful")
    uvicorn.run(asgi_app, http=factory)  # type: ignore[arg-type]
    uvicorn.run(asgi_app, http=tcpclose.uvicorn.H11Protocol)
    uvicorn.run(asgi_app, http=tcpclose.uvicorn.HttpToolsProtocol, workers=1)
    uvicorn.Config(asgi_app, http=tcpclose.uvicorn.H11Protocol)


def run_sanic(app: Sanic[Any, Any]) -> None:
    app.run(protocol=tcpclose.sanic.HttpProtocol)
    app.run(protocol=tcpclose.sanic.WebSocketProtocol)


async def serve_websockets() -> None:
    async def handler(connection: websockets_server.ServerConnection) -> None:
        pass

    async with websockets_server.serve(
        handler, "127.0.0.1", 0, create_connection=tcpclose.websockets.ServerConnection
    ):
        pass


async def serve_aiohttp(runner: web.AppRunner) -> None:
    site: web.TCPSite = tcpclose.aiohttp.TCPSite(runner, "127.0.0.1", 0, close_policy="graceful")
    await site.start()


def test_the_classes_are_what_the_servers_declare() -> None:
    for cls in (
        tcpclose.uvicorn.H11Protocol,
        tcpclose.uvicorn.HttpToolsProtocol,
        tcpclose.sanic.HttpProtocol,
        tcpclose.sanic.WebSocketProtocol,
    ):
        assert isinstance(cls, type)
        assert issubclass(cls, asyncio.Protocol)
    assert issubclass(tcpclose.websockets.ServerConnection, websockets_server.ServerConnection)
    assert issubclass(tcpclose.aiohttp.TCPSite, web.TCPSite)


def test_public_modules_export_every_name_documented() -> None:
    import inspect

    import tcpclose.gunicorn

    expected = {
        tcpclose.aiohttp: ("TCPSite",),
        tcpclose.gunicorn: ("HandOverSocket", "SyncWorker", "ThreadWorker"),
        tcpclose.sanic: ("HttpProtocol", "WebSocketProtocol"),
        tcpclose.uvicorn: ("H11Protocol", "HttpToolsProtocol"),
        tcpclose.websockets: ("ServerConnection",),
    }
    for module, names in expected.items():
        assert module.__all__ == names, module
        assert inspect.getdoc(module), module
        for name in names:
            assert inspect.getdoc(getattr(module, name)), (module, name)
