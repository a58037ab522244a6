"""Reports, the demo and the counters say when the kernel skipped TIME_WAIT because its
table was full (``net.ipv4.tcp_max_tw_buckets``), issue 18.

``tcp_max_tw_buckets`` is per network namespace: these tests set it inside the test
session's private namespace only (never the host's), and restore it.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import tcpclose
from tcpclose import CloseReport, TcpState
from tcpclose._cli import main
from tcpclose.metrics import LogSink, PrometheusSink
from tests import _session_netns
from tests._support import Peer, listener, tcp_pair

pytestmark = pytest.mark.timeout(120)

BUCKETS = Path("/proc/sys/net/ipv4/tcp_max_tw_buckets")


def overflows() -> int:
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=True))
            return int(table["TCPTimeWaitOverflow"])
    raise AssertionError("no TcpExt in /proc/net/netstat")


@pytest.fixture
def tw_buckets() -> Iterator[Callable[[int], None]]:
    """Set this namespace's ``tcp_max_tw_buckets``; restored afterwards."""
    if not _session_netns.private:
        pytest.skip(f"needs the session's private network namespace ({_session_netns.status})")
    original = BUCKETS.read_text()

    def set_limit(limit: int) -> None:
        BUCKETS.write_text(f"{limit}\n")

    try:
        yield set_limit
    finally:
        BUCKETS.write_text(original)


def graceful_close() -> CloseReport:
    """A graceful close whose peer closes once it sees our FIN: TIME_WAIT is due here."""
    with listener(socket.AF_INET) as lst:
        client, server = tcp_pair(socket.AF_INET, lst)

        def drain_then_close() -> None:
            client.settimeout(10)
            while client.recv(65536):
                pass
            client.close()

        peer = Peer(drain_then_close)
        report = tcpclose.close(server, "graceful")
        peer.result()
    return report


def test_report_says_when_the_kernel_skipped_time_wait(
    tw_buckets: Callable[[int], None], caplog: pytest.LogCaptureFixture
) -> None:
    # With room in the table: TIME_WAIT here, nothing skipped.
    report = graceful_close()
    assert report.state is TcpState.TIME_WAIT
    assert not report.time_wait_skipped
    assert "skipped" not in str(report)

    # The table full (limit 0): the kernel closes without TIME_WAIT and counts it.
    tw_buckets(0)
    before = overflows()
    report = graceful_close()
    assert overflows() > before
    assert report.state is TcpState.CLOSED
    assert report.time_wait_skipped
    assert "now CLOSED (TIME_WAIT skipped: kernel table full, tcp_max_tw_buckets)" in str(report)
    assert report.as_dict()["time_wait_skipped"] is True

    # ... and so do the metrics and the log line.
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    PrometheusSink(registry)(report)
    assert registry.get_sample_value("tcpclose_time_wait_skipped_total", {"mode": "graceful"}) == 1
    caplog.set_level(logging.INFO, logger="tcpclose.close")
    LogSink(sample=0.0)(report)  # sampled out if ordinary: this one is logged
    (record,) = [r for r in caplog.records if r.name == "tcpclose.close"]
    assert record.levelno == logging.WARNING
    assert record.__dict__["close_time_wait_skipped"] is True


def test_peer_first_close_is_not_flagged(tw_buckets: Callable[[int], None]) -> None:
    """With the table full, a close whose TIME_WAIT is at the peer is not flagged: only
    a missing TIME_WAIT that was due here is."""
    tw_buckets(0)
    with listener(socket.AF_INET) as lst:
        client, server = tcp_pair(socket.AF_INET, lst)
        client.close()
        report = tcpclose.close(server, "peer-first")
    assert report.peer_closed_first
    assert not report.time_wait_skipped


@pytest.mark.slow
def test_demo_says_time_wait_was_skipped(
    tw_buckets: Callable[[int], None], capsys: pytest.CaptureFixture[str]
) -> None:
    tw_buckets(0)
    code = main(
        [
            "demo",
            "--policies",
            "peer-first,graceful",
            "--scenario",
            "cooperating",
            "--connections",
            "5",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0
    # peer-first: the client's TIME_WAIT were skipped (the server's reports flag none,
    # unless a close fell back to graceful); graceful: the server's, each report says so
    assert re.search(
        r"^note: peer-first, cooperating: the kernel skipped TIME_WAIT 5 times "
        r"\(TCPTimeWaitOverflow rose; \d at the server by its reports\)",
        out,
        re.M,
    )
    assert (
        "note: graceful, cooperating: the kernel skipped TIME_WAIT 5 times "
        "(TCPTimeWaitOverflow rose; 5 at the server by its reports)"
    ) in out
