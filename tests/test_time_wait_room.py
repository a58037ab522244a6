"""The skip of TIME_WAIT tests when the session shares a nearly full host table.

Shown in a network namespace made for the purpose, standing for a busy host: its own
``tcp_max_tw_buckets`` is set to 100, so it has less room than the tests need. A pytest
run there that is told to stay in the current namespace (``TCPCLOSE_TEST_HOST_NETNS``)
skips a TIME_WAIT test with the reason, and still runs a test that has nothing to do
with TIME_WAIT.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests import _session_netns

ROOT = Path(__file__).resolve().parent.parent

needs_root_unshare = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None or not sys.platform.startswith("linux"),
    reason="needs root and unshare(1) to make a namespace standing for a full host",
)


@needs_root_unshare
@pytest.mark.timeout(120)
def test_time_wait_tests_skip_with_the_reason_on_a_full_shared_table() -> None:
    script = (
        "echo 100 > /proc/sys/net/ipv4/tcp_max_tw_buckets && "
        f"exec {sys.executable} -m pytest -q -rs -p no:cacheprovider "
        "tests/test_cli.py::test_lookup_closed_exits_1 "
        "'tests/test_cli.py::test_lookup_time_wait_agrees_with_ss'"
    )
    env = dict(os.environ, **{_session_netns.OPT_OUT_ENV: "1"})
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", script],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "1 passed" in out, out  # lookup of a CLOSED 4-tuple: no TIME_WAIT involved
    assert "skipped" in out, out
    assert "host TIME_WAIT table nearly full (0 of tcp_max_tw_buckets=100)" in out, out
