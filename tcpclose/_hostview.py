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

from . import _kernel
from ._audit import read_counters, read_sysctls
from ._facts import (
    Counters,
    Sysctls,
    TimeWaitSummary,
    side_of,
    summarize_time_wait,
    unmap_host,
)
from ._kernel._types import Address, KernelState, TcpState

__all__ = (
    "HostView",
    "collect_host_view",
    "owners_by_inode",
)


def _sorted(counts: Mapping[object, int]) -> Mapping[object, int]:
    return MappingProxyType(dict(sorted(counts.items(), key=lambda kv: (-kv[1], str(kv[0])))))


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
        time_wait: the TIME_WAIT entries by who closed first (the audit's tally too).
        ephemeral_by_destination: sockets of any state holding an ephemeral local port
            per destination (IPv4-mapped hosts unmapped): ``connect()`` needs a free
            one per destination.
        close_wait: the CLOSE_WAIT sockets: the peer closed, the program has not.
        close_wait_received: seconds since each CLOSE_WAIT socket last received a
            segment, by cookie (sock_diag's ``tcp_info``; empty from ``/proc``): how
            long it has been in CLOSE_WAIT at least.
        sysctls: the sysctls read (ephemeral range, ``tcp_max_tw_buckets``).
        counters: the kernel's counters (TIME_WAIT in use, ``TCPTimeWaitOverflow``).
    """

    source: str
    taken: float
    total: int
    by_state: Mapping[TcpState, int]
    listening_ports: frozenset[int]
    time_wait: TimeWaitSummary
    ephemeral_by_destination: Mapping[Address, int]
    close_wait: tuple[KernelState, ...]
    sysctls: Sysctls = field(default_factory=Sysctls)
    close_wait_received: Mapping[int, float] = field(default_factory=lambda: MappingProxyType({}))
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
        close_wait_received: Mapping[int, float] | None = None,
    ) -> HostView:
        """Sort ``entries`` (a dump). Pure."""
        # (plain dicts and per-port answers while counting: a table can hold 100,000
        # sockets, and a frozen value per socket would cost more than the dump)
        by_state: dict[TcpState, int] = {}
        ephemeral: dict[Address, int] = {}
        close_wait: list[KernelState] = []
        time_wait_entries: list[KernelState] = []
        listening = frozenset(listening_ports)
        outgoing_port: dict[int, bool] = {}
        time_wait, listen, closing_wait = TcpState.TIME_WAIT, TcpState.LISTEN, TcpState.CLOSE_WAIT
        range_known = sysctls.ip_local_port_range is not None
        total = 0
        for entry in entries:
            total += 1
            state = entry.state
            by_state[state] = by_state.get(state, 0) + 1
            if state is time_wait:
                time_wait_entries.append(entry)
            elif state is closing_wait:
                close_wait.append(entry)
            local, peer = entry.local, entry.peer
            if not range_known or local is None or peer is None or state is listen:
                continue
            port = local[1]
            outgoing = outgoing_port.get(port)
            if outgoing is None:
                outgoing = outgoing_port[port] = side_of(port, listening, sysctls) == "outgoing"
            if outgoing and peer[1] != 0:
                if ":" in peer[0]:
                    peer = (unmap_host(peer[0]), peer[1])
                ephemeral[peer] = ephemeral.get(peer, 0) + 1
        return cls(
            source=source,
            taken=taken,
            total=total,
            by_state=_sorted(by_state),  # type: ignore[arg-type]
            listening_ports=listening,
            time_wait=summarize_time_wait(
                time_wait_entries, listening_ports=listening, sysctls=sysctls
            ),
            ephemeral_by_destination=_sorted(ephemeral),  # type: ignore[arg-type]
            close_wait=tuple(close_wait),
            sysctls=sysctls,
            counters=counters,
            close_wait_received=MappingProxyType(dict(close_wait_received or {})),
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
    received: dict[int, float] = {}
    if any(e.state is TcpState.CLOSE_WAIT for e in entries):  # how old: a second, small dump
        received = _kernel.received_ages([TcpState.CLOSE_WAIT], port)
    return HostView.build(
        entries,
        listening_ports=listening_ports,
        sysctls=sysctls if sysctls is not None else read_sysctls(),
        counters=read_counters(),
        source=_kernel.backend(),
        taken=time.monotonic(),
        close_wait_received=received,
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
