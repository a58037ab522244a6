"""The soak in quick mode (issue 9): ``benchmarks/soak.py --quick`` must pass.

1,000 connections through ``tcpclose.aio.start_server`` with every policy and a mix of
misbehaving peers; the script itself checks its invariants and exits non-zero when one
fails. Here: that it ran, in time, and what its JSON says about the main promises.
The second test runs the same soak over TLS (``--tls``, issue 20).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests._support import run_script_json

SOAK = Path(__file__).resolve().parent.parent / "benchmarks" / "soak.py"

pytestmark = pytest.mark.timeout(90)


def test_soak_quick(tmp_path: Path) -> None:
    pytest.importorskip("tcpclose.aio", reason="the asyncio driver has not landed yet")
    result = run_script_json(SOAK, tmp_path / "soak.json", "--quick", timeout=60)
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


def test_soak_quick_tls(tmp_path: Path) -> None:
    """The same promises over TLS: every connection through an ``ssl=`` server."""
    pytest.importorskip("tcpclose.aio", reason="the asyncio driver has not landed yet")
    pytest.importorskip("trustme")
    result = run_script_json(SOAK, tmp_path / "soak_tls.json", "--quick", "--tls", timeout=60)
    assert result["failed"] == []
    assert result["tls"] is True
    assert result["connections"] == 1_000
    assert result["lost_bytes_keeping_policies"] == 0
    assert result["fds_after"] == result["fds_before"]
    assert result["tasks_after"] == result["tasks_before"]
    # freed TLS buffers stay with malloc (see benchmarks/soak.py): memory in use is checked
    assert result["rss_growth_trimmed_mib"] < 10
    assert len(result["behaviours"]) == 6
    assert {"peer-eof", "aborted", "reset", "byte-cap"} <= set(result["outcomes"])
