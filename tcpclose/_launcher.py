"""``tcpclose run``: a close policy in every Python process a command starts, with no
change to its code.

How: ``tcpclose run -- COMMAND ...`` puts the directory of tcpclose's
``sitecustomize`` (``tcpclose/_bootstrap``) first on ``PYTHONPATH``, sets
``TCPCLOSE_POLICY`` (and ``TCPCLOSE_LOG_REPORTS``), and executes the command. Python
imports ``sitecustomize`` at start-up in that process and in every Python process it
starts (the environment is inherited: worker processes, reloaders), and ours calls
:func:`activate`, which patches exactly three things:

* ``create_server`` of asyncio's ``BaseEventLoop`` and of ``uvloop.Loop`` (the
  loop-level adapter, :func:`tcpclose.aio.install_policy`): asyncio servers;
* ``socketserver.TCPServer.shutdown_request``: ``http.server``, ``wsgiref`` and the
  servers built on them close through the background closer, as
  :class:`tcpclose.socketserver.ClosePolicyMixIn` does;
* ``gunicorn.util.load_class``, when (if ever) gunicorn is imported: its ``sync`` and
  ``gthread`` workers become :mod:`tcpclose.gunicorn`'s (``_gunicorn_hook.py``).

Then it imports the ``sitecustomize`` that ours shadows, if there is one. A failure
here never stops the program: it is reported on stderr and the program runs as it
would have. :func:`deactivate` undoes the patches; ``TCPCLOSE_POLICY=off`` (or
running the command without ``tcpclose run``) turns it all off.

The ready-made pieces (:mod:`tcpclose.gunicorn`, :mod:`tcpclose.uvicorn`, ...) read
the same variables through :func:`environment_policy` and :func:`environment_on_close`.
"""

from __future__ import annotations

import logging
import os
import socket
import socketserver
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from ._environment import DEFAULT_POLICY as DEFAULT_POLICY
from ._environment import LOG_REPORTS_ENV as LOG_REPORTS_ENV
from ._environment import OFF_WORDS as OFF_WORDS
from ._environment import POLICY_ENV as POLICY_ENV
from ._environment import environment_on_close as environment_on_close
from ._environment import environment_policy as environment_policy
from ._environment import log_sample as log_sample
from ._policy import ClosePolicy
from ._report import CloseReport

__all__ = (
    "BOOTSTRAP_DIR",
    "LOG_REPORTS_ENV",
    "POLICY_ENV",
    "activate",
    "command_environment",
    "deactivate",
    "environment_on_close",
    "environment_policy",
    "exec_command",
    "log_sample",
)

#: The directory holding tcpclose's ``sitecustomize``.
BOOTSTRAP_DIR: Final = str(Path(__file__).resolve().parent / "_bootstrap")
#: The one method of ``socketserver.TCPServer`` the launcher replaces.
_SHUTDOWN_REQUEST: Final = "shutdown_request"

_state: dict[str, Any] = {}


def command_environment(
    policy: str | None,
    *,
    log_reports: bool | float,
    environ: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment ``tcpclose run`` gives the command: ``environ`` (default
    ``os.environ``) with the bootstrap directory first on ``PYTHONPATH``, and the
    policy (validated here, so that a typo fails before the command starts).
    ``log_reports``: True (every close) or the fraction of ordinary closes to log.

    Raises:
        PolicyError: the policy is invalid.
        ValueError: ``log_reports`` is a fraction outside 0 to 1.
    """
    env = dict(os.environ if environ is None else environ)
    if policy is not None:
        env[POLICY_ENV] = policy
    text = env.get(POLICY_ENV, "")
    if text.strip().lower() not in OFF_WORDS:
        ClosePolicy.from_env(POLICY_ENV, DEFAULT_POLICY, environ=env)  # raises PolicyError
    if log_reports is True:
        env[LOG_REPORTS_ENV] = "1"
    elif log_reports is not False:
        env[LOG_REPORTS_ENV] = format(log_sample(str(log_reports)), "g")
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != BOOTSTRAP_DIR]
    env["PYTHONPATH"] = os.pathsep.join([BOOTSTRAP_DIR, *paths])
    return env


def exec_command(command: Sequence[str], env: Mapping[str, str]) -> None:
    """Replace this process with ``command`` (searched on ``PATH``). Returns only
    when that fails (``OSError``)."""
    os.execvpe(command[0], list(command), dict(env))


def activate(environ: Mapping[str, str] | None = None) -> bool:
    """Apply the policy of ``TCPCLOSE_POLICY`` to this process's servers (see the
    module docstring). Returns False when the variable turns it off, or when it is
    active already.

    Raises:
        PolicyError: the variable holds an invalid policy.
    """
    env = os.environ if environ is None else environ
    if _state:
        return False
    policy = environment_policy(env)
    if policy is None:
        return False
    on_close = environment_on_close(env)
    from ._loop_adapter import install_policy

    _state["installation"] = install_policy(policy, on_close=on_close)
    _state["shutdown_request"] = socketserver.TCPServer.__dict__[_SHUTDOWN_REQUEST]
    setattr(socketserver.TCPServer, _SHUTDOWN_REQUEST, _shutdown_request_with(policy, on_close))
    from ._gunicorn_hook import install_gunicorn_hook

    _state["gunicorn_hook"] = install_gunicorn_hook()
    return True


def deactivate() -> None:
    """Undo :func:`activate` (servers already running keep what they had)."""
    if not _state:
        return
    _state.pop("gunicorn_hook").uninstall()
    _state.pop("installation").uninstall()
    setattr(socketserver.TCPServer, _SHUTDOWN_REQUEST, _state.pop("shutdown_request"))


def _shutdown_request_with(
    policy: ClosePolicy, on_close: Callable[[CloseReport], object] | None
) -> Callable[[socketserver.TCPServer, Any], None]:
    def shutdown_request(self: socketserver.TCPServer, request: Any) -> None:
        if not isinstance(request, socket.socket):  # (not a stream connection)
            self.close_request(request)
            return
        _apply(self, request, policy, on_close)

    return shutdown_request


def _apply(
    server: socketserver.TCPServer,
    request: socket.socket,
    policy: ClosePolicy,
    on_close: Callable[[CloseReport], object] | None,
) -> None:
    from ._background import default_closer
    from ._sync import close

    try:
        if isinstance(server, socketserver.ForkingMixIn):
            report = close(request, policy, report=on_close is not None)
            if on_close is not None:
                on_close(report)
        else:
            default_closer().close(request, policy, on_close=on_close)
    except Exception as exc:
        logging.getLogger("tcpclose").debug("close policy not applied (%s): plain close", exc)
        if request.fileno() != -1:
            server.close_request(request)


def bootstrap() -> None:
    """What ``tcpclose/_bootstrap/sitecustomize.py`` runs: :func:`activate`, never
    raising, then the ``sitecustomize`` ours shadows."""
    try:
        activate()
    except Exception as exc:
        print(f"tcpclose run: policy not applied: {exc}", file=sys.stderr)
    _chain_sitecustomize()


def _chain_sitecustomize() -> None:
    """Import the next ``sitecustomize`` on ``sys.path`` (ours shadows it)."""
    import importlib.machinery
    import importlib.util

    path = [p for p in sys.path if os.path.abspath(p or ".") != BOOTSTRAP_DIR]
    try:
        spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    except (ImportError, ValueError):
        return
    if spec is None or spec.origin is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        print(f"tcpclose run: error in {spec.origin}: {exc}", file=sys.stderr)
