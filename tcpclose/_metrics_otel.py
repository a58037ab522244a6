"""OpenTelemetry: an ``on_close`` sink and host gauges through the metrics API.

Counts are asynchronous instruments (``ObservableCounter``, ``ObservableGauge``) whose
callbacks read the tally (:mod:`tcpclose._metrics`) or the kernel when the SDK
collects: the OpenTelemetry API offers this for values aggregated elsewhere, and it
keeps the per-close cost to the tally's. The duration histogram is the exception: the
API has no asynchronous histogram, so it is recorded per close, and only when asked
(``histogram=True``), at the SDK's cost per ``record()`` (``benchmarks/bench_metrics.py``).

Attributes follow OpenTelemetry's semantic conventions where one exists:
``network.transport`` (``tcp``), ``network.type`` (``ipv4``/``ipv6``),
``network.connection.state`` (the kernel state after the close, e.g. ``time_wait``),
``error.type`` (the errno name that ended a close early); the rest are in the
``tcpclose.`` namespace.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._metrics import (
    DURATION_BUCKETS,
    CloseKey,
    CloseTally,
    KeyTotals,
    TallySnapshot,
    semconv_state,
)
from ._version import __version__

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, Histogram, MeterProvider, Observation

    from ._report import CloseReport

__all__ = ("OpenTelemetrySink", "register_host_gauges")

_SCOPE = "tcpclose"


def _meter_provider(provider: MeterProvider | None) -> MeterProvider:
    try:
        from opentelemetry import metrics
    except ImportError as exc:  # pragma: no cover - the extra is installed in tests
        raise ImportError(
            "tcpclose.metrics.OpenTelemetrySink needs opentelemetry-api: "
            "pip install 'tcpclose[metrics]'"
        ) from exc
    return provider if provider is not None else metrics.get_meter_provider()


def _attributes(key: CloseKey, fields: Iterable[str]) -> dict[str, str]:
    """The OpenTelemetry attributes of a tally key, keeping ``fields`` of it."""
    mode, fallback, outcome, state, error, network = key
    wanted = set(fields)
    out = {"network.transport": "tcp"}
    if network and "network" in wanted:
        out["network.type"] = network
    if "mode" in wanted:
        out["tcpclose.close.mode"] = mode
    if fallback and "fallback" in wanted:
        out["tcpclose.close.fallback"] = fallback
    if "outcome" in wanted:
        out["tcpclose.close.outcome"] = outcome
    if "state" in wanted:
        semconv = semconv_state(state)
        if semconv is not None:
            out["network.connection.state"] = semconv
        out["tcpclose.close.state"] = state
    if error and "error" in wanted:
        out["error.type"] = error
    return out


_ALL = ("mode", "fallback", "outcome", "state", "error", "network")
_PER_MODE = ("mode", "network")


class OpenTelemetrySink(CloseTally):
    """An ``on_close`` callable that counts closes through the OpenTelemetry metrics API.

    Instruments (meter ``tcpclose``):

    ==================================  ===============  =====  ==========================
    instrument                          kind             unit   attributes
    ==================================  ===============  =====  ==========================
    ``tcpclose.closes``                 ObservableCtr    close  mode, fallback, outcome,
                                                                state, error, network
    ``tcpclose.close.time``             ObservableCtr    s      the same (durations' sum)
    ``tcpclose.close.resets_sent``      ObservableCtr    close  mode, network
    ``tcpclose.close.drained``          ObservableCtr    By     mode, network
    ``tcpclose.close.discarded``        ObservableCtr    By     mode, network
    ``tcpclose.close.time_wait_skipped`` ObservableCtr   close  mode, network
    ``tcpclose.warnings``               ObservableCtr    warn.  ``tcpclose.warning.code``
    ``tcpclose.close.duration``         Histogram        s      as ``tcpclose.closes``;
                                                                only with histogram=True
    ==================================  ===============  =====  ==========================

    Attribute names: ``tcpclose.close.mode``, ``tcpclose.close.fallback``,
    ``tcpclose.close.outcome``, ``network.connection.state`` (semantic conventions'
    values; ``tcpclose.close.state`` has the kernel's name), ``error.type``,
    ``network.transport`` and ``network.type``.

    Args:
        meter_provider: default the global one (``opentelemetry.metrics``).
        histogram: also record ``tcpclose.close.duration`` per close. The API has no
            asynchronous histogram, so each close then pays for a ``record()`` (about
            ten times the rest of the counting path with the SDK); the mean duration is
            ``tcpclose.close.time`` over ``tcpclose.closes`` without it.
        buckets: the histogram's advised bucket bounds, seconds.

    Example::

        from tcpclose.metrics import OpenTelemetrySink, register_host_gauges

        sink = OpenTelemetrySink()          # after the SDK's MeterProvider is set
        register_host_gauges()
        server = await tcpclose.aio.start_server(handle, "0.0.0.0", 8080, on_close=sink)
    """

    __slots__ = ("_attribute_cache", "_histogram")

    def __init__(
        self,
        meter_provider: MeterProvider | None = None,
        *,
        histogram: bool = False,
        buckets: Iterable[float] = DURATION_BUCKETS,
    ) -> None:
        super().__init__(buckets)
        meter = _meter_provider(meter_provider).get_meter(_SCOPE, __version__)
        self._attribute_cache: dict[tuple[CloseKey, tuple[str, ...]], dict[str, str]] = {}
        self._histogram: Histogram | None = None
        if histogram:
            self._histogram = meter.create_histogram(
                "tcpclose.close.duration",
                unit="s",
                description="Time a close took, from the policy's start to the fd's release",
                explicit_bucket_boundaries_advisory=list(self.bounds),
            )
            self._also = self._record_duration
        per_close = _ALL
        for name, unit, text, attribute, fields in (
            ("tcpclose.closes", "{close}", "TCP closes", "closes", per_close),
            ("tcpclose.close.time", "s", "Time spent closing (sum)", "seconds", per_close),
            (
                "tcpclose.close.resets_sent",
                "{close}",
                "Closes that sent RST",
                "resets_sent",
                _PER_MODE,
            ),
            (
                "tcpclose.close.drained",
                "By",
                "Bytes read and discarded waiting for the peer",
                "drained_bytes",
                _PER_MODE,
            ),
            (
                "tcpclose.close.discarded",
                "By",
                "Bytes of ours thrown away by aborts",
                "discarded_bytes",
                _PER_MODE,
            ),
            (
                "tcpclose.close.time_wait_skipped",
                "{close}",
                "Closes whose TIME_WAIT the kernel skipped (tcp_max_tw_buckets reached)",
                "time_wait_skipped",
                _PER_MODE,
            ),
        ):
            meter.create_observable_counter(
                name,
                callbacks=[self._observer(attribute, fields)],
                unit=unit,
                description=text,
            )
        meter.create_observable_counter(
            "tcpclose.warnings",
            callbacks=[self._observe_warnings],
            unit="{warning}",
            description="Warnings issued by closes, by code",
        )

    def _record_duration(self, report: CloseReport) -> None:
        assert self._histogram is not None
        self._histogram.record(report.duration, self._attrs(_key_of(report), _ALL))

    def _attrs(self, key: CloseKey, fields: tuple[str, ...]) -> dict[str, str]:
        cached = self._attribute_cache.get((key, fields))
        if cached is None:
            cached = self._attribute_cache[(key, fields)] = _attributes(key, fields)
        return cached

    def _observer(
        self, attribute: str, fields: tuple[str, ...]
    ) -> Any:  # a callback as the API types it
        from opentelemetry.metrics import Observation

        def observe(options: CallbackOptions) -> Iterator[Observation]:
            snap: TallySnapshot = self.snapshot()
            sums: dict[tuple[tuple[str, str], ...], float] = {}
            for key, totals in snap.by_key.items():
                attrs = self._attrs(key, fields)
                group = tuple(sorted(attrs.items()))
                sums[group] = sums.get(group, 0) + _value(totals, attribute)
            for group, value in sums.items():
                yield Observation(value, dict(group))

        return observe

    def _observe_warnings(self, options: CallbackOptions) -> Iterator[Observation]:
        from opentelemetry.metrics import Observation

        for code, count in self.snapshot().warnings.items():
            yield Observation(count, {"tcpclose.warning.code": code})


def _value(totals: KeyTotals, attribute: str) -> float:
    value: float = getattr(totals, attribute)
    return value


def _key_of(report: CloseReport) -> CloseKey:
    kernel_state = report.kernel_state
    local = report.local
    return (
        report.policy.mode.value,
        "" if report.fallback is None else report.fallback.value,
        report.outcome.value,
        "UNKNOWN" if kernel_state is None else kernel_state.state.name,
        report.error or "",
        "" if local is None else ("ipv6" if ":" in local[0] else "ipv4"),
    )


def register_host_gauges(
    meter_provider: MeterProvider | None = None, *, top: int = 10, port: int | None = None
) -> None:
    """Observable gauges of the host's socket table, read when the SDK collects.

    ``tcpclose.host.time_wait`` (attribute ``tcpclose.side``: ``accepted``,
    ``outgoing``, ``bound``), ``tcpclose.host.listener.time_wait``
    (``server.port``), ``tcpclose.host.ephemeral_ports.used`` (``server.address``,
    ``server.port``: the ``top`` largest destinations), ``tcpclose.host.ephemeral_ports``,
    ``tcpclose.host.time_wait_table.used`` and ``.limit``, ``tcpclose.host.close_wait``
    and, as an observable counter, ``tcpclose.host.time_wait_table.overflows``. One read
    of the kernel serves every gauge of a collection. ``port`` keeps only the sockets
    whose local or peer port it is (one service's); the table's figures stay the host's.
    """
    from opentelemetry.metrics import Observation

    from ._hostview import HostView, collect_host_view

    if top < 1:
        raise ValueError(f"top: expected at least 1, got {top}")
    meter = _meter_provider(meter_provider).get_meter(_SCOPE, __version__)
    latest: dict[str, HostView] = {}

    def view() -> HostView:
        # The SDK calls each callback of one collection in turn: the first reads the
        # kernel, the others reuse that look while it is fresh (one second).
        import time

        cached = latest.get("view")
        if cached is None or time.monotonic() - cached.taken > 1.0:
            cached = latest["view"] = collect_host_view(port=port)
        return cached

    def by_side(options: CallbackOptions) -> Iterator[Observation]:
        for side, count in view().time_wait.by_side.items():
            yield Observation(count, {"tcpclose.side": side, "network.transport": "tcp"})

    def by_listener(options: CallbackOptions) -> Iterator[Observation]:
        for port, timers in list(view().time_wait.accepted_by_port.items())[:top]:
            yield Observation(timers.count, {"server.port": port})

    def by_destination(options: CallbackOptions) -> Iterator[Observation]:
        for (host, port), count in list(view().ephemeral_by_destination.items())[:top]:
            yield Observation(count, {"server.address": host, "server.port": port})

    def scalar(read: Any) -> Any:
        def observe(options: CallbackOptions) -> Iterator[Observation]:
            value = read(view())
            if value is not None:
                yield Observation(value)

        return observe

    meter.create_observable_gauge(
        "tcpclose.host.time_wait",
        [by_side],
        unit="{socket}",
        description="TIME_WAIT sockets by who closed first",
    )
    meter.create_observable_gauge(
        "tcpclose.host.listener.time_wait",
        [by_listener],
        unit="{socket}",
        description="TIME_WAIT on a listening port: the server closed first",
    )
    meter.create_observable_gauge(
        "tcpclose.host.ephemeral_ports.used",
        [by_destination],
        unit="{port}",
        description="Sockets holding an ephemeral local port, per destination",
    )
    meter.create_observable_gauge(
        "tcpclose.host.ephemeral_ports",
        [scalar(lambda v: v.sysctls.ephemeral_ports)],
        unit="{port}",
        description="Ports connect() can pick per destination",
    )
    meter.create_observable_gauge(
        "tcpclose.host.time_wait_table.used",
        [scalar(lambda v: v.counters.time_wait)],
        unit="{socket}",
        description="TIME_WAIT sockets the kernel holds",
    )
    meter.create_observable_gauge(
        "tcpclose.host.time_wait_table.limit",
        [scalar(lambda v: v.sysctls.tcp_max_tw_buckets)],
        unit="{socket}",
        description="net.ipv4.tcp_max_tw_buckets",
    )
    meter.create_observable_gauge(
        "tcpclose.host.close_wait",
        [scalar(lambda v: len(v.close_wait))],
        unit="{socket}",
        description="CLOSE_WAIT sockets: the peer closed, the program has not",
    )
    meter.create_observable_counter(
        "tcpclose.host.time_wait_table.overflows",
        [scalar(lambda v: v.counters.time_wait_overflows)],
        unit="{close}",
        description="Closes whose TIME_WAIT the kernel skipped (TCPTimeWaitOverflow)",
    )
