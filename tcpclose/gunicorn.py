"""gunicorn worker classes with a close policy (``sync`` and ``gthread``).

    gunicorn -k tcpclose.gunicorn.SyncWorker app:app
    gunicorn -k tcpclose.gunicorn.ThreadWorker --threads 8 app:app

The policy comes from ``TCPCLOSE_POLICY`` (``graceful`` when unset), or from a
subclass's ``close_policy``. Each connection is handed to the background closer once
gunicorn ends it, so the worker is not held for the policy's bounds. See the "Your
server" page of the docs.
"""

from __future__ import annotations

from ._gunicorn import HandOverSocket as HandOverSocket
from ._gunicorn import SyncWorker as SyncWorker
from ._gunicorn import ThreadWorker as ThreadWorker

__all__ = ("HandOverSocket", "SyncWorker", "ThreadWorker")
