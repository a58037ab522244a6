"""The asyncio API: :func:`with_policy` (its factory, :class:`PolicyProtocolFactory`)
and :func:`aclose`.

How the rooms call each other (one way, never back up): this module → the wrapper
protocol and proxy transport (``_aio_proxy.py``) → the driver running the close plan
(``_aio_closer.py``) → the transports' specifics (``_aio_transport.py``), the kernel
view and the plan.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any, Final, cast

from . import _observe
from ._aio_closer import KernelStateChoice, kernel_state_choice
from ._aio_proxy import ConnectionRegistry, ListenerLinger, _DrainSink, _new_wrapper
from ._aio_proxy import OnClose as OnClose
from ._aio_proxy import PolicyProtocol as PolicyProtocol
from ._aio_proxy import PolicyTransport as PolicyTransport
from ._aio_transport import _TransportLike
from ._errors import NotTcpSocketError
from ._policy import ClosePolicy, PolicyLike, as_policy
from ._report import CloseReport

__all__ = (
    "OnClose",
    "PolicyProtocol",
    "PolicyProtocolFactory",
    "PolicyTransport",
    "aclose",
    "connection_of",
    "with_policy",
)


# -- the factory for with_policy ------------------------------------------------------------


class PolicyProtocolFactory:
    """A protocol factory applying a close policy; what :func:`with_policy` returns.

    Calling it calls the wrapped factory with the same arguments and puts a
    :class:`PolicyProtocol` in front of the protocol it made. Attributes it does not
    have are looked up on the wrapped factory. Instances pickle (when the wrapped
    factory and ``on_close`` do), so servers that send their protocol factory to worker
    processes keep working.

    Attributes:
        protocol_factory: the wrapped factory.
        policy: the close policy.
        on_close: receives each :class:`CloseReport`, or None.
        report: whether reports are built (the kernel lookups cost a few microseconds
            per close).
        kernel_state: when the reports' kernel state is looked up: ``"eager"``,
            ``"lazy"`` or ``"sampled:F"`` (see :func:`with_policy`).
        listener: what is known of the ``SO_LINGER`` its connections inherit from
            their listener (:class:`~tcpclose._aio_proxy.ListenerLinger`).
    """

    __slots__ = (
        "_kernel_choice",
        "_registry",
        "kernel_state",
        "listener",
        "on_close",
        "policy",
        "protocol_factory",
        "report",
    )

    def __init__(
        self,
        protocol_factory: Callable[..., asyncio.BaseProtocol],
        policy: PolicyLike = "graceful",
        on_close: OnClose | None = None,
        *,
        report: bool | None = None,
        registry: ConnectionRegistry | None = None,
        kernel_state: str | KernelStateChoice = "eager",
    ) -> None:
        if not callable(protocol_factory):
            raise TypeError(
                f"expected a protocol factory, got {type(protocol_factory).__qualname__} instead"
            )
        if on_close is not None and not callable(on_close):
            raise TypeError(f"on_close must be callable, got {type(on_close).__qualname__}")
        self.protocol_factory = protocol_factory
        self.policy = as_policy(policy)
        self.on_close = on_close
        self.report = (on_close is not None) if report is None else report
        self._registry = registry
        self._kernel_choice = kernel_state_choice(kernel_state)
        self.kernel_state = self._kernel_choice.text
        self.listener = ListenerLinger()

    def __call__(self, *args: Any, **kwargs: Any) -> PolicyProtocol:
        inner = self.protocol_factory(*args, **kwargs)
        registry = self._registry
        wrapper = _new_wrapper(
            inner,
            self.policy,
            self.on_close,
            self.report,
            registry,
            self._kernel_choice,
            self.listener,
        )
        if registry is not None and registry.handshaking is not None:
            registry.handshaking.add(wrapper)
        return wrapper

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in PolicyProtocolFactory.__slots__:
            raise AttributeError(name)
        return getattr(self.protocol_factory, name)

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            _rebuild_factory,
            (self.protocol_factory, self.policy, self.on_close, self.report, self.kernel_state),
        )

    def __repr__(self) -> str:
        return f"with_policy({self.protocol_factory!r}, {str(self.policy)!r})"


def _rebuild_factory(
    protocol_factory: Callable[..., asyncio.BaseProtocol],
    policy: ClosePolicy,
    on_close: OnClose | None,
    report: bool,
    kernel_state: str = "eager",
) -> PolicyProtocolFactory:
    return PolicyProtocolFactory(
        protocol_factory, policy, on_close, report=report, kernel_state=kernel_state
    )


def with_policy(
    protocol_factory: Callable[..., asyncio.BaseProtocol],
    policy: PolicyLike,
    on_close: OnClose | None = None,
    *,
    report: bool | None = None,
    kernel_state: str = "eager",
) -> PolicyProtocolFactory:
    """Wrap an asyncio protocol factory so that its connections close with ``policy``.

    The protocol's own ``transport.close()`` and ``transport.abort()`` go through the
    policy; nothing else changes for it (``write``, ``get_extra_info``,
    ``pause_reading``, ``set_protocol`` ... keep working). This is how a server that
    takes a protocol class or factory adopts a policy.

    Semantics (docs: asyncio API, #semantics): a second ``close()`` is a no-op; ``abort()``
    during a pending close does not cut it short; ``write_eof()`` under ``peer-first``
    gives the peer its grace to close first, then sends our FIN, while data still
    reaches the protocol;
    while the policy drains, reading is resumed and what arrives is discarded; the
    protocol's ``connection_lost`` is called exactly once, when the connection is
    finished.

    Args:
        protocol_factory: what ``loop.create_server()`` would take: a protocol class
            or any callable returning a protocol. Called with the arguments the
            returned factory is called with.
        policy: a :class:`ClosePolicy`, policy text or mapping.
        on_close: called with each :class:`CloseReport` in the event loop; its
            exceptions are logged on the ``tcpclose`` logger, never raised.
        report: build reports (kernel state lookups). Default: only when ``on_close``
            is given.
        kernel_state: when each report's kernel state (the 4-tuple's, after the
            close) is looked up: ``"eager"`` (default: before ``on_close`` gets the
            report), ``"lazy"`` (when ``report.kernel_state`` is first read: a report
            nobody asks costs no lookup; TLS connections stay eager) or
            ``"sampled:F"`` (eagerly for a fraction F of the closes, 0 < F <= 1; the
            others have none). ``report.kernel_state_mode`` says which.

    Returns:
        A picklable :class:`PolicyProtocolFactory`.

    Raises:
        PolicyError: ``policy`` or ``kernel_state`` is invalid.
        TypeError: ``protocol_factory`` or ``on_close`` is not callable.

    Example::

        server = await loop.create_server(
            tcpclose.aio.with_policy(HttpProtocol, "peer-first timeout=5s"), host, port
        )
    """
    return PolicyProtocolFactory(
        protocol_factory, policy, on_close, report=report, kernel_state=kernel_state
    )


# -- aclose -----------------------------------------------------------------------------------


def connection_of(transport: object) -> PolicyProtocol | None:
    """The wrapper protocol of ``transport`` (a :class:`PolicyTransport` or a real
    transport whose protocol is a :class:`PolicyProtocol`), or None."""
    if isinstance(transport, PolicyTransport):
        return transport.connection
    get_protocol = getattr(transport, "get_protocol", None)
    if get_protocol is None:
        return None
    protocol = get_protocol()
    if isinstance(protocol, _DrainSink):
        return protocol.conn
    return protocol if isinstance(protocol, PolicyProtocol) else None


_TRANSPORT_METHODS: Final = ("get_extra_info", "get_protocol", "set_protocol", "close", "abort")


def _transport_of(obj: object) -> _TransportLike:
    if isinstance(obj, asyncio.StreamWriter):
        obj = obj.transport
    if isinstance(obj, asyncio.BaseTransport) or all(
        callable(getattr(obj, name, None)) for name in _TRANSPORT_METHODS
    ):
        return cast(_TransportLike, obj)
    raise TypeError(
        f"expected an asyncio transport or StreamWriter, got {type(obj).__qualname__} instead"
    )


def _check_tcp_transport(transport: _TransportLike) -> None:
    sock = transport.get_extra_info("socket")
    if sock is None:
        raise NotTcpSocketError(
            f"expected a TCP transport, got {type(transport).__qualname__} without a socket"
        )
    family = getattr(sock, "family", None)
    kind = getattr(sock, "type", None)
    if family not in (socket.AF_INET, socket.AF_INET6) or kind != socket.SOCK_STREAM:
        raise NotTcpSocketError(f"expected a TCP transport, got one over {sock!r}")
    if transport.is_closing():
        raise ValueError("the transport is already closing")


async def aclose(
    obj: object,
    policy: PolicyLike = "graceful",
    *,
    report: bool = True,
    allow_data_loss: bool = False,
    kernel_state: str = "eager",
) -> CloseReport:
    """Close an asyncio connection with ``policy`` and report what happened.

    Never blocks the event loop: every wait goes through the loop, bounded by the
    policy. Cancelling the awaiting task does not stop the close, which finishes in
    the background within its bounds.

    Args:
        obj: an asyncio transport (selector or TLS, asyncio's or uvloop's) or an
            ``asyncio.StreamWriter``. The application's protocol gets
            ``connection_lost`` when the connection is finished; what arrives while
            the policy drains is discarded.
        policy: a :class:`ClosePolicy`, policy text or mapping. Default ``"graceful"``.
        report: when False, skip the measurements made only for the report.
        allow_data_loss: do not warn when an abort discards queued bytes.
        kernel_state: when the report's kernel state is looked up: ``"eager"``
            (default), ``"lazy"`` or ``"sampled:F"``, as for :func:`with_policy`.

    Returns:
        The :class:`CloseReport`. When the connection is already closing under a
        policy (:func:`with_policy`, the servers here), that close's report.

    Raises:
        PolicyError: ``policy`` or ``kernel_state`` is invalid.
        TypeError: ``obj`` is not an asyncio transport or StreamWriter, or not over
            TCP (:class:`NotTcpSocketError`).
        ValueError: the transport is already closing or closed.

    Example::

        writer.write(response)
        report = await tcpclose.aio.aclose(writer, "peer-first timeout=5s")
        log.info("%s", report)
    """
    resolved = as_policy(policy)
    choice = kernel_state_choice(kernel_state)
    transport = _transport_of(obj)
    conn = connection_of(transport)
    if conn is None:
        _check_tcp_transport(transport)
        conn = PolicyProtocol.adopt(transport, resolved, report=report, kernel_state=choice)
    elif conn.closer is None and conn.lost:
        raise ValueError("the connection is already closed")
    started = conn.closer is None
    closer = conn.start_close(
        resolved,
        trigger="aclose",
        report=report,
        allow_data_loss=allow_data_loss,
        background=False,
        requested=True,
        kernel_state=choice,
    )
    if closer.deliver:  # write_eof() under peer-first was pending: now it is a close
        conn.request_close("aclose")
    try:
        result = await closer.wait()
    except asyncio.CancelledError:
        if started and not closer.done:
            closer.background = True  # nobody will be there to see the warnings
        raise
    if started:
        _observe.emit_findings(list(closer.findings), stacklevel=2)
    return result
