"""``tcpclose run`` (issue 15, item 1), end to end with ``python -m http.server``: the
policy reaches a server started as a command, with no change to its code.

The RST trap as ``python -m http.server`` meets it: a GET carrying a 512 KiB body the
server never reads, for a 2 MiB file, and the HTTP/1.0 close after it; judged by curl
and a checksumming client. TIME_WAIT placement with ``peer-first`` over 200
connections, judged by ``ss``. Then the launcher's own contract: the policy from
``TCPCLOSE_POLICY``, ``off``, bad input, a shadowed ``sitecustomize`` still run, and
``activate``/``deactivate`` restoring what they patched.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socketserver
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tcpclose import PolicyError
from tcpclose._launcher import (
    BOOTSTRAP_DIR,
    LOG_REPORTS_ENV,
    POLICY_ENV,
    activate,
    command_environment,
    deactivate,
)
from tests._adopt_support import (
    ANSWER,
    SMALL,
    checksum_post,
    clean_env,
    curl_post,
    free_port,
    get_small,
    launched,
    server_command,
    time_wait_count,
    wait_quiet,
)
from tests._support import wait_until

pytestmark = [
    pytest.mark.skipif(shutil.which("curl") is None, reason="no curl"),
    pytest.mark.skipif(shutil.which("ss") is None, reason="no ss"),
    pytest.mark.timeout(180),
]

TRIES = 10
CONNECTIONS = 200


@contextmanager
def http_server(
    tmp_path: Path, *launcher: str, env: dict[str, str] | None = None
) -> Iterator[tuple[int, Path]]:
    """``python -m http.server`` serving a 2 MiB file (``/big``) and a small one
    (``/small``), started through ``tcpclose run`` with ``launcher`` arguments (or
    plainly when there are none); yields its port and its stderr file."""
    root = tmp_path / "root"
    root.mkdir(exist_ok=True)
    (root / "big").write_bytes(ANSWER)
    (root / "small").write_bytes(SMALL)
    port = free_port()
    server = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
    argv = launched(server, launcher or None)
    with server_command(argv, port, cwd=root, env=env, name="http.server") as err:
        yield port, err


def trap(port: int) -> tuple[int, int, list[str]]:
    errors: list[str] = []
    whole_curl = whole_client = 0
    for _ in range(TRIES):
        by_curl = curl_post(f"http://127.0.0.1:{port}/big", method="GET")
        whole_curl += by_curl.whole
        if by_curl.error:
            errors.append(f"curl: {by_curl.error}")
        by_client = checksum_post(port, "/big", method="GET")
        whole_client += by_client.whole
        if by_client.error:
            errors.append(f"client: {by_client.error} after {by_client.got} bytes")
    return whole_curl, whole_client, errors


def test_plain_http_server_loses_answers(tmp_path: Path) -> None:
    with http_server(tmp_path) as (port, _):
        whole_curl, whole_client, errors = trap(port)
    print(f"python -m http.server: whole {whole_curl}/{TRIES} by curl, {whole_client} by client")
    assert whole_curl + whole_client < 2 * TRIES, (whole_curl, whole_client)
    assert any("reset" in error.lower() for error in errors), errors[:3]


@pytest.mark.parametrize("policy", ["graceful", "peer-first timeout=5s"])
def test_http_server_under_tcpclose_run_answers_whole(tmp_path: Path, policy: str) -> None:
    with http_server(tmp_path, "--policy", policy, "--log-reports") as (port, err):
        whole_curl, whole_client, errors = trap(port)
        wait_until(
            lambda: err.read_text().count("tcpclose: ") >= 2 * TRIES, 10, message="report lines"
        )
    assert (whole_curl, whole_client) == (TRIES, TRIES), errors[:3]
    lines = [line for line in err.read_text().splitlines() if line.startswith("tcpclose: ")]
    assert len(lines) == 2 * TRIES
    assert all(" peer-eof " in line for line in lines), lines[:3]
    assert not any("RST sent" in line for line in lines), lines[:3]


def test_time_wait_placement_under_tcpclose_run(tmp_path: Path) -> None:
    """200 connections: ``python -m http.server`` as it is keeps TIME_WAIT on the
    server whenever its FIN beats the client's; under ``tcpclose run`` with
    ``peer-first`` (from ``TCPCLOSE_POLICY``) it keeps none."""
    counts = {}
    for name, launcher, env in (
        ("plain", (), clean_env()),
        ("peer-first", ("--log-reports",), {**clean_env(), POLICY_ENV: "peer-first timeout=5s"}),
    ):
        with http_server(tmp_path, *launcher, env=env) as (port, _):
            for _ in range(CONNECTIONS):
                assert get_small(port) == SMALL
            wait_quiet(port)
            counts[name] = (
                time_wait_count(port, side="server"),
                time_wait_count(port, side="clients"),
            )
    print(f"TIME_WAIT (server, clients): {counts}")
    assert sum(counts["plain"]) >= CONNECTIONS * 0.9, counts
    assert counts["plain"][0] > 0, counts
    assert counts["peer-first"][0] == 0, counts
    assert counts["peer-first"][1] >= CONNECTIONS * 0.9, counts


HYPERCORN_APP = """
ANSWER = open("big", "rb").read()


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    headers = [(b"content-length", str(len(ANSWER)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": ANSWER})
"""


@contextmanager
def hypercorn_command(
    tmp_path: Path, worker_class: str, *launcher: str
) -> Iterator[tuple[int, Path]]:
    """``python -m hypercorn app:app`` in ``tmp_path``, through ``tcpclose run`` with
    ``launcher`` arguments (plainly when there are none); yields its port and stderr."""
    port = free_port()
    hypercorn = [sys.executable, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}"]
    hypercorn += ["--worker-class", worker_class, "app:app"]
    argv = launched(hypercorn, launcher or None)
    with server_command(argv, port, cwd=tmp_path, name="hypercorn") as err:
        yield port, err


@pytest.mark.parametrize("worker_class", ["asyncio", "uvloop"])
def test_hypercorn_under_tcpclose_run_answers_whole(tmp_path: Path, worker_class: str) -> None:
    """hypercorn started as a command (``python -m hypercorn app:app``), its code and
    the application's unchanged: plain, it loses answers to the RST trap, cut by a
    reset (shown on the asyncio worker class, where runs lost 8 to 19 of 20: on uvloop
    it loses 1 to 3 of 20); under ``tcpclose run`` every answer is whole, on either
    worker class."""
    pytest.importorskip("hypercorn")
    if worker_class == "uvloop":
        pytest.importorskip("uvloop")
    (tmp_path / "big").write_bytes(ANSWER)
    (tmp_path / "app.py").write_text(HYPERCORN_APP)
    if worker_class == "asyncio":
        with hypercorn_command(tmp_path, worker_class) as (port, _):
            plain_curl, plain_client, plain_errors = trap_post(port)
        print(f"plain hypercorn: whole {plain_curl}/{TRIES} by curl, {plain_client} by client")
        # (how many are cut varies with the machine's load: that some are, by resets)
        assert plain_curl + plain_client < 2 * TRIES, (plain_curl, plain_client)
        assert any("reset" in e.lower() or "(56)" in e for e in plain_errors), plain_errors
    launcher = ("--policy", "graceful", "--log-reports")
    with hypercorn_command(tmp_path, worker_class, *launcher) as (port, err):
        whole_curl, whole_client, errors = trap_post(port)
        wait_until(
            lambda: err.read_text().count("tcpclose: ") >= 2 * TRIES, 10, message="report lines"
        )
    assert (whole_curl, whole_client) == (TRIES, TRIES), errors[:3]


def trap_post(port: int) -> tuple[int, int, list[str]]:
    errors: list[str] = []
    whole_curl = whole_client = 0
    for _ in range(TRIES):
        by_curl = curl_post(f"http://127.0.0.1:{port}/")
        whole_curl += by_curl.whole
        if by_curl.error:
            errors.append(f"curl: {by_curl.error}")
        by_client = checksum_post(port)
        whole_client += by_client.whole
        if by_client.error:
            errors.append(f"client: {by_client.error} after {by_client.got} bytes")
    return whole_curl, whole_client, errors


def test_run_command_line_errors(tmp_path: Path) -> None:
    def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tcpclose", "run", *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=env if env is not None else clean_env(),
            check=False,
        )

    bad = run("--policy", "gracefull", "--", sys.executable, "-c", "print('ran')")
    assert bad.returncode == 2, bad
    assert "gracefull" in bad.stderr
    assert "ran" not in bad.stdout
    missing = run("--", str(tmp_path / "no-such-program"))
    assert missing.returncode == 127, missing
    assert "cannot run" in missing.stderr
    nothing = run()
    assert nothing.returncode == 2, nothing
    # The command's exit status is the launcher's; the policy is active in the child.
    probe = (
        "import socketserver, sys, asyncio; "
        "print(socketserver.TCPServer.shutdown_request.__module__, "
        "hasattr(asyncio.BaseEventLoop.create_server, '__tcpclose_installation__')); "
        "sys.exit(3)"
    )
    active = run("--policy", "abort", "--", sys.executable, "-c", probe)
    assert active.returncode == 3, active
    assert active.stdout.split() == ["tcpclose._launcher", "True"], active
    off = run("--", sys.executable, "-c", probe, env={**clean_env(), POLICY_ENV: "off"})
    assert off.stdout.split() == ["socketserver", "False"], off
    show = "import os; print(os.environ['TCPCLOSE_LOG_REPORTS'])"
    sampled = run("--log-reports", "0.05", "--", sys.executable, "-c", show)
    assert sampled.stdout.split() == ["0.05"], sampled
    every = run("--log-reports", "--", sys.executable, "-c", show)
    assert every.stdout.split() == ["1"], every
    too_many = run("--log-reports", "2", "--", sys.executable, "-c", show)
    assert too_many.returncode == 2, too_many


def test_a_shadowed_sitecustomize_still_runs(tmp_path: Path) -> None:
    own = tmp_path / "site"
    own.mkdir()
    (own / "sitecustomize.py").write_text("import os\nos.environ['OWN_SITECUSTOMIZE'] = 'ran'\n")
    env = {**clean_env(), "PYTHONPATH": str(own)}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tcpclose",
            "run",
            "--",
            sys.executable,
            "-c",
            "import os, socketserver; print(os.environ.get('OWN_SITECUSTOMIZE'), "
            "socketserver.TCPServer.shutdown_request.__module__)",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result
    assert result.stdout.split() == ["ran", "tcpclose._launcher"], result


def test_activate_and_deactivate_restore_what_they_patched() -> None:
    shutdown_request = socketserver.TCPServer.__dict__["shutdown_request"]
    create_server = asyncio.BaseEventLoop.__dict__["create_server"]
    assert activate({POLICY_ENV: "graceful", LOG_REPORTS_ENV: "1"})
    try:
        assert not activate({POLICY_ENV: "graceful"})  # once
        assert socketserver.TCPServer.__dict__["shutdown_request"] is not shutdown_request
        assert asyncio.BaseEventLoop.__dict__["create_server"] is not create_server
    finally:
        deactivate()
    assert socketserver.TCPServer.__dict__["shutdown_request"] is shutdown_request
    assert asyncio.BaseEventLoop.__dict__["create_server"] is create_server
    deactivate()  # idempotent
    assert not activate({POLICY_ENV: "off"})
    with pytest.raises(PolicyError):
        activate({POLICY_ENV: "gracefull"})


def test_command_environment() -> None:
    env = command_environment(
        "peer-first", log_reports=True, environ={"PYTHONPATH": "/a", "X": "1"}
    )
    assert env["PYTHONPATH"] == os.pathsep.join([BOOTSTRAP_DIR, "/a"])
    assert env[POLICY_ENV] == "peer-first"
    assert env[LOG_REPORTS_ENV] == "1"
    assert env["X"] == "1"
    again = command_environment(None, log_reports=False, environ=env)
    assert again["PYTHONPATH"] == env["PYTHONPATH"]  # not added twice
    with pytest.raises(PolicyError):
        command_environment(None, log_reports=False, environ={POLICY_ENV: "nope"})
    sampled = command_environment(None, log_reports=0.05, environ={})
    assert sampled[LOG_REPORTS_ENV] == "0.05"
    with pytest.raises(ValueError, match=LOG_REPORTS_ENV):
        command_environment(None, log_reports=1.5, environ={})


def test_log_reports_from_the_environment() -> None:
    """``TCPCLOSE_LOG_REPORTS``: 1 logs every close, a fraction samples the ordinary
    ones (the built-in LogSink's ``sample``), 0 or unset logs none."""
    from tcpclose._launcher import environment_on_close, environment_policy
    from tcpclose.metrics import LogSink

    assert environment_on_close({}) is None
    assert environment_on_close({LOG_REPORTS_ENV: "0"}) is None
    every = environment_on_close({LOG_REPORTS_ENV: "1"})
    assert isinstance(every, LogSink)
    assert every.sample == 1.0
    some = environment_on_close({LOG_REPORTS_ENV: "0.25"})
    assert isinstance(some, LogSink)
    assert some.sample == 0.25
    with pytest.raises(ValueError, match="fraction"):
        environment_on_close({LOG_REPORTS_ENV: "yes"})
    assert environment_policy({POLICY_ENV: "off"}) is None
    assert str(environment_policy({})) == "graceful"
