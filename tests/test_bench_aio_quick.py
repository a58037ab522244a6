"""The asyncio benchmark in quick mode (issue 6): ``benchmarks/bench_aio.py --quick``.

500 connections per run against plain asyncio, the hand-written graceful reference and
``tcpclose.aio.start_server`` with each policy, reports on and off. Throughput ratios
are not asserted here (that is the benchmark's business, on a quiet machine); what is:
the script runs, every response arrives whole, every report is delivered, and
``peer-first`` leaves no TIME_WAIT on the server's side where the plain server-side
close of the reference leaves one per connection.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_aio.py"

pytestmark = pytest.mark.timeout(90)


def test_bench_aio_quick(tmp_path: Path) -> None:
    out = tmp_path / "aio.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=80,
        check=False,
    )
    assert proc.returncode == 0, f"bench_aio failed:\n{proc.stdout}\n{proc.stderr}"
    document = json.loads(out.read_text())["by_loop"]["asyncio"]
    runs = {run["name"]: run for run in document["runs"]}
    total = document["connections_per_run"]
    assert total == 500
    assert {"plain asyncio", "asyncio, graceful by hand"} <= set(runs)
    for run in runs.values():
        assert run["errors"] == 0, run["name"]
        assert run["samples"][0]["ok"] == total, run["name"]
        if run["reports"]:
            assert run["samples"][0]["reports_received"] == total, run["name"]
    # Whoever closes first keeps the TIME_WAIT: the by-hand graceful close keeps one
    # per connection on the server, peer-first none.
    assert runs["asyncio, graceful by hand"]["server_time_wait"] >= total
    assert runs["peer-first, reports off"]["server_time_wait"] == 0
    assert runs["peer-first, reports on"]["server_time_wait"] == 0
    assert document["summary"]["peer_first_leaves_no_time_wait"] is True
