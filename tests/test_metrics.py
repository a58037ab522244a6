"""tcpclose.metrics: Prometheus and OpenTelemetry sinks, the log sink, tee (issue 18).

Every count is read back through the engine's own test utilities (a
``CollectorRegistry``'s samples; the OpenTelemetry SDK's ``InMemoryMetricReader``) after
real closes on loopback, and must equal the closes made, by mode and outcome.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import tcpclose
import tcpclose.aio
import tcpclose.kernel
import tcpclose.metrics
from tcpclose import CloseReport, TcpState
from tcpclose.metrics import (
    LogSink,
    OpenTelemetrySink,
    PrometheusHostCollector,
    PrometheusSink,
    tee,
)
from tests._aio_support import Client, payload, run, wait_for
from tests._support import Peer, addr, listener, port_with_time_wait, tcp_pair, wait_until

prometheus_client = pytest.importorskip("prometheus_client")
otel_sdk_metrics = pytest.importorskip("opentelemetry.sdk.metrics")
otel_export = pytest.importorskip("opentelemetry.sdk.metrics.export")

pytestmark = pytest.mark.timeout(60)

#: Closes per mode in the sync tests.
N = 5


def _drain_then_close(sock: socket.socket) -> Callable[[], None]:
    def behave() -> None:
        sock.settimeout(10)
        while sock.recv(65536):
            pass
        sock.close()

    return behave


def _fill(sock: socket.socket) -> None:
    """Write until the peer's window and our send buffer are full: bytes stay queued."""
    sock.setblocking(False)
    chunk = b"x" * 65536
    try:
        for _ in range(1000):
            sock.send(chunk)
    except BlockingIOError:
        pass
    sock.setblocking(True)


def close_each_mode(n: int = N) -> Iterator[CloseReport]:
    """``n`` real closes per mode over loopback, through the sync driver."""
    with listener(socket.AF_INET) as lst:
        for _ in range(n):
            # graceful: our FIN first, the client closes once it sees it
            client, server = tcp_pair(socket.AF_INET, lst)
            peer = Peer(_drain_then_close(client))
            yield tcpclose.close(server, "graceful")
            peer.result()
            # peer-first: the client closes first
            client, server = tcp_pair(socket.AF_INET, lst)
            client.close()
            yield tcpclose.close(server, "peer-first")
            # abort: RST
            client, server = tcp_pair(socket.AF_INET, lst)
            _fill(server)
            yield tcpclose.close(server, "abort", allow_data_loss=True)
            client.close()
            # default: plain close, the client still open
            client, server = tcp_pair(socket.AF_INET, lst)
            yield tcpclose.close(server, "default")
            client.close()


def _expected(reports: list[CloseReport]) -> dict[tuple[str, str], int]:
    counts: dict[tuple[str, str], int] = {}
    for r in reports:
        key = (r.policy.mode.value, r.outcome.value)
        counts[key] = counts.get(key, 0) + 1
    return counts


# -- Prometheus -------------------------------------------------------------------------------


def test_prometheus_counts_equal_the_closes_made() -> None:
    registry = prometheus_client.CollectorRegistry()
    sink = PrometheusSink(registry)
    sample = registry.get_sample_value
    labels = {"mode": "graceful", "outcome": "peer-eof"}
    assert sample("tcpclose_closes_total", labels) is None  # nothing counted yet

    reports = list(close_each_mode())
    for report in reports:
        sink(report)

    expected = _expected(reports)
    assert expected[("graceful", "peer-eof")] == N
    assert expected[("abort", "aborted")] == N
    assert sum(expected.values()) == 4 * N
    for (mode, outcome), count in expected.items():
        labels = {"mode": mode, "outcome": outcome}
        assert sample("tcpclose_closes_total", labels) == count
        assert sample("tcpclose_close_duration_seconds_count", labels) == count
        assert sample("tcpclose_close_duration_seconds_bucket", {**labels, "le": "+Inf"}) == count
        seconds = sum(r.duration for r in reports if (r.policy.mode, r.outcome) == (mode, outcome))
        assert sample("tcpclose_close_duration_seconds_sum", labels) == pytest.approx(seconds)

    # graceful leaves TIME_WAIT here; abort sends RST and leaves nothing
    assert (
        sample("tcpclose_close_kernel_state_total", {"mode": "graceful", "state": "TIME_WAIT"}) == N
    )
    assert sample("tcpclose_close_kernel_state_total", {"mode": "abort", "state": "CLOSED"}) == N
    assert sample("tcpclose_resets_sent_total", {"mode": "abort"}) == N
    assert sample("tcpclose_resets_sent_total", {"mode": "graceful"}) == 0
    discarded = sum(r.discarded_bytes for r in reports)
    assert discarded > 0
    assert sample("tcpclose_discarded_bytes_total", {"mode": "abort"}) == discarded
    assert sample("tcpclose_time_wait_skipped_total", {"mode": "graceful"}) == 0

    # the exposition is valid text format, with Prometheus' names and units
    text = prometheus_client.generate_latest(registry).decode()
    assert "# TYPE tcpclose_closes_total counter" in text
    assert "# TYPE tcpclose_close_duration_seconds histogram" in text
    assert "peer" not in {name for line in text.splitlines() for name in _label_names(line)}


def _label_names(line: str) -> list[str]:
    if line.startswith("#") or "{" not in line:
        return []
    inner = line[line.index("{") + 1 : line.index("}")]
    return [pair.split("=")[0] for pair in inner.split(",") if pair]


def test_prometheus_fallbacks_and_errors_counted() -> None:
    """peer-first with a silent peer falls back: counted by fallback."""
    registry = prometheus_client.CollectorRegistry()
    sink = PrometheusSink(registry)
    with listener(socket.AF_INET) as lst:
        client, server = tcp_pair(socket.AF_INET, lst)
        peer = Peer(_drain_then_close(client))
        report = tcpclose.close(server, "peer-first timeout=0.05s fallback=graceful")
        peer.result()
    sink(report)
    assert report.fallback is not None
    assert (
        registry.get_sample_value(
            "tcpclose_fallbacks_total", {"mode": "peer-first", "fallback": "graceful"}
        )
        == 1
    )


# -- OpenTelemetry ----------------------------------------------------------------------------


def _otel() -> tuple[Any, Any]:
    reader = otel_export.InMemoryMetricReader()
    provider = otel_sdk_metrics.MeterProvider(metric_readers=[reader])
    return reader, provider


def _points(reader: Any) -> dict[str, list[Any]]:
    data = reader.get_metrics_data()
    out: dict[str, list[Any]] = {}
    if data is None:  # nothing to report yet
        return out
    for resource in data.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out.setdefault(metric.name, []).extend(metric.data.data_points)
    return out


def _by_mode_outcome(points: list[Any]) -> dict[tuple[str, str], float]:
    counts: dict[tuple[str, str], float] = {}
    for p in points:
        key = (p.attributes["tcpclose.close.mode"], p.attributes["tcpclose.close.outcome"])
        counts[key] = counts.get(key, 0) + (p.count if hasattr(p, "count") else p.value)
    return counts


def test_opentelemetry_counts_equal_the_closes_made() -> None:
    reader, provider = _otel()
    sink = OpenTelemetrySink(provider, histogram=True)
    assert not _points(reader).get("tcpclose.closes")  # nothing counted yet

    reports = list(close_each_mode())
    for report in reports:
        sink(report)

    points = _points(reader)
    expected = _expected(reports)
    assert _by_mode_outcome(points["tcpclose.closes"]) == expected
    assert _by_mode_outcome(points["tcpclose.close.duration"]) == expected

    graceful = [
        p for p in points["tcpclose.closes"] if p.attributes["tcpclose.close.mode"] == "graceful"
    ]
    attributes = graceful[0].attributes
    assert attributes["network.transport"] == "tcp"
    assert attributes["network.type"] == "ipv4"
    assert attributes["network.connection.state"] == "time_wait"
    assert attributes["tcpclose.close.state"] == "TIME_WAIT"
    assert "error.type" not in attributes

    resets = {
        p.attributes["tcpclose.close.mode"]: p.value for p in points["tcpclose.close.resets_sent"]
    }
    assert resets["abort"] == N
    assert resets["graceful"] == 0
    discarded = sum(p.value for p in points["tcpclose.close.discarded"])
    assert discarded == sum(r.discarded_bytes for r in reports) > 0

    # cumulative: a second collection after more closes adds up
    for report in close_each_mode(1):
        sink(report)
    again = _by_mode_outcome(_points(reader)["tcpclose.closes"])
    assert again[("graceful", "peer-eof")] == N + 1
    provider.shutdown()


def test_opentelemetry_error_type_on_a_reset() -> None:
    reader, provider = _otel()
    sink = OpenTelemetrySink(provider)
    with listener(socket.AF_INET) as lst:
        client, server = tcp_pair(socket.AF_INET, lst)
        ends = addr(server), addr(server, peer=True)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        client.close()  # RST
        wait_until(
            lambda: tcpclose.lookup(*ends).state is not TcpState.ESTABLISHED, message="the reset"
        )
        report = tcpclose.close(server, "graceful")
    sink(report)
    assert report.outcome.value == "reset"
    (point,) = _points(reader)["tcpclose.closes"]
    if report.error:
        assert point.attributes["error.type"] == report.error
    assert point.attributes["tcpclose.close.outcome"] == "reset"
    provider.shutdown()


# -- both loops, through on_close -------------------------------------------------------------


def test_server_on_close_feeds_both_engines(loop_name: str) -> None:
    """A tcpclose.aio server with on_close=tee(prometheus, otel, list): each engine
    counts every connection the server closed."""
    registry = prometheus_client.CollectorRegistry()
    reader, provider = _otel()
    prom = PrometheusSink(registry)
    otel = OpenTelemetrySink(provider)
    reports: list[CloseReport] = []
    response = payload(4096)
    connections = 8

    async def handle(reader_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader_.readline()
        writer.write(response)

    async def main() -> None:
        server = await tcpclose.aio.start_server(
            handle,
            "127.0.0.1",
            0,
            close_policy="graceful",
            on_close=tee(prom, otel, reports.append),
        )
        async with server:
            name = server.sockets[0].getsockname()
            for _ in range(connections):
                await Client(expect=len(response), after="eof-close").run((name[0], name[1]))
            await wait_for(lambda: len(reports) == connections, 10, "every report")

    run(loop_name, main)
    expected = _expected(reports)
    for (mode, outcome), count in expected.items():
        labels = {"mode": mode, "outcome": outcome}
        assert registry.get_sample_value("tcpclose_closes_total", labels) == count
    assert sum(expected.values()) == connections
    assert _by_mode_outcome(_points(reader)["tcpclose.closes"]) == expected
    provider.shutdown()


# -- host gauges ------------------------------------------------------------------------------


@pytest.fixture
def server_time_wait() -> Iterator[tuple[int, int, int]]:
    """A listener with 3 TIME_WAIT of its own (the server closed first) and 2 of its
    clients' (outgoing). Yields ``(port, server_side, client_side)``."""
    with port_with_time_wait(3, 2) as port:
        yield port, 3, 2


def test_prometheus_host_gauges_on_scrape(server_time_wait: tuple[int, int, int]) -> None:
    port, server_side, client_side = server_time_wait
    registry = prometheus_client.CollectorRegistry()
    PrometheusHostCollector(port=port).register(registry)
    sample = registry.get_sample_value
    assert sample("tcpclose_host_listener_time_wait_sockets", {"port": str(port)}) == server_side
    used = sample("tcpclose_host_ephemeral_ports_used", {"destination": f"127.0.0.1:{port}"})
    assert used == client_side
    assert (sample("tcpclose_host_time_wait_sockets", {"side": "accepted"}) or 0) >= server_side
    assert (sample("tcpclose_host_time_wait_sockets", {"side": "outgoing"}) or 0) >= client_side
    limit = sample("tcpclose_host_time_wait_table_limit")
    with open("/proc/sys/net/ipv4/tcp_max_tw_buckets") as f:
        assert limit == int(f.read())
    assert sample("tcpclose_host_time_wait_table_sockets") is not None
    assert sample("tcpclose_host_time_wait_overflows_total") is not None


def test_opentelemetry_host_gauges(server_time_wait: tuple[int, int, int]) -> None:
    port, server_side, client_side = server_time_wait
    reader, provider = _otel()
    tcpclose.metrics.register_host_gauges(provider, port=port)
    points = _points(reader)
    (listener_point,) = [
        p for p in points["tcpclose.host.listener.time_wait"] if p.attributes["server.port"] == port
    ]
    assert listener_point.value == server_side
    (destination,) = [
        p
        for p in points["tcpclose.host.ephemeral_ports.used"]
        if (p.attributes["server.address"], p.attributes["server.port"]) == ("127.0.0.1", port)
    ]
    assert destination.value == client_side
    sides = {p.attributes["tcpclose.side"]: p.value for p in points["tcpclose.host.time_wait"]}
    assert sides["accepted"] >= server_side
    assert "tcpclose.host.time_wait_table.limit" in points
    provider.shutdown()


# -- logs --------------------------------------------------------------------------------------


def test_log_sink_one_line_per_close_with_fields(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tcpclose.close")
    sink = LogSink()
    reports = list(close_each_mode(1))
    for report in reports:
        sink(report)
    records = [r for r in caplog.records if r.name == "tcpclose.close"]
    assert len(records) == len(reports) == 4
    for record, report in zip(records, reports, strict=True):
        assert record.getMessage() == str(report)
        assert record.__dict__["close_mode"] == report.policy.mode.value
        assert record.__dict__["close_outcome"] == report.outcome.value
        assert record.__dict__["close_state"] == report.state.name
    abort = records[2]
    assert abort.levelno == logging.WARNING  # RST sent: worth a look
    assert abort.__dict__["close_rst_sent"] is True
    assert records[0].levelno == logging.INFO
    assert "close_rst_sent" not in records[0].__dict__


def test_log_sink_sampling_keeps_the_problems(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tcpclose.close")
    sink = LogSink(sample=0.0)
    for report in close_each_mode(2):
        sink(report)
    modes = [r.__dict__["close_mode"] for r in caplog.records if r.name == "tcpclose.close"]
    assert modes == ["abort", "abort"]  # the resets only: every ordinary close sampled out
    with pytest.raises(ValueError, match="sample"):
        LogSink(sample=1.5)


# -- tee and the module -----------------------------------------------------------------------


def test_tee_calls_every_sink_then_raises_the_first_error() -> None:
    seen: list[str] = []

    def broken(report: CloseReport) -> None:
        seen.append("broken")
        raise RuntimeError("sink failed")

    sink = tee(broken, lambda r: seen.append("second"))
    (report,) = [r for r in close_each_mode(1) if r.policy.mode.value == "abort"]
    with pytest.raises(RuntimeError, match="sink failed"):
        sink(report)
    assert seen == ["broken", "second"]
    with pytest.raises(TypeError, match="expected callables"):
        tee(42)  # type: ignore[arg-type]


def test_public_module_exports_every_name_typed_and_documented() -> None:
    module = tcpclose.metrics
    assert isinstance(module.__all__, tuple)
    assert len(set(module.__all__)) == len(module.__all__)
    for name in module.__all__:
        obj = getattr(module, name)
        if callable(obj) and not isinstance(obj, type):
            assert inspect.getdoc(obj), name
            assert "return" in inspect.get_annotations(obj), name
        elif isinstance(obj, type):
            assert inspect.getdoc(obj), name


@pytest.mark.parametrize(
    "module",
    ["tcpclose._metrics", "tcpclose._hostview", "tcpclose.metrics", "tcpclose._report"],
)
def test_docstring_examples(module: str) -> None:
    import doctest
    import importlib

    failures, _ = doctest.testmod(importlib.import_module(module))
    assert failures == 0


def test_host_view_sorts_a_constructed_table() -> None:
    """The pure sort, on a table made by hand: a listener's TIME_WAIT, outgoing ones,
    one on a bound port, a CLOSE_WAIT, against a 10-port ephemeral range."""
    from tcpclose._facts import Counters, Sysctls
    from tcpclose._hostview import HostView
    from tcpclose.kernel import KernelState

    def tw(local: tuple[str, int], peer: tuple[str, int], left: float) -> KernelState:
        return KernelState(TcpState.TIME_WAIT, "test", local, peer, seconds_left=left)

    entries = [
        KernelState(TcpState.LISTEN, "test", ("0.0.0.0", 80), ("0.0.0.0", 0)),
        tw(("10.0.0.1", 80), ("10.0.0.9", 40001), 30.0),
        tw(("10.0.0.1", 80), ("10.0.0.8", 40002), 50.0),
        tw(("10.0.0.1", 40003), ("10.0.0.5", 443), 10.0),
        tw(("10.0.0.1", 40004), ("10.0.0.5", 443), 20.0),
        KernelState(TcpState.ESTABLISHED, "test", ("10.0.0.1", 40005), ("10.0.0.5", 443)),
        tw(("10.0.0.1", 5000), ("10.0.0.6", 22), 5.0),
        KernelState(TcpState.CLOSE_WAIT, "test", ("10.0.0.1", 80), ("10.0.0.7", 40006)),
    ]
    view = HostView.build(
        entries,
        listening_ports={80},
        sysctls=Sysctls(ip_local_port_range=(40000, 40009), tcp_max_tw_buckets=10),
        counters=Counters(time_wait=5, time_wait_overflows=0),
        source="test",
        taken=0.0,
    )
    assert dict(view.time_wait.by_side) == {"accepted": 2, "outgoing": 2, "bound": 1}
    (listener_port,) = view.time_wait.accepted_by_port.items()
    assert listener_port[0] == 80
    assert (listener_port[1].count, listener_port[1].min_left, listener_port[1].max_left) == (
        2,
        30.0,
        50.0,
    )
    assert list(view.time_wait.outgoing_by_destination) == [("10.0.0.5", 443)]
    assert dict(view.ephemeral_by_destination) == {("10.0.0.5", 443): 3}
    assert view.ephemeral_share(3) == 0.3
    assert view.time_wait_fill == 0.5
    assert len(view.close_wait) == 1


def test_dashboard_queries_name_metrics_the_sinks_expose(
    server_time_wait: tuple[int, int, int],
) -> None:
    """docs/dashboards/tcpclose.json: valid JSON whose every metric name is one that
    PrometheusSink or PrometheusHostCollector exposes after real closes."""
    import json
    import re
    from pathlib import Path

    registry = prometheus_client.CollectorRegistry()
    sink = PrometheusSink(registry)
    PrometheusHostCollector().register(registry)
    for report in close_each_mode(1):
        sink(report)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    exposed = {
        family.name + suffix
        for family in registry.collect()
        for suffix in suffixes.get(family.type, ("",))
    }
    path = Path(__file__).resolve().parent.parent / "docs" / "dashboards" / "tcpclose.json"
    dashboard = json.loads(path.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    used = {name for expr in exprs for name in re.findall(r"\btcpclose_[a-z_]+", expr)}
    assert used - exposed == set()
    assert {"tcpclose_closes_total", "tcpclose_host_time_wait_sockets"} <= used


def test_tally_counts_every_close_from_several_threads() -> None:
    import threading

    (report,) = [r for r in close_each_mode(1) if r.policy.mode.value == "graceful"]
    tally = tcpclose.metrics.CloseTally()

    def hammer() -> None:
        for _ in range(5000):
            tally(report)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    snap = tally.snapshot()
    assert snap.total() == 20_000 == snap.total(mode="graceful", outcome="peer-eof")
    (totals,) = snap.by_key.values()
    assert totals.buckets[-1] == 20_000
    assert totals.seconds == pytest.approx(report.duration * 20_000)
