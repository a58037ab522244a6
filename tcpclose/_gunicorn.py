"""gunicorn worker classes whose connections close with a policy, in the background.

gunicorn's ``sync`` and ``gthread`` workers end each connection with
``gunicorn.util.close_graceful``: ``shutdown(SHUT_WR)`` (the server's FIN first, so
TIME_WAIT lands on the server), then a read of at most 64 KiB for at most 2 s, then
``close()``, which still sends RST when more of an unread request body is queued. The
worker waits through all of it (the ``gthread`` worker in its main loop, which also
accepts connections).

The classes here change one thing: each connection socket is a :class:`HandOverSocket`,
whose ``shutdown()`` for writing or ``close()`` hands it to the process-wide
:class:`~tcpclose.BackgroundCloser` instead. The worker returns at once; the closer's
thread applies the policy and delivers the report. Everything else (parsing,
keep-alive, timeouts, signals) is gunicorn's. TLS connections keep gunicorn's own
close (the sync driver does not speak TLS).

What must live here: the socket that hands itself over, and where each worker class
puts it. What must not: close logic (the closer's and the plan's).
"""

from __future__ import annotations

import logging
import socket
from typing import Any, ClassVar

from gunicorn.workers.gthread import ThreadWorker as _GunicornThreadWorker
from gunicorn.workers.sync import SyncWorker as _GunicornSyncWorker

from ._background import OnClose, close_in_background
from ._environment import environment_on_close, environment_policy
from ._errors import TcpCloseError
from ._policy import ClosePolicy, PolicyLike, as_policy
from ._report import CloseReport

__all__ = ("HandOverSocket", "SyncWorker", "ThreadWorker")

logger = logging.getLogger("tcpclose")


class HandOverSocket(socket.socket):
    """A connection socket that hands itself to the background closer when its owner
    ends it: ``shutdown(SHUT_WR)`` or ``shutdown(SHUT_RDWR)`` (the start of gunicorn's
    lingering close) or ``close()``. Afterwards the object is detached: further calls
    on it fail with ``EBADF`` (gunicorn's lingering close stops at the first one) and
    ``close()`` does nothing.

    A socket the closer refuses (the peer reset it already, say) is ended as asked,
    as a plain socket would be.
    """

    __slots__ = ("_tcpclose_on_close", "_tcpclose_policy")

    _tcpclose_policy: ClosePolicy | None
    _tcpclose_on_close: OnClose | None

    @classmethod
    def adopt(
        cls, sock: socket.socket, policy: ClosePolicy, on_close: OnClose | None = None
    ) -> HandOverSocket:
        """A :class:`HandOverSocket` for ``sock``'s connection (``sock`` is detached;
        its timeout is kept)."""
        timeout = sock.gettimeout()
        adopted = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        adopted.settimeout(timeout)
        adopted._tcpclose_policy = policy
        adopted._tcpclose_on_close = on_close
        return adopted

    def shutdown(self, how: int) -> None:
        if how != socket.SHUT_RD and self._hand_over():
            return
        super().shutdown(how)

    def close(self) -> None:
        self._hand_over()
        super().close()

    def _hand_over(self) -> bool:
        policy = getattr(self, "_tcpclose_policy", None)
        if policy is None or self.fileno() == -1:
            return False
        self._tcpclose_policy = None
        try:
            close_in_background(self, policy, on_close=self._tcpclose_on_close)
        except (TcpCloseError, OSError, ValueError, TypeError, RuntimeError) as exc:
            logger.debug("close policy not applied (%s): gunicorn's own close", exc)
            return False
        return True


class _PolicyWorker:
    """What both worker classes share: the policy and the report sink, set when the
    worker process starts."""

    #: The policy: text, mapping or :class:`ClosePolicy`; None (default): the
    #: ``TCPCLOSE_POLICY`` environment variable, ``graceful`` when it is unset, no
    #: policy at all when it says ``off``.
    close_policy: ClassVar[PolicyLike | None] = None

    _tcpclose_policy: ClosePolicy | None = None
    _tcpclose_on_close: OnClose | None = None

    def on_close(self, report: CloseReport) -> None:
        """Receives each close's report, in the closer's thread, when overridden. By
        default reports go to the per-close log line when ``TCPCLOSE_LOG_REPORTS``
        asks for it (``tcpclose run --log-reports``), and are not built otherwise."""

    def _tcpclose_setup(self) -> None:
        cls = type(self)
        self._tcpclose_policy = (
            environment_policy() if cls.close_policy is None else as_policy(cls.close_policy)
        )
        if getattr(cls, "on_close", None) is not _PolicyWorker.on_close:
            self._tcpclose_on_close = self.on_close
        else:
            self._tcpclose_on_close = environment_on_close()

    def _tcpclose_adopt(self, sock: Any) -> Any:
        """``sock`` as a :class:`HandOverSocket`, or unchanged (no policy, TLS, or
        already adopted)."""
        policy = self._tcpclose_policy
        if (
            policy is None or type(sock) is not socket.socket or self.cfg.is_ssl  # type: ignore[attr-defined]
        ):
            return sock
        return HandOverSocket.adopt(sock, policy, self._tcpclose_on_close)


class SyncWorker(_PolicyWorker, _GunicornSyncWorker):  # type: ignore[misc]
    """gunicorn's ``sync`` worker, each connection closed with the policy by the
    background closer once the response is sent::

        gunicorn -k tcpclose.gunicorn.SyncWorker app:app
        TCPCLOSE_POLICY="peer-first timeout=2s" gunicorn -k tcpclose.gunicorn.SyncWorker app:app

    The policy is the class's :attr:`close_policy`, else ``TCPCLOSE_POLICY``. With
    ``--threads`` above 1 gunicorn replaces any class whose name ends in
    ``SyncWorker`` by its own ``gthread`` worker: use :class:`ThreadWorker` there.
    """

    def init_process(self) -> None:
        self._tcpclose_setup()
        super().init_process()

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        super().handle(listener, self._tcpclose_adopt(client), addr)


class ThreadWorker(_PolicyWorker, _GunicornThreadWorker):  # type: ignore[misc]
    """gunicorn's ``gthread`` worker, each connection closed with the policy by the
    background closer (kept-alive connections too, when their keep-alive ends)::

        gunicorn -k tcpclose.gunicorn.ThreadWorker --threads 8 app:app

    The policy is the class's :attr:`close_policy`, else ``TCPCLOSE_POLICY``.
    """

    def init_process(self) -> None:
        self._tcpclose_setup()
        super().init_process()

    def enqueue_req(self, conn: Any) -> None:
        conn.sock = self._tcpclose_adopt(conn.sock)
        super().enqueue_req(conn)
