"""The loop-level adapter: every server a loop (or every loop) starts gets a policy.

For servers that take no protocol hook (hypercorn calls ``asyncio.start_server``),
:func:`install_policy` wraps ``create_server``, through which ``asyncio.start_server``
and ``loop.create_server`` both go, so that the protocol factory of each server
created afterwards passes through :func:`tcpclose.aio.with_policy`. Nothing else is
changed, and :meth:`PolicyInstallation.uninstall` puts the original back.

Two scopes:

* one loop (``loop=``): an attribute on that loop object shadows its class's method;
* the process (no ``loop``): the method of asyncio's ``BaseEventLoop`` (every asyncio
  loop: selector and proactor) and of ``uvloop.Loop`` when uvloop is installed.

Servers started before the installation keep their behaviour; so do servers whose
factory already went through ``with_policy`` (not wrapped twice).
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import logging
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Final, Self

from ._aio import OnClose, PolicyProtocolFactory, with_policy
from ._policy import ClosePolicy, PolicyLike, as_policy

__all__ = ("PolicyInstallation", "install_policy")

logger = logging.getLogger("tcpclose")

_CreateServer = Callable[..., Coroutine[Any, Any, asyncio.AbstractServer]]

#: The method wrapped (patched with setattr: on a loop object, or on a class).
_METHOD: Final = "create_server"
#: Marks our wrappers, holding the function each replaced, the installation it
#: belongs to, and whether the target had its own attribute before.
_WRAPPED: Final = "__tcpclose_wrapped__"
_INSTALLATION: Final = "__tcpclose_installation__"
_HAD_OWN: Final = "__tcpclose_had_own__"

_lock: Final = threading.Lock()


class PolicyInstallation:
    """What :func:`install_policy` did; :meth:`uninstall` (or leaving a ``with`` block)
    undoes it.

    Attributes:
        policy: the policy given to new servers.
        on_close: receives each :class:`CloseReport`, or None.
        loop: the loop patched, or None for the process-wide installation.
        targets: what was patched (a loop object, or the loop classes).
    """

    __slots__ = ("_installed", "loop", "on_close", "policy", "targets")

    def __init__(
        self,
        policy: ClosePolicy,
        on_close: OnClose | None,
        loop: asyncio.AbstractEventLoop | None,
        targets: tuple[object, ...],
    ) -> None:
        self.policy = policy
        self.on_close = on_close
        self.loop = loop
        self.targets = targets
        self._installed = True

    @property
    def installed(self) -> bool:
        """False once uninstalled."""
        return self._installed

    def wrap(self, protocol_factory: Callable[..., asyncio.BaseProtocol]) -> Callable[..., Any]:
        """``protocol_factory`` with the policy (unchanged when it has one already)."""
        if isinstance(protocol_factory, PolicyProtocolFactory):
            return protocol_factory
        return with_policy(protocol_factory, self.policy, self.on_close)

    def uninstall(self) -> None:
        """Put the original ``create_server`` back. Servers already started keep the
        policy. Idempotent.

        Raises:
            RuntimeError: another wrapper was installed over this one later and is
                still in place (uninstall that one first).
        """
        with _lock:
            if not self._installed:
                return
            for target in self.targets:
                current = _own_attribute(target)
                if (
                    current is None
                    or getattr(current, "__tcpclose_installation__", None) is not self
                ):
                    raise RuntimeError(
                        "create_server was wrapped again after this installation; "
                        "uninstall the later one first"
                    )
            for target in self.targets:
                current = _own_attribute(target)
                previous = getattr(current, _WRAPPED)
                if getattr(current, _HAD_OWN, False):
                    setattr(target, _METHOD, previous)
                else:
                    delattr(target, _METHOD)
            self._installed = False

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.uninstall()

    def __repr__(self) -> str:
        scope = "process" if self.loop is None else f"loop {self.loop!r}"
        state = "installed" if self._installed else "uninstalled"
        return f"<PolicyInstallation {str(self.policy)!r} on {scope}, {state}>"


def install_policy(
    policy: PolicyLike,
    *,
    loop: asyncio.AbstractEventLoop | None = None,
    on_close: OnClose | None = None,
) -> PolicyInstallation:
    """Give every server created afterwards on ``loop`` (or, without ``loop``, on every
    asyncio and uvloop loop of the process) the close policy ``policy``.

    ``loop.create_server`` (which ``asyncio.start_server`` calls) is wrapped so that
    its protocol factory goes through :func:`tcpclose.aio.with_policy`: this is how a
    server with no protocol hook, such as hypercorn, adopts a policy. Undo it with
    :meth:`PolicyInstallation.uninstall`, or use the result as a context manager.

    Args:
        policy: a :class:`ClosePolicy`, policy text or mapping.
        loop: the one loop to patch; None patches the loop classes (asyncio's
            ``BaseEventLoop`` and, when importable, ``uvloop.Loop``).
        on_close: called with each :class:`CloseReport`, in the loop.

    Returns:
        A :class:`PolicyInstallation`.

    Raises:
        PolicyError: ``policy`` is invalid.
        TypeError: ``on_close`` is not callable.

    Example::

        async def main() -> None:
            tcpclose.aio.install_policy("peer-first timeout=2s", loop=asyncio.get_running_loop())
            await hypercorn.asyncio.serve(app, config)
    """
    resolved = as_policy(policy)
    if on_close is not None and not callable(on_close):
        raise TypeError(f"on_close must be callable, got {type(on_close).__qualname__}")
    targets: tuple[object, ...] = (loop,) if loop is not None else _loop_classes()
    installation = PolicyInstallation(resolved, on_close, loop, targets)
    with _lock:
        for target in targets:
            _wrap(target, installation, bound=target is loop)
    return installation


def _loop_classes() -> tuple[type, ...]:
    classes: list[type] = [asyncio.BaseEventLoop]
    try:
        uvloop = importlib.import_module("uvloop")
    except ImportError:
        pass
    else:
        classes.append(uvloop.Loop)
    return tuple(classes)


def _own_attribute(target: object) -> Any:
    """``create_server`` as set on ``target`` itself (not inherited), or None."""
    namespace = target.__dict__ if isinstance(target, type) else vars(target)
    return namespace.get(_METHOD)


def _wrap(target: object, installation: PolicyInstallation, *, bound: bool) -> None:
    own = _own_attribute(target)
    original: _CreateServer = getattr(target, _METHOD)
    if bound:

        @functools.wraps(original)
        async def create_server(
            protocol_factory: Callable[..., asyncio.BaseProtocol], *args: Any, **kwargs: Any
        ) -> asyncio.AbstractServer:
            return await original(installation.wrap(protocol_factory), *args, **kwargs)

        wrapper: Any = create_server
    else:

        @functools.wraps(original)
        async def create_server_method(
            self: asyncio.AbstractEventLoop,
            protocol_factory: Callable[..., asyncio.BaseProtocol],
            *args: Any,
            **kwargs: Any,
        ) -> asyncio.AbstractServer:
            return await original(self, installation.wrap(protocol_factory), *args, **kwargs)

        wrapper = create_server_method
    setattr(wrapper, _WRAPPED, original)
    setattr(wrapper, _INSTALLATION, installation)
    setattr(wrapper, _HAD_OWN, own is not None)
    setattr(target, _METHOD, wrapper)
