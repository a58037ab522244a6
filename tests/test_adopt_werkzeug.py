"""The development servers of Flask (werkzeug) adopt a close policy (issue 15, item 6):
in code, a werkzeug server class with ``tcpclose.socketserver.ClosePolicyMixIn``;
without code, ``tcpclose run -- flask run``.

werkzeug's ``BaseWSGIServer`` derives from ``http.server.HTTPServer`` and ends each
connection in ``socketserver``'s ``shutdown_request``. werkzeug 3 guards itself
against the RST trap: after the answer it reads what is left of the request until the
client's FIN (up to 10 GB or 1,000 reads, with no time bound), so the client closes
first. Measured here as it is: every answer whole and no TIME_WAIT on the server; with
the mix-in the same, within the policy's bounds and with reports. The RST trap (a
512 KiB body the application never reads, a 2 MiB answer), judged by curl and a
checksumming client; TIME_WAIT over 200 connections, judged by ``ss``.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

import tcpclose.socketserver
from tests._adopt_support import (
    ANSWER,
    SMALL,
    clean_env,
    free_port,
    launched,
    report_lines,
    serve_in_thread,
    server_command,
    time_wait_placement,
    trap_runs,
    write_app,
)
from tests._support import wait_until

pytest.importorskip("werkzeug")

from werkzeug import serving  # (by name, after the skip: mypy sees its types)

pytestmark = [
    pytest.mark.skipif(shutil.which("curl") is None, reason="no curl"),
    pytest.mark.skipif(shutil.which("ss") is None, reason="no ss"),
    pytest.mark.timeout(120),
]

TRIES = 10
CONNECTIONS = 200


def wsgi_app(environ: dict[str, Any], start_response: Callable[..., object]) -> Iterable[bytes]:
    """Never reads ``wsgi.input``; ``Connection: close``."""
    body = SMALL if environ.get("PATH_INFO") == "/small" else ANSWER
    start_response(
        "200 OK",
        [("Content-Length", str(len(body))), ("Connection", "close")],
    )
    return [body]


class QuietHandler(serving.WSGIRequestHandler):
    def log(self, type: str, message: str, *args: Any) -> None:
        pass


class PolicyServer(tcpclose.socketserver.ClosePolicyMixIn, serving.ThreadedWSGIServer):
    """The recipe of docs/servers.md: the mix-in first, werkzeug's threaded server."""

    close_policy = "peer-first timeout=5s"


@contextmanager
def werkzeug_server(policy: bool) -> Iterator[int]:
    # (Typed Any: to mypy the mix-in's first base, socketserver.BaseServer, gives the
    # class its constructor, while werkzeug's takes host, port and app.)
    cls: Any = PolicyServer if policy else serving.ThreadedWSGIServer
    server = cls("127.0.0.1", 0, wsgi_app, handler=QuietHandler)
    thread = serve_in_thread(server)
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        thread.result()
        server.server_close()


def test_werkzeug_as_it_is_and_with_the_mixin() -> None:
    results = {}
    for policy in (False, True):
        with werkzeug_server(policy) as port:
            trap = trap_runs(port, TRIES)
        with werkzeug_server(policy) as port:
            results[policy] = (trap, time_wait_placement(port, CONNECTIONS))
    for policy, ((whole_curl, whole_client, errors), placement) in results.items():
        name = "peer-first" if policy else "plain"
        print(
            f"werkzeug {name}: whole {whole_curl}/{TRIES} by curl, {whole_client} by client; "
            f"TIME_WAIT (server, clients) {placement}"
        )
        assert (whole_curl, whole_client) == (TRIES, TRIES), errors[:3]
        assert placement[0] == 0, placement
        assert placement[1] >= CONNECTIONS * 0.9, placement


FLASK_APP = '''
from flask import Flask, request

ANSWER = open("big", "rb").read()
app = Flask(__name__)


@app.route("/", methods=["POST"])
def big():
    """Answers without reading the request body."""
    return ANSWER, 200, {"Connection": "close", "Content-Type": "application/octet-stream"}
'''


@pytest.mark.parametrize("policy", [None, "graceful"])
def test_tcpclose_run_flask_run(tmp_path: Path, policy: str | None) -> None:
    """``flask run`` under ``tcpclose run``, the command unchanged: the policy reaches
    werkzeug's server (one report per connection), every answer whole (as without)."""
    pytest.importorskip("flask")
    write_app(tmp_path, FLASK_APP, "flaskapp.py")
    port = free_port()
    command = [sys.executable, "-m", "flask", "--app", "flaskapp", "run", "--port", str(port)]
    launcher = None if policy is None else ["--policy", policy, "--log-reports"]
    argv = launched(command, launcher)
    with server_command(argv, port, cwd=tmp_path, env=clean_env(), name="flask") as err:
        whole_curl, whole_client, errors = trap_runs(port, TRIES)
        if policy is not None:
            wait_until(lambda: len(report_lines(err)) >= 2 * TRIES, 10, message="report lines")
    print(f"flask run {policy}: whole {whole_curl}/{TRIES} by curl, {whole_client} by client")
    assert (whole_curl, whole_client) == (TRIES, TRIES), errors[:3]
    assert len(report_lines(err)) == (0 if policy is None else 2 * TRIES)
