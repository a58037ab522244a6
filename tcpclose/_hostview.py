"""The host's TCP table sorted the way an operator asks about it: whose TIME_WAIT these
are (a server that closed first on its listening port, or outgoing connections), how
full each destination's ephemeral range and the kernel's TIME_WAIT table are, and which
CLOSE_WAIT sockets were never closed by their program.

:class:`HostView` is built from a dump by a pure function (:meth:`HostView.build`);
:func:`collect_host_view` reads the kernel, the sysctls and the counters. ``tcpclose
states`` and the metrics sinks' host gauges both show it.
"""

from __future__ import annotations

import os
import time
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Final

from . import _kernel
from ._audit import read_counters, read_sysctls
from ._facts import Counters, Sysctls
from ._kernel._types import Address, KernelState, TcpState

__all__ = (
    "SIDES",
    "HostView",
    "Timers",
    "collect_host_view",
    "owners_by_inode",
    "side_of",
)

#: Who closed first, for a TIME_WAIT entry (``HostView.time_wait_by_side``' keys):
#: ``accepted`` -- on a local port with a listener: this host's server closed first;
#: ``outgoing`` -- on a port ``connect()`` picks: this host's client closed first;
#: ``bound`` -- on a port bound on purpose with no listener now.
SIDES: Final = ("accepted", "outgoing", "bound")


@dataclass(frozen=True, slots=True)
class Timers:
    """How many sockets a group holds, and the shortest/longest TIME_WAIT left."""

    count: int = 0
    min_left: float | None = None
    max_left: float | None = None

    def add(self, seconds_left: float | None) -> Timers:
        low, high = self.min_left, self.max_left
        if seconds_left is not None:
            low = seconds_left if low is None else min(low, seconds_left)
            high = seconds_left if high is None else max(high, seconds_left)
        return Timers(self.count + 1, low, high)


def side_of(local_port: int, listening_ports: Collection[int], sysctls: Sysctls) -> str:
    """Which of :data:`SIDES` a TIME_WAIT entry on ``local_port`` belongs to.

    When the ephemeral range is unknown, a port without a listener counts as outgoing.

    >>> s = Sysctls(ip_local_port_range=(32768, 60999))
    >>> side_of(8080, {8080}, s), side_of(40000, {8080}, s), side_of(5000, {8080}, s)
    ('accepted', 'outgoing', 'bound')
    """
    if local_port in listening_ports:
        return "accepted"
    return "bound" if sysctls.is_ephemeral(local_port) is False else "outgoing"


def _add(groups: dict[Any, list[Any]], key: object, seconds_left: float | None) -> None:
    group = groups.get(key)
    if group is None:
        groups[key] = [1, seconds_left, seconds_left]
        return
    group[0] += 1
    if seconds_left is not None:
        if group[1] is None or seconds_left < group[1]:
            group[1] = seconds_left
        if group[2] is None or seconds_left > group[2]:
            group[2] = seconds_left


def _timers(groups: dict[Any, list[Any]]) -> dict[Any, Timers]:
    return {key: Timers(count, low, high) for key, (count, low, high) in groups.items()}


def _sorted(counts: Mapping[object, int] | Mapping[object, Timers]) -> Mapping[object, object]:
    def size(item: tuple[object, int | Timers]) -> int:
        value = item[1]
        return value if isinstance(value, int) else value.count

    return MappingProxyType(dict(sorted(counts.items(), key=lambda kv: (-size(kv), str(kv[0])))))


@dataclass(frozen=True, slots=True)
class HostView:
    """One look at the host's TCP sockets, sorted by who is responsible.

    Mappings are read-only and ordered from the largest count down.

    Attributes:
        source: which kernel view answered.
        taken: ``time.monotonic()`` when the table was read (rates between two views).
        total: sockets counted (after the ``states``/``port`` filters).
        by_state: count per state.
        listening_ports: local ports with a listener (read whatever the filters).
        time_wait_by_side: TIME_WAIT per side (:data:`SIDES`; all three present).
        time_wait_by_listener: TIME_WAIT on each listening port (the server closed first).
        time_wait_by_destination: outgoing TIME_WAIT per destination.
        ephemeral_by_destination: sockets of any state holding an ephemeral local port
            per destination: ``connect()`` needs a free one per destination.
        close_wait: the CLOSE_WAIT sockets: the peer closed, the program has not.
        sysctls: the sysctls read (ephemeral range, ``tcp_max_tw_buckets``).
        counters: the kernel's counters (TIME_WAIT in use, ``TCPTimeWaitOverflow``).
    """

    source: str
    taken: float
    total: int
    by_state: Mapping[TcpState, int]
    listening_ports: frozenset[int]
    time_wait_by_side: Mapping[str, int]
    time_wait_by_listener: Mapping[int, Timers]
    time_wait_by_destination: Mapping[Address, Timers]
    ephemeral_by_destination: Mapping[Address, int]
    close_wait: tuple[KernelState, ...]
    sysctls: Sysctls = field(default_factory=Sysctls)
    counters: Counters = field(default_factory=Counters)

    @classmethod
    def build(
        cls,
        entries: Iterable[KernelState],
        *,
        listening_ports: Collection[int],
        sysctls: Sysctls,
        counters: Counters,
        source: str,
        taken: float,
    ) -> HostView:
        """Sort ``entries`` (a dump). Pure."""
        # (plain lists and per-port answers while counting: a table can hold 100,000
        # sockets, and a frozen value per socket would cost more than the dump)
        by_state: dict[TcpState, int] = {}
        sides = dict.fromkeys(SIDES, 0)
        by_listener: dict[int, list[Any]] = {}
        by_destination: dict[Address, list[Any]] = {}
        ephemeral: dict[Address, int] = {}
        close_wait: list[KernelState] = []
        listening = frozenset(listening_ports)
        side_by_port: dict[int, str] = {}
        time_wait, listen, closing_wait = TcpState.TIME_WAIT, TcpState.LISTEN, TcpState.CLOSE_WAIT
        total = 0
        for entry in entries:
            total += 1
            state = entry.state
            by_state[state] = by_state.get(state, 0) + 1
            local, peer = entry.local, entry.peer
            if state is closing_wait:
                close_wait.append(entry)
            if local is None or peer is None or state is listen:
                continue
            port = local[1]
            side = side_by_port.get(port)
            if side is None:
                side = side_by_port[port] = side_of(port, listening, sysctls)
            if side == "outgoing" and peer[1] != 0 and sysctls.ip_local_port_range is not None:
                ephemeral[peer] = ephemeral.get(peer, 0) + 1
            if state is time_wait:
                sides[side] += 1
                if side == "accepted":
                    _add(by_listener, port, entry.seconds_left)
                elif side == "outgoing":
                    _add(by_destination, peer, entry.seconds_left)
        return cls(
            source=source,
            taken=taken,
            total=total,
            by_state=_sorted(by_state),  # type: ignore[arg-type]
            listening_ports=listening,
            time_wait_by_side=MappingProxyType(sides),
            time_wait_by_listener=_sorted(_timers(by_listener)),  # type: ignore[arg-type]
            time_wait_by_destination=_sorted(_timers(by_destination)),  # type: ignore[arg-type]
            ephemeral_by_destination=_sorted(ephemeral),  # type: ignore[arg-type]
            close_wait=tuple(close_wait),
            sysctls=sysctls,
            counters=counters,
        )

    def count(self, state: TcpState) -> int:
        """Sockets in ``state`` (0 when none)."""
        return self.by_state.get(state, 0)

    @property
    def time_wait_fill(self) -> float | None:
        """The kernel's TIME_WAIT table fill: TIME_WAIT in use (all of the host's
        namespace, whatever the filters) over ``tcp_max_tw_buckets``; None when unknown.
        At 1.0 the kernel closes without TIME_WAIT and counts ``TCPTimeWaitOverflow``."""
        used, limit = self.counters.time_wait, self.sysctls.tcp_max_tw_buckets
        if used is None or not limit:
            return None
        return used / limit

    def ephemeral_share(self, in_use: int) -> float | None:
        """``in_use`` over the ephemeral range's size (None when unknown)."""
        size = self.sysctls.ephemeral_ports
        return in_use / size if size else None


def collect_host_view(
    states: Sequence[TcpState] | None = None,
    port: int | None = None,
    *,
    sysctls: Sysctls | None = None,
) -> HostView:
    """Read the kernel's TCP table (filtered in the kernel), the listeners, the sysctls
    and the counters, and sort them. Errors of the kernel view propagate."""
    entries = list(_kernel.dump(states, port))
    wanted = set(states) if states is not None else None
    if wanted is None or TcpState.LISTEN in wanted:
        listeners = [e for e in entries if e.state is TcpState.LISTEN]
    else:  # listeners tell whose TIME_WAIT these are: read them whatever the filter
        listeners = list(_kernel.dump([TcpState.LISTEN], port))
    listening_ports = {e.local[1] for e in listeners if e.local is not None}
    return HostView.build(
        entries,
        listening_ports=listening_ports,
        sysctls=sysctls if sysctls is not None else read_sysctls(),
        counters=read_counters(),
        source=_kernel.backend(),
        taken=time.monotonic(),
    )


def owners_by_inode(inodes: Collection[int], proc: str = "/proc") -> dict[int, tuple[int, str]]:
    """``inode -> (pid, command name)`` for the sockets among ``inodes`` that a process
    of this host holds open (``/proc/PID/fd`` links ``socket:[INODE]``). Processes that
    cannot be read (another user's, without root) are skipped."""
    wanted = {f"socket:[{inode}]": inode for inode in inodes if inode}
    found: dict[int, tuple[int, str]] = {}
    if not wanted:
        return found
    try:
        pids = [name for name in os.listdir(proc) if name.isdigit()]
    except OSError:
        return found
    for pid in pids:
        fd_dir = f"{proc}/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            inode = wanted.get(target)
            if inode is not None and inode not in found:
                found[inode] = (int(pid), _command(proc, pid))
        if len(found) == len(wanted):
            break
    return found


def _command(proc: str, pid: str) -> str:
    try:
        with open(f"{proc}/{pid}/comm", encoding="utf-8", errors="replace") as f:
            return f.read().strip()
    except OSError:
        return "?"
