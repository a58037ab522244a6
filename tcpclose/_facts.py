"""The facts the rules read: host sysctls and counters, one socket's options, and the
TIME_WAIT entries of the socket table sorted by who closed first. Pure data and pure
functions; gathering the facts (files, socket options, the kernel view) is
``_audit.py``'s job, judging them ``_checks.py``'s.

``None`` in a fact means unknown (a sysctl another kernel lacks, ``/proc`` hidden in a
container, an option the platform lacks): the rules over it stay silent.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final, Literal

from ._kernel._types import Address, KernelState, TcpState

__all__ = (
    "SIDES",
    "TICKS_PER_SECOND",
    "Counters",
    "LingerUnit",
    "SocketFacts",
    "Sysctls",
    "TimeWaitSummary",
    "Timers",
    "is_loopback",
    "side_of",
    "summarize_time_wait",
    "unmap_host",
)

#: What ``l_linger`` counts: seconds (Linux, Windows, macOS ``SO_LINGER_SEC``) or clock
#: ticks of 1/100 s (macOS and other BSD-derived ``SO_LINGER``).
LingerUnit = Literal["seconds", "ticks"]

#: macOS ``SO_LINGER`` ticks per second (XNU's ``hz``).
TICKS_PER_SECOND = 100


@dataclass(frozen=True, slots=True)
class Sysctls:
    """The ``net.ipv4`` sysctls the checks read. ``None`` means unknown: absent on this
    kernel (``tcp_tw_recycle`` since 4.12), hidden in a container, or unreadable.

    ``ip_local_reserved_ports`` holds inclusive ``(first, last)`` ranges.
    """

    ip_local_port_range: tuple[int, int] | None = None
    ip_local_reserved_ports: tuple[tuple[int, int], ...] | None = None
    tcp_tw_reuse: int | None = None
    tcp_timestamps: int | None = None
    tcp_tw_recycle: int | None = None
    tcp_max_tw_buckets: int | None = None
    tcp_max_orphans: int | None = None
    tcp_rfc1337: int | None = None
    tcp_fin_timeout: int | None = None

    def is_reserved(self, port: int) -> bool:
        """True when ``port`` is in ``ip_local_reserved_ports`` (False when unknown)."""
        return any(lo <= port <= hi for lo, hi in self.ip_local_reserved_ports or ())

    def is_ephemeral(self, port: int) -> bool | None:
        """Whether the kernel could pick ``port`` for an unbound ``connect()``; ``None``
        when the range is unknown.

        >>> Sysctls(ip_local_port_range=(32768, 60999)).is_ephemeral(8080)
        False
        """
        if self.ip_local_port_range is None:
            return None
        lo, hi = self.ip_local_port_range
        return lo <= port <= hi and not self.is_reserved(port)

    @property
    def ephemeral_ports(self) -> int | None:
        """How many ports ``connect()`` can pick: the range minus reserved ports in it.

        >>> Sysctls(ip_local_port_range=(32768, 60999)).ephemeral_ports
        28232
        >>> Sysctls((1000, 1999), ((1500, 1509), (5000, 5000))).ephemeral_ports
        990
        """
        if self.ip_local_port_range is None:
            return None
        lo, hi = self.ip_local_port_range
        if hi < lo:
            return 0
        reserved: set[int] = set()
        for first, last in self.ip_local_reserved_ports or ():
            reserved.update(range(max(first, lo), min(last, hi) + 1))
        return hi - lo + 1 - len(reserved)


@dataclass(frozen=True, slots=True)
class Counters:
    """Kernel counters. ``None`` means unknown.

    Attributes:
        time_wait: TIME_WAIT sockets now (``/proc/net/sockstat``, ``TCP: ... tw N``).
        orphans: orphaned sockets now, closed by their program but not finished
            (``TCP: ... orphan N``).
        time_wait_overflows: times since boot the kernel skipped TIME_WAIT because
            ``tcp_max_tw_buckets`` was reached (``/proc/net/netstat``,
            ``TcpExt: TCPTimeWaitOverflow``).
    """

    time_wait: int | None = None
    orphans: int | None = None
    time_wait_overflows: int | None = None


@dataclass(frozen=True, slots=True)
class SocketFacts:
    """One socket's options and situation, as :func:`check_socket_facts` needs them.

    Attributes:
        platform: ``sys.platform`` of the host the socket lives on.
        listening: ``SO_ACCEPTCONN``.
        local_port: bound port; 0 when unbound.
        peer: connected peer, or ``None``.
        nonblocking: the program treats the socket as non-blocking (timeout 0).
        event_loop: the socket belongs to an event-loop transport.
        linger_on, linger_time, linger_unit: ``SO_LINGER`` as read (macOS: ticks,
            unless read through ``SO_LINGER_SEC``).
        reuseaddr, reuseport, exclusiveaddruse: the options; ``None`` when the
            platform lacks them or they could not be read.
        port_chosen: the local port is one ``connect()`` would never pick (outside the
            ephemeral range or reserved), so the program bound it explicitly; ``None``
            when unknown.
        listener_on_port: a listening socket exists on the same local port (this one
            was accepted from it); ``None`` when the socket table is unknown.
    """

    platform: str
    listening: bool = False
    local_port: int = 0
    peer: Address | None = None
    nonblocking: bool = False
    event_loop: bool = False
    linger_on: bool = False
    linger_time: int = 0
    linger_unit: LingerUnit = "seconds"
    reuseaddr: bool | None = None
    reuseport: bool | None = None
    exclusiveaddruse: bool | None = None
    port_chosen: bool | None = None
    listener_on_port: bool | None = None


def unmap_host(host: str) -> str:
    """An IPv4-mapped IPv6 host as plain IPv4 (both name one destination); any other
    host as it is.

    >>> unmap_host("::ffff:10.0.0.5"), unmap_host("::1")
    ('10.0.0.5', '::1')
    """
    if host[:7].lower() == "::ffff:" and "." in host:
        return host[7:]
    return host


def is_loopback(host: str) -> bool:
    """Whether ``host`` (textual, IPv4-mapped or with an IPv6 scope) is a loopback
    address; False for what is not an address.

    >>> is_loopback("::ffff:127.0.0.1"), is_loopback("10.0.0.5")
    (True, False)
    """
    try:
        return ipaddress.ip_address(unmap_host(host).split("%")[0]).is_loopback
    except ValueError:
        return False


# -- TIME_WAIT by who closed first -------------------------------------------------------

#: Who closed first, for a TIME_WAIT entry:
#: ``accepted`` -- this host's server (a listener on the local port, or a port bound on
#: purpose towards a client's ephemeral port: a server whose listener has closed since);
#: ``outgoing`` -- this host's client, on a port ``connect()`` picked;
#: ``bound`` -- this host's client, on a port it bound on purpose, towards a service port.
SIDES: Final = ("accepted", "outgoing", "bound")


def side_of(local_port: int, listening_ports: Collection[int], sysctls: Sysctls) -> str:
    """Which of :data:`SIDES` a socket on ``local_port`` is on, by its port alone:
    ``accepted`` with a listener on it, ``bound`` on a port ``connect()`` would never
    pick, else ``outgoing`` (also when the ephemeral range is unknown). A TIME_WAIT
    entry on a ``bound`` port towards an ephemeral peer port is ``accepted``
    (:func:`summarize_time_wait` asks).

    >>> s = Sysctls(ip_local_port_range=(32768, 60999))
    >>> side_of(8080, {8080}, s), side_of(40000, {8080}, s), side_of(5000, {8080}, s)
    ('accepted', 'outgoing', 'bound')
    """
    if local_port in listening_ports:
        return "accepted"
    return "bound" if sysctls.is_ephemeral(local_port) is False else "outgoing"


@dataclass(frozen=True, slots=True)
class Timers:
    """How many TIME_WAIT entries a group holds, and the shortest and longest time
    they have left (seconds; ``None`` when the kernel view does not say)."""

    count: int = 0
    min_left: float | None = None
    max_left: float | None = None


@dataclass(frozen=True, slots=True)
class TimeWaitSummary:
    """The socket table's TIME_WAIT entries sorted by who closed first (:data:`SIDES`):
    the one tally that the audit's rules, ``tcpclose states`` and the metrics' host
    gauges read. Made by :func:`summarize_time_wait`.

    Mappings are read-only and ordered from the largest count down.

    Attributes:
        accepted_by_port: this host's server closed first, per local port.
        outgoing_by_destination: this host's client closed first on an ephemeral
            port, per destination ``(host, port)`` (IPv4-mapped hosts unmapped): each
            entry holds one of the ports ``connect()`` can pick towards it.
        bound_by_port: this host's client closed first on a port it bound on
            purpose, per local port: binding it again fails for 60 s.
    """

    accepted_by_port: Mapping[int, Timers] = field(default_factory=dict)
    outgoing_by_destination: Mapping[Address, Timers] = field(default_factory=dict)
    bound_by_port: Mapping[int, Timers] = field(default_factory=dict)

    @property
    def by_side(self) -> Mapping[str, int]:
        """TIME_WAIT count per side, every side of :data:`SIDES` present."""
        counts = (
            sum(t.count for t in self.accepted_by_port.values()),
            sum(t.count for t in self.outgoing_by_destination.values()),
            sum(t.count for t in self.bound_by_port.values()),
        )
        return MappingProxyType(dict(zip(SIDES, counts, strict=True)))

    @property
    def total(self) -> int:
        """Every TIME_WAIT entry counted."""
        return sum(self.by_side.values())

    @property
    def outgoing_non_loopback(self) -> int:
        """Outgoing TIME_WAIT towards hosts that are not loopback."""
        return sum(
            t.count
            for (host, _), t in self.outgoing_by_destination.items()
            if not is_loopback(host)
        )


def _largest_first(groups: dict[Any, list[float | None]]) -> Mapping[Any, Timers]:
    """Each group's seconds left as :class:`Timers`, the largest group first."""
    timers = {}
    for key, lefts in groups.items():
        known = [left for left in lefts if left is not None]
        low, high = (min(known), max(known)) if known else (None, None)
        timers[key] = Timers(len(lefts), low, high)
    ordered = sorted(timers.items(), key=lambda kv: (-kv[1].count, kv[0]))
    return MappingProxyType(dict(ordered))


def summarize_time_wait(
    entries: Iterable[KernelState],
    *,
    listening_ports: Collection[int],
    sysctls: Sysctls,
) -> TimeWaitSummary:
    """Sort the TIME_WAIT ``entries`` (others are skipped) by who closed first.

    A local port with a listener means the server side closed first (``accepted``);
    a port ``connect()`` could have picked means an outgoing connection, counted per
    destination; any other port was bound on purpose. Bound on purpose towards a peer
    port in the ephemeral range is a server whose listener has closed since
    (``accepted``: its clients' ports are ephemeral); towards any other peer port it is
    a client bound to a fixed port (``bound``). When the ephemeral range is unknown,
    every entry without a listener counts as outgoing.

    >>> from tcpclose._kernel._types import KernelState, TcpState
    >>> s = summarize_time_wait(
    ...     [
    ...         KernelState(TcpState.TIME_WAIT, "procfs", ("10.0.0.1", 40000), ("10.0.0.5", 443)),
    ...         KernelState(TcpState.TIME_WAIT, "procfs", ("10.0.0.1", 80), ("10.9.9.9", 5555)),
    ...     ],
    ...     listening_ports={80},
    ...     sysctls=Sysctls(ip_local_port_range=(32768, 60999)),
    ... )
    >>> dict(s.by_side), list(s.outgoing_by_destination), s.outgoing_non_loopback
    ({'accepted': 1, 'outgoing': 1, 'bound': 0}, [('10.0.0.5', 443)], 1)
    """
    # (plain lists of seconds left and one answer per local port while counting: a
    # table can hold 100,000 sockets, and a value per socket would cost more than the dump)
    accepted: dict[int, list[float | None]] = {}
    outgoing: dict[Address, list[float | None]] = {}
    bound: dict[int, list[float | None]] = {}
    side_by_port: dict[int, str] = {}
    time_wait = TcpState.TIME_WAIT
    for entry in entries:
        local, peer = entry.local, entry.peer
        if entry.state is not time_wait or local is None or peer is None:
            continue
        port = local[1]
        side = side_by_port.get(port)
        if side is None:
            side = side_by_port[port] = side_of(port, listening_ports, sysctls)
        if side == "outgoing":
            destination = (unmap_host(peer[0]), peer[1]) if ":" in peer[0] else peer
            outgoing.setdefault(destination, []).append(entry.seconds_left)
        elif side == "accepted" or sysctls.is_ephemeral(peer[1]):
            # (on a bound port towards a client's port: a server's, its listener gone)
            accepted.setdefault(port, []).append(entry.seconds_left)
        else:
            bound.setdefault(port, []).append(entry.seconds_left)
    return TimeWaitSummary(
        accepted_by_port=_largest_first(accepted),
        outgoing_by_destination=_largest_first(outgoing),
        bound_by_port=_largest_first(bound),
    )
