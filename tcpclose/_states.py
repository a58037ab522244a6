"""What ``tcpclose states`` prints: a :class:`~tcpclose._hostview.HostView` as a table
that answers "whose TIME_WAIT are these, and what do I do about them".

Pure formatting and findings, plus :class:`CloseWaitAges`, which tells how long each
CLOSE_WAIT socket has been held at least: the kernel's time since it last received a
segment (sock_diag) or, across refreshes, since when it has been seen.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from ._checks import PORT_RANGE_WARNING, TW_BUCKETS_NEAR
from ._facts import SIDES, Timers
from ._hostview import HostView, owners_by_inode
from ._kernel._address import format_address
from ._kernel._types import Address, KernelState, TcpState
from ._warnings import DOCS_ROOT, docs_url

__all__ = (
    "DOCS",
    "CloseWaitAges",
    "Leak",
    "advice",
    "find_leaks",
    "format_view",
    "view_as_dict",
)

#: The documentation's root (the warnings' links point below it too).
DOCS: Final = DOCS_ROOT
#: A destination is worth a word when its sockets hold this share of the ephemeral range
#: (the TC303 warning's threshold).
DESTINATION_SHARE: Final = PORT_RANGE_WARNING
#: The TIME_WAIT table is worth a word from this fill on (TC308's "near").
TABLE_FILL: Final = TW_BUCKETS_NEAR

_SIDE_TEXT: Final = {
    "accepted": "on a listening port: a server here closed first",
    "outgoing": "on an ephemeral port: a client here closed first",
    "bound": "on a port bound on purpose: a client here closed first",
}

SocketKey = tuple[Any, ...]


def _key(entry: KernelState) -> SocketKey:
    return (entry.cookie,) if entry.cookie else (entry.local, entry.peer)


class CloseWaitAges:
    """How long each CLOSE_WAIT socket has been held at least: the longer of the time
    since it was first seen, across refreshes, and the kernel's time since it last
    received a segment (:attr:`HostView.close_wait_received`: the peer's FIN, or
    anything after it)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._first: dict[SocketKey, float] = {}

    def update(
        self, close_wait: Iterable[KernelState], received: Mapping[int, float] | None = None
    ) -> dict[SocketKey, float]:
        """Note the sockets now in CLOSE_WAIT; returns each one's age in seconds (from
        ``received``, by cookie, else 0 the first time it is seen). Sockets gone are
        forgotten."""
        now = self._clock()
        received = received or {}
        first: dict[SocketKey, float] = {}
        for entry in close_wait:
            key = _key(entry)
            quiet = received.get(entry.cookie or 0, 0.0)
            first[key] = min(self._first.get(key, now), now - quiet)
        self._first = first
        return {key: now - since for key, since in first.items()}


@dataclass(frozen=True, slots=True)
class Leak:
    """A CLOSE_WAIT socket older than the threshold, and who holds it."""

    entry: KernelState
    age: float
    pid: int | None
    command: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "local": format_address(self.entry.local) if self.entry.local else None,
            "peer": format_address(self.entry.peer) if self.entry.peer else None,
            "held_for_s": round(self.age, 3),
            "recv_queue": self.entry.recv_queue,
            "pid": self.pid,
            "command": self.command,
        }


def find_leaks(
    view: HostView,
    ages: Mapping[SocketKey, float],
    older_than: float,
    owners: Callable[[list[int]], Mapping[int, tuple[int, str]]] = owners_by_inode,
) -> list[Leak]:
    """The CLOSE_WAIT sockets seen for at least ``older_than`` seconds, with the
    process holding each (when this user can see it), oldest first."""
    old = [(e, ages.get(_key(e), 0.0)) for e in view.close_wait]
    old = [(e, age) for e, age in old if age >= older_than]
    if not old:
        return []
    holders = owners([e.inode for e, _ in old if e.inode])
    leaks = []
    for entry, age in old:
        pid, command = holders.get(entry.inode or 0, (None, None))
        leaks.append(Leak(entry, age, pid, command))
    leaks.sort(key=lambda leak: -leak.age)
    return leaks


def _share(fraction: float | None) -> str:
    if fraction is None:
        return "-"
    return f"{fraction * 100:.1f}%" if fraction < 0.995 or fraction >= 1 else "99.9%"


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f} s"


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def _signed(n: int) -> str:
    return f"+{n}" if n > 0 else str(n)


def advice(
    view: HostView,
    leaks: Sequence[Leak],
    previous: HostView | None = None,
    leak_after: float | None = None,
) -> list[str]:
    """One line per finding, each naming what to do and where the docs say more."""
    lines = []
    accepted = view.time_wait.by_side["accepted"]
    if accepted:
        ports = ", ".join(str(p) for p in list(view.time_wait.accepted_by_port)[:5])
        lines.append(
            f"{accepted} TIME_WAIT on listening port(s) {ports}: this server closes first; "
            f"'peer-first' leaves them to the clients -- {DOCS}policies/#decision-table"
        )
    for destination, in_use in view.ephemeral_by_destination.items():
        share = view.ephemeral_share(in_use)
        if share is None or share < DESTINATION_SHARE:
            break  # (ordered from the largest down)
        lines.append(
            f"{format_address(destination)} holds {_share(share)} of the ephemeral range "
            "(full: connect() fails, EADDRNOTAVAIL); reuse connections or let the server "
            f"close first -- {docs_url('TC303')}"
        )
    overflows = view.counters.time_wait_overflows
    rose = (
        overflows - previous.counters.time_wait_overflows
        if previous is not None
        and overflows is not None
        and previous.counters.time_wait_overflows is not None
        else None
    )
    fill = view.time_wait_fill
    # (the counter since boot is printed, not a finding: one overflow long ago would
    # otherwise be advised about forever; between refreshes a rise is one)
    if (fill is not None and fill >= TABLE_FILL) or (rose or 0) > 0:
        skipped = (
            f"{rose} TIME_WAIT skipped since the last refresh"
            if rose is not None
            else f"{overflows} TIME_WAIT skipped since boot"
        )
        lines.append(
            f"TIME_WAIT table {_share(fill)} full, {skipped} (TCPTimeWaitOverflow): raise "
            "net.ipv4.tcp_max_tw_buckets or leave TIME_WAIT to the peers with 'peer-first' "
            f"-- {docs_url('TC308')}"
        )
    if leaks:
        holders = sorted({f"{leak.pid} ({leak.command})" for leak in leaks if leak.pid})
        who = ", ".join(holders[:3]) if holders else "a process this user cannot see"
        age = leak_after if leak_after is not None else leaks[-1].age
        lines.append(
            f"{len(leaks)} CLOSE_WAIT held {age:g} s or more by {who}: the peer closed, the "
            f"program never did (a leak); close on EOF -- {DOCS}observability/#close_wait-leaks"
        )
    return lines


def _changes(view: HostView, previous: HostView | None) -> tuple[float, dict[TcpState, int]]:
    if previous is None:
        return 0.0, {}
    elapsed = max(view.taken - previous.taken, 1e-9)
    states = set(view.by_state) | set(previous.by_state)
    return elapsed, {s: view.count(s) - previous.count(s) for s in states}


def _table(
    header: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool]
) -> list[str]:
    body = [list(row) for row in rows]
    widths = [
        max(len(header[i]), *(len(r[i]) for r in body)) if body else len(header[i])
        for i in range(len(header))
    ]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(
            cell.rjust(w) if r else cell.ljust(w)
            for cell, w, r in zip(cells, widths, right, strict=True)
        ).rstrip()

    return [line(header), *(line(r) for r in body)]


def _top_title(what: str, shown: int, every: int) -> str:
    return f"{what} (top {shown} of {every})" if shown < every else what


def _destinations(view: HostView, top: int) -> list[tuple[Address, int, Timers]]:
    keys = set(view.time_wait.outgoing_by_destination) | set(view.ephemeral_by_destination)
    rows = [
        (
            d,
            view.ephemeral_by_destination.get(d, 0),
            view.time_wait.outgoing_by_destination.get(d, Timers()),
        )
        for d in keys
    ]
    rows.sort(key=lambda row: (-row[1], -row[2].count, row[0]))
    return rows[:top]


def format_view(
    view: HostView,
    *,
    top: int,
    leaks: Sequence[Leak] = (),
    previous: HostView | None = None,
    leak_after: float | None = None,
) -> str:
    """The text ``tcpclose states`` prints."""
    out = [f"{view.total} TCP sockets (kernel view: {view.source})"]
    elapsed, changes = _changes(view, previous)
    if view.by_state:
        out.append("")
        if previous is None:
            out.extend(
                _table(
                    ("STATE", "COUNT"),
                    ((s.name, str(n)) for s, n in view.by_state.items()),
                    (False, True),
                )
            )
        else:
            out.extend(
                _table(
                    ("STATE", "COUNT", "CHANGE", "PER S"),
                    (
                        (
                            s.name,
                            str(view.count(s)),
                            _signed(changes[s]),
                            f"{changes[s] / elapsed:+.1f}",
                        )
                        for s in sorted(changes, key=lambda s: (-view.count(s), s.name))
                    ),
                    (False, True, True, True),
                )
            )
    time_wait = view.count(TcpState.TIME_WAIT)
    if time_wait:
        out.append("")
        out.append("TIME_WAIT by who closed first")
        rows = []
        for side in SIDES:
            row = [side, str(view.time_wait.by_side[side])]
            if previous is not None:
                row.append(_signed(view.time_wait.by_side[side] - previous.time_wait.by_side[side]))
            row.append(_SIDE_TEXT[side])
            rows.append(row)
        header = ["SIDE", "TIME_WAIT", *(["CHANGE"] if previous is not None else []), "WHERE"]
        out.extend(_table(header, rows, [False, True, *([True] if previous else []), False]))
    listeners = list(view.time_wait.accepted_by_port.items())
    if listeners:
        shown = listeners[:top]
        out.append("")
        out.append(
            _top_title(
                "TIME_WAIT on listening ports (server closed first)", len(shown), len(listeners)
            )
        )
        out.extend(
            _table(
                ("PORT", "TIME_WAIT", "MIN LEFT", "MAX LEFT"),
                (
                    (str(p), str(t.count), _seconds(t.min_left), _seconds(t.max_left))
                    for p, t in shown
                ),
                (True, True, True, True),
            )
        )
    destinations = _destinations(view, top)
    if destinations:
        every = len(
            set(view.time_wait.outgoing_by_destination) | set(view.ephemeral_by_destination)
        )
        out.append("")
        out.append(_top_title("outgoing, by destination", len(destinations), every))
        out.extend(
            _table(
                ("DESTINATION", "PORTS IN USE", "FULL", "TIME_WAIT", "MIN LEFT", "MAX LEFT"),
                (
                    (
                        format_address(d),
                        str(n),
                        _share(view.ephemeral_share(n)),
                        str(t.count),
                        _seconds(t.min_left),
                        _seconds(t.max_left),
                    )
                    for d, n, t in destinations
                ),
                (False, True, True, True, True, True),
            )
        )
    if view.close_wait:
        out.append("")
        if leaks:
            out.append(
                f"CLOSE_WAIT held {leak_after:g} s or more ({len(leaks)} of "
                f"{len(view.close_wait)}): the peer closed, the program has not"
            )
            out.extend(
                _table(
                    ("LOCAL", "PEER", "HELD FOR", "RECV-Q", "PROCESS"),
                    (
                        (
                            format_address(leak.entry.local) if leak.entry.local else "-",
                            format_address(leak.entry.peer) if leak.entry.peer else "-",
                            _seconds(leak.age),
                            "-" if leak.entry.recv_queue is None else str(leak.entry.recv_queue),
                            f"{leak.pid} {leak.command}" if leak.pid else "-",
                        )
                        for leak in leaks[:top]
                    ),
                    (False, False, True, True, False),
                )
            )
        else:
            hint = (
                f"none held {leak_after:g} s yet"
                if leak_after is not None
                else "how long each is held shows with --watch"
            )
            out.append(f"CLOSE_WAIT: {len(view.close_wait)} ({hint})")
    out.append("")
    out.append(_table_line(view, previous))
    lines = advice(view, leaks, previous, leak_after)
    for line in lines:
        out.append(f"advice: {line}")
    out.append(_range_line(view))
    return "\n".join(out)


def _table_line(view: HostView, previous: HostView | None) -> str:
    used, limit = view.counters.time_wait, view.sysctls.tcp_max_tw_buckets
    overflows = view.counters.time_wait_overflows
    text = (
        f"TIME_WAIT table: {'?' if used is None else used} of "
        f"{'?' if limit is None else limit} (net.ipv4.tcp_max_tw_buckets), "
        f"{_share(view.time_wait_fill)} full"
    )
    if overflows is not None:
        text += f"; skipped since boot: {overflows} (TCPTimeWaitOverflow)"
        old = previous.counters.time_wait_overflows if previous is not None else None
        if old is not None:
            text += f", {_signed(overflows - old)} since the last refresh"
    if view.time_wait_fill is not None and view.time_wait_fill >= 1:
        text += " -- FULL: closes now skip TIME_WAIT"
    return text


def _range_line(view: HostView) -> str:
    sysctls = view.sysctls
    if sysctls.ip_local_port_range is None:
        return "ephemeral port range: unknown (net.ipv4.ip_local_port_range unreadable)"
    low, high = sysctls.ip_local_port_range
    size = sysctls.ephemeral_ports or 0
    reserved = high - low + 1 - size
    return (
        f"ephemeral port range: {low}-{high}, {reserved} reserved: "
        f"{size} ports per destination for connect()"
    )


def view_as_dict(
    view: HostView,
    *,
    top: int,
    leaks: Sequence[Leak] = (),
    previous: HostView | None = None,
    leak_after: float | None = None,
) -> dict[str, Any]:
    """The JSON ``tcpclose states --json`` prints."""
    sysctls = view.sysctls
    port_range = sysctls.ip_local_port_range
    elapsed, changes = _changes(view, previous)
    document: dict[str, Any] = {
        "time": round(time.time(), 3),
        "source": view.source,
        "total": view.total,
        "by_state": {state.name: n for state, n in view.by_state.items()},
        "time_wait": {
            "total": view.count(TcpState.TIME_WAIT),
            "by_side": dict(view.time_wait.by_side),
            "by_local_port": [
                {
                    "port": port,
                    "listening": True,
                    "time_wait": t.count,
                    "min_seconds_left": _round(t.min_left),
                    "max_seconds_left": _round(t.max_left),
                }
                for port, t in list(view.time_wait.accepted_by_port.items())[:top]
            ],
        },
        "destinations": [
            {
                "host": dest[0],
                "port": dest[1],
                "ephemeral_in_use": in_use,
                "ephemeral_full": _round(view.ephemeral_share(in_use)),
                "time_wait": t.count,
                "min_seconds_left": _round(t.min_left),
                "max_seconds_left": _round(t.max_left),
            }
            for dest, in_use, t in _destinations(view, top)
        ],
        "time_wait_table": {
            "used": view.counters.time_wait,
            "limit": sysctls.tcp_max_tw_buckets,
            "fill": _round(view.time_wait_fill),
            "overflows": view.counters.time_wait_overflows,
        },
        "close_wait": {
            "total": len(view.close_wait),
            "leaks": [leak.as_dict() for leak in leaks[:top]],
        },
        "listening_ports": sorted(view.listening_ports),
        "advice": advice(view, leaks, previous, leak_after),
        "ephemeral_range": {
            "low": port_range[0] if port_range else None,
            "high": port_range[1] if port_range else None,
            "reserved": [list(r) for r in sysctls.ip_local_reserved_ports or ()],
            "ports": sysctls.ephemeral_ports,
        },
    }
    if previous is not None:
        old = previous.counters.time_wait_overflows
        new = view.counters.time_wait_overflows
        document["change"] = {
            "seconds": round(elapsed, 3),
            "by_state": {s.name: n for s, n in changes.items() if n},
            "per_second": {s.name: round(n / elapsed, 3) for s, n in changes.items() if n},
            "time_wait_by_side": {
                side: view.time_wait.by_side[side] - previous.time_wait.by_side[side]
                for side in SIDES
            },
            "overflows": None if old is None or new is None else new - old,
        }
    return document
