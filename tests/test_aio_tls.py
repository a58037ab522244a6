"""TLS: each mode over ssl= transports, on both loops, with Python's ssl client and
with real peers (``openssl s_client``, ``curl``) (issue 6).

What each mode must look like to a TLS peer:

* ``graceful``: close_notify; the TCP FIN once the peer has answered it (issue 20): the
  peer sees a clean TLS shutdown and has read everything before our FIN arrives;
* ``abort``: RST, and no close_notify before it;
* ``peer-first``: nothing until the peer's close_notify or FIN; then we close.
"""

from __future__ import annotations

import asyncio
import shutil
import warnings
from typing import Any

import pytest

import tcpclose
import tcpclose.aio
from tcpclose import CloseMode, CloseReport, DataLossWarning, TcpState
from tcpclose._plan import Outcome
from tests._aio_support import (
    Client,
    TlsClient,
    curl,
    payload,
    run,
    sha256,
    spawn_piped,
    tls,
    wait_for,
)

pytestmark = pytest.mark.timeout(60)

RESPONSE = payload(200 * 1024, seed=21)


def address(server: Any) -> tuple[str, int]:
    name = server.sockets[0].getsockname()
    return str(name[0]), int(name[1])


async def tls_exchange(
    policy: str, client: TlsClient, tmp: str, *, response: bytes = RESPONSE
) -> tuple[CloseReport, Any]:
    """A TLS start_server answering one line with ``response``; returns the report and
    what the client saw."""
    reports: list[CloseReport] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(response)

    server = await tcpclose.aio.start_server(
        handle,
        "127.0.0.1",
        0,
        ssl=tls(tmp).server,
        close_policy=policy,
        on_close=reports.append,
    )
    async with server:
        peer = await client.run(address(server))
        await wait_for(lambda: reports, 10, "the report")
    return reports[0], peer


def test_tls_graceful_close_notify_then_fin(loop_name: str, tmp_path: Any) -> None:
    """graceful: the client gets every byte, then close_notify, then, once it has
    answered, the TCP FIN; no ragged EOF, no reset (issue 20: a FIN right behind the
    close_notify cut uvloop clients' responses)."""

    async def main() -> None:
        client = TlsClient(tls(str(tmp_path)).client, expect=len(RESPONSE), after="read-close")
        report, peer = await tls_exchange("graceful idle_timeout=2s", client, str(tmp_path))
        assert peer.error is None, peer.error
        assert sha256(peer.data) == sha256(RESPONSE)
        assert peer.extra["close_notify"] is True
        # Our FIN waited for the client's answer, then came.
        assert peer.extra["fin_before_answer"] is False
        assert peer.extra["fin_after_close_notify"] is True
        assert report.mode is CloseMode.GRACEFUL
        assert report.outcome is Outcome.PEER_EOF
        assert not report.rst_sent

    run(loop_name, main)


def test_tls_abort_resets_without_close_notify(loop_name: str, tmp_path: Any) -> None:
    """abort: the client's connection is reset, with no close_notify before it;
    nothing is left here. (asyncio's own abort() would send a FIN.)"""

    async def main() -> None:
        client = TlsClient(tls(str(tmp_path)).client, expect=len(RESPONSE), after="read-close")
        report, peer = await tls_exchange("abort", client, str(tmp_path))
        # Python's ssl reports the reset inside a record as SSLEOFError; the kernel
        # tells: CLOSE is where RST leaves a socket (a FIN would leave CLOSE_WAIT).
        assert peer.error in ("ECONNRESET", "SSLEOFError")
        assert peer.extra["tcp_state"] is TcpState.CLOSE
        assert "close_notify" not in peer.extra
        assert report.outcome is Outcome.ABORTED
        assert report.rst_sent
        assert report.state is TcpState.CLOSED

    with pytest.warns(DataLossWarning, match="TC101"):
        run(loop_name, main)


@pytest.mark.parametrize("after", ["notify-close", "plain-close"])
def test_tls_peer_first_waits_for_the_peer(loop_name: str, after: str, tmp_path: Any) -> None:
    """peer-first: no close_notify and no FIN from us until the peer's close_notify or
    FIN (uvloop reports a bare FIN only as connection_lost); then we close, second."""

    async def main() -> None:
        client = TlsClient(tls(str(tmp_path)).client, expect=len(RESPONSE), after=after)
        report, peer = await tls_exchange("peer-first timeout=3s", client, str(tmp_path))
        assert peer.error is None
        assert sha256(peer.data) == sha256(RESPONSE)
        assert report.mode is CloseMode.PEER_FIRST
        assert report.fallback is None
        assert report.outcome is Outcome.PEER_EOF
        assert report.peer_closed_first
        assert report.duration < 2
        assert report.state is not TcpState.TIME_WAIT
        assert peer.local is not None
        assert peer.peer is not None
        peer_state = tcpclose.lookup(peer.local, peer.peer).state
        if after == "plain-close":
            assert peer_state is TcpState.TIME_WAIT
        else:
            # The peer closed right after its close_notify; the TLS layer's answering
            # close_notify then reaches a closed socket, which resets: no TIME_WAIT on
            # either side.
            assert peer_state in (TcpState.TIME_WAIT, TcpState.CLOSED)

    run(loop_name, main)


def test_tls_peer_first_silent_peer_falls_back(loop_name: str, tmp_path: Any) -> None:
    """peer-first over TLS with a peer that waits for us: after the grace the
    graceful fallback sends close_notify and FIN; the peer sees a clean shutdown."""

    async def main() -> None:
        client = TlsClient(tls(str(tmp_path)).client, expect=len(RESPONSE), after="read-close")
        report, peer = await tls_exchange(
            "peer-first grace=300ms fallback=graceful", client, str(tmp_path)
        )
        assert peer.extra["close_notify"] is True
        assert report.fallback is not None
        assert report.mode is CloseMode.GRACEFUL
        assert 0.29 <= report.duration < 1.5

    run(loop_name, main)


def test_tls_default_is_asyncio_close(loop_name: str, tmp_path: Any) -> None:
    """default: asyncio's own TLS close (close_notify, the peer's, then FIN)."""

    async def main() -> None:
        client = TlsClient(tls(str(tmp_path)).client, expect=len(RESPONSE), after="read-close")
        report, peer = await tls_exchange("default", client, str(tmp_path))
        assert peer.extra["close_notify"] is True
        assert report.outcome is Outcome.CLOSED

    run(loop_name, main)


# -- real peers ---------------------------------------------------------------------------------


needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl")
needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="no curl")


@needs_openssl
@pytest.mark.parametrize("policy", ["graceful", "peer-first timeout=2s", "abort"])
def test_openssl_s_client(loop_name: str, policy: str, tmp_path: Any) -> None:
    """openssl s_client as the peer: graceful and peer-first end in a clean TLS
    shutdown (s_client exits 0 with the whole answer); abort is a reset."""
    text = b"".join(b"line %05d of the answer\n" % i for i in range(4000))
    cfg = tls(str(tmp_path))

    async def main() -> CloseReport:
        reports: list[CloseReport] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(text)

        server = await tcpclose.aio.start_server(
            handle, "127.0.0.1", 0, ssl=cfg.server, close_policy=policy, on_close=reports.append
        )
        async with server:
            port = address(server)[1]
            cmd = [
                "openssl",
                "s_client",
                "-connect",
                f"127.0.0.1:{port}",
                "-servername",
                "localhost",
                "-CAfile",
                cfg.ca_file,
                "-verify_return_error",
                "-quiet",
            ]
            if policy.startswith("peer-first"):
                # s_client closes (close_notify + FIN) when its input ends: give it the
                # request and end the input once the answer is in.
                cmd.append("-no_ign_eof")
            proc = await spawn_piped(cmd)
            assert proc.stdin is not None
            assert proc.stdout is not None
            proc.stdin.write(b"GET\n")
            await proc.stdin.drain()
            received = b""
            try:
                received = await asyncio.wait_for(proc.stdout.readexactly(len(text)), 10)
            except asyncio.IncompleteReadError as exc:
                received = exc.partial
            proc.stdin.close()
            rest, stderr = await asyncio.wait_for(proc.communicate(), 10)
            received += rest
            await wait_for(lambda: reports, 10, "the report")
        report = reports[0]
        if policy == "abort":
            assert report.outcome is Outcome.ABORTED
            assert report.rst_sent
            assert report.state is TcpState.CLOSED
        else:
            assert proc.returncode == 0, stderr
            assert received == text
            assert report.outcome is Outcome.PEER_EOF
            if policy.startswith("peer-first"):
                assert report.peer_closed_first
        return report

    # An abort warns when s_client had not acknowledged everything yet (timing).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = run(loop_name, main)
    assert ("TC101" in report.warnings) == any(
        issubclass(w.category, DataLossWarning) for w in caught
    )


HTTP_BODY = payload(4 << 20, seed=22)


async def http_server(
    policy: str | None, ssl: Any = None, *, await_body: bool = False
) -> tuple[Any, list[CloseReport]]:
    """A minimal HTTP/1.1 server: reads the headers (never a request body), answers
    4 MiB with Connection: close, and closes (plainly when ``policy`` is None).

    ``await_body``: answer only once part of the request body waits unread in the
    kernel (the stream reader pauses at twice its limit), so that the close meets
    unread data whatever curl's timing; bounded by 5 s."""
    reports: list[CloseReport] = []
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(HTTP_BODY)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if await_body:
            fd = writer.get_extra_info("socket").fileno()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while tcpclose.queues(fd).unread == 0 and loop.time() < deadline:
                await asyncio.sleep(0.005)  # polling the kernel's queue, with a deadline
        writer.write(head + HTTP_BODY)
        if policy is None:
            writer.close()
            try:
                await writer.wait_closed()
            except OSError:
                pass

    if policy is None:
        return await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ssl), reports
    server = await tcpclose.aio.start_server(
        handle, "127.0.0.1", 0, ssl=ssl, close_policy=policy, on_close=reports.append
    )
    return server, reports


@needs_curl
def test_curl_rst_trap(loop_name: str) -> None:
    """curl posting a body the server never reads, 4 MiB answered with Connection:
    close, curl reading at its own pace: after a plain asyncio close curl fails with
    "Connection reset by peer" (exit 56) and part of the answer; with graceful and
    peer-first it gets all of it."""

    async def main() -> None:
        body = payload(1 << 20, seed=23)
        # Without the library (a race the client nearly always loses: three tries).
        outcomes = []
        for _ in range(3):
            server, _ = await http_server(None, await_body=True)
            async with server:
                url = f"http://127.0.0.1:{address(server)[1]}/"
                code, out, err = await curl(url, body=body, pace=0.003)
            outcomes.append((code, len(out)))
            if code == 56:
                assert b"reset" in err.lower()
                assert len(out) < len(HTTP_BODY)
                break
        else:
            raise AssertionError(f"plain close never reset curl: {outcomes}")
        for policy in ("graceful", "peer-first timeout=5s"):
            server, reports = await http_server(policy, await_body=True)
            async with server:
                url = f"http://127.0.0.1:{address(server)[1]}/"
                code, out, err = await curl(url, body=body, pace=0.003)
                await wait_for(lambda r=reports: r, 10, "the report")  # type: ignore[misc]
            assert code == 0, err
            assert sha256(out) == sha256(HTTP_BODY)
            assert not reports[0].rst_sent

    run(loop_name, main, timeout=60)


@needs_curl
@pytest.mark.parametrize("policy", ["graceful", "peer-first timeout=5s"])
def test_curl_over_tls(loop_name: str, policy: str, tmp_path: Any) -> None:
    """curl over HTTPS: the whole answer, a clean TLS shutdown (exit 0)."""
    cfg = tls(str(tmp_path))

    async def main() -> None:
        server, reports = await http_server(policy, ssl=cfg.server)
        async with server:
            url = f"https://localhost:{address(server)[1]}/"
            code, out, err = await curl(url, "--cacert", cfg.ca_file)
            await wait_for(lambda: reports, 10, "the report")
        assert code == 0, err
        assert sha256(out) == sha256(HTTP_BODY)
        assert reports[0].outcome is Outcome.PEER_EOF

    run(loop_name, main)


def test_plain_client_unaffected(loop_name: str, tmp_path: Any) -> None:
    """A non-TLS client against a TLS server: the handshake fails; nothing hangs and
    nothing is left open."""

    async def main() -> None:
        reports: list[CloseReport] = []

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            raise AssertionError("no handshake, no handler")

        server = await tcpclose.aio.start_server(
            handle, "127.0.0.1", 0, ssl=tls(str(tmp_path)).server, on_close=reports.append
        )
        async with server:
            peer = await Client(request=b"GET / HTTP/1.0\r\n\r\n", expect=1).run(address(server))
        assert peer.eof or peer.error

    run(loop_name, main, expected_errors=("SSL handshake failed",))
