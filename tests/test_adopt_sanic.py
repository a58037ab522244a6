"""Sanic adopts a close policy through its ``protocol=`` hook with
``tcpclose.sanic.HttpProtocol`` (issue 15, item 4).

The RST trap (a 512 KiB body a streaming handler never reads, a 2 MiB ``Connection:
close`` answer), judged by curl and a checksumming client: Sanic as it is drains the
body itself, and stays whole under the policy. TIME_WAIT over 200 connections with
``peer-first``, judged by ``ss``: Sanic closes right after each answer when
keep-alive is off, racing the client's FIN, so the server keeps a few; with
``peer-first`` none.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests._adopt_support import (
    clean_env,
    free_port,
    report_lines,
    server_command,
    time_wait_placement,
    trap_runs,
    write_app,
)
from tests._support import wait_until

pytest.importorskip("sanic")

pytestmark = [
    pytest.mark.skipif(shutil.which("curl") is None, reason="no curl"),
    pytest.mark.skipif(shutil.which("ss") is None, reason="no ss"),
    pytest.mark.timeout(120),
]

TRIES = 10
CONNECTIONS = 200

APP = '''
import sys

from sanic import Sanic, response

import tcpclose.sanic

ANSWER = open("big", "rb").read()
app = Sanic("trap")
app.config.KEEP_ALIVE = False


@app.route("/", methods=["POST"], stream=True)
async def big(request):
    """Answers without reading the request body."""
    return response.raw(ANSWER)


@app.get("/small")
async def small(request):
    return response.raw(b"small answer\\n")


if __name__ == "__main__":
    protocol = tcpclose.sanic.HttpProtocol if sys.argv[2] == "policy" else None
    app.run(
        host="127.0.0.1",
        port=int(sys.argv[1]),
        protocol=protocol,
        single_process=True,
        access_log=False,
        motd=False,
    )
'''


@contextmanager
def sanic(tmp_path: Path, policy: str | None) -> Iterator[tuple[int, Path]]:
    """The Sanic application above, as it is or with ``protocol=tcpclose.sanic.HttpProtocol``
    and ``TCPCLOSE_POLICY=policy``; yields its port and stderr file."""
    write_app(tmp_path, APP, "sanic_app.py")
    port = free_port()
    env = clean_env()
    if policy is not None:
        env.update(TCPCLOSE_POLICY=policy, TCPCLOSE_LOG_REPORTS="1")
    argv = [sys.executable, "sanic_app.py", str(port), "plain" if policy is None else "policy"]
    with server_command(argv, port, cwd=tmp_path, env=env, name="sanic") as err:
        yield port, err


def test_plain_sanic_avoids_the_rst_trap_itself(tmp_path: Path) -> None:
    """Sanic as it is (25.12) reads what is left of a body its streaming handler did
    not read before it closes (it logs "body not consumed"), so the trap does not
    catch it: measured 10 of 10 whole by curl and by the client. What a policy
    changes for Sanic is where TIME_WAIT lands (below), and the reports."""
    with sanic(tmp_path, None) as (port, _):
        whole_curl, whole_client, errors = trap_runs(port, TRIES)
    print(f"plain Sanic: whole {whole_curl}/{TRIES} by curl, {whole_client} by client")
    assert (whole_curl, whole_client) == (TRIES, TRIES), errors[:3]


@pytest.mark.parametrize("policy", ["graceful", "peer-first timeout=5s"])
def test_sanic_with_the_protocol_class_answers_whole(tmp_path: Path, policy: str) -> None:
    with sanic(tmp_path, policy) as (port, err):
        whole_curl, whole_client, errors = trap_runs(port, TRIES)
        wait_until(lambda: len(report_lines(err)) >= 2 * TRIES, 10, message="report lines")
    assert (whole_curl, whole_client) == (TRIES, TRIES), errors[:3]
    lines = report_lines(err)
    assert not any("RST sent" in line for line in lines), lines[:3]


def test_time_wait_placement(tmp_path: Path) -> None:
    with sanic(tmp_path, None) as (port, _):
        plain = time_wait_placement(port, CONNECTIONS)
    with sanic(tmp_path, "peer-first timeout=5s") as (port, _):
        peer_first = time_wait_placement(port, CONNECTIONS)
    print(f"Sanic, TIME_WAIT (server, clients): plain {plain}, peer-first {peer_first}")
    # As it is, Sanic's FIN races the client's: 0 to 3 of 200 on the server, measured.
    assert sum(plain) >= CONNECTIONS * 0.9, plain
    assert peer_first[0] == 0, peer_first
    assert peer_first[1] >= CONNECTIONS * 0.9, peer_first
