"""The asyncio benchmark in quick mode (issue 6): ``benchmarks/bench_aio.py --quick``.

500 connections per run against plain asyncio, the hand-written references and
``tcpclose.aio.start_server`` with each policy, reports on and off. Throughput ratios
are not asserted here (that is the benchmark's business, on a quiet machine); what is:
the script runs, every response arrives whole, every report is delivered, and
``peer-first`` leaves no TIME_WAIT on the server's side where the plain server-side
close of the reference leaves one per connection.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._support import run_script_json

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_aio.py"

pytestmark = pytest.mark.timeout(90)


def test_bench_aio_quick(tmp_path: Path) -> None:
    document = run_script_json(BENCH, tmp_path / "aio.json", "--quick", timeout=80)
    document = document["by_loop"]["asyncio"]
    runs = {run["name"]: run for run in document["runs"]}
    total = document["connections_per_run"]
    assert total == 500
    assert {"plain asyncio", "asyncio, graceful by hand"} <= set(runs)
    for run in runs.values():
        assert run["errors"] == 0, run["name"]
        assert run["samples"][0]["ok"] == total, run["name"]
        if run["reports"] and not run["name"].startswith("asyncio"):  # (by hand: no reports)
            assert run["samples"][0]["reports_received"] == total, run["name"]
    # Whoever closes first keeps the TIME_WAIT: the by-hand graceful close sends its FIN
    # first and keeps it on the server, peer-first never. Every by-hand connection
    # leaves one somewhere (less the client ports that repeat within the run: a new SYN
    # from a repeated port takes the old entry over; a CI run saw 499 of 500). Most are
    # on the server; on a loaded machine the client, which closes once it has the whole
    # response, sometimes sends its FIN first (seen: 213 of 500 on the server with five
    # other test runs on the 2 cores).
    by_hand = runs["asyncio, graceful by hand"]
    assert by_hand["server_time_wait"] + by_hand["client_time_wait"] >= total * 0.95
    assert by_hand["server_time_wait"] > 0
    assert runs["peer-first, reports off"]["server_time_wait"] == 0
    assert runs["peer-first, reports on"]["server_time_wait"] == 0
    assert document["summary"]["peer_first_leaves_no_time_wait"] is True
