"""Counting sockets: how many in each state, and where the TIME_WAIT pile up. Pure."""

from __future__ import annotations

import operator
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ._types import Address, KernelState, Source, TcpState

__all__ = ("Summary",)


def _frozen(counter: Counter[TcpState] | Counter[int] | Counter[Address]) -> Mapping[object, int]:
    return MappingProxyType(dict(counter.most_common()))


def _by_count(
    counts: Mapping[TcpState, int] | Mapping[int, int] | Mapping[Address, int],
) -> Mapping[object, int]:
    """Read-only, largest count first (ties in their first-seen order, as
    ``Counter.most_common``)."""
    return MappingProxyType(dict(sorted(counts.items(), key=_count_of, reverse=True)))


_count_of = operator.itemgetter(1)


@dataclass(frozen=True, slots=True)
class Summary:
    """Socket counts from one :func:`dump`.

    Mappings are read-only and ordered from the largest count down.

    Attributes:
        source: which kernel view answered (``"netlink"``, ``"procfs"``,
            ``"unsupported"``: then every count is 0).
        total: sockets counted.
        by_state: count per state (states with no socket are absent).
        time_wait_by_local_port: TIME_WAIT count per local port: a server that closes
            first piles them on its listening port.
        time_wait_by_destination: TIME_WAIT count per peer ``(host, port)``: a client
            that closes first uses one ephemeral port per entry towards that
            destination, and runs out at the size of ``ip_local_port_range``.
    """

    source: Source
    total: int
    by_state: Mapping[TcpState, int]
    time_wait_by_local_port: Mapping[int, int]
    time_wait_by_destination: Mapping[Address, int]

    @classmethod
    def from_states(cls, states: Iterable[KernelState], source: Source) -> Summary:
        """Count ``states`` (e.g. the output of :func:`dump`)."""
        by_state: Counter[TcpState] = Counter()
        by_port: Counter[int] = Counter()
        by_destination: Counter[Address] = Counter()
        total = 0
        time_wait = TcpState.TIME_WAIT
        for entry in states:
            total += 1
            by_state[entry.state] += 1
            if entry.state is time_wait:
                if entry.local is not None:
                    by_port[entry.local[1]] += 1
                if entry.peer is not None:
                    by_destination[entry.peer] += 1
        return cls(
            source,
            total,
            _frozen(by_state),  # type: ignore[arg-type]
            _frozen(by_port),  # type: ignore[arg-type]
            _frozen(by_destination),  # type: ignore[arg-type]
        )

    @classmethod
    def from_counts(
        cls,
        source: Source,
        by_state: Mapping[TcpState, int],
        time_wait_by_local_port: Mapping[int, int],
        time_wait_by_destination: Mapping[Address, int],
    ) -> Summary:
        """A summary of counts made elsewhere (the netlink view counts a dump without
        decoding each socket): positive counts only; ``total`` is the sum of
        ``by_state``."""
        return cls(
            source,
            sum(by_state.values()),
            _by_count(by_state),  # type: ignore[arg-type]
            _by_count(time_wait_by_local_port),  # type: ignore[arg-type]
            _by_count(time_wait_by_destination),  # type: ignore[arg-type]
        )

    def count(self, state: TcpState) -> int:
        """Sockets in ``state`` (0 when none)."""
        return self.by_state.get(state, 0)

    def as_dict(self, top: int = 10) -> dict[str, object]:
        """JSON-ready mapping; the per-port and per-destination maps keep their
        ``top`` largest entries."""
        return {
            "source": self.source,
            "total": self.total,
            "by_state": {state.name: n for state, n in self.by_state.items()},
            "time_wait_by_local_port": {
                str(port): n for port, n in list(self.time_wait_by_local_port.items())[:top]
            },
            "time_wait_by_destination": [
                {"host": host, "port": port, "count": n}
                for (host, port), n in list(self.time_wait_by_destination.items())[:top]
            ],
        }

    def __str__(self) -> str:
        parts = [f"{state.name} {n}" for state, n in self.by_state.items()]
        return f"{self.total} TCP sockets" + (": " + ", ".join(parts) if parts else "")
