"""The kernel view: what the kernel holds for a TCP socket or 4-tuple.

One backend (netlink sock_diag, procfs, or unsupported) is chosen on first use, not at
import: importing tcpclose opens no socket. The rest of tcpclose talks only to the
functions this package exports.

Modules, one responsibility each:

=================  ==================================================================
``_types``         the values returned (``KernelState``, ``TcpState``, ``Queues``...)
``_address``       validating and packing ``(host, port)`` pairs, IPv4 mapping
``_diag``          sock_diag requests built and replies decoded (pure): the one codec
``_netlink``       sock_diag sockets and the backend (I/O only)
``_procfs``        ``/proc/net/tcp{,6}`` parsing (pure) and the backend
``_unsupported``   the backend that answers ``UNKNOWN``
``_tcpinfo``       ``struct tcp_info`` decoding (pure)
``_sockopt``       options and ioctls on a caller's socket, without owning it
``_summary``       counting a dump (pure)
=================  ==================================================================
"""

from __future__ import annotations

import socket
import sys
import threading
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Final, Protocol, TypeAlias

from ._address import FourTuple, parse_four_tuple
from ._netlink import NetlinkBackend, dump_with_info
from ._netlink import probe as netlink_probe
from ._procfs import ProcfsBackend
from ._sockopt import SocketLike, queues, socket_cookie, tcp_info
from ._summary import Summary
from ._tcpinfo import TcpInfo, decode_tcp_info
from ._types import Address, KernelState, Queues, Source, TcpState, TimerKind
from ._unsupported import UnsupportedBackend

__all__ = (
    "Address",
    "AddressLike",
    "Backend",
    "KernelState",
    "Queues",
    "SocketLike",
    "Source",
    "Summary",
    "TcpInfo",
    "TcpState",
    "TimerKind",
    "backend",
    "current_backend",
    "dump",
    "lookup",
    "queues",
    "select_backend",
    "socket_cookie",
    "summary",
    "tcp_info",
)

#: A socket address as ``getsockname()`` returns it: ``(host, port)`` for IPv4,
#: ``(host, port, flowinfo, scope_id)`` for IPv6 (``(host, port)`` is accepted too).
AddressLike: TypeAlias = tuple[str, int] | tuple[str, int, int, int]

#: States a dump covers when none are named: every state a socket can be dumped in
#: (``BOUND_INACTIVE`` only when asked for).
DEFAULT_DUMP_STATES: Final = frozenset(
    s for s in TcpState if TcpState.ESTABLISHED <= s <= TcpState.NEW_SYN_RECV
)
_FAMILIES: Final = (int(socket.AF_INET), int(socket.AF_INET6))


def _squash(name: str) -> str:
    return name.strip().upper().replace("-", "").replace("_", "")


#: State names accepted by dump(): ours (``TIME_WAIT``) and ss's (``TIME-WAIT``,
#: ``ESTAB``), any case, with or without separators.
_STATE_NAMES: Final = {_squash(s.label): s for s in TcpState} | {
    _squash(s.name): s for s in TcpState
}


class Backend(Protocol):
    """What each platform module provides (see ``_netlink``, ``_procfs``,
    ``_unsupported``)."""

    @property
    def name(self) -> str: ...

    def lookup(self, four: FourTuple, cookie: int | None = None) -> KernelState: ...

    def dump(
        self, states: Collection[TcpState], port: int | None, families: Collection[int]
    ) -> Iterator[KernelState]: ...

    def summary(
        self, states: Collection[TcpState], port: int | None, families: Collection[int]
    ) -> Summary: ...


def _procfs_readable(root: str) -> bool:
    return ProcfsBackend(root).available()


def select_backend(
    platform: str = sys.platform,
    *,
    netlink_available: Callable[[], bool] = netlink_probe,
    procfs_root: str = "/proc",
    procfs_available: Callable[[str], bool] = _procfs_readable,
) -> Backend:
    """Pick the kernel view for ``platform``: netlink, else procfs, else unsupported.

    Called once, on first use (:func:`current_backend`); the probes are parameters so
    tests can inject them.
    """
    if not platform.startswith("linux"):
        return UnsupportedBackend()
    if netlink_available():
        return NetlinkBackend()
    if procfs_available(procfs_root):
        return ProcfsBackend(procfs_root)
    return UnsupportedBackend()


#: The kernel view in use; None until the first call that needs it.
_backend: Backend | None = None
_choosing = threading.Lock()


def current_backend() -> Backend:
    """The kernel view in use, chosen now if this is the first call that needs it.

    The netlink probe costs one sock_diag round trip on the lookup socket that this
    thread keeps for later lookups; no TCP socket is made.
    """
    global _backend
    chosen = _backend
    if chosen is None:
        with _choosing:
            chosen = _backend
            if chosen is None:
                chosen = _backend = select_backend()
    return chosen


def backend() -> str:
    """Name of the kernel view in use: ``"netlink"``, ``"procfs"`` or ``"unsupported"``.

    >>> import tcpclose.kernel
    >>> tcpclose.kernel.backend() in ("netlink", "procfs", "unsupported")
    True
    """
    return current_backend().name


def lookup(
    local_addr: AddressLike, peer_addr: AddressLike, *, cookie: int | None = None
) -> KernelState:
    """The kernel's state for one TCP 4-tuple, now.

    On Linux this is one sock_diag request answered from the kernel's socket hash
    (microseconds, however many sockets exist). ``CLOSED`` means no socket exists for
    the 4-tuple any more; ``UNKNOWN`` that this platform cannot tell (or the kernel
    view failed, logged on the ``tcpclose.kernel`` logger).

    Args:
        local_addr: our end, ``(host, port)`` or ``(host, port, flowinfo, scope_id)``
            as ``getsockname()`` returns it. Hosts are literal IPv4 or IPv6
            addresses; IPv4-mapped IPv6 (``::ffff:a.b.c.d``) equals plain IPv4.
        peer_addr: the other end, likewise (``getpeername()``).
        cookie: the socket's ``SO_COOKIE`` (:func:`socket_cookie`) or a cookie from an
            earlier :class:`KernelState`: only that very socket then matches, not a
            later connection reusing the 4-tuple. Ignored by the procfs view.

    Raises:
        ValueError: a malformed address (not a tuple, a host name instead of an
            address, port out of range, IPv4 on one end and IPv6 on the other) or
            cookie.

    Example::

        local, peer = sock.getsockname(), sock.getpeername()
        sock.close()
        tcpclose.lookup(local, peer)   # KernelState(state=TIME_WAIT, seconds_left=59.9, ...)
    """
    four = parse_four_tuple(local_addr, peer_addr)
    if cookie is not None and (
        isinstance(cookie, bool) or not isinstance(cookie, int) or not 0 <= cookie < 1 << 64
    ):
        raise ValueError(f"cookie: expected an int in 0..2**64-1 or None, got {cookie!r}")
    return (_backend or current_backend()).lookup(four, cookie)


def _wanted_states(states: TcpState | str | Iterable[TcpState | str] | None) -> frozenset[TcpState]:
    if states is None:
        return DEFAULT_DUMP_STATES
    items: Iterable[object] = [states] if isinstance(states, TcpState | str) else states
    wanted: set[TcpState] = set()
    for item in items:
        state: TcpState | None
        if isinstance(item, TcpState):
            state = item
        elif isinstance(item, str):
            state = _STATE_NAMES.get(_squash(item))
        else:
            state = None
        if state is None or state in (TcpState.CLOSED, TcpState.UNKNOWN):
            raise ValueError(
                f"states: {item!r} is not a kernel TCP state; accepted: "
                + ", ".join(s.name for s in TcpState if s > 0)
            )
        wanted.add(state)
    return frozenset(wanted)


def _wanted_families(family: int | None) -> tuple[int, ...]:
    if family is None:
        return _FAMILIES
    if isinstance(family, bool) or family not in _FAMILIES:
        raise ValueError(f"family: expected AF_INET, AF_INET6 or None, got {family!r}")
    return (int(family),)


def _check_port(port: int | None) -> None:
    if port is not None and (
        isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF
    ):
        raise ValueError(f"port: expected an int in 0..65535 or None, got {port!r}")


def dump(
    states: TcpState | str | Iterable[TcpState | str] | None = None,
    port: int | None = None,
    family: int | None = None,
) -> Iterator[KernelState]:
    """Every TCP socket the kernel holds, optionally only some states, one port, one
    address family.

    On Linux the kernel does the filtering (sock_diag's state mask and a bytecode
    port filter), so asking for the TIME_WAIT on one port is cheap even among many
    sockets. The kernel is read when ``dump`` is called; entries are decoded as the
    iterator is consumed.

    Args:
        states: ``TcpState`` members or their names (``"TIME_WAIT"``, or as ``ss``
            prints them, ``"time-wait"``, ``"estab"``); default every state
            (``BOUND_INACTIVE`` only when named).
        port: keep sockets whose local *or* peer port is ``port``.
        family: ``socket.AF_INET`` or ``socket.AF_INET6``; default both. A dual-stack
            socket's IPv4 connection belongs to ``AF_INET6`` (mapped addresses).

    Raises:
        ValueError: ``CLOSED``/``UNKNOWN`` or an unknown name in ``states``, a bad
            ``port`` or ``family``.
        TimeoutError, KernelViewError: the kernel view failed (not on the close path,
            so this one does raise).

    Example::

        waits = list(tcpclose.kernel.dump(states=[TcpState.TIME_WAIT], port=8080))
    """
    wanted = _wanted_states(states)
    _check_port(port)
    return current_backend().dump(wanted, port, _wanted_families(family))


def summary(
    states: TcpState | str | Iterable[TcpState | str] | None = None,
    port: int | None = None,
    family: int | None = None,
) -> Summary:
    """Count what :func:`dump` would return: per state, and TIME_WAIT per local port
    and per destination. Same arguments and errors as :func:`dump`.

    On Linux the sockets are counted straight from the kernel's answer, without a
    :class:`KernelState` each: faster than ``Summary.from_states(dump(...))``, which
    gives the same counts.

    Example::

        s = tcpclose.kernel.summary()
        print(s.count(TcpState.TIME_WAIT), s.time_wait_by_destination)
    """
    wanted = _wanted_states(states)
    _check_port(port)
    return current_backend().summary(wanted, port, _wanted_families(family))


def received_ages(
    states: TcpState | str | Iterable[TcpState | str], port: int | None = None
) -> dict[int, float]:
    """Seconds since each socket in ``states`` last received a segment (data or ACK),
    by ``SO_COOKIE``, from the kernel's ``tcp_info`` (``tcpi_last_data_recv`` and
    ``tcpi_last_ack_recv``). For a CLOSE_WAIT socket this is a lower bound of how long
    it has been in CLOSE_WAIT: the peer's FIN was a segment, and anything later is
    later. Empty where the kernel view is not sock_diag (``/proc`` has no such field).

    Raises:
        ValueError, TimeoutError, KernelViewError: as :func:`dump`.
    """
    wanted = _wanted_states(states)
    _check_port(port)
    if not isinstance(current_backend(), NetlinkBackend):
        return {}
    ages: dict[int, float] = {}
    for entry, info_bytes in dump_with_info(wanted, port, _wanted_families(None)):
        if info_bytes is None or not entry.cookie:
            continue
        info = decode_tcp_info(info_bytes)
        ages[entry.cookie] = min(info.last_data_recv, info.last_ack_recv)
    return ages
