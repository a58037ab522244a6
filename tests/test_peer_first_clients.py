"""``peer-first`` against real clients (issue 14).

Clients that read to the end of the stream wait for the server's FIN: ApacheBench
(HTTP/1.0), curl on a close-delimited body, ``openssl s_client -ign_eof``, the websockets
client (RFC 6455: the server closes the TCP connection first). Under the old rule (wait
the whole ``timeout`` for the peer's FIN, then ``fallback=auto``) each close stalled,
then reset a client that had every byte. Under the new one the peer gets a short grace
once our data has reached it, then our FIN: no error, no reset, and each close ends
within the grace plus 50 ms of when a plain close would have. Clients that close as soon
as they have a complete response (curl with Content-Length, h2load, a Python client)
still close first: no TIME_WAIT on the server over 200 connections.

Each test first runs the same exchange with a plain close or the old rule and shows
what the new rule changes. ``OLD`` waits 1 s instead of the old default's 5 s, to keep
the suite short.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import threading
import time
import wsgiref.simple_server
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

import tcpclose
import tcpclose.aio
from tcpclose import CloseReport, Fallback, TcpState
from tests._aio_support import curl, payload, run, sha256, spawn_piped, tls, wait_for

#: The string the docs recommend (canonical form: ``peer-first``).
RECOMMENDED = "peer-first timeout=5s grace=50ms fallback=graceful"
GRACE_S = 0.05
#: The issue's allowance on top of the grace.
SLACK_S = 0.05
#: The old rule: wait the whole timeout for the peer's FIN, then auto (1 s, not 5 s;
#: a grace longer than the timeout leaves the timeout alone to end the wait).
OLD = "peer-first timeout=1s grace=1h fallback=auto"

BODY = payload(20_000, seed=14)
DRIVERS = ("sync", "asyncio", "uvloop")


def needs(program: str, package: str) -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        shutil.which(program) is None,
        reason=f"{program} is not installed (Debian package {package})",
    )


# -- servers -----------------------------------------------------------------------------------


@dataclass
class Served:
    """What one server run saw: each client's exit status and output, the reports."""

    codes: list[int] = field(default_factory=list)
    outputs: list[bytes] = field(default_factory=list)
    reports: list[CloseReport] = field(default_factory=list)
    seconds: float = 0.0  # the clients' wall time, all runs together

    def durations(self) -> list[float]:
        return [report.duration for report in self.reports]

    def resets(self) -> int:
        return sum(report.rst_sent for report in self.reports)


def _wsgi_app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """A body without Content-Length: wsgiref sends it close-delimited (HTTP/1.0)."""
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    for start in range(0, len(BODY), 4096):
        yield BODY[start : start + 4096]


class _QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


class _PolicyWSGIServer(wsgiref.simple_server.WSGIServer):
    """wsgiref's server, its connections closed with a policy (the sync driver)."""

    policy: str = "default"
    reports: list[CloseReport]

    def shutdown_request(self, request: Any) -> None:
        self.reports.append(tcpclose.close(request, self.policy))


@contextlib.contextmanager
def _wsgi_server(policy: str, reports: list[CloseReport]) -> Iterator[int]:
    server = wsgiref.simple_server.make_server(
        "127.0.0.1", 0, _wsgi_app, server_class=_PolicyWSGIServer, handler_class=_QuietHandler
    )
    assert isinstance(server, _PolicyWSGIServer)
    server.policy = policy
    server.reports = reports
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        thread.join(10)
        server.server_close()


async def _close_delimited(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: application/octet-stream\r\n\r\n" + BODY)


def serve(driver: str, policy: str, commands: list[list[str]]) -> Served:
    """Serve a close-delimited body with ``policy`` (``default``: a plain close) and run
    each command in turn against it (``{port}`` in an argument is the server's port)."""
    served = Served()

    def argv(command: list[str], port: int) -> list[str]:
        return [arg.replace("{port}", str(port)) for arg in command]

    if driver == "sync":
        with _wsgi_server(policy, served.reports) as port:
            started = time.monotonic()
            for command in commands:
                done = subprocess.run(argv(command, port), capture_output=True, check=False)
                served.codes.append(done.returncode)
                served.outputs.append(done.stdout)
            served.seconds = time.monotonic() - started
            wait_until_reports(served, len(commands))
        return served

    async def main() -> None:
        server = await tcpclose.aio.start_server(
            _close_delimited, "127.0.0.1", 0, close_policy=policy, on_close=served.reports.append
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            started = time.monotonic()
            for command in commands:
                proc = await spawn_piped(argv(command, port))
                out, _ = await asyncio.wait_for(proc.communicate(), 30)
                assert proc.returncode is not None
                served.codes.append(proc.returncode)
                served.outputs.append(out)
            served.seconds = time.monotonic() - started
            await wait_for(lambda: len(served.reports) >= len(commands), 10, "the reports")

    run(driver, main, timeout=60)
    return served


def wait_until_reports(served: Served, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(served.reports) < count and time.monotonic() < deadline:
        time.sleep(0.01)  # (the server thread appends after its close returns)
    assert len(served.reports) >= count


def assert_waited_grace_then_fin(served: Served, plain: Served, per_close: int = 1) -> None:
    """No reset; every close ended by our FIN within the grace plus the slack, and the
    clients took no more than that longer per connection than with a plain close."""
    assert served.resets() == 0
    assert all(report.fallback is Fallback.GRACEFUL for report in served.reports)
    assert all(not report.peer_closed_first for report in served.reports)
    assert max(served.durations()) <= GRACE_S + SLACK_S, served.durations()
    count = len(served.reports)
    assert served.seconds / count <= plain.seconds / len(plain.reports) + GRACE_S + SLACK_S


# -- ApacheBench -------------------------------------------------------------------------------


def _ab(n: int) -> list[str]:
    return ["ab", "-q", "-n", str(n), "-c", "1", "-s", "20", "http://127.0.0.1:{port}/"]


def _ab_counts(output: bytes) -> tuple[int, int]:
    """(complete, failed) requests from ab's summary."""
    counts = {}
    for line in output.decode(errors="replace").splitlines():
        key, _, value = line.partition(":")
        if key in ("Complete requests", "Failed requests"):
            counts[key] = int(value.split()[0])
    return counts.get("Complete requests", 0), counts.get("Failed requests", 0)


@needs("ab", "apache2-utils")
@pytest.mark.parametrize("driver", DRIVERS)
def test_ab_reads_to_the_end_of_the_stream(driver: str) -> None:
    """ab (HTTP/1.0) reads every response to the end of the stream."""
    n = 20
    plain = serve(driver, "default", [_ab(n)])
    assert plain.codes == [0]
    assert _ab_counts(plain.outputs[0]) == (n, 0)
    # The old rule: each close stalls for the timeout, then ab is reset and gives up.
    old = serve(driver, OLD, [_ab(2)])
    assert old.codes != [0] or _ab_counts(old.outputs[0])[1] > 0
    assert old.resets() >= 1
    assert min(old.durations()) >= 0.99
    # The new rule: a short grace, then our FIN.
    new = serve(driver, RECOMMENDED, [_ab(n)])
    assert new.codes == [0]
    assert _ab_counts(new.outputs[0]) == (n, 0)
    assert_waited_grace_then_fin(new, plain)


# -- curl on a close-delimited body ------------------------------------------------------------


def _curl() -> list[str]:
    return ["curl", "-sS", "--max-time", "20", "http://127.0.0.1:{port}/"]


@needs("curl", "curl")
@pytest.mark.parametrize("driver", DRIVERS)
def test_curl_close_delimited_body(driver: str) -> None:
    """curl reads a body without Content-Length until the server's FIN."""
    n = 10
    plain = serve(driver, "default", [_curl()] * n)
    assert plain.codes == [0] * n
    assert all(out == BODY for out in plain.outputs)
    old = serve(driver, OLD, [_curl()])
    assert old.codes == [56]  # "Recv failure: Connection reset by peer"
    assert old.resets() == 1
    new = serve(driver, RECOMMENDED, [_curl()] * n)
    assert new.codes == [0] * n
    assert all(out == BODY for out in new.outputs)
    assert_waited_grace_then_fin(new, plain)


# -- openssl s_client -ign_eof -----------------------------------------------------------------


@needs("openssl", "openssl")
def test_openssl_s_client_ign_eof(loop_name: str, tmp_path: Any) -> None:
    """``s_client -ign_eof`` keeps reading after its input ends, until the server
    closes: a clean TLS shutdown (exit 0, the whole answer) under the new rule."""
    cfg = tls(str(tmp_path))
    text = b"".join(b"line %05d of the answer\n" % i for i in range(2000))

    async def one(policy: str) -> tuple[int, bytes, float, CloseReport]:
        reports: list[CloseReport] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(text)

        server = await tcpclose.aio.start_server(
            handle, "127.0.0.1", 0, ssl=cfg.server, close_policy=policy, on_close=reports.append
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            cmd = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-quiet"]
            cmd += ["-servername", "localhost", "-CAfile", cfg.ca_file, "-ign_eof"]
            proc = await spawn_piped(cmd)
            assert proc.stdin is not None
            started = time.monotonic()
            out, _ = await asyncio.wait_for(proc.communicate(b"GET\n"), 20)
            seconds = time.monotonic() - started
            await wait_for(lambda: reports, 10, "the report")
        assert proc.returncode is not None
        return proc.returncode, out, seconds, reports[0]

    async def main() -> None:
        code, out, plain_s, _ = await one("default")
        assert (code, out) == (0, text)
        code, out, _, report = await one(OLD)
        assert report.rst_sent
        assert report.duration >= 0.99
        assert code != 0  # s_client reports the reset
        code, out, new_s, report = await one(RECOMMENDED)
        assert (code, out) == (0, text)
        assert not report.rst_sent
        assert report.fallback is Fallback.GRACEFUL
        assert report.duration <= GRACE_S + SLACK_S
        assert new_s <= plain_s + GRACE_S + SLACK_S

    run(loop_name, main, timeout=60)


# -- the websockets client ---------------------------------------------------------------------


def test_websockets_client_close_handshake(loop_name: str) -> None:
    """RFC 6455: after the close frames, the server closes the TCP connection first
    (websockets half-closes with ``write_eof()``) and the client waits for it. Under
    peer-first, write_eof() gives the client its grace, then sends our FIN."""
    websockets_server = pytest.importorskip("websockets.asyncio.server")
    websockets_client = pytest.importorskip("websockets.asyncio.client")

    async def echo(ws: Any) -> None:
        async for message in ws:
            await ws.send(message)

    async def exchanges(policy: str | None, n: int) -> tuple[list[float], list[CloseReport]]:
        reports: list[CloseReport] = []
        create = (
            tcpclose.aio.with_policy(
                websockets_server.ServerConnection, policy, on_close=reports.append
            )
            if policy is not None
            else None
        )
        closes = []
        async with websockets_server.serve(
            echo, "127.0.0.1", 0, create_connection=create
        ) as server:
            port = server.sockets[0].getsockname()[1]
            for _ in range(n):
                async with websockets_client.connect(f"ws://127.0.0.1:{port}") as ws:
                    await ws.send("hello")
                    assert await ws.recv() == "hello"
                    started = time.monotonic()
                    await ws.close()
                    closes.append(time.monotonic() - started)
                    assert ws.close_code == 1000
            if policy is not None:
                await wait_for(lambda: len(reports) >= n, 10, "the reports")
        return closes, reports

    async def main() -> None:
        plain, _ = await exchanges(None, 5)
        # A wait as long as the old rule's: every close handshake stalls for it.
        stalled, reports = await exchanges("peer-first timeout=1s grace=1s", 1)
        assert stalled[0] >= 0.99
        closes, reports = await exchanges(RECOMMENDED, 5)
        assert all(not r.rst_sent and r.trigger == "write-eof" for r in reports)
        assert all(r.fallback is Fallback.GRACEFUL and r.fin_sent for r in reports)
        assert max(closes) <= max(plain) + GRACE_S + SLACK_S, (closes, plain)

    run(loop_name, main, timeout=60)


# -- prompt clients: TIME_WAIT stays with them -------------------------------------------------

PROMPT_N = 200


async def _content_length(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(BODY)
    writer.write(head + BODY)


def time_wait_sides(reports: list[CloseReport]) -> tuple[int, int]:
    """TIME_WAIT entries of these connections: (on the server's side, on the clients'),
    each 4-tuple looked up in the kernel (stale entries of an earlier server on the
    same port are not counted)."""
    here = there = 0
    for report in reports:
        assert report.local is not None
        assert report.peer is not None
        here += tcpclose.lookup(report.local, report.peer).state is TcpState.TIME_WAIT
        there += tcpclose.lookup(report.peer, report.local).state is TcpState.TIME_WAIT
    return here, there


def _python_prompt_client(port: int, n: int) -> int:
    """n connections that close as soon as the response is complete; errors."""
    errors = 0
    for _ in range(n):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while not data.endswith(BODY):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
                errors += not data.endswith(BODY)
        except OSError:
            errors += 1
    return errors


async def _run_prompt(kind: str, port: int) -> int:
    """Run PROMPT_N connections of client ``kind``; the number of errors."""
    url = f"http://127.0.0.1:{port}/"
    if kind == "python":
        return await asyncio.to_thread(_python_prompt_client, port, PROMPT_N)
    if kind == "h2load":
        proc = await spawn_piped(["h2load", "--h1", "-n", str(PROMPT_N), "-c", "1", url])
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
        return 0 if b" 0 failed, 0 errored" in out and proc.returncode == 0 else PROMPT_N
    errors = 0
    for _ in range(PROMPT_N):
        code, out, _ = await curl(url)
        errors += code != 0 or out != BODY
    return errors


@pytest.mark.parametrize(
    "kind",
    [
        "python",
        pytest.param("curl", marks=needs("curl", "curl")),
        pytest.param("h2load", marks=needs("h2load", "nghttp2-client")),
    ],
)
def test_prompt_clients_keep_their_time_wait(loop_name: str, kind: str) -> None:
    """Clients that close as soon as the response is complete were served well by the
    old rule (they close first) and still are: 0 TIME_WAIT here, all of it on their
    side, no fallback, no reset."""

    async def one(policy: str) -> tuple[int, int, int, list[CloseReport]]:
        reports: list[CloseReport] = []
        server = await tcpclose.aio.start_server(
            _content_length, "127.0.0.1", 0, close_policy=policy, on_close=reports.append
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            errors = await _run_prompt(kind, port)
            await wait_for(lambda: len(reports) >= PROMPT_N, 20, "the reports")
        here, there = time_wait_sides(reports)
        return errors, here, there, reports

    async def main() -> None:
        errors, here, there, reports = await one(RECOMMENDED)
        assert errors == 0
        assert here == 0
        assert there == PROMPT_N
        assert all(r.peer_closed_first and r.fallback is None for r in reports)
        assert sum(r.rst_sent for r in reports) == 0

    run(loop_name, main, timeout=120)


# -- a slow reader of a large response ---------------------------------------------------------

LARGE = payload(4 << 20, seed=141)


@needs("curl", "curl")
def test_slow_reader_gets_every_byte(loop_name: str) -> None:
    """A 4 MiB response to a reader that takes about a second: the wait for the peer
    starts once our data is acknowledged, then our FIN; no byte lost, no RST."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.0 200 OK\r\n\r\n" + LARGE)

    async def main() -> None:
        reports: list[CloseReport] = []
        server = await tcpclose.aio.start_server(
            handle, "127.0.0.1", 0, close_policy=RECOMMENDED, on_close=reports.append
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            code, out, err = await curl(f"http://127.0.0.1:{port}/", pace=0.015)
            await wait_for(lambda: reports, 10, "the report")
        assert code == 0, err
        assert sha256(out) == sha256(LARGE)
        report = reports[0]
        assert not report.rst_sent
        assert report.fallback is Fallback.GRACEFUL
        assert report.duration >= 0.3  # it did wait for the reader

    run(loop_name, main, timeout=60)


def test_slow_reader_gets_every_byte_sync() -> None:
    """The same with the blocking driver and a Python reader with a small buffer."""
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        client.connect(listener.getsockname())
        conn, _ = listener.accept()
        received: list[bytes] = []
        ending: list[str] = []

        def read_slowly() -> None:
            with client:
                while True:
                    try:
                        chunk = client.recv(64 * 1024)
                    except ConnectionResetError:
                        ending.append("reset")
                        return
                    if not chunk:
                        ending.append("eof")
                        return
                    received.append(chunk)
                    time.sleep(0.015)  # pacing the reader, not waiting for a state

        reader = threading.Thread(target=read_slowly)
        reader.start()
        conn.sendall(LARGE)
        report = tcpclose.close(conn, RECOMMENDED)
        reader.join(20)
    assert ending == ["eof"]
    assert sha256(b"".join(received)) == sha256(LARGE)
    assert not report.rst_sent
    assert report.fallback is Fallback.GRACEFUL


# -- client-side use ---------------------------------------------------------------------------


async def _closes_after(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 with Connection: close, the plain asyncio way: answer, close."""
    await _content_length(reader, writer)
    writer.close()


async def _keep_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 keep-alive: answer, then wait for the next request (or the end)."""
    while True:
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            break
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(BODY)
        writer.write(head + BODY)
    writer.close()


@pytest.mark.parametrize("server_closes", [True, False])
@pytest.mark.parametrize("fallback", ["graceful", "auto"])
def test_client_side_peer_first(loop_name: str, server_closes: bool, fallback: str) -> None:
    """A client closing with peer-first once it has a response: a server that closes
    after each response closes first (TIME_WAIT at the server); a keep-alive server
    does not, and after the grace the fallback decides: our FIN (TIME_WAIT here) or,
    with auto, a reset (no TIME_WAIT anywhere; the server had sent everything)."""
    policy = f"peer-first fallback={fallback}"

    async def main() -> None:
        handler = _closes_after if server_closes else _keep_alive
        server = await asyncio.start_server(handler, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]

            def client() -> CloseReport:
                sock = socket.create_connection(("127.0.0.1", port), timeout=10)
                sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while not data.endswith(BODY):
                    chunk = sock.recv(65536)
                    assert chunk
                    data += chunk
                return tcpclose.close(sock, policy)

            report = await asyncio.to_thread(client)
            await asyncio.sleep(0)  # (let the server see the end)
        if server_closes:
            assert report.peer_closed_first
            assert report.fallback is None
            assert report.state is TcpState.CLOSED
        elif fallback == "graceful":
            assert report.fallback is Fallback.GRACEFUL
            assert report.state is TcpState.TIME_WAIT
            assert report.duration <= GRACE_S + SLACK_S
        else:
            assert report.fallback is Fallback.ABORT
            assert report.rst_sent
            assert report.discarded_bytes == 0
            assert report.state is TcpState.CLOSED
            assert report.duration <= GRACE_S + SLACK_S

    run(loop_name, main, timeout=30)
