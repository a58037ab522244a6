"""Counting closes for metrics engines: one tally, read by each exporter on collection.

A report is counted by :class:`CloseTally`: what counts is copied into a small tuple,
and the tuples are added up 32 at a time under one lock. The Prometheus and
OpenTelemetry sinks turn a :class:`TallySnapshot` into their own metric families when
their engine collects. Updating the engines' own instruments on every close costs ten to
thirty times as much (``benchmarks/bench_metrics.py`` measures both).

Pure: no I/O, no engine imported here.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from ._kernel._types import TcpState
from ._policy import DEFAULT_LINGER_TIME

if TYPE_CHECKING:
    from ._report import CloseReport

__all__ = (
    "DURATION_BUCKETS",
    "CloseKey",
    "CloseTally",
    "KeyTotals",
    "TallySnapshot",
    "network_type",
    "semconv_state",
    "tee",
)

#: Upper bounds (seconds) of the close-duration histogram's buckets: from a plain
#: close (microseconds) to the default ``linger_time`` bound.
DURATION_BUCKETS: Final = (
    0.0001,
    0.0005,
    0.001,
    0.005,
    0.01,
    0.05,
    0.1,
    0.5,
    1.0,
    5.0,
    10.0,
    DEFAULT_LINGER_TIME,
)

#: What a close is counted by: ``(mode asked, fallback taken or "", outcome, kernel
#: state after the close, error or "", network type)``. Strings, ready as label values.
CloseKey = tuple[str, str, str, str, str, str]

# What the tally keys on per close: the same fields as enums, None and a bool.
_RawKey = tuple[Any, Any, Any, Any, "str | None", "bool | None"]


def _label_key(raw: _RawKey) -> CloseKey:
    mode, fallback, outcome, state, error, ipv6 = raw
    return (
        mode.value,
        "" if fallback is None else fallback.value,
        outcome.value,
        "UNKNOWN" if state is None else state.name,
        error or "",
        "" if ipv6 is None else ("ipv6" if ipv6 else "ipv4"),
    )


#: Closes queued before they are counted: the close that fills the batch counts it
#: (20 to 40 us for 32 in the benchmark), and no more than this many small tuples wait.
_BATCH: Final = 32

# Fields of a queued close: the key's six, then what is added up.
_KEY_FIELDS = 6
_DURATION, _RST_SENT, _DRAINED_BYTES, _DISCARDED_BYTES, _TW_SKIPPED, _WARNINGS = range(6, 12)

# Slots of a key's running totals (a list: updated in place under the lock).
_CLOSES, _RESETS, _DRAINED, _DISCARDED, _SKIPPED, _SECONDS, _BUCKETS = range(7)


@dataclass(frozen=True, slots=True)
class KeyTotals:
    """Running totals of the closes that share one :data:`CloseKey`.

    Attributes:
        closes: closes counted.
        resets_sent: closes that sent RST.
        drained_bytes: bytes read and discarded while waiting for the peer's FIN.
        discarded_bytes: bytes of ours thrown away by aborts.
        time_wait_skipped: closes whose TIME_WAIT the kernel skipped (table full).
        seconds: the durations' sum.
        buckets: per bound of :data:`DURATION_BUCKETS`, closes that took at most that
            long (cumulative, as Prometheus and OpenTelemetry histograms count), then
            the count of all (``+Inf``).
    """

    closes: int
    resets_sent: int
    drained_bytes: int
    discarded_bytes: int
    time_wait_skipped: int
    seconds: float
    buckets: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TallySnapshot:
    """A consistent copy of a :class:`CloseTally` (read-only mappings).

    Attributes:
        by_key: totals per :data:`CloseKey`.
        warnings: warnings issued per code.
        bounds: the duration histogram's bucket bounds.
    """

    by_key: Mapping[CloseKey, KeyTotals]
    warnings: Mapping[str, int]
    bounds: tuple[float, ...]

    def total(self, **match: str) -> int:
        """Closes whose key matches every given field (``mode``, ``fallback``,
        ``outcome``, ``state``, ``error``, ``network``).

        >>> TallySnapshot({}, {}, DURATION_BUCKETS).total(mode="graceful")
        0
        """
        index = {name: _FIELDS.index(name) for name in match}
        return sum(
            totals.closes
            for key, totals in self.by_key.items()
            if all(key[index[name]] == value for name, value in match.items())
        )

    def group(self, *fields: str) -> dict[tuple[str, ...], list[KeyTotals]]:
        """The totals grouped by some of the key's fields (an exporter's label set)."""
        index = [_FIELDS.index(name) for name in fields]
        groups: dict[tuple[str, ...], list[KeyTotals]] = {}
        for key, totals in self.by_key.items():
            groups.setdefault(tuple(key[i] for i in index), []).append(totals)
        return groups


_FIELDS: Final = ("mode", "fallback", "outcome", "state", "error", "network")


class CloseTally:
    """Counts closes by mode, fallback, outcome, kernel state, error and network type.

    Call it with each :class:`~tcpclose.CloseReport` (it is an ``on_close`` callable);
    read it with :meth:`snapshot`. Safe to call from several threads at once.

    Args:
        buckets: the duration histogram's upper bounds in seconds, ascending.
    """

    __slots__ = ("_also", "_bounds", "_by_key", "_lock", "_pending", "_warnings", "_width")

    def __init__(self, buckets: Iterable[float] = DURATION_BUCKETS) -> None:
        bounds = tuple(float(b) for b in buckets)
        if not bounds or list(bounds) != sorted(set(bounds)):
            raise ValueError(f"buckets: expected ascending distinct bounds, got {bounds!r}")
        self._bounds = bounds
        self._width = _BUCKETS + len(bounds) + 1
        self._by_key: dict[_RawKey, list[float]] = {}
        self._warnings: dict[str, int] = {}
        self._lock = threading.Lock()
        self._pending: deque[tuple[Any, ...]] = deque()
        #: Called with each report after it is counted (a subclass's extra step).
        self._also: Callable[[CloseReport], object] | None = None

    @property
    def bounds(self) -> tuple[float, ...]:
        """The duration histogram's bucket bounds."""
        return self._bounds

    def __call__(self, report: CloseReport) -> None:
        """Count one close."""
        # What is counted is copied out while the report is fresh in the CPU's caches,
        # and counted _BATCH at a time: one at a time, between an event loop's other
        # work, the counting ran with cold caches and cost about 1 us more per close
        # (benchmarks/bench_metrics.py). The key holds the enums themselves: their
        # ``.value``/``.name`` cost about 0.1 us each, so they are read on collection.
        kernel_state = report.kernel_state
        local = report.local
        pending = self._pending
        pending.append(  # (deque.append is atomic: threads may append at once)
            (
                report.policy.mode,
                report.fallback,
                report.outcome,
                None if kernel_state is None else kernel_state.state,
                report.error,
                None if local is None else ":" in local[0],
                report.duration,
                report.rst_sent,
                report.drained_bytes,
                report.discarded_bytes,
                report.time_wait_skipped,
                report.warnings,
            )
        )
        if len(pending) >= _BATCH:
            self._count_pending()
        if self._also is not None:
            self._also(report)

    def _count_pending(self) -> None:
        """Count the queued closes (under the lock: one thread counts at a time)."""
        pending = self._pending
        popleft = pending.popleft
        bounds = self._bounds
        by_key = self._by_key
        width = self._width
        with self._lock:
            while pending:
                entry = popleft()
                key = entry[:_KEY_FIELDS]
                totals = by_key.get(key)
                if totals is None:
                    totals = by_key[key] = [0] * width
                duration = entry[_DURATION]
                totals[_CLOSES] += 1
                totals[_SECONDS] += duration
                # (the bucket the duration falls in; made cumulative on read)
                totals[_BUCKETS + bisect_left(bounds, duration)] += 1
                if entry[_RST_SENT]:
                    totals[_RESETS] += 1
                if entry[_DRAINED_BYTES]:
                    totals[_DRAINED] += entry[_DRAINED_BYTES]
                if entry[_DISCARDED_BYTES]:
                    totals[_DISCARDED] += entry[_DISCARDED_BYTES]
                if entry[_TW_SKIPPED]:
                    totals[_SKIPPED] += 1
                for code in entry[_WARNINGS]:
                    self._warnings[code] = self._warnings.get(code, 0) + 1

    def snapshot(self) -> TallySnapshot:
        """A consistent copy of the counts so far."""
        self._count_pending()
        with self._lock:
            rows = [(key, list(totals)) for key, totals in self._by_key.items()]
            warnings = dict(self._warnings)
        by_key: dict[CloseKey, KeyTotals] = {}
        for raw, totals in rows:
            key = _label_key(raw)
            running = 0
            cumulative: list[int] = []
            for count in totals[_BUCKETS:]:
                running += int(count)
                cumulative.append(running)
            by_key[key] = KeyTotals(
                closes=int(totals[_CLOSES]),
                resets_sent=int(totals[_RESETS]),
                drained_bytes=int(totals[_DRAINED]),
                discarded_bytes=int(totals[_DISCARDED]),
                time_wait_skipped=int(totals[_SKIPPED]),
                seconds=float(totals[_SECONDS]),
                buckets=tuple(cumulative),
            )
        return TallySnapshot(MappingProxyType(by_key), MappingProxyType(warnings), self._bounds)


def tee(*sinks: Callable[[CloseReport], object]) -> Callable[[CloseReport], None]:
    """One ``on_close`` callable that calls each of ``sinks`` in turn.

    An exception in one sink does not keep the others from the report: each is
    called, then the first exception is raised again (the server's ``on_close``
    handling logs it).

    Example::

        on_close = tcpclose.metrics.tee(PrometheusSink(), LogSink(sample=0.01), my_hook)
    """
    chosen = tuple(sinks)
    for sink in chosen:
        if not callable(sink):
            raise TypeError(f"tee: expected callables, got {type(sink).__qualname__}")

    def call_each(report: CloseReport) -> None:
        first: BaseException | None = None
        for sink in chosen:
            try:
                sink(report)
            except Exception as exc:
                if first is None:
                    first = exc
        if first is not None:
            raise first

    return call_each


#: OpenTelemetry's ``network.connection.state`` values, by kernel state (semantic
#: conventions, "network" attributes). States it has no value for are absent.
_SEMCONV_STATES: Final = MappingProxyType(
    {
        TcpState.CLOSED.name: "closed",
        TcpState.CLOSE.name: "closed",
        TcpState.CLOSE_WAIT.name: "close_wait",
        TcpState.CLOSING.name: "closing",
        TcpState.ESTABLISHED.name: "established",
        TcpState.FIN_WAIT1.name: "fin_wait_1",
        TcpState.FIN_WAIT2.name: "fin_wait_2",
        TcpState.LAST_ACK.name: "last_ack",
        TcpState.LISTEN.name: "listen",
        TcpState.SYN_RECV.name: "syn_received",
        TcpState.NEW_SYN_RECV.name: "syn_received",
        TcpState.SYN_SENT.name: "syn_sent",
        TcpState.TIME_WAIT.name: "time_wait",
    }
)


def semconv_state(state_name: str) -> str | None:
    """``network.connection.state`` for a :class:`~tcpclose.TcpState` name, or None
    (``UNKNOWN``: not looked up).

    >>> semconv_state("TIME_WAIT"), semconv_state("FIN_WAIT2"), semconv_state("UNKNOWN")
    ('time_wait', 'fin_wait_2', None)
    """
    return _SEMCONV_STATES.get(state_name)


def network_type(host: str) -> str:
    """``network.type``: ``"ipv6"`` when ``host`` is an IPv6 address (IPv4-mapped ones
    included: the socket is IPv6), else ``"ipv4"``.

    >>> network_type("::1"), network_type("10.0.0.5")
    ('ipv6', 'ipv4')
    """
    return "ipv6" if ":" in host else "ipv4"
