"""gunicorn's ``sync`` and ``gthread`` workers adopt a close policy (issue 15, item 3):
``-k tcpclose.gunicorn.SyncWorker`` / ``ThreadWorker``, and ``tcpclose run -- gunicorn``
with no change to the command.

The RST trap (a 512 KiB body the application never reads, a 2 MiB ``Connection:
close`` answer), judged by curl and a checksumming client: gunicorn's own lingering
close reads at most 64 KiB for at most 2 s and then still resets, so most answers are
cut; with the worker classes every one arrives whole. TIME_WAIT over 200 connections,
judged by ``ss``: gunicorn sends the first FIN, so the server keeps TIME_WAIT; with
``peer-first`` it keeps none.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests._adopt_support import (
    ANSWER,
    ASGI_APP,
    clean_env,
    free_port,
    launched,
    report_lines,
    server_command,
    time_wait_placement,
    trap_runs,
    write_app,
)
from tests._support import wait_until

pytest.importorskip("gunicorn")

pytestmark = [
    pytest.mark.skipif(shutil.which("curl") is None, reason="no curl"),
    pytest.mark.skipif(shutil.which("ss") is None, reason="no ss"),
    pytest.mark.timeout(120),
]

TRIES = 10
CONNECTIONS = 200

APP = '''
ANSWER = open("big", "rb").read()
SMALL = b"small answer\\n"


def app(environ, start_response):
    """Answers without reading the request body."""
    body = SMALL if environ["PATH_INFO"] == "/small" else ANSWER
    start_response("200 OK", [("Content-Length", str(len(body))), ("Connection", "close")])
    return [body]
'''


@contextmanager
def gunicorn(
    tmp_path: Path,
    *args: str,
    policy: str | None = None,
    log_reports: bool = False,
    launcher: list[str] | None = None,
) -> Iterator[tuple[int, Path]]:
    """``python -m gunicorn app:app`` with ``args`` (one worker), ``TCPCLOSE_POLICY``
    set to ``policy`` when given, through ``tcpclose run`` with ``launcher``'s
    arguments when given; yields its port and stderr file."""
    (tmp_path / "big").write_bytes(ANSWER)
    (tmp_path / "app.py").write_text(APP)
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-w", "1"]
    command += ["--graceful-timeout", "5", *args, "app:app"]
    env = clean_env()
    if policy is not None:
        env["TCPCLOSE_POLICY"] = policy
    if log_reports:
        env["TCPCLOSE_LOG_REPORTS"] = "1"
    argv = launched(command, launcher)
    with server_command(argv, port, cwd=tmp_path, env=env, name="gunicorn") as err:
        yield port, err


WORKERS = {
    "sync": ("-k", "tcpclose.gunicorn.SyncWorker"),
    "gthread": ("-k", "tcpclose.gunicorn.ThreadWorker", "--threads", "4"),
}
PLAIN = {"sync": ("-k", "sync"), "gthread": ("-k", "gthread", "--threads", "4")}


@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_plain_gunicorn_loses_answers_in_the_rst_trap(tmp_path: Path, worker: str) -> None:
    with gunicorn(tmp_path, *PLAIN[worker]) as (port, _):
        whole_curl, whole_client, errors = trap_runs(port, TRIES)
    print(f"plain gunicorn {worker}: whole {whole_curl}/{TRIES} by curl, {whole_client} by client")
    assert whole_curl + whole_client < 2 * TRIES, (whole_curl, whole_client)
    assert any("reset" in error.lower() for error in errors), errors[:3]


@pytest.mark.parametrize(
    ("worker", "policy"), [("sync", "graceful"), ("gthread", "peer-first timeout=5s")]
)
def test_worker_classes_answer_whole(tmp_path: Path, worker: str, policy: str) -> None:
    """``-k tcpclose.gunicorn.SyncWorker`` (``ThreadWorker``), the policy from
    ``TCPCLOSE_POLICY``, reports from ``TCPCLOSE_LOG_REPORTS``: every answer whole,
    every close ended by the client's FIN, none with RST. (Each worker class with one
    policy, to keep the run short: the policies differ only in who sends the first
    FIN, which the TIME_WAIT tests check.)"""
    with gunicorn(tmp_path, *WORKERS[worker], policy=policy, log_reports=True) as (port, err):
        whole_curl, whole_client, errors = trap_runs(port, TRIES)
        wait_until(lambda: len(report_lines(err)) >= 2 * TRIES, 10, message="report lines")
    assert (whole_curl, whole_client) == (TRIES, TRIES), errors[:3]
    lines = report_lines(err)
    assert len(lines) == 2 * TRIES, lines
    assert all(" peer-eof " in line for line in lines), lines[:3]
    assert not any("RST sent" in line for line in lines), lines[:3]


@pytest.mark.parametrize("worker", ["sync", "gthread"])
def test_time_wait_placement(tmp_path: Path, worker: str) -> None:
    """200 connections: gunicorn as it is sends its FIN first, so the server keeps the
    TIME_WAIT whenever its FIN beats the client's; with ``peer-first`` it keeps none."""
    with gunicorn(tmp_path, *PLAIN[worker]) as (port, _):
        plain = time_wait_placement(port, CONNECTIONS)
    with gunicorn(tmp_path, *WORKERS[worker], policy="peer-first timeout=5s") as (port, _):
        peer_first = time_wait_placement(port, CONNECTIONS)
    print(f"gunicorn {worker}, TIME_WAIT (server, clients): plain {plain}, peer-first {peer_first}")
    assert plain[0] > 0, plain  # (measured: 12 to 90 of 200, by server)
    assert sum(plain) >= CONNECTIONS * 0.9, plain
    assert peer_first[0] == 0, peer_first
    assert peer_first[1] >= CONNECTIONS * 0.9, peer_first


def test_tcpclose_run_gunicorn_sync(tmp_path: Path) -> None:
    """``tcpclose run -- gunicorn app:app``, the command unchanged (gunicorn's default
    ``sync`` worker), ``peer-first``: every answer whole, every close reported, and no
    TIME_WAIT on the server over 200 connections."""
    launcher = ["--policy", "peer-first timeout=5s", "--log-reports"]
    with gunicorn(tmp_path, launcher=launcher) as (port, err):
        whole_curl, whole_client, errors = trap_runs(port, TRIES)
        on_server, on_clients = time_wait_placement(port, CONNECTIONS)
        wait_until(lambda: len(report_lines(err)) >= 2 * TRIES + CONNECTIONS, 10, message="reports")
    print(
        f"tcpclose run -- gunicorn, peer-first: whole {whole_curl}/{TRIES} by curl, "
        f"{whole_client} by client; TIME_WAIT {on_server} server, {on_clients} clients"
    )
    assert (whole_curl, whole_client) == (TRIES, TRIES), errors[:3]
    assert on_server == 0, on_server
    assert on_clients >= CONNECTIONS * 0.9, on_clients


def test_tcpclose_run_gunicorn_threads_and_off(tmp_path: Path) -> None:
    """``--threads 2`` makes gunicorn switch to its ``gthread`` worker: the launcher
    replaces that one too. ``TCPCLOSE_POLICY=off``: gunicorn's own workers."""
    with gunicorn(tmp_path, "--threads", "2", launcher=["--log-reports"]) as (port, err):
        whole_curl, whole_client, errors = trap_runs(port, 3)
        wait_until(lambda: len(report_lines(err)) >= 6, 10, message="report lines")
    assert (whole_curl, whole_client) == (3, 3), errors[:3]
    with gunicorn(tmp_path, policy="off", launcher=["--log-reports"]) as (port, err):
        trap_runs(port, 2)
    assert report_lines(err) == [], err.read_text()


def test_launcher_hook_replaces_gunicorns_two_workers_and_is_undone() -> None:
    """What ``tcpclose run`` patches in gunicorn: ``gunicorn.util.load_class`` returns
    tcpclose's class for gunicorn's own ``SyncWorker`` and ``ThreadWorker`` (by short
    name, by path, and a subclass is left alone); ``deactivate()`` puts it back."""
    import gunicorn.util
    from gunicorn.workers.sync import SyncWorker as GunicornSyncWorker

    import tcpclose.gunicorn
    from tcpclose._launcher import activate, deactivate

    original = gunicorn.util.load_class
    assert activate({"TCPCLOSE_POLICY": "graceful"})
    try:
        assert gunicorn.util.load_class("sync") is tcpclose.gunicorn.SyncWorker
        assert gunicorn.util.load_class("gthread") is tcpclose.gunicorn.ThreadWorker
        path = "gunicorn.workers.gthread.ThreadWorker"
        assert gunicorn.util.load_class(path) is tcpclose.gunicorn.ThreadWorker
        assert gunicorn.util.load_class("tcpclose.gunicorn.SyncWorker") is (
            tcpclose.gunicorn.SyncWorker
        )
        assert gunicorn.util.load_class(GunicornSyncWorker) is tcpclose.gunicorn.SyncWorker
        assert gunicorn.util.load_class("gunicorn.workers.gasgi.ASGIWorker").__name__ == (
            "ASGIWorker"
        )
    finally:
        deactivate()
    assert gunicorn.util.load_class is original
    assert not any(type(finder).__name__ == "GunicornHook" for finder in sys.meta_path)


UVICORN_WORKERS = """
from uvicorn.workers import UvicornWorker


class PolicyUvicornWorker(UvicornWorker):
    CONFIG_KWARGS = {"loop": "asyncio", "http": "tcpclose.uvicorn:H11Protocol"}
"""


def test_uvicorn_worker_under_gunicorn(tmp_path: Path) -> None:
    """gunicorn's uvicorn worker, both routes the docs give: a worker subclass whose
    ``CONFIG_KWARGS`` names ``tcpclose.uvicorn:H11Protocol`` (policy from
    ``TCPCLOSE_POLICY``), and ``tcpclose run`` with the stock worker (the loop-level
    adapter). uvicorn as it is loses these answers (tests/test_adopt_uvicorn.py)."""
    pytest.importorskip("uvicorn")
    write_app(tmp_path, ASGI_APP, "asgi_app.py")
    (tmp_path / "workers.py").write_text(UVICORN_WORKERS)
    runs = {
        "subclass": (["-k", "workers.PolicyUvicornWorker"], None),
        "tcpclose run": (["-k", "uvicorn.workers.UvicornWorker"], ["--log-reports"]),
    }
    for name, (args, launcher) in runs.items():
        port = free_port()
        command = [sys.executable, "-m", "gunicorn", "-b", f"127.0.0.1:{port}", "-w", "1"]
        command += [*args, "asgi_app:app"]
        env = clean_env(TCPCLOSE_POLICY="graceful", TCPCLOSE_LOG_REPORTS="1")
        argv = launched(command, launcher)
        with server_command(argv, port, cwd=tmp_path, env=env, name="gunicorn") as err:
            whole_curl, whole_client, errors = trap_runs(port, TRIES // 2)
            wait_until(lambda: len(report_lines(err)) >= TRIES, 10, message="report lines")
        print(f"gunicorn uvicorn worker, {name}: whole {whole_curl}, {whole_client}")
        assert (whole_curl, whole_client) == (TRIES // 2, TRIES // 2), errors[:3]
