"""The background closer's benchmark in quick mode (issue 15): it runs, every socket
is closed, and the figures it prints are in its JSON. Ratios are not asserted here
(that is the benchmark's business, on a quiet machine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._support import run_script_json

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_background.py"

pytestmark = pytest.mark.timeout(90)


def test_bench_background_quick(tmp_path: Path) -> None:
    document = run_script_json(BENCH, tmp_path / "background.json", "--quick", timeout=80)
    assert document["connections"] == 200
    results = document["results"]
    assert set(results) == {
        "plain close()",
        "tcpclose.close graceful",
        "BackgroundCloser.close graceful",
    }
    for row in results.values():
        assert row["median_us"] > 0
        assert row["all_closed_ms"] >= row["burst_ms"]
