"""The facts the rules read: host sysctls and counters, one socket's options, and the
TIME_WAIT entries of the socket table sorted by who closed first. Pure data and pure
functions; gathering the facts (files, socket options, the kernel view) is
``_audit.py``'s job, judging them ``_checks.py``'s.

``None`` in a fact means unknown (a sysctl another kernel lacks, ``/proc`` hidden in a
container, an option the platform lacks): the rules over it stay silent.
"""

from __future__ import annotations

import ipaddress
from collections import Counter as _Tally
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from ._kernel._types import Address

__all__ = (
    "TICKS_PER_SECOND",
    "Counters",
    "LingerUnit",
    "SocketFacts",
    "Sysctls",
    "TimeWaitSummary",
    "is_loopback",
    "summarize_time_wait",
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
class TimeWaitSummary:
    """The socket table's TIME_WAIT entries, sorted by who closed first.

    Attributes:
        total: TIME_WAIT entries seen.
        accepted: the server closed first: on a local port that has a listener, or on
            a fixed port whose listener is gone, towards a peer port in the ephemeral
            range (a client's port, as a server's own TIME_WAIT is).
        towards: outgoing (local port in the ephemeral range, no listener), counted
            per destination ``(host, port)``; IPv4-mapped hosts are unmapped.
        outgoing_non_loopback: the part of ``towards`` going to non-loopback hosts.
        fixed_port: on a local port outside the ephemeral range with no listener,
            towards a peer port outside it (a service's port): a client bound to a
            fixed port closed first. Per local port.
    """

    total: int = 0
    accepted: int = 0
    towards: Mapping[Address, int] = field(default_factory=dict)
    outgoing_non_loopback: int = 0
    fixed_port: Mapping[int, int] = field(default_factory=dict)


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


def _unmap(host: str) -> str:
    if host.lower().startswith("::ffff:") and "." in host:
        return host[7:]
    return host


def is_loopback(host: str) -> bool:
    """Whether ``host`` (textual, IPv4-mapped or with an IPv6 scope) is a loopback
    address; False for what is not an address.

    >>> is_loopback("::ffff:127.0.0.1"), is_loopback("10.0.0.5")
    (True, False)
    """
    try:
        return ipaddress.ip_address(_unmap(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def summarize_time_wait(
    entries: Iterable[tuple[Address, Address]],
    *,
    listening_ports: Collection[int],
    sysctls: Sysctls,
) -> TimeWaitSummary:
    """Sort TIME_WAIT ``(local, peer)`` entries by who closed first.

    A local port with a listener means the server side closed first (``accepted``);
    a port ``connect()`` could have picked means an outgoing connection (``towards``
    its destination); any other port was bound on purpose. Bound on purpose towards a
    peer port in the ephemeral range is a server whose listener has closed since
    (``accepted``: its clients' ports are ephemeral); towards any other peer port it is
    a client bound to a fixed port (``fixed_port``). When the ephemeral range is
    unknown, every entry without a listener counts as outgoing.

    >>> s = summarize_time_wait(
    ...     [(("10.0.0.1", 40000), ("10.0.0.5", 443)), (("10.0.0.1", 80), ("10.9.9.9", 5555))],
    ...     listening_ports={80},
    ...     sysctls=Sysctls(ip_local_port_range=(32768, 60999)),
    ... )
    >>> s.accepted, dict(s.towards), s.outgoing_non_loopback
    (1, {('10.0.0.5', 443): 1}, 1)
    """
    total = accepted = non_loopback = 0
    towards: _Tally[Address] = _Tally()
    fixed: _Tally[int] = _Tally()
    for (_, local_port), (peer_host, peer_port) in entries:
        total += 1
        if local_port in listening_ports:
            accepted += 1
        elif sysctls.is_ephemeral(local_port) is False:
            if sysctls.is_ephemeral(peer_port):
                accepted += 1  # a server's own, its listener closed since
            else:
                fixed[local_port] += 1
        else:
            host = _unmap(peer_host)
            towards[(host, peer_port)] += 1
            if not is_loopback(host):
                non_loopback += 1
    return TimeWaitSummary(
        total=total,
        accepted=accepted,
        towards=MappingProxyType(dict(towards)),
        outgoing_non_loopback=non_loopback,
        fixed_port=MappingProxyType(dict(fixed)),
    )
