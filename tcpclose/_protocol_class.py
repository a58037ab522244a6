"""Protocol classes that servers can be given by name, with a close policy from the
environment: the pieces behind :mod:`tcpclose.uvicorn`, :mod:`tcpclose.sanic` and
:mod:`tcpclose.websockets`.

A server that takes a protocol *class* (uvicorn's ``http=``, Sanic's ``protocol=``,
websockets' ``create_connection=``) types it as a class, names it by import string,
and pickles it by reference into worker processes. :func:`tcpclose.aio.with_policy`
returns a factory object, which works at run time but is neither a class to a type
checker nor importable by name. The classes made here are both: real subclasses of
what the server expects, whose *metaclass* makes each call build the server's own
protocol behind :func:`tcpclose.aio.with_policy`.

Each class names the protocol it stands for (``wrapped``, an import string read on
first use) and its policy (``close_policy``; None: ``TCPCLOSE_POLICY``, ``graceful``
when unset, none at all when it says ``off``). Reports go to ``on_close`` when a
subclass sets it, else to the per-close log line when ``TCPCLOSE_LOG_REPORTS`` asks
for it. Both are read once per process, at the first connection, so every worker
process reads its own environment. Class attributes the class lacks (uvicorn's
``alpn_protocols``, Sanic's ``websocket_handshake``) are looked up on the wrapped
class, as the server would have found them there.
"""

from __future__ import annotations

import asyncio
import importlib
import threading
from collections.abc import Callable
from typing import Any, ClassVar, Final

from ._background import OnClose
from ._environment import environment_on_close, environment_policy
from ._policy import PolicyLike, as_policy

__all__ = ("PolicyProtocolBase", "PolicyProtocolClass")

_lock: Final = threading.Lock()


class PolicyProtocolClass(type):
    """The metaclass: calling a class of it returns the wrapped protocol with the
    policy (a :class:`tcpclose.aio.PolicyProtocol`), or the wrapped protocol itself
    when the policy is off."""

    #: ``"module:attribute"`` of the protocol class this one stands for.
    wrapped: str
    #: The policy; None: from the environment.
    close_policy: PolicyLike | None
    #: Receives each report, in the event loop; None: the environment's log line.
    on_close: OnClose | None
    _tcpclose_factory: Callable[..., asyncio.BaseProtocol] | None

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        factory = cls.__dict__.get("_tcpclose_factory")
        if factory is None:
            factory = cls.tcpclose_factory()
        return factory(*args, **kwargs)

    def tcpclose_factory(cls) -> Callable[..., asyncio.BaseProtocol]:
        """The protocol factory this class calls (made once per class and process)."""
        with _lock:
            factory = cls.__dict__.get("_tcpclose_factory")
            if factory is None:
                factory = cls._make_factory()
                type.__setattr__(cls, "_tcpclose_factory", factory)
            return factory

    def tcpclose_wrapped(cls) -> type[asyncio.BaseProtocol]:
        """The protocol class named by :attr:`wrapped`."""
        module_name, _, name = cls.wrapped.partition(":")
        target: type[asyncio.BaseProtocol] = getattr(importlib.import_module(module_name), name)
        return target

    def _make_factory(cls) -> Callable[..., asyncio.BaseProtocol]:
        from .aio import with_policy

        target = cls.tcpclose_wrapped()
        policy = environment_policy() if cls.close_policy is None else as_policy(cls.close_policy)
        if policy is None:  # TCPCLOSE_POLICY=off
            return target
        on_close = cls.on_close if cls.on_close is not None else environment_on_close()
        return with_policy(target, policy, on_close)

    def __getattr__(cls, name: str) -> Any:
        if name.startswith("__") or name in _OWN:
            raise AttributeError(name)
        return getattr(cls.tcpclose_wrapped(), name)


_OWN: Final = frozenset({"wrapped", "close_policy", "on_close", "_tcpclose_factory"})


class PolicyProtocolBase(metaclass=PolicyProtocolClass):
    """Gives subclasses the defaults of :class:`PolicyProtocolClass`'s attributes."""

    wrapped: ClassVar[str]
    close_policy: ClassVar[PolicyLike | None] = None
    on_close: ClassVar[OnClose | None] = None
