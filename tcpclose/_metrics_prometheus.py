"""Prometheus: an ``on_close`` sink and a host collector for ``prometheus_client``.

Both are ``prometheus_client`` collectors: the registry asks them for their metric
families on each scrape, so nothing but a tally update (:mod:`tcpclose._metrics`)
happens per close, and the host's socket table is read only when scraped.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from ._kernel._address import format_address
from ._metrics import DURATION_BUCKETS, CloseTally, KeyTotals

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric
    from prometheus_client.registry import CollectorRegistry

__all__ = ("PrometheusHostCollector", "PrometheusSink")


def _require() -> None:
    try:
        import prometheus_client  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the extra is installed in tests
        raise ImportError(
            "tcpclose.metrics.PrometheusSink needs prometheus_client: "
            "pip install 'tcpclose[metrics]'"
        ) from exc


def _default_registry() -> CollectorRegistry:
    from prometheus_client import REGISTRY

    return REGISTRY


def _sum(rows: Iterable[KeyTotals], attribute: str) -> int:
    return sum(getattr(row, attribute) for row in rows)


class PrometheusSink(CloseTally):
    """An ``on_close`` callable that counts closes for Prometheus.

    Registered on ``registry`` as a collector; on each scrape it exposes (with the
    default ``namespace="tcpclose"``):

    ==========================================  ==================  =====================
    metric                                      labels              what
    ==========================================  ==================  =====================
    ``tcpclose_closes_total``                   mode, outcome       closes
    ``tcpclose_close_duration_seconds``         mode, outcome       histogram of duration
    ``tcpclose_close_kernel_state_total``       mode, state         kernel state after
    ``tcpclose_fallbacks_total``                mode, fallback      peer-first fallbacks
    ``tcpclose_resets_sent_total``              mode                closes that sent RST
    ``tcpclose_drained_bytes_total``            mode                read and discarded
    ``tcpclose_discarded_bytes_total``          mode                ours, thrown away
    ``tcpclose_time_wait_skipped_total``        mode                table full: no TW
    ``tcpclose_close_errors_total``             error               errno that ended one
    ``tcpclose_warnings_total``                 code                warnings issued
    ==========================================  ==================  =====================

    ``mode`` is the policy's mode (``peer-first`` also when a fallback ran: the
    fallbacks counter says which), ``state`` the :class:`~tcpclose.TcpState` name
    (``UNKNOWN`` when reports were off). No label names a peer.

    Args:
        registry: where to register (default ``prometheus_client.REGISTRY``).
        namespace: the metric names' prefix.
        buckets: the duration histogram's upper bounds, seconds.

    Example::

        from prometheus_client import start_http_server
        from tcpclose.metrics import PrometheusSink, PrometheusHostCollector

        sink = PrometheusSink()
        PrometheusHostCollector().register()
        start_http_server(9464)
        server = await tcpclose.aio.start_server(handle, "0.0.0.0", 8080, on_close=sink)
    """

    __slots__ = ("namespace",)

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        namespace: str = "tcpclose",
        buckets: Iterable[float] = DURATION_BUCKETS,
    ) -> None:
        _require()
        super().__init__(buckets)
        self.namespace = namespace
        (registry if registry is not None else _default_registry()).register(self)

    def describe(self) -> list[Metric]:
        """No description in advance: collected on each scrape."""
        return []

    def collect(self) -> Iterator[Metric]:
        """The metric families, from a snapshot of the tally (called by the registry)."""
        from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

        snap = self.snapshot()
        ns = self.namespace

        closes = CounterMetricFamily(
            f"{ns}_closes", "TCP closes by policy mode and outcome", labels=["mode", "outcome"]
        )
        duration = HistogramMetricFamily(
            f"{ns}_close_duration_seconds",
            "Time a close took, from the policy's start to the fd's release",
            labels=["mode", "outcome"],
            unit="seconds",
        )
        bounds = [*(repr(b) for b in snap.bounds), "+Inf"]
        for (mode, outcome), rows in sorted(snap.group("mode", "outcome").items()):
            closes.add_metric([mode, outcome], _sum(rows, "closes"))
            cumulative = [sum(row.buckets[i] for row in rows) for i in range(len(bounds))]
            duration.add_metric(
                [mode, outcome],
                list(zip(bounds, cumulative, strict=True)),
                sum(row.seconds for row in rows),
            )
        yield closes
        yield duration

        states = CounterMetricFamily(
            f"{ns}_close_kernel_state",
            "Closes by the kernel state of the connection just after the close",
            labels=["mode", "state"],
        )
        for (mode, state), rows in sorted(snap.group("mode", "state").items()):
            states.add_metric([mode, state], _sum(rows, "closes"))
        yield states

        fallbacks = CounterMetricFamily(
            f"{ns}_fallbacks",
            "peer-first closes that took their fallback",
            labels=["mode", "fallback"],
        )
        for (mode, fallback), rows in sorted(snap.group("mode", "fallback").items()):
            if fallback:
                fallbacks.add_metric([mode, fallback], _sum(rows, "closes"))
        yield fallbacks

        per_mode = sorted(snap.group("mode").items())
        for name, attribute, text in (
            ("resets_sent", "resets_sent", "Closes that sent RST"),
            ("drained_bytes", "drained_bytes", "Bytes read and discarded waiting for the peer"),
            ("discarded_bytes", "discarded_bytes", "Bytes of ours thrown away by aborts"),
            (
                "time_wait_skipped",
                "time_wait_skipped",
                "Closes whose TIME_WAIT the kernel "
                "skipped because its table was full (tcp_max_tw_buckets)",
            ),
        ):
            family = CounterMetricFamily(f"{ns}_{name}", text, labels=["mode"])
            for (mode,), rows in per_mode:
                family.add_metric([mode], _sum(rows, attribute))
            yield family

        errors = CounterMetricFamily(
            f"{ns}_close_errors", "Closes ended early by an error, by errno", labels=["error"]
        )
        for (error,), rows in sorted(snap.group("error").items()):
            if error:
                errors.add_metric([error], _sum(rows, "closes"))
        yield errors

        warned = CounterMetricFamily(
            f"{ns}_warnings", "Warnings issued by closes, by code", labels=["code"]
        )
        for code, count in sorted(snap.warnings.items()):
            warned.add_metric([code], count)
        yield warned


class PrometheusHostCollector:
    """Host gauges read from the kernel's socket table on each scrape.

    ==================================================  ================  ================
    metric                                              labels            what
    ==================================================  ================  ================
    ``tcpclose_host_time_wait_sockets``                 side              TIME_WAIT now
    ``tcpclose_host_listener_time_wait_sockets``        port              ... per listener
    ``tcpclose_host_ephemeral_ports_used``              destination       ports held
    ``tcpclose_host_ephemeral_ports``                                     range size
    ``tcpclose_host_time_wait_table_sockets``                             kernel's count
    ``tcpclose_host_time_wait_table_limit``                               max_tw_buckets
    ``tcpclose_host_time_wait_overflows_total``                           TW skipped
    ``tcpclose_host_close_wait_sockets``                                  CLOSE_WAIT now
    ==================================================  ================  ================

    ``side`` is ``accepted`` (a server closed first on its listening port),
    ``outgoing`` (a client of this host closed first) or ``bound`` (a port bound on
    purpose, no listener). Per-port and per-destination series keep the ``top``
    largest, so the series count stays bounded on a busy host.

    Args:
        top: series kept for the per-port and per-destination gauges.
        port: only the sockets whose local or peer port is ``port`` (one service's);
            the TIME_WAIT table's figures stay the host's.
        namespace: the metric names' prefix.
    """

    def __init__(
        self, *, top: int = 10, port: int | None = None, namespace: str = "tcpclose"
    ) -> None:
        _require()
        if top < 1:
            raise ValueError(f"top: expected at least 1, got {top}")
        self.top = top
        self.port = port
        self.namespace = namespace

    def register(self, registry: CollectorRegistry | None = None) -> PrometheusHostCollector:
        """Register on ``registry`` (default ``prometheus_client.REGISTRY``); returns self."""
        (registry if registry is not None else _default_registry()).register(self)
        return self

    def describe(self) -> list[Metric]:
        """No description in advance: the kernel is read on each scrape only."""
        return []

    def collect(self) -> Iterator[Metric]:
        """Read the socket table and yield the gauges (called by the registry)."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        from ._hostview import collect_host_view

        view = collect_host_view(port=self.port)
        ns = f"{self.namespace}_host"
        sides = GaugeMetricFamily(
            f"{ns}_time_wait_sockets", "TIME_WAIT sockets by who closed first", labels=["side"]
        )
        for side, count in view.time_wait.by_side.items():
            sides.add_metric([side], count)
        yield sides
        listeners = GaugeMetricFamily(
            f"{ns}_listener_time_wait_sockets",
            "TIME_WAIT on a listening port: the server closed first",
            labels=["port"],
        )
        for port, timers in list(view.time_wait.accepted_by_port.items())[: self.top]:
            listeners.add_metric([str(port)], timers.count)
        yield listeners
        used = GaugeMetricFamily(
            f"{ns}_ephemeral_ports_used",
            "Sockets holding an ephemeral local port, per destination",
            labels=["destination"],
        )
        for destination, count in list(view.ephemeral_by_destination.items())[: self.top]:
            used.add_metric([format_address(destination)], count)
        yield used
        if view.sysctls.ephemeral_ports is not None:
            yield GaugeMetricFamily(
                f"{ns}_ephemeral_ports",
                "Ports connect() can pick per destination (ip_local_port_range less reserved)",
                value=view.sysctls.ephemeral_ports,
            )
        if view.counters.time_wait is not None:
            yield GaugeMetricFamily(
                f"{ns}_time_wait_table_sockets",
                "TIME_WAIT sockets the kernel holds (/proc/net/sockstat)",
                value=view.counters.time_wait,
            )
        if view.sysctls.tcp_max_tw_buckets is not None:
            yield GaugeMetricFamily(
                f"{ns}_time_wait_table_limit",
                "net.ipv4.tcp_max_tw_buckets: past it the kernel skips TIME_WAIT",
                value=view.sysctls.tcp_max_tw_buckets,
            )
        if view.counters.time_wait_overflows is not None:
            yield CounterMetricFamily(
                f"{ns}_time_wait_overflows",
                "Closes whose TIME_WAIT the kernel skipped, table full (TCPTimeWaitOverflow)",
                value=view.counters.time_wait_overflows,
            )
        yield GaugeMetricFamily(
            f"{ns}_close_wait_sockets",
            "CLOSE_WAIT sockets: the peer closed, the program has not",
            value=len(view.close_wait),
        )
