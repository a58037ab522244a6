"""``tcpclose demo``: every close policy, side by side, measured on loopback.

For each scenario and each policy, one run: a fresh :func:`tcpclose.aio.start_server`
on ``127.0.0.1`` and a fresh port, with that ``close_policy``, serves N connections
made by a client in a separate process (:mod:`tcpclose._demo_client`). Each handler
reads the request line, writes the response and returns: the policy closes.

What the table shows, and where each figure comes from:

* **server / client TIME_WAIT** -- the kernel's socket table (:func:`tcpclose.kernel.dump`
  filtered on the run's server port) once every close is over: an entry whose local
  port is the server port is the server's, one whose remote port is the server port is
  the client's. Only 4-tuples of this run count (the client reports its ports).
* **client RSTs** -- connections on which the client got ECONNRESET (or EPIPE, Linux's
  errno for a reset after the peer's FIN) from a receive, a send, or the look at the
  connection it takes before closing it.
* **bytes lost** -- response bytes the client did not receive intact: it knows each
  response's content and length and compares.
* **discarded** -- the sum of ``CloseReport.discarded_bytes``: what the server's close
  threw away by its own account (``abort``): bytes not yet acknowledged when it reset
  the connection. An upper bound of what the client lost: the client may already hold
  bytes it has not acknowledged yet, and the fd is closed a loop turn after the count.
* **median close** -- the median ``CloseReport.duration``, from ``on_close``.

Scenarios:

``cooperating``
    the client sends a request line, reads the whole response (16 KiB) and closes.
    It starts reading 20 ms after its request, as a client across a network would see
    the response arrive: on loopback with no delay the client would often read the
    response and close before the server's close even started, a race that a real
    network's round trip decides in the server's favour.
``unread-body``
    the client sends a request line and a 512 KiB body the server never reads, and
    starts reading the 256 KiB response only 50 ms later, with a 64 KiB receive buffer:
    when the handler returns, the response is still partly queued in the server's
    kernel and the body partly unread in it. This is the trap in which a plain
    ``close()`` sends RST and the client loses the end of its response. (The body is
    larger than what asyncio reads ahead into its ``StreamReader`` -- up to 256 KiB per
    read -- so that some of it is still in the kernel at the close.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import textwrap
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from . import _kernel
from ._audit import read_counters
from ._demo_client import Command, parse_request_line, response_bytes
from ._kernel._types import TcpState
from ._policy import DEFAULT_LINGER_TIME
from ._report import CloseReport
from ._warnings import TcpCloseWarning
from .aio import start_server

__all__ = (
    "POLICIES",
    "SCENARIOS",
    "DemoError",
    "DemoResult",
    "RunResult",
    "Scenario",
    "format_table",
    "run_demo",
)

HOST: Final = "127.0.0.1"

#: The policies the demo runs, by name, and the policy each one applies. peer-first's
#: timeout is far above what a cooperating client needs (tens of milliseconds here).
POLICIES: Final[dict[str, str]] = {
    "default": "default",
    "graceful": "graceful",
    "peer-first": "peer-first timeout=5s",
    "abort": "abort",
}


@dataclass(frozen=True, slots=True)
class Scenario:
    """How the client behaves in one scenario (see the module docstring)."""

    name: str
    description: str
    response_length: int
    body_length: int = 0
    read_delay: float = 0.0
    rcvbuf: int = 0

    def command(self, port: int, connections: int, concurrency: int) -> Command:
        return Command(
            host=HOST,
            port=port,
            connections=connections,
            concurrency=concurrency,
            response_length=self.response_length,
            body_length=self.body_length,
            read_delay=self.read_delay,
            rcvbuf=self.rcvbuf,
        )


SCENARIOS: Final[dict[str, Scenario]] = {
    s.name: s
    for s in (
        Scenario(
            "cooperating",
            "the client reads the whole 16 KiB response (from 20 ms after its request, "
            "as across a network), then closes",
            response_length=16 * 1024,
            read_delay=0.02,
        ),
        Scenario(
            "unread-body",
            "the client sends a 512 KiB body the server never reads and reads the "
            "256 KiB response from 50 ms on, with SO_RCVBUF 64 KiB: the server closes "
            "with data still queued both ways",
            response_length=256 * 1024,
            body_length=512 * 1024,
            read_delay=0.05,
            rcvbuf=64 * 1024,
        ),
    )
}

#: How long to wait for the server's last closes once the client is done (seconds):
#: above every bound of the policies the demo runs (graceful's linger_time the largest).
CLOSE_WAIT_S: Final = DEFAULT_LINGER_TIME + 5.0
#: How long to wait for the last transitions (FIN_WAIT2, LAST_ACK...) before counting.
SETTLE_TIMEOUT_S: Final = 2.0

Progress = Callable[[int, int, str], None]


def run_timeout(connections: int) -> float:
    """The longest one run's client may take before the demo gives up (seconds)."""
    return 60.0 + 0.05 * connections


class DemoError(Exception):
    """The demo could not run (its client process failed, a run timed out...)."""


@dataclass(slots=True)
class RunResult:
    """The figures of one (scenario, policy) run. See the module docstring."""

    scenario: str
    policy: str
    policy_text: str
    port: int
    connections: int
    server_time_wait: int = 0
    client_time_wait: int = 0
    client_resets: int = 0
    bytes_expected: int = 0
    bytes_lost: int = 0
    discarded_bytes: int = 0
    median_close_s: float | None = None
    reports: int = 0
    server_rst_sent: int = 0
    fallbacks: int = 0
    time_wait_overflows: int = 0
    time_wait_skipped: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    other_states: dict[str, int] = field(default_factory=dict)
    warnings: dict[str, int] = field(default_factory=dict)
    client: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        client = {k: v for k, v in self.client.items() if k != "local_ports"}
        return {
            "scenario": self.scenario,
            "policy": self.policy,
            "policy_text": self.policy_text,
            "port": self.port,
            "connections": self.connections,
            "server_time_wait": self.server_time_wait,
            "client_time_wait": self.client_time_wait,
            "client_resets": self.client_resets,
            "bytes_expected": self.bytes_expected,
            "bytes_lost": self.bytes_lost,
            "discarded_bytes": self.discarded_bytes,
            "median_close_s": self.median_close_s,
            "reports": self.reports,
            "server_rst_sent": self.server_rst_sent,
            "fallbacks": self.fallbacks,
            "time_wait_overflows": self.time_wait_overflows,
            "time_wait_skipped": self.time_wait_skipped,
            "outcomes": self.outcomes,
            "other_states": self.other_states,
            "warnings": self.warnings,
            "client": client,
            "seconds": round(self.seconds, 3),
        }


@dataclass(slots=True)
class DemoResult:
    """All runs of one demo."""

    connections: int
    kernel_view: str
    runs: list[RunResult] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "host": HOST,
            "kernel_view": self.kernel_view,
            "policies": {
                name: POLICIES[name] for name in dict.fromkeys(r.policy for r in self.runs)
            },
            "scenarios": {
                name: SCENARIOS[name].description
                for name in dict.fromkeys(r.scenario for r in self.runs)
            },
            "runs": [r.as_dict() for r in self.runs],
            "seconds": round(self.seconds, 3),
        }


# -- the client process --------------------------------------------------------------------


class ClientProcess:
    """The demo's client, ``python -m tcpclose._demo_client``, as a child process.

    :meth:`close` always reaps it (closing its stdin, then killing it if it has not
    ended within a second, or at once with ``kill=True``); it is synchronous so that it
    also runs after an event loop was interrupted. Idempotent.
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        package_parent = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (package_parent, env.get("PYTHONPATH", "")) if p
        )
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tcpclose._demo_client"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def run(self, cmd: Command, timeout: float) -> dict[str, Any]:
        """Send one command; return the client's result.

        Raises:
            DemoError: the process ended, did not answer in ``timeout`` seconds, or
                refused the command.
        """
        proc = self._proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise DemoError("the client process is not running")
        try:
            proc.stdin.write(json.dumps(cmd.as_dict()).encode() + b"\n")
            proc.stdin.flush()
            async with asyncio.timeout(timeout):
                # A thread reads the reply; if this wait is abandoned, close() ends
                # the process and so the read.
                line = await asyncio.to_thread(proc.stdout.readline)
        except asyncio.CancelledError:
            # Ctrl-C: asyncio.run() waits for the reader thread before it returns, and
            # the thread waits for the client's answer: end the client, and so the read.
            proc.kill()
            raise
        except TimeoutError:
            raise DemoError(f"the client process did not answer within {timeout:.0f} s") from None
        except OSError as exc:
            raise DemoError(f"the client process is gone ({exc})") from exc
        if not line:
            status = proc.poll()
            raise DemoError(f"the client process ended (exit status {status})")
        try:
            reply: dict[str, Any] = json.loads(line)
        except ValueError as exc:
            raise DemoError(f"the client process answered {line[:80]!r}") from exc
        if "error" in reply:
            raise DemoError(f"the client process refused the command: {reply['error']}")
        return reply

    def close(self, *, kill: bool = False) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        try:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
            if not kill:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=1.0)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


# -- one run ---------------------------------------------------------------------------------


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The demo server's handler: read the request line, answer, return (the policy
    then closes the connection). The request body, if any, is never read."""
    try:
        line = await reader.readline()
    except (ConnectionError, ValueError):
        return
    request = parse_request_line(line)
    if request is None:
        return
    conn_id, length, _body = request
    writer.write(response_bytes(conn_id, length))
    with contextlib.suppress(ConnectionError):
        await writer.drain()


def _count_sockets(port: int, client_ports: frozenset[int]) -> tuple[int, int, Counter[str]]:
    """Server TIME_WAIT, client TIME_WAIT, and other states, among the run's 4-tuples."""
    server_tw = client_tw = 0
    others: Counter[str] = Counter()
    for entry in _kernel.dump(port=port):
        if entry.local is None or entry.peer is None:
            continue
        lport, pport = entry.local[1], entry.peer[1]
        if lport == port and pport in client_ports:
            side = "server"
        elif pport == port and lport in client_ports:
            side = "client"
        else:
            continue
        if entry.state is TcpState.TIME_WAIT:
            if side == "server":
                server_tw += 1
            else:
                client_tw += 1
        else:
            others[f"{side} {entry.state.name}"] += 1
    return server_tw, client_tw, others


async def _settled_counts(port: int, client_ports: frozenset[int]) -> tuple[int, int, Counter[str]]:
    """Count once the last FIN/ACKs have been processed (bounded wait)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        counts = _count_sockets(port, client_ports)
        if not counts[2] or time.monotonic() >= deadline:
            return counts
        await asyncio.sleep(0.01)


async def run_one(
    client: ClientProcess,
    scenario: Scenario,
    policy: str,
    connections: int,
    *,
    concurrency: int = 20,
    on_report: Callable[[], None] | None = None,
) -> RunResult:
    """One (scenario, policy) run on a fresh server port."""
    started = time.monotonic()
    policy_text = POLICIES[policy]
    reports: list[CloseReport] = []
    expected = connections  # lowered to the connections made, once the client has said
    all_closed = asyncio.Event()
    overflows_before = read_counters().time_wait_overflows

    def on_close(report: CloseReport) -> None:
        reports.append(report)
        if on_report is not None:
            on_report()
        if len(reports) >= expected:
            all_closed.set()

    server = await start_server(
        _handle,
        HOST,
        0,
        close_policy=policy_text,
        on_close=on_close,
        backlog=max(128, concurrency * 2),
    )
    try:
        port = int(server.sockets[0].getsockname()[1])
        cmd = scenario.command(port, connections, concurrency)
        client_result = await client.run(cmd, run_timeout(connections))
        # Every connection the server accepted ends with a report; wait for them
        # (each close is bounded by its policy).
        expected = len(client_result["local_ports"])
        if len(reports) >= expected:
            all_closed.set()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_WAIT_S):
                await all_closed.wait()
    finally:
        server.close()
        await server.wait_closed()
    client_ports = frozenset(int(p) for p in client_result["local_ports"])
    server_tw, client_tw, others = await _settled_counts(port, client_ports)
    overflows_after = read_counters().time_wait_overflows
    overflows = (
        overflows_after - overflows_before
        if overflows_after is not None and overflows_before is not None
        else 0
    )
    durations = [r.duration for r in reports]
    outcomes = Counter(r.outcome.value for r in reports)
    warned = Counter(code for r in reports for code in r.warnings)
    return RunResult(
        scenario=scenario.name,
        policy=policy,
        policy_text=policy_text,
        port=port,
        connections=connections,
        server_time_wait=server_tw,
        client_time_wait=client_tw,
        client_resets=int(client_result["resets"]),
        bytes_expected=int(client_result["bytes_expected"]),
        bytes_lost=int(client_result["bytes_lost"]),
        discarded_bytes=sum(r.discarded_bytes for r in reports),
        median_close_s=statistics.median(durations) if durations else None,
        reports=len(reports),
        server_rst_sent=sum(r.rst_sent for r in reports),
        fallbacks=sum(r.fallback is not None for r in reports),
        time_wait_overflows=overflows,
        time_wait_skipped=sum(r.time_wait_skipped for r in reports),
        outcomes=dict(outcomes.most_common()),
        other_states=dict(others.most_common()),
        warnings=dict(warned.most_common()),
        client=client_result,
        seconds=time.monotonic() - started,
    )


async def run_demo(
    policies: Sequence[str],
    scenarios: Sequence[str],
    connections: int,
    *,
    concurrency: int = 20,
    progress: Progress | None = None,
    client: ClientProcess | None = None,
) -> DemoResult:
    """Run every (scenario, policy) pair.

    ``client``: a started :class:`ClientProcess` that the caller closes; by default
    one is started here and reaped on every path.

    Raises:
        DemoError: the client process failed or a run did not finish in time.
    """
    started = time.monotonic()
    result = DemoResult(connections=connections, kernel_view=_kernel.backend())
    total = len(policies) * len(scenarios) * connections
    done = 0
    label = ""

    def on_report() -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, label)

    # The demo's aborts discard data on purpose: the reports say how much, so the
    # warnings that would say so too are not issued here.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TcpCloseWarning)
        own_client = client is None
        if client is None:
            client = ClientProcess()
            client.start()
        try:
            for scenario_name in scenarios:
                for policy in policies:
                    label = f"{policy}, {scenario_name}"
                    run = await run_one(
                        client,
                        SCENARIOS[scenario_name],
                        policy,
                        connections,
                        concurrency=concurrency,
                        on_report=on_report,
                    )
                    result.runs.append(run)
                    done = sum(r.connections for r in result.runs)
        finally:
            if own_client:
                client.close(kill=len(result.runs) < len(policies) * len(scenarios))
    result.seconds = time.monotonic() - started
    return result


# -- output -----------------------------------------------------------------------------------


def format_bytes(n: int) -> str:
    """``0`` -> ``"0"``, ``1536`` -> ``"1.5 KiB"``, ``3 << 20`` -> ``"3.0 MiB"``."""
    if n == 0:
        return "0"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _format_lost(lost: int, expected: int) -> str:
    if not lost or not expected:
        return format_bytes(lost)
    return f"{format_bytes(lost)} ({100 * lost / expected:.0f}%)"


def _format_ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000
    return f"{ms:.1f} ms" if ms < 100 else f"{ms:.0f} ms"


#: Table columns: two header lines and the alignment. Rows are grouped under a line
#: naming the scenario, so the table fits 80 columns (about 72 at 10,000 connections).
_COLUMNS: Final = (
    ("", "policy", "<"),
    ("server", "TIME_WAIT", ">"),
    ("client", "TIME_WAIT", ">"),
    ("client", "RSTs", ">"),
    ("bytes", "lost", ">"),
    ("", "discarded", ">"),
    ("median", "close", ">"),
)

#: Text width of the heading, scenario notes and legend.
_TEXT_WIDTH: Final = 79


def format_table(result: DemoResult) -> str:
    """The demo's table, with a heading and the notes that say where figures come from.

    No line is longer than 80 columns (a terminal's usual width)."""
    rows: list[tuple[str, ...]] = [
        (
            run.policy,
            str(run.server_time_wait),
            str(run.client_time_wait),
            str(run.client_resets),
            _format_lost(run.bytes_lost, run.bytes_expected),
            format_bytes(run.discarded_bytes),
            _format_ms(run.median_close_s),
        )
        for run in result.runs
    ]
    widths = [
        max(len(top), len(bottom), *(len(row[i]) for row in rows))
        for i, (top, bottom, _) in enumerate(_COLUMNS)
    ]

    def line(cells: Sequence[str]) -> str:
        return (
            "  "
            + "  ".join(
                f"{cell:{align}{width}}"
                for cell, (_, _, align), width in zip(cells, _COLUMNS, widths, strict=True)
            ).rstrip()
        )

    heading = (
        f"{result.connections} connections per policy and scenario: a tcpclose.aio server "
        f"in this process, the client in another, over {HOST}"
    )
    out = [
        *textwrap.wrap(heading, _TEXT_WIDTH),
        "",
        line([top for top, _, _ in _COLUMNS]),
        line([bottom for _, bottom, _ in _COLUMNS]),
    ]
    previous = None
    for run, row in zip(result.runs, rows, strict=True):
        if run.scenario != previous:
            out.append(f"{run.scenario}:")
            previous = run.scenario
        out.append(line(row))
    out.append("")
    names = list(dict.fromkeys(r.scenario for r in result.runs))
    width = max(len(n) for n in names) if names else 0
    for name in names:
        out.extend(_wrapped(name, SCENARIOS[name].description, width))
    out.append("")
    legend = [
        (
            "TIME_WAIT",
            f"counted in the kernel's socket table ({result.kernel_view}) after each run",
        ),
        ("client RSTs", "connections on which the client got ECONNRESET (or EPIPE)"),
        ("bytes lost", "response bytes the client did not get intact (it knows what to expect)"),
        (
            "discarded",
            "CloseReport.discarded_bytes, summed: not yet acknowledged when the server "
            "reset the connection (an upper bound: the client may have had some of them)",
        ),
        (
            "median close",
            "CloseReport.duration; graceful and peer-first wait for the client's FIN",
        ),
    ]
    width = max(len(k) for k, _ in legend)
    for key, text in legend:
        out.extend(_wrapped(key, text, width))
    out.append(f"{result.seconds:.1f} s in all")
    notes = _anomalies(result)
    out.extend(notes)
    return "\n".join(out)


def _wrapped(key: str, text: str, width: int) -> list[str]:
    lines = textwrap.wrap(text, _TEXT_WIDTH - width - 2)
    return [f"{key if i == 0 else '':<{width}}  {line}" for i, line in enumerate(lines)]


def _anomalies(result: DemoResult) -> list[str]:
    """Lines for anything that is not a plain result (fallbacks, client errors...)."""
    notes = []
    for run in result.runs:
        where = f"{run.policy}, {run.scenario}"
        if run.reports != run.connections:
            notes.append(f"note: {where}: {run.reports} close reports for {run.connections}")
        if run.fallbacks:
            notes.append(f"note: {where}: {run.fallbacks} closes took peer-first's fallback")
        if run.time_wait_overflows or run.time_wait_skipped:
            notes.append(
                f"note: {where}: the kernel skipped TIME_WAIT {run.time_wait_overflows} "
                f"times (TCPTimeWaitOverflow rose; {run.time_wait_skipped} at the server by "
                "its reports): its table is full (tcp_max_tw_buckets), the TIME_WAIT "
                "columns undercount"
            )
        errors = run.client.get("errors") or {}
        if errors:
            listed = ", ".join(f"{k} {v}" for k, v in errors.items())
            notes.append(f"note: {where}: client errors: {listed}")
        if run.client.get("corrupt"):
            notes.append(f"note: {where}: {run.client['corrupt']} corrupt responses")
        if run.other_states:
            listed = ", ".join(f"{k} {v}" for k, v in run.other_states.items())
            notes.append(f"note: {where}: still in other states when counted: {listed}")
    return notes
