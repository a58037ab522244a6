"""uvicorn HTTP protocol classes with a close policy (h11 and httptools).

    uvicorn app:app --http tcpclose.uvicorn:H11Protocol
    uvicorn.run(app, http=tcpclose.uvicorn.HttpToolsProtocol)

The policy comes from ``TCPCLOSE_POLICY`` (``graceful`` when unset) in each worker
process, or from a subclass's ``close_policy``. The classes are typed as
``asyncio.Protocol`` subclasses, so ``uvicorn.run(app, http=...)`` type-checks, and
are importable by name for ``--http`` and ``--workers``. See the "Your server" page
of the docs.
"""

from __future__ import annotations

from ._uvicorn import H11Protocol as H11Protocol
from ._uvicorn import HttpToolsProtocol as HttpToolsProtocol

__all__ = ("H11Protocol", "HttpToolsProtocol")
