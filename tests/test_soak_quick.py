"""The soak in quick mode (issue 9): ``benchmarks/soak.py --quick`` must pass.

1,000 connections through ``tcpclose.aio.start_server`` with every policy and a mix of
misbehaving peers; the script itself checks its invariants and exits non-zero when one
fails. Here: that it ran, in time, and what its JSON says about the main promises.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"

pytestmark = pytest.mark.timeout(90)


def test_soak_quick(tmp_path: Path) -> None:
    pytest.importorskip("tcpclose.aio", reason="the asyncio driver has not landed yet")
    out = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, str(SOAK), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, f"soak failed:\n{proc.stdout}\n{proc.stderr}"
    result = json.loads(out.read_text())
    assert result["failed"] == []
    assert result["connections"] == 1_000
    assert result["lost_bytes_keeping_policies"] == 0
    assert result["fds_after"] == result["fds_before"]
    assert result["tasks_after"] == result["tasks_before"]
    assert result["rss_growth_mib"] < 10
    # the mix really exercised the faults
    assert set(result["behaviours"]) == {
        "close-first",
        "silent",
        "flood",
        "slow",
        "close-early",
        "reset",
    }
    assert {"peer-eof", "aborted", "reset", "byte-cap"} <= set(result["outcomes"])
