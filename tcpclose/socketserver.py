"""Close policies for ``socketserver`` servers (``http.server``, ``wsgiref``, and the
development servers built on them), without changing their request handlers.

    import http.server
    import tcpclose.socketserver

    class Server(tcpclose.socketserver.ClosePolicyMixIn, http.server.ThreadingHTTPServer):
        close_policy = "peer-first timeout=2s"

Each connection is handed to a background closer after the response, so no worker
waits for the peer. See the "Your server" page of the docs.
"""

from __future__ import annotations

from ._socketserver import ClosePolicyMixIn as ClosePolicyMixIn
from ._socketserver import with_close_policy as with_close_policy

__all__ = ("ClosePolicyMixIn", "with_close_policy")
