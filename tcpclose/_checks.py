"""The warning rules: pure functions from facts to findings, and the code catalogue.

What must live here, and only here:

* :data:`CATALOGUE`, the one table of stable codes (code, warning class, severity,
  title, advice, docs anchor) that ``docs/warnings.md`` is written from;
* :class:`Finding` and :class:`Severity`, the data every check returns;
* the fact records (:class:`Sysctls`, :class:`Counters`, :class:`TimeWaitSummary`,
  :class:`SocketFacts`) and one small function per check over them.

Nothing here touches a socket, a file or the :mod:`warnings` module: gathering facts is
``_audit.py``'s job, issuing a finding as a warning is ``_warnings.warn``'s. Tests feed
facts for kernels and platforms the test machine is not.

Code ranges follow the warning class: ``TC1xx`` data loss (:class:`DataLossWarning`),
``TC2xx`` a blocking close (:class:`BlockingCloseWarning`), ``TC3xx`` port/4-tuple reuse
and the sysctls around it (:class:`UnsafeReuseWarning`). A code, once published, keeps
its meaning; a retired check leaves its code unused.

Titles and advice are fixed per code (no numbers in them): the numbers go in
``evidence``. That keeps a warning's text stable, so the standard once-per-location
filter of :mod:`warnings` shows it once per call site however the numbers vary.
"""

from __future__ import annotations

import enum
import ipaddress
from collections import Counter as _Tally
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from ._warnings import (
    DOCS_URL,
    BlockingCloseWarning,
    DataLossWarning,
    TcpCloseWarning,
    UnsafeReuseWarning,
)

__all__ = (
    "CATALOGUE",
    "CatalogueEntry",
    "Counters",
    "Finding",
    "LingerUnit",
    "Severity",
    "SocketFacts",
    "Sysctls",
    "TimeWaitSummary",
    "abort_discards",
    "blocking_linger",
    "check_socket_facts",
    "check_system",
    "close_with_unread",
    "fin_timeout_unusual",
    "fixed_port_client",
    "fixed_port_time_wait",
    "format_address",
    "orphans_near_limit",
    "reuseaddr_takeover",
    "reuseport_listener",
    "rfc1337_off",
    "sort_findings",
    "summarize_time_wait",
    "time_wait_near_port_range",
    "tw_buckets_near_limit",
    "tw_recycle_on",
    "tw_reuse_for_accepted",
    "tw_reuse_loopback_only",
    "tw_reuse_without_timestamps",
    "unreadable_input",
    "windows_reuseaddr",
)

#: ``(host, port)``, as the kernel view reports addresses.
Address = tuple[str, int]

#: What ``l_linger`` counts: seconds (Linux, Windows, macOS ``SO_LINGER_SEC``) or clock
#: ticks of 1/100 s (macOS and other BSD-derived ``SO_LINGER``).
LingerUnit = Literal["seconds", "ticks"]

#: macOS ``SO_LINGER`` ticks per second (XNU's ``hz``).
TICKS_PER_SECOND = 100


class Severity(enum.StrEnum):
    """How bad a finding is. ``error`` makes ``tcpclose audit`` exit with status 1."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        """0 for info, 1 for warning, 2 for error (for sorting and thresholds)."""
        return _SEVERITY_RANK[self]


_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ERROR: 2}


# -- the catalogue -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    """One stable warning code.

    Attributes:
        code: ``"TC101"``...; the docs anchor is its lower-case form.
        category: the :class:`TcpCloseWarning` subclass a finding is issued as.
        severity: the usual severity of a finding with this code.
        max_severity: the highest severity the check can reach (e.g. a percentage
            crossing a second threshold); equal to ``severity`` for most codes.
        title: one line, fixed per code, without numbers.
        advice: one line on what to do, fixed per code.
    """

    code: str
    category: type[TcpCloseWarning]
    severity: Severity
    title: str
    advice: str
    max_severity: Severity | None = None

    @property
    def anchor(self) -> str:
        """The docs section anchor: the code in lower case (``tc101``)."""
        return self.code.lower()

    @property
    def docs_url(self) -> str:
        """Link to this code's section of the warnings reference."""
        return f"{DOCS_URL}#{self.anchor}"

    @property
    def severities(self) -> tuple[Severity, ...]:
        """Every severity a finding with this code can have, lowest first."""
        top = self.max_severity or self.severity
        return tuple(s for s in Severity if self.severity.rank <= s.rank <= top.rank)


_I, _W, _E = Severity.INFO, Severity.WARNING, Severity.ERROR

_ENTRIES = (
    # -- TC1xx: data loss ------------------------------------------------------------------
    CatalogueEntry(
        "TC101",
        DataLossWarning,
        _W,
        "abort discarded data the peer had not acknowledged",
        "close gracefully when the peer must get the data; "
        "pass allow_data_loss=True when discarding it is intended",
    ),
    CatalogueEntry(
        "TC102",
        DataLossWarning,
        _W,
        "close with unread input sends RST instead of FIN",
        "read what the peer sent before closing, or use the graceful policy, which drains it",
    ),
    CatalogueEntry(
        "TC103",
        DataLossWarning,
        _W,
        "orphaned sockets near tcp_max_orphans: closes turn into RST",
        "find why closed connections do not finish (peers not reading, stuck FIN_WAIT), "
        "or raise net.ipv4.tcp_max_orphans",
        max_severity=_E,
    ),
    # -- TC2xx: a blocking close -----------------------------------------------------------
    CatalogueEntry(
        "TC201",
        BlockingCloseWarning,
        _W,
        "SO_LINGER with a non-zero time makes close() block on a non-blocking socket",
        "turn SO_LINGER off and use a graceful close policy; "
        "use SO_LINGER {1, 0} only for an intended abort",
    ),
    # -- TC3xx: port and 4-tuple reuse, and the sysctls around it --------------------------
    CatalogueEntry(
        "TC301",
        UnsafeReuseWarning,
        _W,
        "active close on a client bound to a fixed local port blocks that 4-tuple for 60 s",
        "let the kernel choose the client's local port, or let the server close first "
        "(peer-first policy)",
    ),
    CatalogueEntry(
        "TC302",
        UnsafeReuseWarning,
        _W,
        "SO_REUSEADDR with an explicit bind before connect takes over TIME_WAIT 4-tuples",
        "do not set SO_REUSEADDR on client sockets; let the kernel choose the local port "
        "(IP_BIND_ADDRESS_NO_PORT when only the address is fixed)",
    ),
    CatalogueEntry(
        "TC303",
        UnsafeReuseWarning,
        _W,
        "TIME_WAIT towards one destination is using up the ephemeral port range",
        "reuse connections (keep-alive, pooling) or let the server close first; "
        "widen net.ipv4.ip_local_port_range; tcp_tw_reuse=1 helps outgoing connections",
        max_severity=_E,
    ),
    CatalogueEntry(
        "TC304",
        UnsafeReuseWarning,
        _W,
        "tcp_tw_reuse is on but TIME_WAIT is on accepted connections, where it never applies",
        "tcp_tw_reuse only affects outgoing connect(); on a server let clients close first "
        "(peer-first policy) or keep connections alive",
    ),
    CatalogueEntry(
        "TC305",
        UnsafeReuseWarning,
        _W,
        "tcp_tw_reuse is on but tcp_timestamps is off, so it never applies",
        "set net.ipv4.tcp_timestamps=1, or stop relying on tcp_tw_reuse",
    ),
    CatalogueEntry(
        "TC306",
        UnsafeReuseWarning,
        _I,
        "tcp_tw_reuse=2 applies to loopback only, and outgoing TIME_WAIT goes to other hosts",
        "set net.ipv4.tcp_tw_reuse=1 if outgoing connections to other hosts must reuse "
        "TIME_WAIT ports",
    ),
    CatalogueEntry(
        "TC307",
        UnsafeReuseWarning,
        _E,
        "tcp_tw_recycle is on: connections from clients behind NAT are dropped",
        "set net.ipv4.tcp_tw_recycle=0 (Linux 4.12 removed it); "
        "use tcp_tw_reuse for outgoing connections instead",
    ),
    CatalogueEntry(
        "TC308",
        UnsafeReuseWarning,
        _W,
        "TIME_WAIT is near tcp_max_tw_buckets now, or overflowed it since boot: "
        "closes skip TIME_WAIT",
        "reduce TIME_WAIT (connection reuse, let the peer close first) or raise "
        "net.ipv4.tcp_max_tw_buckets; do not lower it to get rid of TIME_WAIT",
        max_severity=_E,
    ),
    CatalogueEntry(
        "TC309",
        UnsafeReuseWarning,
        _I,
        "tcp_rfc1337 is off: a stray RST can end TIME_WAIT early",
        "set net.ipv4.tcp_rfc1337=1 so TIME_WAIT ignores RST and lasts its full time",
    ),
    CatalogueEntry(
        "TC310",
        UnsafeReuseWarning,
        _W,
        "SO_REUSEPORT on a listener lets another process of the same user take connections",
        "set SO_REUSEPORT only for deliberately sharded listeners, "
        "under a user no other program runs as",
    ),
    CatalogueEntry(
        "TC311",
        UnsafeReuseWarning,
        _W,
        "SO_REUSEADDR on Windows lets another socket bind the same port",
        "on Windows use SO_EXCLUSIVEADDRUSE instead of SO_REUSEADDR",
    ),
    CatalogueEntry(
        "TC312",
        UnsafeReuseWarning,
        _I,
        "tcp_fin_timeout far from its default: it limits orphaned FIN_WAIT2, not TIME_WAIT",
        "TIME_WAIT is fixed at 60 s; keep tcp_fin_timeout near 60 s unless orphaned "
        "FIN_WAIT2 sockets are the problem you measured",
        max_severity=_W,
    ),
    CatalogueEntry(
        "TC313",
        UnsafeReuseWarning,
        _W,
        "a file the audit reads could not be used, so the checks over it did not run",
        "give audit the real /proc, or a snapshot of regular files copied from it; "
        "the evidence names the file and the reason",
    ),
)

#: Every code, in order: the table ``docs/warnings.md`` follows.
CATALOGUE: Mapping[str, CatalogueEntry] = MappingProxyType({e.code: e for e in _ENTRIES})


# -- findings ----------------------------------------------------------------------------


def _json_ready(value: object) -> object:
    if isinstance(value, tuple | list | frozenset | set):
        return [_json_ready(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return ",".join(_format_value(v) for v in value)
    return str(value)


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing a check found: what it is, how bad, the numbers seen, what to do.

    ``title`` and ``advice`` come from the :data:`CATALOGUE` entry of ``code``; the
    numbers are in ``evidence`` (a read-only mapping of JSON-ready values).

    >>> f = abort_discards(4096)
    >>> str(f)  # doctest: +ELLIPSIS
    'TC101 warning: abort discarded data ... (discarded_bytes=4096) — close gracefully ...'
    >>> f.as_dict()["evidence"]
    {'discarded_bytes': 4096}
    """

    code: str
    severity: Severity
    title: str
    evidence: Mapping[str, object]
    advice: str
    category: type[TcpCloseWarning]

    def __post_init__(self) -> None:
        object.__setattr__(self, "evidence", MappingProxyType(dict(self.evidence)))

    def __hash__(self) -> int:
        return hash((self.code, self.severity, self.title, self.advice))

    @property
    def docs_url(self) -> str:
        """Link to this code's section of the warnings reference."""
        return f"{DOCS_URL}#{self.code.lower()}"

    def as_dict(self) -> dict[str, object]:
        """JSON-ready mapping: the fields, the category's name and the docs link."""
        return {
            "code": self.code,
            "severity": self.severity.value,
            "title": self.title,
            "evidence": _json_ready(self.evidence),
            "advice": self.advice,
            "category": self.category.__name__,
            "docs": self.docs_url,
        }

    def __str__(self) -> str:
        text = f"{self.code} {self.severity.value}: {self.title}"
        if self.evidence:
            pairs = ", ".join(f"{k}={_format_value(v)}" for k, v in self.evidence.items())
            text += f" ({pairs})"
        return f"{text} — {self.advice}"


def _finding(code: str, severity: Severity | None = None, **evidence: object) -> Finding:
    entry = CATALOGUE[code]
    chosen = severity or entry.severity
    if chosen not in entry.severities:  # pragma: no cover - a bug in a check, not input
        raise AssertionError(f"{code} cannot have severity {chosen}")
    return Finding(
        code=code,
        severity=chosen,
        title=entry.title,
        evidence=evidence,
        advice=entry.advice,
        category=entry.category,
    )


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Most severe first, then by code (stable for equal keys)."""
    return sorted(findings, key=lambda f: (-f.severity.rank, f.code))


# -- facts -------------------------------------------------------------------------------


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


def format_address(address: Address) -> str:
    """``host:port``, with IPv6 hosts in brackets.

    >>> format_address(("10.0.0.5", 443)), format_address(("::1", 8080))
    ('10.0.0.5:443', '[::1]:8080')
    """
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _is_loopback(host: str) -> bool:
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
            if not _is_loopback(host):
                non_loopback += 1
    return TimeWaitSummary(
        total=total,
        accepted=accepted,
        towards=MappingProxyType(dict(towards)),
        outgoing_non_loopback=non_loopback,
        fixed_port=MappingProxyType(dict(fixed)),
    )


# -- TC1xx: data loss --------------------------------------------------------------------


def abort_discards(discarded_bytes: int) -> Finding | None:
    """TC101: an abort (``SO_LINGER {1, 0}`` + ``close()``) threw away
    ``discarded_bytes`` that the peer had not acknowledged (``SIOCOUTQ`` before close).

    >>> abort_discards(0) is None, abort_discards(1).code
    (True, 'TC101')
    """
    if discarded_bytes <= 0:
        return None
    return _finding("TC101", discarded_bytes=discarded_bytes)


def close_with_unread(unread_bytes: int) -> Finding | None:
    """TC102: a plain ``close()`` with ``unread_bytes`` still in the receive queue
    (``SIOCINQ``): Linux answers with RST, and the peer may lose our last response.

    >>> close_with_unread(0) is None, close_with_unread(200).code
    (True, 'TC102')
    """
    if unread_bytes <= 0:
        return None
    return _finding("TC102", unread_bytes=unread_bytes)


def orphans_near_limit(*, orphans: int | None, max_orphans: int | None) -> Finding | None:
    """TC103: orphaned sockets near ``tcp_max_orphans``.

    The kernel's test is ``orphans << shift > tcp_max_orphans``: ``close()`` uses shift
    0 and then resets the connection instead of closing it; the retransmit timer uses a
    shift up to 2 for stalled peers, so resets start at a quarter of the limit. Warning
    above a quarter, error above the limit.

    >>> orphans_near_limit(orphans=1100, max_orphans=4096).severity
    <Severity.WARNING: 'warning'>
    >>> orphans_near_limit(orphans=1024, max_orphans=4096) is None
    True
    """
    if orphans is None or max_orphans is None or max_orphans <= 0:
        return None
    if orphans > max_orphans:
        severity = Severity.ERROR
    elif orphans << 2 > max_orphans:
        severity = Severity.WARNING
    else:
        return None
    return _finding(
        "TC103",
        severity,
        orphans=orphans,
        tcp_max_orphans=max_orphans,
        percent=round(100 * orphans / max_orphans, 1),
    )


# -- TC2xx: a blocking close -------------------------------------------------------------


def blocking_linger(
    *,
    linger_on: bool,
    linger_time: float,
    nonblocking: bool,
    event_loop: bool = False,
    linger_unit: LingerUnit = "seconds",
) -> Finding | None:
    """TC201: ``SO_LINGER`` on with a non-zero time, on a socket the program does not
    expect to block (non-blocking, or owned by an event loop).

    Linux's ``close()`` then waits up to that time for the peer to acknowledge what is
    queued, whatever ``O_NONBLOCK`` says, and does not abort when the time runs out.

    Args:
        linger_on, linger_time: ``l_onoff`` and ``l_linger`` as read.
        nonblocking: the socket is in non-blocking mode.
        event_loop: the socket belongs to an event-loop transport.
        linger_unit: ``"ticks"`` for macOS ``SO_LINGER`` (1/100 s; ``SO_LINGER_SEC``
            reads seconds), ``"seconds"`` elsewhere.

    Notes:
        ``SO_LINGER {1, 0}`` is an abort, not a blocking close: no finding.

    >>> blocking_linger(linger_on=True, linger_time=5, nonblocking=True).code
    'TC201'
    >>> blocking_linger(linger_on=True, linger_time=0, nonblocking=True) is None
    True
    """
    if not linger_on or linger_time <= 0 or not (nonblocking or event_loop):
        return None
    seconds = linger_time / TICKS_PER_SECOND if linger_unit == "ticks" else float(linger_time)
    return _finding(
        "TC201",
        linger_time=linger_time,
        linger_unit=linger_unit,
        linger_seconds=seconds,
        nonblocking=nonblocking,
        event_loop=event_loop,
    )


# -- TC3xx: port and 4-tuple reuse -------------------------------------------------------


def _client_on_chosen_port(facts: SocketFacts) -> bool:
    return (
        facts.peer is not None
        and not facts.listening
        and facts.local_port > 0
        and facts.port_chosen is True
        and facts.listener_on_port is False
    )


def fixed_port_client(facts: SocketFacts) -> Finding | None:
    """TC301: a connected client bound to a port it chose, without ``SO_REUSEADDR``.

    Closing first leaves that 4-tuple in TIME_WAIT for 60 s: binding the port again
    fails (``EADDRINUSE``) and ``tcp_tw_reuse`` does not apply to an explicit bind.
    An accepted socket (a listener shares its port) and an unknown socket table are
    not findings. With ``SO_REUSEADDR`` the risk is the opposite one: TC302.
    """
    if not _client_on_chosen_port(facts) or facts.reuseaddr:
        return None
    assert facts.peer is not None
    return _finding(
        "TC301",
        local_port=facts.local_port,
        peer=format_address(facts.peer),
        reuseaddr=bool(facts.reuseaddr),
    )


def reuseaddr_takeover(facts: SocketFacts) -> Finding | None:
    """TC302: a connected client with ``SO_REUSEADDR`` bound to a port it chose.

    The bind succeeds over TIME_WAIT entries of that port, and ``connect()`` to the
    same destination then takes over the TIME_WAIT 4-tuple at once whenever the old
    connection used timestamps: the kernel's ``tcp_twsk_unique`` skips both
    ``tcp_tw_reuse`` and its one-second delay for an explicitly bound port.
    """
    if not _client_on_chosen_port(facts) or not facts.reuseaddr:
        return None
    assert facts.peer is not None
    return _finding(
        "TC302",
        local_port=facts.local_port,
        peer=format_address(facts.peer),
        reuseaddr=True,
    )


def fixed_port_time_wait(summary: TimeWaitSummary, *, examples: int = 5) -> Finding | None:
    """TC301 from the socket table: TIME_WAIT on local ports outside the ephemeral
    range with no listener on them, towards peer ports outside it: clients bound to
    fixed ports closed first. (A server whose listener is gone has TIME_WAIT towards
    its clients' ephemeral ports: not this.) Evidence lists the busiest ``examples``
    ports.
    """
    if not summary.fixed_port:
        return None
    busiest = sorted(summary.fixed_port.items(), key=lambda kv: (-kv[1], kv[0]))
    return _finding(
        "TC301",
        time_wait=sum(summary.fixed_port.values()),
        local_ports=[port for port, _ in busiest[:examples]],
    )


def _tw_reuse_applies(sysctls: Sysctls, host: str) -> bool:
    if not sysctls.tcp_timestamps:
        return False
    return sysctls.tcp_tw_reuse == 1 or (sysctls.tcp_tw_reuse == 2 and _is_loopback(host))


def time_wait_near_port_range(towards: Mapping[Address, int], sysctls: Sysctls) -> list[Finding]:
    """TC303: outgoing TIME_WAIT towards one destination above 50% (warning) or 90%
    (error) of the ephemeral ports (``ip_local_port_range`` minus
    ``ip_local_reserved_ports``). One finding per destination, busiest first.

    Above 90% stays a warning when ``tcp_tw_reuse`` applies to that destination
    (1, or 2 towards loopback, with ``tcp_timestamps`` on): ``connect()`` can then take
    TIME_WAIT ports older than a second.

    >>> s = Sysctls(ip_local_port_range=(40000, 40099))
    >>> [f.severity.value for f in time_wait_near_port_range({("10.0.0.5", 443): 95}, s)]
    ['error']
    >>> time_wait_near_port_range({("10.0.0.5", 443): 50}, s)
    []
    """
    ports = sysctls.ephemeral_ports
    if not ports:
        return []
    lo, hi = sysctls.ip_local_port_range or (0, 0)
    findings: list[Finding] = []
    for (host, port), count in sorted(towards.items(), key=lambda kv: (-kv[1], kv[0])):
        share = count / ports
        if share <= 0.5:
            continue
        reuse = _tw_reuse_applies(sysctls, host)
        severity = Severity.ERROR if share > 0.9 and not reuse else Severity.WARNING
        findings.append(
            _finding(
                "TC303",
                severity,
                destination=format_address((host, port)),
                time_wait=count,
                ephemeral_ports=ports,
                ip_local_port_range=[lo, hi],
                percent=round(100 * share, 1),
                tw_reuse_applies=reuse,
            )
        )
    return findings


#: TIME_WAIT count on accepted connections from which TC304 fires.
ACCEPTED_TIME_WAIT_THRESHOLD = 1000
#: Outgoing non-loopback TIME_WAIT count from which TC306 fires.
NON_LOOPBACK_TIME_WAIT_THRESHOLD = 100


def tw_reuse_for_accepted(
    *,
    tcp_tw_reuse: int | None,
    accepted_time_wait: int,
    threshold: int = ACCEPTED_TIME_WAIT_THRESHOLD,
) -> Finding | None:
    """TC304: ``tcp_tw_reuse=1`` (set on purpose: the default is 2) while many
    TIME_WAIT entries sit on accepted connections. ``tcp_tw_reuse`` is consulted only
    by ``connect()``; it never shortens a server's TIME_WAIT.
    """
    if tcp_tw_reuse != 1 or accepted_time_wait < threshold:
        return None
    return _finding("TC304", tcp_tw_reuse=tcp_tw_reuse, accepted_time_wait=accepted_time_wait)


def tw_reuse_without_timestamps(
    *, tcp_tw_reuse: int | None, tcp_timestamps: int | None
) -> Finding | None:
    """TC305: ``tcp_tw_reuse`` on (1 or 2) with ``tcp_timestamps=0``. Reuse needs the
    old connection's timestamp to tell old segments from new, so it never happens.

    >>> tw_reuse_without_timestamps(tcp_tw_reuse=1, tcp_timestamps=0).code
    'TC305'
    >>> tw_reuse_without_timestamps(tcp_tw_reuse=1, tcp_timestamps=2) is None
    True
    """
    if not tcp_tw_reuse or tcp_timestamps != 0:
        return None
    return _finding("TC305", tcp_tw_reuse=tcp_tw_reuse, tcp_timestamps=tcp_timestamps)


def tw_reuse_loopback_only(
    *,
    tcp_tw_reuse: int | None,
    non_loopback_time_wait: int,
    threshold: int = NON_LOOPBACK_TIME_WAIT_THRESHOLD,
) -> Finding | None:
    """TC306 (info): ``tcp_tw_reuse=2``, which reuses TIME_WAIT only for loopback
    traffic, while outgoing TIME_WAIT to other hosts is at least ``threshold``."""
    if tcp_tw_reuse != 2 or non_loopback_time_wait < threshold:
        return None
    return _finding(
        "TC306", tcp_tw_reuse=tcp_tw_reuse, non_loopback_time_wait=non_loopback_time_wait
    )


def tw_recycle_on(tcp_tw_recycle: int | None) -> Finding | None:
    """TC307 (error): ``tcp_tw_recycle`` exists (kernels before 4.12) and is on. It
    drops SYNs whose timestamps go backwards per source address, which is what many
    clients behind one NAT address look like.

    >>> tw_recycle_on(None) is None, tw_recycle_on(0) is None, tw_recycle_on(1).code
    (True, True, 'TC307')
    """
    if not tcp_tw_recycle:
        return None
    return _finding("TC307", tcp_tw_recycle=tcp_tw_recycle)


#: Share of ``tcp_max_tw_buckets`` from which TC308 warns.
TW_BUCKETS_NEAR = 0.8


def tw_buckets_near_limit(
    *,
    time_wait: int | None,
    max_tw_buckets: int | None,
    overflows: int | None = None,
) -> Finding | None:
    """TC308: TIME_WAIT at ``tcp_max_tw_buckets`` (error: new closes skip TIME_WAIT
    and the 4-tuple is reusable at once), above 80% of it, or ``TCPTimeWaitOverflow``
    non-zero (warning: it has happened since boot, whatever the count is now).

    The evidence says which: ``reason`` is ``"at the limit"``, ``"near the limit"`` or
    ``"overflowed since boot"``, and ``percent_of_limit`` is the count now.

    >>> tw_buckets_near_limit(time_wait=4096, max_tw_buckets=4096).severity.value
    'error'
    >>> tw_buckets_near_limit(time_wait=100, max_tw_buckets=4096, overflows=0) is None
    True
    >>> dict(tw_buckets_near_limit(time_wait=600, max_tw_buckets=4000, overflows=3).evidence)
    ... # doctest: +NORMALIZE_WHITESPACE
    {'reason': 'overflowed since boot', 'time_wait': 600, 'tcp_max_tw_buckets': 4000,
     'percent_of_limit': 15.0, 'time_wait_overflows': 3}
    """
    severity: Severity | None = None
    reason = ""
    percent: float | None = None
    if time_wait is not None and max_tw_buckets is not None:
        if max_tw_buckets > 0:
            percent = round(100 * time_wait / max_tw_buckets, 1)
        if time_wait >= max_tw_buckets:
            severity, reason = Severity.ERROR, "at the limit"
        elif time_wait >= TW_BUCKETS_NEAR * max_tw_buckets:
            severity, reason = Severity.WARNING, "near the limit"
    if severity is None and overflows:
        severity, reason = Severity.WARNING, "overflowed since boot"
    if severity is None:
        return None
    return _finding(
        "TC308",
        severity,
        reason=reason,
        time_wait=time_wait,
        tcp_max_tw_buckets=max_tw_buckets,
        percent_of_limit=percent,
        time_wait_overflows=overflows,
    )


def rfc1337_off(tcp_rfc1337: int | None) -> Finding | None:
    """TC309 (info): ``tcp_rfc1337=0``: an RST arriving in TIME_WAIT ends it at once
    (RFC 1337's "TIME-WAIT assassination"), so old duplicates can reach a new
    connection on the same 4-tuple.
    """
    if tcp_rfc1337 != 0:
        return None
    return _finding("TC309", tcp_rfc1337=tcp_rfc1337)


def reuseport_listener(*, listening: bool, reuseport: bool | None) -> Finding | None:
    """TC310: ``SO_REUSEPORT`` on a listening socket. Any process of the same effective
    user can bind the same address and port and the kernel will hand it a share of new
    connections."""
    if not listening or not reuseport:
        return None
    return _finding("TC310", listening=True, reuseport=True)


def windows_reuseaddr(
    *, platform: str, reuseaddr: bool | None, exclusiveaddruse: bool | None
) -> Finding | None:
    """TC311: ``SO_REUSEADDR`` on Windows, where it means "let me bind a port in use":
    another socket can bind the same port and receive its traffic. Windows'
    ``SO_EXCLUSIVEADDRUSE`` is the option that prevents this; POSIX ``SO_REUSEADDR``
    does not have this meaning."""
    if platform != "win32" or not reuseaddr or exclusiveaddruse:
        return None
    return _finding(
        "TC311", platform=platform, reuseaddr=True, exclusiveaddruse=bool(exclusiveaddruse)
    )


#: ``tcp_fin_timeout`` below this is "very low" (default 60 s).
FIN_TIMEOUT_LOW = 15
#: ``tcp_fin_timeout`` above this is "very high".
FIN_TIMEOUT_HIGH = 120


def fin_timeout_unusual(tcp_fin_timeout: int | None) -> Finding | None:
    """TC312: ``tcp_fin_timeout`` below 15 s (info) or above 120 s (warning).

    It bounds how long an orphaned socket waits in FIN_WAIT2 for the peer's FIN; it does
    not change TIME_WAIT (fixed at 60 s), which is why it is so often lowered in vain.
    Very low: peers that close late get RST. Very high: orphaned FIN_WAIT2 sockets pile
    up towards ``tcp_max_orphans``.

    >>> fin_timeout_unusual(60) is None, fin_timeout_unusual(5).severity.value
    (True, 'info')
    """
    if tcp_fin_timeout is None:
        return None
    if tcp_fin_timeout < FIN_TIMEOUT_LOW:
        severity = Severity.INFO
    elif tcp_fin_timeout > FIN_TIMEOUT_HIGH:
        severity = Severity.WARNING
    else:
        return None
    return _finding("TC312", severity, tcp_fin_timeout=tcp_fin_timeout, default=60)


# -- aggregates --------------------------------------------------------------------------


def unreadable_input(path: str, reason: str) -> Finding:
    """TC313: ``path`` exists but could not be used (not a regular file, too large,
    unreadable, malformed): the checks that need it stayed silent.

    >>> unreadable_input("/snap/proc/net/tcp", "not a regular file").evidence["reason"]
    'not a regular file'
    """
    return _finding("TC313", path=path, reason=reason)


def check_system(
    sysctls: Sysctls,
    counters: Counters,
    time_wait: TimeWaitSummary | None = None,
) -> list[Finding]:
    """Every host-wide check: sysctls, counters and (when known) the TIME_WAIT table.

    Facts that are unknown (``None``) make their checks stay silent.
    """
    found: list[Finding | None] = [
        tw_recycle_on(sysctls.tcp_tw_recycle),
        tw_reuse_without_timestamps(
            tcp_tw_reuse=sysctls.tcp_tw_reuse, tcp_timestamps=sysctls.tcp_timestamps
        ),
        tw_buckets_near_limit(
            time_wait=counters.time_wait,
            max_tw_buckets=sysctls.tcp_max_tw_buckets,
            overflows=counters.time_wait_overflows,
        ),
        orphans_near_limit(orphans=counters.orphans, max_orphans=sysctls.tcp_max_orphans),
        rfc1337_off(sysctls.tcp_rfc1337),
        fin_timeout_unusual(sysctls.tcp_fin_timeout),
    ]
    if time_wait is not None:
        found.append(
            tw_reuse_for_accepted(
                tcp_tw_reuse=sysctls.tcp_tw_reuse, accepted_time_wait=time_wait.accepted
            )
        )
        found.append(
            tw_reuse_loopback_only(
                tcp_tw_reuse=sysctls.tcp_tw_reuse,
                non_loopback_time_wait=time_wait.outgoing_non_loopback,
            )
        )
        found.append(fixed_port_time_wait(time_wait))
        found.extend(time_wait_near_port_range(time_wait.towards, sysctls))
    return sort_findings(f for f in found if f is not None)


def check_socket_facts(facts: SocketFacts) -> list[Finding]:
    """Every per-socket check over one socket's options."""
    found = [
        blocking_linger(
            linger_on=facts.linger_on,
            linger_time=facts.linger_time,
            nonblocking=facts.nonblocking,
            event_loop=facts.event_loop,
            linger_unit=facts.linger_unit,
        ),
        fixed_port_client(facts),
        reuseaddr_takeover(facts),
        reuseport_listener(listening=facts.listening, reuseport=facts.reuseport),
        windows_reuseaddr(
            platform=facts.platform,
            reuseaddr=facts.reuseaddr,
            exclusiveaddruse=facts.exclusiveaddruse,
        ),
    ]
    return sort_findings(f for f in found if f is not None)
