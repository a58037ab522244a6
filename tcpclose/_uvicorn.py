"""uvicorn's HTTP protocol classes with a close policy from the environment."""

from __future__ import annotations

import asyncio

from ._protocol_class import PolicyProtocolBase

__all__ = ("H11Protocol", "HttpToolsProtocol")


class H11Protocol(PolicyProtocolBase, asyncio.Protocol):
    """uvicorn's h11 protocol (``--http h11``) with the close policy of
    ``TCPCLOSE_POLICY`` (``graceful`` when unset)::

        uvicorn app:app --http tcpclose.uvicorn:H11Protocol
        uvicorn.run(app, http=tcpclose.uvicorn.H11Protocol)

    Subclass it to fix the policy or receive reports (keep the subclass at module
    level, so that worker processes can import it by name)::

        class Http(tcpclose.uvicorn.H11Protocol):
            close_policy = "peer-first timeout=2s"
    """

    wrapped = "uvicorn.protocols.http.h11_impl:H11Protocol"


class HttpToolsProtocol(PolicyProtocolBase, asyncio.Protocol):
    """uvicorn's httptools protocol (``--http httptools``) with the close policy of
    ``TCPCLOSE_POLICY`` (``graceful`` when unset)::

        uvicorn app:app --http tcpclose.uvicorn:HttpToolsProtocol

    See :class:`H11Protocol` for subclassing.
    """

    wrapped = "uvicorn.protocols.http.httptools_impl:HttpToolsProtocol"
