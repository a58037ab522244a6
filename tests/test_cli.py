"""The command line: ``tcpclose states``, ``lookup``, ``demo`` (and the shared parser).

Run in-process through ``tcpclose._cli.main`` (output via capsys), once as a real
``python -m tcpclose`` process. States and lookups are checked against real loopback
sockets, :func:`tcpclose.lookup` and ``ss``; the demo runs for real, small.
"""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tcpclose
import tcpclose.kernel
from tcpclose import _cli, _demo
from tcpclose._demo_client import Command
from tcpclose._kernel._types import TcpState
from tests._support import (
    addr,
    listener,
    port_with_time_wait,
    quiet_listener,
    ss_lookup,
    tcp_pair,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent

needs_ss = pytest.mark.skipif(shutil.which("ss") is None, reason="ss (iproute2) not installed")
needs_kernel_view = pytest.mark.skipif(
    tcpclose.kernel.backend() == "unsupported", reason="no kernel view on this platform"
)


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = _cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def text_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the parser, help, errors --------------------------------------------------------------


def test_version_in_a_separate_process() -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, "-m", "tcpclose", "--version"],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"tcpclose {tcpclose.__version__}"
    assert proc.stderr == ""


def test_main_help_lists_commands_and_exit_status(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_cli(capsys, "--help")
    assert code == 0
    for name in ("demo", "states", "lookup", "audit"):
        assert name in out
    assert "exit status:" in out
    assert re.search(r"^\s+130\s", out, re.MULTILINE)


def test_no_command_is_a_usage_error_with_the_help(capsys: pytest.CaptureFixture[str]) -> None:
    """Bare ``tcpclose`` shows the help, on stderr, and exits 2: a script that forgot
    the command fails instead of passing."""
    code, out, err = run_cli(capsys)
    assert code == 2
    assert out == ""
    assert err.startswith("usage: tcpclose")
    assert "examples:" in err


@pytest.mark.parametrize("command", ["demo", "states", "lookup", "audit"])
def test_every_command_has_help_with_examples(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    code, out, _ = run_cli(capsys, command, "--help")
    assert code == 0
    assert "examples:" in out
    assert f"tcpclose {command}" in out.split("examples:")[1]
    assert "exit status:" in out


def test_exit_codes_are_documented_in_the_module() -> None:
    doc = _cli.__doc__ or ""
    for code in ("0", "1", "2", "130"):
        assert f"* {code} --" in doc


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["bogus"], "tcpclose: error: argument COMMAND: invalid choice: 'bogus'"),
        (["lookup"], "tcpclose: error: lookup: the following arguments are required"),
        (["lookup", "x", "127.0.0.1:1"], "tcpclose: error: lookup: bad address 'x': expected"),
        (["lookup", "127.0.0.1:80", "::1:80"], "lookup: bad address '::1:80': an IPv6 address"),
        (["lookup", "localhost:80", "127.0.0.1:1"], "host names are not resolved"),
        (["lookup", "127.0.0.1:0", "127.0.0.1:1"], "expected a port from 1 to 65535, got 0"),
        (["lookup", "127.0.0.1:http", "127.0.0.1:1"], "expected a port number after the host"),
        (["lookup", "[::1]80", "[::1]:1"], "bad address '[::1]80': expected [v6]:port"),
        (["lookup", "[::1]:80", "127.0.0.1:1"], "lookup: LOCAL and PEER are of different"),
        (["states", "--state", "waiting"], "tcpclose: error: states: bad state 'waiting'"),
        (["states", "--port", "70000"], "states: argument --port: expected a port from 1"),
        (["states", "--count", "2"], "states: --count needs --watch"),
        (["states", "--watch", "0"], "argument --watch: expected 0.1 to 3600 seconds"),
        (["states", "--watch", "soon"], "argument --watch: expected seconds, got 'soon'"),
        (["demo", "--policies", "gentle"], "demo: argument --policies: unknown policy 'gentle'"),
        (["demo", "--connections", "0"], "demo: argument --connections: expected 1 to 10000"),
        (["demo", "--scenario", "x"], "demo: argument --scenario: invalid choice: 'x'"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    code, out, err = run_cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.count("\n") == 1, err
    assert err.startswith("tcpclose: error: ")
    assert expected in err
    assert "Traceback" not in err


# -- lookup ------------------------------------------------------------------------------------


@needs_kernel_view
def test_lookup_established(capsys: pytest.CaptureFixture[str], family: int) -> None:
    client, server = tcp_pair(family)
    with client, server:
        client.sendall(b"abc")
        local, peer = addr(server), addr(server, peer=True)
        wait_until(lambda: tcpclose.lookup(local, peer).recv_queue == 3, message="3 bytes queued")
        code, out, err = run_cli(capsys, "lookup", text_address(local), text_address(peer))
        assert (code, err) == (0, "")
        assert out.splitlines()[0].endswith("ESTABLISHED")
        assert "recv-q 3, send-q 0" in out
        assert f"/ {os.fstat(server.fileno()).st_ino}" in out

        code, out, _ = run_cli(capsys, "lookup", text_address(local), text_address(peer), "--json")
        shown = json.loads(out)
        expected = tcpclose.lookup(local, peer)
        assert code == 0
        assert shown["state"] == "ESTABLISHED"
        assert shown["query"] == {"local": list(local), "peer": list(peer)}
        for key in ("recv_queue", "send_queue", "uid", "inode", "cookie", "source"):
            assert shown[key] == expected.as_dict()[key], key


@needs_kernel_view
@needs_ss
def test_lookup_time_wait_agrees_with_ss(capsys: pytest.CaptureFixture[str], family: int) -> None:
    client, server = tcp_pair(family)
    local, peer = addr(server), addr(server, peer=True)
    server.close()  # the server closes first: TIME_WAIT is its
    wait_until(lambda: client.recv(1) == b"", message="the server's FIN")
    client.close()
    wait_until(
        lambda: tcpclose.lookup(local, peer).state is TcpState.TIME_WAIT, message="TIME_WAIT"
    )
    code, out, _ = run_cli(capsys, "lookup", text_address(local), text_address(peer), "--json")
    shown = json.loads(out)
    assert code == 0
    assert shown["state"] == "TIME_WAIT"
    assert shown["timer"] == "TIMEWAIT"
    assert 50 < shown["seconds_left"] <= 60
    assert (shown["uid"], shown["inode"]) == (0, 0)
    entry = ss_lookup(local, peer)
    assert entry is not None
    assert entry.state == "TIME-WAIT"
    assert entry.timer == "timewait"
    assert entry.timer_seconds is not None
    # ss truncates to whole seconds at 10 s and above; it ran after us.
    assert -0.5 <= shown["seconds_left"] - entry.timer_seconds <= 2.5

    code, out, _ = run_cli(capsys, "lookup", text_address(local), text_address(peer))
    assert code == 0
    assert re.search(r"timer\s+timewait, \d+\.\d s left", out)

    # The client's end closed second (passively): nothing is left of it.
    code, out, _ = run_cli(capsys, "lookup", text_address(peer), text_address(local))
    assert code == 1
    assert "CLOSED (no socket for this 4-tuple)" in out
    assert ss_lookup(peer, local) is None


@needs_kernel_view
def test_lookup_closed_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with listener(socket.AF_INET) as lst:
        port = addr(lst)[1]
        code, out, err = run_cli(capsys, "lookup", f"127.0.0.1:{port}", "127.0.0.1:9", "--json")
    assert (code, err) == (1, "")
    assert json.loads(out)["state"] == "CLOSED"  # not the listener (the lookup trap)


# -- states ------------------------------------------------------------------------------------


def _ss_time_wait_count(port: int) -> int:
    out = subprocess.run(
        [
            "ss",
            "-tanH",
            "state",
            "time-wait",
            "(",
            "sport",
            "=",
            f":{port}",
            "or",
            "dport",
            "=",
            f":{port}",
            ")",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return sum(1 for line in out.splitlines() if line.strip())


@pytest.fixture
def time_wait_on_port() -> Iterator[tuple[int, int, int]]:
    """A listening port with 3 server-side and 2 client-side TIME_WAIT entries.

    Yields ``(port, server_side, client_side)``.
    """
    with port_with_time_wait(3, 2) as port:
        yield port, 3, 2


@needs_kernel_view
@needs_ss
def test_states_json_counts_time_wait_by_port_and_destination(
    capsys: pytest.CaptureFixture[str], time_wait_on_port: tuple[int, int, int]
) -> None:
    port, server_side, client_side = time_wait_on_port
    code, out, err = run_cli(capsys, "states", "--port", str(port), "--json")
    assert (code, err) == (0, "")
    view = json.loads(out)
    assert view["source"] == tcpclose.kernel.backend()
    assert view["by_state"] == {"TIME_WAIT": 5, "LISTEN": 1}
    assert view["time_wait"]["total"] == 5 == _ss_time_wait_count(port)

    by_port = {row["port"]: row for row in view["time_wait"]["by_local_port"]}
    assert by_port[port]["time_wait"] == server_side
    assert 50 < by_port[port]["min_seconds_left"] <= by_port[port]["max_seconds_left"] <= 60

    by_destination = {(d["host"], d["port"]): d for d in view["destinations"]}
    towards_server = by_destination[("127.0.0.1", port)]
    assert towards_server["time_wait"] == client_side
    assert towards_server["ephemeral_in_use"] == client_side  # each holds a local port
    size = view["ephemeral_range"]["ports"]
    assert towards_server["ephemeral_full"] == round(client_side / size, 3)

    summary = tcpclose.kernel.summary(port=port)
    assert summary.count(TcpState.TIME_WAIT) == 5
    assert summary.time_wait_by_local_port[port] == server_side


@needs_kernel_view
def test_states_table_and_filters(
    capsys: pytest.CaptureFixture[str], time_wait_on_port: tuple[int, int, int]
) -> None:
    port, server_side, client_side = time_wait_on_port
    code, out, _ = run_cli(capsys, "states", "--port", str(port), "--state", "time-wait")
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"5 TCP sockets (kernel view: {tcpclose.kernel.backend()})"
    assert re.search(r"^TIME_WAIT\s+5$", out, re.MULTILINE)
    assert "LISTEN" not in out  # filtered out by --state
    assert re.search(rf"^\s*{port}\s+{server_side}\s+\d+\.\d s\s+\d+\.\d s$", out, re.MULTILINE)
    assert re.search(
        rf"^127\.0\.0\.1:{port}\s+{client_side}\s+\d+\.\d%\s+{client_side}\s", out, re.MULTILINE
    )
    assert lines[-1].startswith("ephemeral port range: ")

    code, out, _ = run_cli(capsys, "states", "--port", str(port), "--state", "estab,syn-sent")
    assert code == 0
    assert out.startswith("0 TCP sockets")


@needs_kernel_view
def test_states_watch_is_bounded_by_count(capsys: pytest.CaptureFixture[str]) -> None:
    with quiet_listener() as lst:
        port = str(addr(lst)[1])
        code, out, _ = run_cli(capsys, "states", "--port", port, "--watch", "0.1", "--count", "3")
        assert code == 0
        assert len(re.findall(r"^-- .* every 0\.1 s \(Ctrl-C to stop\) --$", out, re.M)) == 3

        code, out, _ = run_cli(
            capsys, "states", "--port", port, "--watch", "0.1", "--count", "2", "--json"
        )
        assert code == 0
        documents = [json.loads(line) for line in out.splitlines()]
        assert [d["by_state"] for d in documents] == [{"LISTEN": 1}] * 2


@needs_kernel_view
def test_states_watch_stops_cleanly_on_ctrl_c(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("tcpclose._cli.time.sleep", interrupted)
    code, out, err = run_cli(capsys, "states", "--watch", "5", "--port", "9")
    assert (code, err) == (0, "")
    assert out.count("TCP sockets") == 1


# -- demo --------------------------------------------------------------------------------------

_ROW = re.compile(
    r"^  (?P<policy>default|graceful|peer-first|abort)\s+"
    r"(?P<server_tw>\d+)\s+(?P<client_tw>\d+)\s+(?P<rsts>\d+)\s+"
    r"(?P<lost>0|[\d.]+ (?:B|KiB|MiB|GiB)(?: \(\d+%\))?)\s+"
    r"(?P<discarded>0|[\d.]+ (?:B|KiB|MiB|GiB))\s+(?P<close>[\d.]+ ms)$"
)
_SCENARIO = re.compile(r"^(?P<scenario>[a-z-]+):$")


def _parse_table(out: str) -> dict[tuple[str, str], dict[str, str]]:
    rows: dict[tuple[str, str], dict[str, str]] = {}
    scenario = ""
    for line in out.splitlines():
        heading = _SCENARIO.match(line)
        if heading:
            scenario = heading["scenario"]
        m = _ROW.match(line)
        if m:
            rows[(scenario, m["policy"])] = m.groupdict()
    return rows


@needs_kernel_view
@pytest.mark.timeout(60)
def test_demo_table_shows_where_time_wait_lands_and_what_is_lost(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Issue 8's "done when", at 20 connections."""
    n = 20
    code, out, err = run_cli(capsys, "demo", "--connections", str(n))
    assert code == 0, err
    assert out.startswith(f"{n} connections per policy and scenario")
    rows = _parse_table(out)
    assert len(rows) == 8, out
    assert "note:" not in out  # no fallback, client error or unexpected state
    # It fits a terminal of 80 columns, and ends by pointing at the reader's own host.
    assert max(len(line) for line in out.splitlines()) < 80, out
    assert out.rstrip().splitlines()[-1] == _cli.DEMO_NEXT

    def figure(scenario: str, policy: str, column: str) -> int:
        return int(rows[(scenario, policy)][column])

    # Who closes first holds the TIME_WAIT. peer-first and abort are exact; default and
    # graceful race a client that reads 20 ms late, which the server wins unless starved.
    for policy in ("default", "graceful"):
        server_tw = figure("cooperating", policy, "server_tw")
        assert server_tw >= 0.8 * n, out
        assert server_tw + figure("cooperating", policy, "client_tw") <= n
    assert figure("cooperating", "peer-first", "server_tw") == 0
    assert figure("cooperating", "peer-first", "client_tw") == n
    for scenario in ("cooperating", "unread-body"):
        assert figure(scenario, "abort", "server_tw") == 0
        assert figure(scenario, "abort", "client_tw") == 0
        assert figure(scenario, "peer-first", "client_tw") == n

    # Unread data: a plain close loses bytes (RST); graceful and peer-first lose none.
    assert rows[("unread-body", "default")]["lost"] != "0", out
    assert figure("unread-body", "default", "rsts") > 0
    for policy in ("graceful", "peer-first"):
        assert rows[("unread-body", policy)]["lost"] == "0", out
        assert figure("unread-body", policy, "rsts") == 0
        assert rows[("cooperating", policy)]["lost"] == "0", out
    # abort says what it threw away.
    assert rows[("unread-body", "abort")]["discarded"] != "0", out


@needs_kernel_view
@pytest.mark.timeout(60)
def test_demo_json_one_policy(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run_cli(
        capsys,
        "demo",
        "--connections",
        "10",
        "--policies",
        "abort,graceful",
        "--scenario",
        "unread-body",
        "--json",
    )
    assert code == 0, err
    assert err == ""  # no progress bar when stderr is not a terminal
    result = json.loads(out)
    assert result["connections"] == 10
    runs = {run["policy"]: run for run in result["runs"]}
    assert list(runs) == ["abort", "graceful"]
    assert {run["scenario"] for run in result["runs"]} == {"unread-body"}
    abort, graceful = runs["abort"], runs["graceful"]
    assert abort["reports"] == graceful["reports"] == 10
    assert abort["outcomes"] == {"aborted": 10}
    assert abort["server_rst_sent"] == 10
    assert abort["discarded_bytes"] > 0
    assert abort["server_time_wait"] == abort["client_time_wait"] == 0
    assert graceful["bytes_lost"] == 0
    assert graceful["server_time_wait"] == 10
    assert graceful["client"]["completed"] == 10
    assert graceful["bytes_expected"] == 10 * _demo.SCENARIOS["unread-body"].response_length


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@needs_kernel_view
def test_demo_error_is_one_line_and_reaps_the_client(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[int] = []
    real_start = _demo.ClientProcess.start

    def start(self: _demo.ClientProcess) -> None:
        real_start(self)
        assert self.pid is not None
        started.append(self.pid)

    async def failing_run(self: _demo.ClientProcess, cmd: Command, timeout: float) -> Any:
        raise _demo.DemoError("the client process ended (exit status 1)")

    monkeypatch.setattr(_demo.ClientProcess, "start", start)
    monkeypatch.setattr(_demo.ClientProcess, "run", failing_run)
    code, out, err = run_cli(capsys, "demo", "--connections", "1")
    assert code == 2
    assert out == ""
    assert err == "tcpclose: error: demo: the client process ended (exit status 1)\n"
    assert len(started) == 1
    assert not _alive(started[0])


def _read_available(fd: int, into: bytearray) -> bool:
    """Append what ``fd`` has now to ``into``; False at end of file."""
    while select.select([fd], [], [], 0)[0]:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the pty's other end is closed
            return False
        if not chunk:
            return False
        into.extend(chunk)
    return True


@needs_kernel_view
@pytest.mark.timeout(60)
def test_demo_ctrl_c_clears_the_progress_line() -> None:
    """``tcpclose demo`` on a terminal, interrupted mid-run: the progress line is
    blanked (with room for the ``^C`` a terminal echoes) before "interrupted", and
    the exit status is 130."""
    controller, terminal = pty.openpty()
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    # As from a shell: SIGINT neither ignored nor blocked, whatever this process
    # inherited or a library running in it set (both would pass on to the child).
    start = (
        "import runpy, signal, sys\n"
        "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)\n"
        "sys.argv = ['tcpclose', 'demo', '--connections', '5000']\n"
        "runpy.run_module('tcpclose', run_name='__main__', alter_sys=True)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", start],
        stdout=subprocess.DEVNULL,
        stderr=terminal,
        env=env,
    )
    os.close(terminal)
    seen = bytearray()
    try:
        wait_until(
            lambda: not _read_available(controller, seen) or b"] " in seen,
            timeout=30,
            message="a progress line",
        )
        assert b"] " in seen, seen
        status = Path(f"/proc/{proc.pid}/status").read_text()
        masks = [line for line in status.splitlines() if line.startswith(("SigBlk", "SigIgn"))]
        proc.send_signal(signal.SIGINT)
        wait_until(
            lambda: not _read_available(controller, seen),
            timeout=30,
            message=f"end of output ({', '.join(masks)})",
        )
        assert proc.wait(timeout=30) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
    text = seen.decode()
    last_bar = text.rindex("[")
    bar_width = len(text[last_bar:].split("\r", 1)[0])
    tail = text[last_bar:].split("\r", 1)[1]
    assert re.fullmatch(r" +\rtcpclose: demo: interrupted\r?\n", tail), repr(tail)
    assert len(tail.split("\r")[0]) >= bar_width + 2  # the bar and an echoed ^C


def test_client_process_is_reaped_when_killed() -> None:
    client = _demo.ClientProcess()
    client.start()
    pid = client.pid
    assert pid is not None
    assert _alive(pid)
    client.close(kill=True)
    assert not _alive(pid)
    client.close()  # idempotent


@pytest.mark.parametrize("command", ["demo", "states"])
def test_without_a_kernel_view_demo_and_states_say_so(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, command: str
) -> None:
    monkeypatch.setattr("tcpclose._cli._kernel.backend", lambda: "unsupported")
    code, out, err = run_cli(capsys, command)
    assert code == 2
    assert out == ""
    assert err == f"tcpclose: error: {command}: no kernel view of TCP sockets on this platform" + (
        " to count with\n" if command == "demo" else "\n"
    )
