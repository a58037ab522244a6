"""``socketserver`` servers adopt a close policy (issue 15, item 3): ``http.server``'s
``ThreadingHTTPServer`` through :class:`ClosePolicyMixIn`, ``wsgiref`` through
:func:`with_close_policy`, the routes docs/servers.md gives.

The RST trap (a 512 KiB body the application never reads, a 2 MiB ``Connection:
close`` answer), judged by curl and by a checksumming client: the stdlib servers as
they are lose most answers; with a policy every answer arrives whole. TIME_WAIT
placement over 200 connections, judged by ``ss``: the stdlib servers send the first
FIN (``shutdown(SHUT_WR)``), so TIME_WAIT stays on the server; with ``peer-first``
none does.
"""

from __future__ import annotations

import http.server
import shutil
import socketserver
import threading
import wsgiref.simple_server
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

import tcpclose.socketserver
from tcpclose import CloseReport, Outcome, PolicyError
from tests._adopt_support import (
    ANSWER,
    SMALL,
    checksum_post,
    curl_post,
    get_small,
    serve_in_thread,
    time_wait_count,
    wait_quiet,
)
from tests._support import wait_until

pytestmark = [
    pytest.mark.skipif(shutil.which("curl") is None, reason="no curl"),
    pytest.mark.skipif(shutil.which("ss") is None, reason="no ss"),
    pytest.mark.timeout(180),
]

#: Requests per client kind in the RST trap runs.
TRIES = 20
#: Connections in the TIME_WAIT runs.
CONNECTIONS = 200
KINDS = ["http.server", "wsgiref"]


class TrapHandler(http.server.BaseHTTPRequestHandler):
    """Answers without reading the request body; ``Connection: close``."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self._answer(ANSWER)

    def do_GET(self) -> None:
        self._answer(SMALL)

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def wsgi_app(environ: dict[str, Any], start_response: Callable[..., object]) -> Iterable[bytes]:
    """A WSGI application that never reads ``wsgi.input``."""
    body = SMALL if environ.get("PATH_INFO") == "/small" else ANSWER
    start_response(
        "200 OK",
        [("Content-Type", "application/octet-stream"), ("Content-Length", str(len(body)))],
    )
    return [body]


class QuietWSGIHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class Reports:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.items: list[CloseReport] = []

    def __call__(self, report: CloseReport) -> None:
        with self.lock:
            self.items.append(report)


@contextmanager
def running(
    kind: str, policy: str | None, on_close: Callable[[CloseReport], object] | None = None
) -> Iterator[int]:
    """The server of ``kind``, as the stdlib has it (``policy`` None) or with the
    policy by the route the docs give; yields its port."""
    server: socketserver.TCPServer
    if kind == "http.server":
        if policy is None:
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), TrapHandler)
        else:
            callback = on_close
            text = policy

            class Server(tcpclose.socketserver.ClosePolicyMixIn, http.server.ThreadingHTTPServer):
                close_policy = text

                def on_close(self, report: CloseReport) -> None:
                    if callback is not None:
                        callback(report)

            server = Server(("127.0.0.1", 0), TrapHandler)
    else:
        server_class: type[wsgiref.simple_server.WSGIServer] = wsgiref.simple_server.WSGIServer
        if policy is not None:
            server_class = tcpclose.socketserver.with_close_policy(
                wsgiref.simple_server.WSGIServer, policy, on_close=on_close
            )
        server = wsgiref.simple_server.make_server(
            "127.0.0.1", 0, wsgi_app, server_class=server_class, handler_class=QuietWSGIHandler
        )
    thread = serve_in_thread(server)
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        thread.result()
        server.server_close()


def trap(port: int) -> tuple[int, int, list[str]]:
    """``TRIES`` posts by curl and as many by the checksumming client; the number of
    whole answers of each, and the errors seen."""
    url = f"http://127.0.0.1:{port}/"
    errors: list[str] = []
    whole_curl = whole_client = 0
    for _ in range(TRIES):
        by_curl = curl_post(url)
        whole_curl += by_curl.whole
        if by_curl.error:
            errors.append(f"curl: {by_curl.error} after {by_curl.got} bytes")
        by_client = checksum_post(port)
        whole_client += by_client.whole
        if by_client.error:
            errors.append(f"client: {by_client.error} after {by_client.got} bytes")
    return whole_curl, whole_client, errors


@pytest.mark.parametrize("kind", KINDS)
def test_plain_server_loses_answers_in_the_rst_trap(kind: str) -> None:
    """The problem, first: the stdlib server closes with the body unread, the RST
    cuts the answer short for most requests."""
    with running(kind, None) as port:
        whole_curl, whole_client, errors = trap(port)
    # Measured on loopback (20 + 20 tries): http.server 0 whole by curl, 6-7 by the
    # client; wsgiref 13-14 by curl (it stops its upload when the HTTP/1.0 answer
    # comes), 3 by the client, and in one CI run 15 by the client. How many is timing;
    # that answers are cut, by resets, is the point (with the policy: every one whole).
    assert whole_curl + whole_client < TRIES * 2, (whole_curl, whole_client, errors[:3])
    assert any("reset" in error.lower() for error in errors), errors[:3]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", ["graceful", "peer-first timeout=5s"])
def test_with_policy_every_answer_is_whole(kind: str, policy: str) -> None:
    reports = Reports()
    with running(kind, policy, reports) as port:
        whole_curl, whole_client, errors = trap(port)
        wait_until(lambda: len(reports.items) >= 2 * TRIES, 10, message="every report")
    assert (whole_curl, whole_client) == (TRIES, TRIES), errors[:3]
    assert len(reports.items) == 2 * TRIES
    # The body nobody read was drained (a client may also stop its upload early).
    assert sum(report.drained_bytes > 0 for report in reports.items) >= TRIES
    for report in reports.items:
        assert report.outcome is Outcome.PEER_EOF, report
        assert not report.rst_sent, report
        if policy.startswith("peer-first"):
            assert report.peer_closed_first, report


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("policy", [None, "peer-first timeout=5s"])
def test_time_wait_placement(kind: str, policy: str | None) -> None:
    """200 connections: the stdlib servers send their FIN right after the answer, so
    the server keeps a TIME_WAIT whenever it beats the client's (measured: 54 to 101
    of 200); with ``peer-first`` the server keeps none, the clients all do."""
    with running(kind, policy) as port:
        for _ in range(CONNECTIONS):
            assert get_small(port) == SMALL
        wait_quiet(port)
        on_server = time_wait_count(port, side="server")
        on_clients = time_wait_count(port, side="clients")
    if policy is None:
        assert on_server >= CONNECTIONS * 0.1, (on_server, on_clients)
    else:
        assert on_server == 0, on_server
        assert on_clients >= CONNECTIONS * 0.9, on_clients
    print(f"{kind} {policy}: TIME_WAIT {on_server} on the server, {on_clients} on the clients")


def test_mixin_closes_inline_when_asked_and_in_a_forking_server() -> None:
    """``close_in_background = False`` closes in the handling thread; a forking
    server's child always does (it exits right after)."""
    seen: list[tuple[str, CloseReport]] = []

    class Inline(tcpclose.socketserver.ClosePolicyMixIn, http.server.ThreadingHTTPServer):
        close_policy = "graceful"
        close_in_background = False

        def on_close(self, report: CloseReport) -> None:
            seen.append((threading.current_thread().name, report))

    server = Inline(("127.0.0.1", 0), TrapHandler)
    thread = serve_in_thread(server)
    try:
        assert curl_post(f"http://127.0.0.1:{server.server_address[1]}/").whole
    finally:
        server.shutdown()
        thread.result()
        server.server_close()
    ((name, report),) = seen
    assert not name.startswith("tcpclose")  # the server's own request thread
    assert report.outcome is Outcome.PEER_EOF

    class Forking(tcpclose.socketserver.ClosePolicyMixIn, http.server.HTTPServer):
        pass

    forking = type("ForkingServer", (socketserver.ForkingMixIn, Forking), {})
    server = forking(("127.0.0.1", 0), TrapHandler)
    thread = serve_in_thread(server)
    try:
        for _ in range(3):
            assert curl_post(f"http://127.0.0.1:{server.server_address[1]}/").whole
    finally:
        server.shutdown()
        thread.result()
        server.server_close()


def test_with_close_policy_checks_its_arguments() -> None:
    with pytest.raises(TypeError, match=r"socketserver\.TCPServer"):
        tcpclose.socketserver.with_close_policy(dict, "graceful")  # type: ignore[type-var]
    with pytest.raises(PolicyError):
        tcpclose.socketserver.with_close_policy(socketserver.TCPServer, "gracefull")
    with pytest.raises(TypeError, match="on_close"):
        tcpclose.socketserver.with_close_policy(
            socketserver.TCPServer,
            "graceful",
            on_close=1,  # type: ignore[arg-type]
        )
    cls = tcpclose.socketserver.with_close_policy(socketserver.TCPServer, "abort")
    assert issubclass(cls, socketserver.TCPServer)
    assert issubclass(cls, tcpclose.socketserver.ClosePolicyMixIn)
    assert cls.__name__ == "TCPServerWithClosePolicy"


def test_public_module_exports_every_name_typed_and_documented() -> None:
    import inspect

    module = tcpclose.socketserver
    assert module.__all__ == ("ClosePolicyMixIn", "with_close_policy")
    for name in module.__all__:
        obj = getattr(module, name)
        assert inspect.getdoc(obj), name
        if not isinstance(obj, type):
            assert "return" in inspect.get_annotations(obj), name
