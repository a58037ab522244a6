"""What the metrics and log sinks add per close, against a no-op ``on_close``.

Measured:

* **micro**: the median time of one ``sink(report)`` call, over real reports (one per
  mode, from real loopback closes), for a no-op, the tally alone, the Prometheus sink,
  the OpenTelemetry sink (SDK, in-memory reader) without and with its per-close
  histogram, the log sink (a handler attached; sampled out and logged), ``tee`` of
  the two metrics sinks; and, as the obvious alternative, the engines' own
  per-close instruments (``Counter.labels(...).inc()`` + ``Histogram.observe()``;
  OpenTelemetry ``Counter.add()`` + ``Histogram.record()``). "added" is the median
  minus the no-op's.
* **collection**: what one scrape (``generate_latest``) or one OpenTelemetry
  collection costs with every mode and outcome counted.
* **in the loop**: a ``tcpclose.aio`` server on asyncio and on uvloop, ``on_close``
  timed from inside the loop around the sink, per close.
* **instructions** (``--instructions``, needs valgrind): the same server run under
  callgrind, which counts only what runs inside ``functools.reduce(_apply, [sink],
  report)`` (the ``--toggle-collect`` of that C function, which nothing else on the path
  calls): the sink's instructions per close, exact and
  untouched by the other processes of a shared machine; the added figure is turned into
  microseconds at the rate (instructions per microsecond) the micro measurement of the
  same sink shows. In the loop, the timer around each call costs as much as the sinks
  (the "floor", one count under a lock, measured +2.4 us there): the instruction count
  separates what the sink does from what timing it does.

Times are the thread's CPU time (``time.thread_time_ns``): what the work costs, not the
moments the thread waited for a CPU that other processes held (the machines this runs on
are shared). ``--wall`` times with ``perf_counter_ns`` instead.

Runs in a private network namespace when root (the closes leave TIME_WAIT entries).

Usage: python benchmarks/bench_metrics.py [--quick] [--instructions] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests import _session_netns

_session_netns.enter_private_namespace()  # before any socket or thread

import prometheus_client  # noqa: E402
from opentelemetry.sdk.metrics import MeterProvider  # noqa: E402
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402

import tcpclose  # noqa: E402
import tcpclose.aio  # noqa: E402
from tcpclose import CloseReport  # noqa: E402
from tcpclose.metrics import (  # noqa: E402
    CloseTally,
    LogSink,
    OpenTelemetrySink,
    PrometheusSink,
    tee,
)

RESULTS = Path(__file__).parent / "results" / "metrics.json"
#: The clock every figure is taken with (``--wall`` switches it).
CLOCK = time.thread_time_ns
BUDGET_US = 2.0

Sink = Callable[[CloseReport], object]


def real_reports() -> list[CloseReport]:
    """One report per mode, from real closes over loopback."""
    reports: list[CloseReport] = []
    lst = socket.create_server(("127.0.0.1", 0))
    try:
        for policy in ("graceful", "peer-first", "abort", "default"):
            client = socket.create_connection(lst.getsockname()[:2])
            server, _ = lst.accept()
            if policy == "peer-first":
                client.close()
            if policy == "graceful":
                client.shutdown(socket.SHUT_WR)  # (the peer's FIN is on its way)
            reports.append(tcpclose.close(server, policy))
            client.close()
    finally:
        lst.close()
    return reports


def call_us(
    sink: Sink, reports: list[CloseReport], calls: int, repeats: int
) -> tuple[float, float]:
    """``(fastest, median)`` over ``repeats`` rounds of the mean time of one call, in
    microseconds. The fastest round is the cost with the least interference from other
    processes on the machine (the timeit convention); the median is given beside it."""
    batch = (reports * (calls // len(reports) + 1))[:calls]
    rounds = []
    for _ in range(repeats):
        start = CLOCK()
        for report in batch:
            sink(report)
        rounds.append((CLOCK() - start) / calls / 1000)
    return min(rounds), statistics.median(rounds)


def native_prometheus() -> Sink:
    """The engine's own instruments updated per close (the obvious alternative)."""
    registry = prometheus_client.CollectorRegistry()
    closes = prometheus_client.Counter(
        "native_closes", "closes", ["mode", "outcome"], registry=registry
    )
    states = prometheus_client.Counter(
        "native_state", "states", ["mode", "state"], registry=registry
    )
    duration = prometheus_client.Histogram(
        "native_duration_seconds", "duration", ["mode", "outcome"], registry=registry
    )

    def sink(report: CloseReport) -> None:
        mode, outcome = report.policy.mode.value, report.outcome.value
        closes.labels(mode, outcome).inc()
        states.labels(mode, report.state.name).inc()
        duration.labels(mode, outcome).observe(report.duration)

    return sink


def native_otel(provider: MeterProvider) -> Sink:
    meter = provider.get_meter("native")
    counter = meter.create_counter("native.closes")
    histogram = meter.create_histogram("native.duration", unit="s")

    def sink(report: CloseReport) -> None:
        attributes = {
            "tcpclose.close.mode": report.policy.mode.value,
            "tcpclose.close.outcome": report.outcome.value,
            "network.transport": "tcp",
        }
        counter.add(1, attributes)
        histogram.record(report.duration, attributes)

    return sink


def micro(reports: list[CloseReport], calls: int, repeats: int) -> dict[str, Any]:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    registry = prometheus_client.CollectorRegistry()
    prom = PrometheusSink(registry)
    otel = OpenTelemetrySink(provider)
    otel_hist = OpenTelemetrySink(provider, histogram=True)
    logger = logging.getLogger("bench.tcpclose.close")
    logger.propagate = False
    logger.addHandler(logging.NullHandler())
    logger.setLevel(logging.INFO)
    sinks: dict[str, Sink] = {
        "noop": lambda report: None,
        "tally": CloseTally(),
        "prometheus": prom,
        "opentelemetry": otel,
        "tee(prometheus, opentelemetry)": tee(prom, otel),
        "log, sampled out (sample=0)": LogSink(logger, sample=0.0, problem_level=logging.INFO),
        "log, every close": LogSink(logger),
        "opentelemetry, histogram=True": otel_hist,
        "reference: prometheus_client instruments per close": native_prometheus(),
        "reference: opentelemetry SDK instruments per close": native_otel(provider),
    }
    # (the sampled-out log sink still logs the abort: its RST is a problem; measure the
    # sampling itself on the three ordinary reports)
    ordinary = [r for r in reports if not r.rst_sent]
    fastest: dict[str, list[float]] = {name: [] for name in sinks}
    medians: dict[str, list[float]] = {name: [] for name in sinks}
    # Rounds interleaved across the sinks, so that load from other processes falls on
    # each of them alike.
    for _ in range(repeats):
        for name, sink in sinks.items():
            batch = ordinary if name.startswith("log, sampled") else reports
            low, mid = call_us(sink, batch, calls, 3)
            fastest[name].append(low)
            medians[name].append(mid)
    noop_low, noop_mid = min(fastest["noop"]), statistics.median(medians["noop"])
    table = {
        name: {
            "call_us": round(min(fastest[name]), 3),
            "added_us": round(min(fastest[name]) - noop_low, 3),
            "median_call_us": round(statistics.median(medians[name]), 3),
            "median_added_us": round(statistics.median(medians[name]) - noop_mid, 3),
        }
        for name in sinks
    }

    def collect_ms(action: Callable[[], object]) -> float:
        times = []
        for _ in range(repeats):
            start = CLOCK()
            action()
            times.append((CLOCK() - start) / 1e6)
        return round(statistics.median(times), 3)

    collection = {
        "prometheus_generate_latest_ms": collect_ms(
            lambda: prometheus_client.generate_latest(registry)
        ),
        "opentelemetry_collect_ms": collect_ms(reader.get_metrics_data),
    }
    provider.shutdown()
    return {"sinks": table, "collection": collection}


class _Floor:
    """The least a counting sink can do: one counter under a lock, keyed by mode."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: dict[object, int] = {}

    def __call__(self, report: CloseReport) -> None:
        mode = report.policy.mode
        with self.lock:
            self.counts[mode] = self.counts.get(mode, 0) + 1


def loop_sinks(provider: MeterProvider) -> dict[str, Sink]:
    """The sinks measured inside a server's loop."""
    return {
        "noop": lambda report: None,
        "floor: one count under a lock": _Floor(),
        "prometheus": PrometheusSink(prometheus_client.CollectorRegistry()),
        "opentelemetry": OpenTelemetrySink(provider),
    }


def _apply(report: CloseReport, sink: Sink) -> CloseReport:
    sink(report)
    return report


def in_loop(
    loop_name: str, connections: int, only: str | None = None, counted: bool = False
) -> dict[str, Any]:
    """A server on ``loop_name`` with each sink (or ``only`` that one); the sink's time
    per close, measured in the loop. ``counted``: no timer, each call made through
    ``functools.reduce`` for callgrind to count (see :func:`instructions`)."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    candidates = loop_sinks(provider)
    if only is not None:
        candidates = {only: candidates[only]}
    out: dict[str, Any] = {}
    for name, sink in candidates.items():
        spent: list[int] = []

        def timed(report: CloseReport, sink: Sink = sink, spent: list[int] = spent) -> None:
            if counted:
                functools.reduce(_apply, (sink,), report)
                spent.append(0)
                return
            start = CLOCK()
            sink(report)
            spent.append(CLOCK() - start)

        async def handle(reader_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader_.readline()
            writer.write(b"x" * 1024)

        async def main(timed: Sink = timed, spent: list[int] = spent) -> float:
            server = await tcpclose.aio.start_server(
                handle, "127.0.0.1", 0, close_policy="graceful", on_close=timed
            )
            host, port = server.sockets[0].getsockname()[:2]
            start = time.perf_counter()
            async with server:
                for _ in range(connections):
                    r, w = await asyncio.open_connection(host, port)
                    w.write(b"GET\n")
                    await r.read()
                    w.close()
                    await w.wait_closed()
                deadline = time.monotonic() + 10
                while len(spent) < connections and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            return (time.perf_counter() - start) / connections * 1e6

        if loop_name == "uvloop":
            import uvloop

            per_connection = uvloop.run(main())
        else:
            per_connection = asyncio.run(main())
        ordered = sorted(spent)
        out[name] = {
            "closes": len(spent),
            "sink_mean_us": round(statistics.fmean(spent) / 1000, 3),
            "sink_median_us": round(statistics.median(spent) / 1000, 3),
            "sink_p10_us": round(ordered[len(ordered) // 10] / 1000, 3),
            "sink_p99_us": round(sorted(spent)[int(len(spent) * 0.99) - 1] / 1000, 3),
            "connection_us": round(per_connection, 1),
        }
    if "noop" not in out:
        provider.shutdown()
        return out
    noop = out["noop"]
    for row in out.values():
        # the mean: it includes the closes that count a whole batch
        row["added_us"] = round(row["sink_mean_us"] - noop["sink_mean_us"], 3)
        row["median_added_us"] = round(row["sink_median_us"] - noop["sink_median_us"], 3)
    provider.shutdown()
    return out


#: callgrind counts only inside this C function: ``functools.reduce``, which nothing on
#: a close's path calls (``operator.call`` would not do: tcpclose's ``_frozen`` uses it).
_TOGGLE: Final = "functools_reduce"
_COLLECTED: Final = re.compile(r"Collected : (\d+)")


def _counted_child(args: argparse.Namespace) -> None:
    """Under callgrind: make the closes (or the micro calls) with one sink, through
    ``functools.reduce``, and nothing else through it."""
    if args.loop == "micro":
        reader = InMemoryMetricReader()
        sink = loop_sinks(MeterProvider(metric_readers=[reader]))[args.count_sink]
        reports = real_reports()
        for _ in range(args.calls // len(reports)):
            for report in reports:
                functools.reduce(_apply, (sink,), report)
        return
    in_loop(args.loop, args.connections, only=args.count_sink, counted=True)


def instructions(sink: str, loop: str, amount: int) -> int:
    """What callgrind counted inside ``functools.reduce`` in a child making ``amount``
    closes (or micro calls, for loop ``"micro"``) with ``sink``."""
    what = ["--calls", str(amount)] if loop == "micro" else ["--connections", str(amount)]
    command = [
        "valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
        "--collect-atstart=no", f"--toggle-collect={_TOGGLE}",
        sys.executable, __file__, "--count-sink", sink, "--loop", loop, *what,
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, check=False)
    found = _COLLECTED.findall(done.stderr)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"callgrind run failed ({done.returncode}): {done.stderr[-2000:]}")
    return int(found[-1])


def instruction_table(
    loops: list[str], connections: int, micro_calls: int, micro_us: dict[str, Any]
) -> dict[str, Any]:
    """Instructions per close inside each sink, in each loop, and what the added ones
    cost at the rate the micro measurement shows for the same sink.

    Per close is a slope: the count for ``3 * connections`` closes minus the count for
    ``connections``, over ``2 * connections``, so that what a sink does once (its first
    label set, a lazy import) is not spread over the closes."""
    table: dict[str, Any] = {"connections": [connections, 3 * connections]}
    micro: dict[str, int] = {}
    for name in ("noop", "prometheus", "opentelemetry"):
        micro[name] = round(instructions(name, "micro", micro_calls) / micro_calls)
    rates = {  # instructions per microsecond, hot, on this machine, for each sink's work
        name: (micro[name] - micro["noop"]) / micro_us[name]["added_us"]
        for name in ("prometheus", "opentelemetry")
        if micro_us[name]["added_us"] > 0
    }
    table["micro"] = {
        "calls": micro_calls,
        "instructions_per_call": micro,
        "instructions_per_us": {name: round(rate) for name, rate in rates.items()},
    }
    for loop in loops:
        per_close: dict[str, float] = {}
        for name in ("noop", "floor: one count under a lock", "prometheus", "opentelemetry"):
            few = instructions(name, loop, connections)
            more = instructions(name, loop, 3 * connections)
            per_close[name] = (more - few) / (2 * connections)
        rows: dict[str, Any] = {}
        for name, count in per_close.items():
            added = count - per_close["noop"]
            rate = rates.get(name)
            rows[name] = {
                "instructions_per_close": round(count),
                "added_instructions": round(added),
                "added_us_at_micro_rate": round(added / rate, 3) if rate else None,
            }
        table[loop] = rows
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls (CI)")
    parser.add_argument(
        "--instructions",
        action="store_true",
        help="also count the sinks' instructions per close under callgrind (valgrind)",
    )
    parser.add_argument("--count-sink", help=argparse.SUPPRESS)
    parser.add_argument("--loop", help=argparse.SUPPRESS)
    parser.add_argument("--connections", type=int, default=200, help=argparse.SUPPRESS)
    parser.add_argument("--calls", type=int, default=4000, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write results")
    parser.add_argument("--wall", action="store_true", help="wall-clock times, not CPU time")
    args = parser.parse_args()
    if args.count_sink is not None:
        _counted_child(args)
        return
    if args.instructions and shutil.which("valgrind") is None:
        parser.error("--instructions needs valgrind")
    global CLOCK
    if args.wall:
        CLOCK = time.perf_counter_ns
    calls, repeats, connections = (2_000, 3, 320) if args.quick else (20_000, 7, 1000)

    reports = real_reports()
    result: dict[str, Any] = {
        "benchmark": "metrics and log sinks: cost per close against a no-op on_close",
        "mode": "quick" if args.quick else "full",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "namespace": _session_netns.status,
        "budget_us": BUDGET_US,
        "clock": "perf_counter_ns (wall)" if args.wall else "thread_time_ns (CPU time)",
        "calls_per_round": calls,
        "rounds": repeats * 3,
        "how": "micro: fastest of the rounds (interleaved across sinks) minus the no-op's; "
        "median_* beside it. In the loop: each close's on_close timed with the clock "
        "above inside the event loop, mean minus the no-op's mean (the mean includes the "
        "closes that count a whole batch); medians beside it.",
        "reports": [str(r) for r in reports],
        "micro": micro(reports, calls, repeats),
        "loops": {},
    }
    loops = ["asyncio"]
    try:
        import uvloop  # noqa: F401

        loops.append("uvloop")
    except ImportError:
        pass
    for loop_name in loops:
        result["loops"][loop_name] = in_loop(loop_name, connections)
    sinks = result["micro"]["sinks"]
    worst = max(sinks[name]["added_us"] for name in ("prometheus", "opentelemetry"))
    in_loops = max(
        result["loops"][name][sink]["added_us"]
        for name in loops
        for sink in ("prometheus", "opentelemetry")
    )
    result["floor_added_us_in_loop"] = max(
        result["loops"][name]["floor: one count under a lock"]["added_us"] for name in loops
    )
    result["worst_added_us_micro"] = worst
    result["worst_added_us_in_loop"] = in_loops
    result["within_budget"] = worst <= BUDGET_US and in_loops <= BUDGET_US
    if args.instructions:
        counted = instruction_table(loops, 100, 4000, sinks)
        result["instructions"] = counted
        added = [
            counted[name][sink]["added_us_at_micro_rate"]
            for name in loops
            for sink in ("prometheus", "opentelemetry")
        ]
        result["worst_added_us_by_instructions"] = max(added)
        result["within_budget_by_instructions"] = max(added) <= BUDGET_US
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    for name, row in sinks.items():
        print(
            f"{name:<55} {row['call_us']:8.3f} us  (+{row['added_us']:.3f})"
            f"  median {row['median_call_us']:.3f} (+{row['median_added_us']:.3f})"
        )
    for loop_name, rows in result["loops"].items():
        for name, row in rows.items():
            print(
                f"{loop_name:<8} {name:<30} sink mean {row['sink_mean_us']:.3f} us "
                f"(+{row['added_us']:.3f}), median {row['sink_median_us']:.3f} "
                f"(+{row['median_added_us']:.3f})"
            )
    print(json.dumps(result["micro"]["collection"]))
    if args.instructions:
        counted = result["instructions"]
        print(
            f"instructions per microsecond (micro, hot): {counted['micro']['instructions_per_us']}"
        )
        for loop_name in loops:
            for name, row in counted[loop_name].items():
                print(
                    f"{loop_name:<8} {name:<30} {row['instructions_per_close']:8d} instructions"
                    f" per close (+{row['added_instructions']}"
                    + (
                        f", {row['added_us_at_micro_rate']:.3f} us)"
                        if row["added_us_at_micro_rate"] is not None
                        else ")"
                    )
                )
        print(
            f"within {BUDGET_US} us budget by instructions: "
            f"{result['within_budget_by_instructions']}"
        )
    print(f"within {BUDGET_US} us budget: {result['within_budget']}  -> {args.json}")


if __name__ == "__main__":
    main()
