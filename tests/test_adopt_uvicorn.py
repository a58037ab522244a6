"""uvicorn adopts a close policy through ``tcpclose.uvicorn``'s protocol classes
(``--http tcpclose.uvicorn:H11Protocol``, ``HttpToolsProtocol``), and through
``tcpclose run -- uvicorn app:app --workers 2`` (issue 15, items 1 and 4).

The RST trap (a 512 KiB body the application never reads, a 2 MiB ``Connection:
close`` answer), judged by curl and a checksumming client: uvicorn closes with a plain
``transport.close()`` and loses the answers; with the classes every one is whole.
TIME_WAIT over 200 connections, judged by ``ss``: uvicorn closes first after a
``Connection: close`` answer; with ``peer-first`` the server keeps none.
(That ``uvicorn.run(app, http=...)`` type-checks: tests/test_adopt_typing.py.)
"""

from __future__ import annotations

import pickle
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import tcpclose.uvicorn
from tcpclose.aio import PolicyProtocolFactory
from tests._adopt_support import (
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

pytest.importorskip("uvicorn")

pytestmark = [
    pytest.mark.skipif(shutil.which("curl") is None, reason="no curl"),
    pytest.mark.skipif(shutil.which("ss") is None, reason="no ss"),
    pytest.mark.timeout(120),
]

TRIES = 10
CONNECTIONS = 200
CLASSES = {"h11": "tcpclose.uvicorn:H11Protocol", "httptools": "tcpclose.uvicorn:HttpToolsProtocol"}


@contextmanager
def uvicorn(
    tmp_path: Path,
    http: str,
    *args: str,
    env: dict[str, str] | None = None,
    launcher: list[str] | None = None,
) -> Iterator[tuple[int, Path]]:
    """``python -m uvicorn app:app --http HTTP`` (asyncio's loop), through ``tcpclose
    run`` with ``launcher``'s arguments when given; yields its port and stderr file."""
    if http == "httptools":
        pytest.importorskip("httptools")
    write_app(tmp_path, ASGI_APP)
    port = free_port()
    command = [sys.executable, "-m", "uvicorn", "app:app", "--port", str(port)]
    command += ["--http", http, "--loop", "asyncio", "--no-access-log", "--lifespan", "off", *args]
    argv = launched(command, launcher)
    with server_command(argv, port, cwd=tmp_path, env=env, name="uvicorn") as err:
        yield port, err


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_plain_uvicorn_loses_answers_in_the_rst_trap(tmp_path: Path, http: str) -> None:
    with uvicorn(tmp_path, http) as (port, _):
        whole_curl, whole_client, errors = trap_runs(port, TRIES)
    print(f"plain uvicorn {http}: whole {whole_curl}/{TRIES} by curl, {whole_client} by client")
    assert whole_curl + whole_client < 2 * TRIES, (whole_curl, whole_client)
    assert any("reset" in error.lower() for error in errors), errors[:3]


@pytest.mark.parametrize(
    ("http", "policy"), [("h11", "graceful"), ("httptools", "peer-first timeout=5s")]
)
def test_protocol_classes_answer_whole(tmp_path: Path, http: str, policy: str) -> None:
    """``--http tcpclose.uvicorn:H11Protocol`` (``HttpToolsProtocol``), the policy from
    ``TCPCLOSE_POLICY``, reports from ``TCPCLOSE_LOG_REPORTS``: every answer whole,
    every close ended by the client's FIN."""
    env = clean_env(TCPCLOSE_POLICY=policy, TCPCLOSE_LOG_REPORTS="1")
    with uvicorn(tmp_path, CLASSES[http], env=env) as (port, err):
        whole_curl, whole_client, errors = trap_runs(port, TRIES)
        wait_until(lambda: len(report_lines(err)) >= 2 * TRIES, 10, message="report lines")
    assert (whole_curl, whole_client) == (TRIES, TRIES), errors[:3]
    lines = report_lines(err)
    assert len(lines) == 2 * TRIES, lines
    assert all(" peer-eof " in line for line in lines), lines[:3]
    assert not any("RST sent" in line for line in lines), lines[:3]


def test_time_wait_placement(tmp_path: Path) -> None:
    """200 connections: uvicorn as it is closes first after a ``Connection: close``
    answer; with ``peer-first`` from the environment, the server keeps none."""
    with uvicorn(tmp_path, "h11") as (port, _):
        plain = time_wait_placement(port, CONNECTIONS)
    env = clean_env(TCPCLOSE_POLICY="peer-first timeout=5s")
    with uvicorn(tmp_path, CLASSES["httptools"], env=env) as (port, _):
        peer_first = time_wait_placement(port, CONNECTIONS)
    print(f"uvicorn, TIME_WAIT (server, clients): plain {plain}, peer-first {peer_first}")
    assert plain[0] > 0, plain  # (measured: 12 to 90 of 200, by server)
    assert sum(plain) >= CONNECTIONS * 0.9, plain
    assert peer_first[0] == 0, peer_first
    assert peer_first[1] >= CONNECTIONS * 0.9, peer_first


def test_tcpclose_run_uvicorn_with_two_workers(tmp_path: Path) -> None:
    """``tcpclose run -- uvicorn app:app --workers 2``: the policy reaches both worker
    processes (spawned, not forked: they get it from the environment). ``peer-first``:
    every answer whole, every close reported, no TIME_WAIT on the server."""
    launcher = ["--policy", "peer-first timeout=5s", "--log-reports"]
    with uvicorn(tmp_path, "h11", "--workers", "2", launcher=launcher) as (port, err):
        wait_until(
            lambda: err.read_text().count("Started server process") >= 2, 20, message="workers"
        )
        whole_curl, whole_client, errors = trap_runs(port, TRIES)
        on_server, on_clients = time_wait_placement(port, CONNECTIONS)
        wait_until(lambda: len(report_lines(err)) >= 2 * TRIES + CONNECTIONS, 10, message="reports")
    print(
        f"tcpclose run -- uvicorn --workers 2, peer-first: whole {whole_curl}/{TRIES} by "
        f"curl, {whole_client} by client; TIME_WAIT {on_server} server, {on_clients} clients"
    )
    assert (whole_curl, whole_client) == (TRIES, TRIES), errors[:3]
    assert on_server == 0, on_server
    assert on_clients >= CONNECTIONS * 0.9, on_clients


class FixedPolicy(tcpclose.uvicorn.H11Protocol):
    close_policy = "abort"


def test_classes_are_importable_picklable_and_forward_class_attributes() -> None:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    assert pickle.loads(pickle.dumps(tcpclose.uvicorn.H11Protocol)) is tcpclose.uvicorn.H11Protocol
    assert tcpclose.uvicorn.H11Protocol.tcpclose_wrapped() is H11Protocol
    # A class attribute the class lacks is the wrapped class's (uvicorn reads some).
    assert tcpclose.uvicorn.H11Protocol.__init__ is not None
    assert tcpclose.uvicorn.H11Protocol.handle_events is H11Protocol.handle_events
    factory = FixedPolicy.tcpclose_factory()
    assert isinstance(factory, PolicyProtocolFactory)
    assert str(factory.policy) == "abort"
    assert FixedPolicy.tcpclose_factory() is factory  # made once
