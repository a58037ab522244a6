"""The asyncio benchmark in quick mode (issues 6 and 16): ``benchmarks/bench_aio.py --quick``.

500 connections per run against plain asyncio, the floors written by hand, the busy-wait
calibration rows, the graceful and the plain close by hand through a bare wrapper protocol (and
the graceful one with a bounded drain and a set of open connections), and
``tcpclose.aio.start_server`` with each policy, reports on and off. Throughput ratios are
not asserted here (that is the benchmark's business, on a quiet machine); what is: the
script runs, every response arrives whole, every report is delivered, every ratio target
of issue 16 has its verdict in the JSON next to the floor it is measured against, and
``peer-first`` leaves no TIME_WAIT on the server's side where the graceful close by hand
leaves one per connection.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._support import run_script_json

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_aio.py"

pytestmark = pytest.mark.timeout(90)

FLOORS = {
    "plain asyncio",
    "by hand: graceful",
    "by hand: abort",
    "by hand: close + report reads",
    "by hand: graceful + report reads",
    "by hand: abort + report reads",
}


def test_bench_aio_quick(tmp_path: Path) -> None:
    document = run_script_json(BENCH, tmp_path / "aio.json", "--quick", timeout=80)
    document = document["by_loop"]["asyncio"]
    runs = {run["name"]: run for run in document["runs"]}
    total = document["connections_per_run"]
    assert total == 500
    assert {run["name"] for run in runs.values() if run["kind"] == "floor"} == FLOORS
    calibration = {run["name"]: run for run in runs.values() if run["kind"] == "calibration"}
    assert {run["busy_wait_us"] for run in calibration.values()} == {0, 2, 5, 10}
    # The graceful close by hand through the thinnest wrapper protocol: what any
    # library standing between transport and protocol costs at the least.
    assert calibration["by hand: graceful through a bare wrapper"]["floor"] == "by hand: graceful"
    assert calibration["by hand: plain close through a bare wrapper"]["floor"] == "plain asyncio"
    # ... and with what the project asks of every close besides: a bounded drain, the
    # server's set of open connections.
    bounded = calibration["by hand: graceful through a bare wrapper, drain bounded, tracked"]
    assert bounded["floor"] == "by hand: graceful"
    # The A/A row: plain asyncio under another name, the run's own resolution.
    again = calibration["plain asyncio, again"]
    assert again["floor"] == "plain asyncio"
    assert document["checks"]["same_code_ratio"] == again["ratio_to_plain"]
    assert all(isinstance(t["within_noise"], bool) for t in document["targets"])
    for run in runs.values():
        assert run["errors"] == 0, run["name"]
        assert run["samples"][0]["ok"] == total, run["name"]
        assert run["server_cpu_us_per_conn"] > 0, run["name"]
        if run["kind"] == "library" and run["reports"]:
            assert run["samples"][0]["reports_received"] == total, run["name"]
    # Each target names its floor, a row of the same run; the lazy and sampled rows are
    # either measured or skipped with the reason.
    targets = {t["row"]: t for t in document["targets"]}
    for policy in ("graceful", "peer-first", "abort", "default"):
        assert targets[f"{policy}, reports off"]["target"] == 0.97
        assert targets[f"{policy}, reports on, eager"]["target"] == 0.95
        lazy = f"{policy}, reports on, lazy"
        assert lazy in targets or lazy in {s["name"] for s in document["skipped"]}
    for target in targets.values():
        assert target["floor"] in FLOORS
        assert isinstance(target["met"], bool)
    assert targets["abort, reports off"]["floor"] == "by hand: abort"
    assert targets["default, reports off"]["floor"] == "plain asyncio"
    # Whoever closes first keeps the TIME_WAIT: the by-hand graceful close sends its FIN
    # first and keeps it on the server, peer-first never. Every by-hand connection
    # leaves one somewhere (less the client ports that repeat within the run: a new SYN
    # from a repeated port takes the old entry over; a CI run saw 499 of 500). Most are
    # on the server; on a loaded machine the client, which closes once it has the whole
    # response, sometimes sends its FIN first (seen: 213 of 500 on the server with five
    # other test runs on the 2 cores).
    by_hand = runs["by hand: graceful"]
    assert by_hand["server_time_wait"] + by_hand["client_time_wait"] >= total * 0.95
    assert by_hand["server_time_wait"] > 0
    assert runs["peer-first, reports off"]["server_time_wait"] == 0
    assert runs["peer-first, reports on, eager"]["server_time_wait"] == 0
    checks = document["checks"]
    assert checks["peer_first_leaves_no_time_wait"] is True
    assert checks["every_response_whole"] is True
