"""aiohttp's ``TCPSite`` with a close policy.

aiohttp serves an application through a runner (``web.AppRunner``) and sites; a
site's ``start()`` hands the runner's low-level ``web.Server`` (a protocol factory) to
``loop.create_server``. :class:`TCPSite` hands it over through
:func:`tcpclose.aio.with_policy` instead, and changes nothing else: the runner still
owns the site, and ``runner.cleanup()`` stops it and closes its connections as
aiohttp's own sites are stopped. (aiohttp's ``start()`` reads the factory from the
site's runner: during that call the site sees a view of its runner whose ``server``
is the wrapped factory.)
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from ._background import OnClose
from ._environment import environment_on_close, environment_policy
from ._policy import PolicyLike, as_policy

__all__ = ("TCPSite",)


class TCPSite(web.TCPSite):
    """``aiohttp.web.TCPSite`` whose connections close with a policy::

        runner = web.AppRunner(app)
        await runner.setup()
        site = tcpclose.aiohttp.TCPSite(runner, "0.0.0.0", 8080, close_policy="graceful")
        await site.start()
        ...
        await runner.cleanup()      # stops the site, as for aiohttp's own

    Args:
        runner: the set-up ``aiohttp.web.AppRunner`` (or another runner).
        host: as for ``aiohttp.web.TCPSite``.
        port: as for ``aiohttp.web.TCPSite``.
        close_policy: the policy; None (default): ``TCPCLOSE_POLICY``, ``graceful``
            when unset (``off``: aiohttp's own close).
        on_close: receives each :class:`CloseReport`, in the event loop; None: the
            per-close log line when ``TCPCLOSE_LOG_REPORTS`` asks for it.
        **kwargs: the other keywords of ``aiohttp.web.TCPSite`` (``ssl_context``,
            ``backlog``, ``reuse_port``, ...).

    Raises:
        PolicyError: the policy is invalid.
        RuntimeError: the runner was not set up (as aiohttp's own).
    """

    __slots__ = ("_tcpclose_factory",)

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str | None = None,
        port: int | None = None,
        *,
        close_policy: PolicyLike | None = None,
        on_close: OnClose | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(runner, host, port, **kwargs)
        from .aio import with_policy

        policy = environment_policy() if close_policy is None else as_policy(close_policy)
        server = runner.server
        assert server is not None  # (aiohttp's __init__ raised otherwise)
        self._tcpclose_factory: Any = (
            None
            if policy is None
            else with_policy(server, policy, on_close if on_close else environment_on_close())
        )

    async def start(self) -> None:
        factory = self._tcpclose_factory
        if factory is None:
            await super().start()
            return
        runner = self._runner
        self._runner = _RunnerView(runner, factory)  # type: ignore[assignment]
        try:
            await super().start()
        finally:
            self._runner = runner


class _RunnerView:
    """A runner whose ``server`` is the wrapped factory; everything else is the
    runner's own."""

    __slots__ = ("_runner", "server")

    def __init__(self, runner: web.BaseRunner, server: Any) -> None:
        self._runner = runner
        self.server = server

    def __getattr__(self, name: str) -> Any:
        return getattr(self._runner, name)
