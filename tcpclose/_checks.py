"""The warning rules: one small pure function per check, from facts to findings.

What must live here, and only here: the decision whether a warning applies and the
thresholds it uses (:data:`TW_BUCKETS_NEAR`, :data:`FIN_TIMEOUT_LOW`...), and
:func:`check_system` / :func:`check_socket_facts`, which run every host-wide and every
per-socket rule. The codes, titles and advice are the catalogue's
(``_findings.py``); the fact records are ``_facts.py``'s.

Nothing here touches a socket, a file or the :mod:`warnings` module: gathering facts is
``_audit.py``'s job, issuing a finding as a warning is ``_findings.warn``'s. Tests feed
facts for kernels and platforms the test machine is not.
"""

from __future__ import annotations

from collections.abc import Mapping

from ._facts import (
    TICKS_PER_SECOND,
    Counters,
    LingerUnit,
    SocketFacts,
    Sysctls,
    TimeWaitSummary,
    is_loopback,
)
from ._findings import Finding as Finding  # (the drivers annotate with _checks.Finding)
from ._findings import Severity, new_finding, sort_findings
from ._kernel._address import format_address
from ._kernel._types import Address

__all__ = (
    "ACCEPTED_TIME_WAIT_THRESHOLD",
    "FIN_TIMEOUT_HIGH",
    "FIN_TIMEOUT_LOW",
    "NON_LOOPBACK_TIME_WAIT_THRESHOLD",
    "PORT_RANGE_ERROR",
    "PORT_RANGE_WARNING",
    "TW_BUCKETS_NEAR",
    "abort_discards",
    "blocking_linger",
    "check_socket_facts",
    "check_system",
    "close_with_unread",
    "fin_timeout_unusual",
    "fixed_port_client",
    "fixed_port_time_wait",
    "orphans_near_limit",
    "reuseaddr_takeover",
    "reuseport_listener",
    "rfc1337_off",
    "time_wait_near_port_range",
    "tw_buckets_near_limit",
    "tw_recycle_on",
    "tw_reuse_for_accepted",
    "tw_reuse_loopback_only",
    "tw_reuse_without_timestamps",
    "unreadable_input",
    "windows_reuseaddr",
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
    return new_finding("TC101", discarded_bytes=discarded_bytes)


def close_with_unread(unread_bytes: int) -> Finding | None:
    """TC102: a plain ``close()`` with ``unread_bytes`` still in the receive queue
    (``SIOCINQ``): Linux answers with RST, and the peer may lose our last response.

    >>> close_with_unread(0) is None, close_with_unread(200).code
    (True, 'TC102')
    """
    if unread_bytes <= 0:
        return None
    return new_finding("TC102", unread_bytes=unread_bytes)


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
    return new_finding(
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
    return new_finding(
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
    return new_finding(
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
    return new_finding(
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
    bound = summary.bound_by_port
    if not bound:
        return None
    return new_finding(
        "TC301",
        time_wait=summary.by_side["bound"],
        local_ports=list(bound)[:examples],  # (largest count first)
    )


def _tw_reuse_applies(sysctls: Sysctls, host: str) -> bool:
    if not sysctls.tcp_timestamps:
        return False
    return sysctls.tcp_tw_reuse == 1 or (sysctls.tcp_tw_reuse == 2 and is_loopback(host))


#: Share of the ephemeral ports one destination's TIME_WAIT holds from which TC303 warns.
PORT_RANGE_WARNING = 0.5
#: ... and from which it is an error (unless ``tcp_tw_reuse`` applies).
PORT_RANGE_ERROR = 0.9


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
        if share <= PORT_RANGE_WARNING:
            continue
        reuse = _tw_reuse_applies(sysctls, host)
        severity = Severity.ERROR if share > PORT_RANGE_ERROR and not reuse else Severity.WARNING
        findings.append(
            new_finding(
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
    return new_finding("TC304", tcp_tw_reuse=tcp_tw_reuse, accepted_time_wait=accepted_time_wait)


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
    return new_finding("TC305", tcp_tw_reuse=tcp_tw_reuse, tcp_timestamps=tcp_timestamps)


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
    return new_finding(
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
    return new_finding("TC307", tcp_tw_recycle=tcp_tw_recycle)


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
    return new_finding(
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
    return new_finding("TC309", tcp_rfc1337=tcp_rfc1337)


def reuseport_listener(*, listening: bool, reuseport: bool | None) -> Finding | None:
    """TC310: ``SO_REUSEPORT`` on a listening socket. Any process of the same effective
    user can bind the same address and port and the kernel will hand it a share of new
    connections."""
    if not listening or not reuseport:
        return None
    return new_finding("TC310", listening=True, reuseport=True)


def windows_reuseaddr(
    *, platform: str, reuseaddr: bool | None, exclusiveaddruse: bool | None
) -> Finding | None:
    """TC311: ``SO_REUSEADDR`` on Windows, where it means "let me bind a port in use":
    another socket can bind the same port and receive its traffic. Windows'
    ``SO_EXCLUSIVEADDRUSE`` is the option that prevents this; POSIX ``SO_REUSEADDR``
    does not have this meaning."""
    if platform != "win32" or not reuseaddr or exclusiveaddruse:
        return None
    return new_finding(
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
    return new_finding("TC312", severity, tcp_fin_timeout=tcp_fin_timeout, default=60)


# -- aggregates --------------------------------------------------------------------------


def unreadable_input(path: str, reason: str) -> Finding:
    """TC313: ``path`` exists but could not be used (not a regular file, too large,
    unreadable, malformed): the checks that need it stayed silent.

    >>> unreadable_input("/snap/proc/net/tcp", "not a regular file").evidence["reason"]
    'not a regular file'
    """
    return new_finding("TC313", path=path, reason=reason)


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
                tcp_tw_reuse=sysctls.tcp_tw_reuse,
                accepted_time_wait=time_wait.by_side["accepted"],
            )
        )
        found.append(
            tw_reuse_loopback_only(
                tcp_tw_reuse=sysctls.tcp_tw_reuse,
                non_loopback_time_wait=time_wait.outgoing_non_loopback,
            )
        )
        found.append(fixed_port_time_wait(time_wait))
        towards = {d: t.count for d, t in time_wait.outgoing_by_destination.items()}
        found.extend(time_wait_near_port_range(towards, sysctls))
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
