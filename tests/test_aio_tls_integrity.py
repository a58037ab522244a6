"""TLS: no response byte lost, whoever the client is (issue 20).

Each cell serves mixed-size responses over TLS, some requests carrying a body the server
never reads, to many clients at once, and checks every response against its digest. The
clients are the ones our users' peers are built on: an asyncio TLS client, a uvloop TLS
client (aiohttp and httpx under uvloop) and a blocking ``ssl`` client, each reading to
the end of the stream.

The failure this guards against: our FIN leaving right behind the close_notify made
uvloop's TLS client end the stream before it handed over data it had already received
(64 of 64 responses of 1 MiB short, while every report said ``peer-eof``, no RST).
:func:`test_fin_right_behind_close_notify_cuts_uvloop_clients` shows that failure with a
server written by hand, so that the cells can fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import ssl
import threading
import warnings
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

import tcpclose.aio
from tcpclose import CloseReport
from tests._aio_support import _warm_up, loop_factory, payload, run, tls, wait_for

pytestmark = pytest.mark.timeout(120)

#: (response size, unread request body size): every combination, several times over.
SIZES = (1024, 256 * 1024, 1024 * 1024)
BODIES = (0, 16 * 1024, 64 * 1024)
ROUNDS = 2
_RESPONSES = {size: payload(size, seed=size) for size in SIZES}
_DIGESTS = {size: hashlib.sha256(data).hexdigest() for size, data in _RESPONSES.items()}


@dataclass
class Fetched:
    """What one client got: the response size it asked for, what it received, and how
    the stream ended (None: a clean end of stream)."""

    size: int
    local_port: int
    digest: str
    received: int
    error: str | None

    @property
    def intact(self) -> bool:
        """Every byte of the response arrived (however the stream ended after it)."""
        return self.digest == _DIGESTS[self.size]

    @property
    def whole(self) -> bool:
        """Every byte arrived and the stream then ended cleanly."""
        return self.intact and self.error is None


def _requests() -> list[tuple[int, int]]:
    return [(size, body) for _ in range(ROUNDS) for size in SIZES for body in BODIES]


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    line = await reader.readline()  # the body behind it stays unread
    writer.write(_RESPONSES[int(line)])


# -- clients ----------------------------------------------------------------------------------


async def _fetch_async(port: int, ctx: ssl.SSLContext, size: int, body: int) -> Fetched:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
    )
    local_port = int(writer.get_extra_info("sockname")[1])
    writer.write(b"%d\n" % size + b"x" * body)
    digest = hashlib.sha256()
    received = 0
    error = None
    try:
        while chunk := await reader.read(65536):
            digest.update(chunk)
            received += len(chunk)
    except (OSError, ssl.SSLError, asyncio.IncompleteReadError) as exc:
        error = type(exc).__name__
    writer.close()
    with contextlib.suppress(OSError, ssl.SSLError):
        await writer.wait_closed()
    return Fetched(size, local_port, digest.hexdigest(), received, error)


def _fetch_blocking(port: int, ctx: ssl.SSLContext, size: int, body: int) -> Fetched:
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    local_port = int(raw.getsockname()[1])
    digest = hashlib.sha256()
    received = 0
    error = None
    with ctx.wrap_socket(raw, server_hostname="localhost", suppress_ragged_eofs=False) as sock:
        try:
            sock.sendall(b"%d\n" % size + b"x" * body)
            while chunk := sock.recv(65536):
                digest.update(chunk)
                received += len(chunk)
        except (OSError, ssl.SSLError) as exc:
            error = type(exc).__name__
    return Fetched(size, local_port, digest.hexdigest(), received, error)


def _run_clients(client: str, port: int, ctx: ssl.SSLContext) -> list[Fetched]:
    """Every request at once, from ``client``, on threads of their own (the server's loop
    is busy serving them)."""
    requests = _requests()
    if client == "blocking":
        results: list[Fetched | None] = [None] * len(requests)

        def one(i: int, size: int, body: int) -> None:
            results[i] = _fetch_blocking(port, ctx, size, body)

        threads = [
            threading.Thread(target=one, args=(i, size, body))
            for i, (size, body) in enumerate(requests)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return [r for r in results if r is not None]

    async def all_at_once() -> list[Fetched]:
        return await asyncio.gather(*(_fetch_async(port, ctx, s, b) for s, b in requests))

    with asyncio.Runner(loop_factory=loop_factory(client)) as runner:
        return runner.run(all_at_once())


async def _serve(
    start: Callable[[], Awaitable[Any]], client: str, ctx: ssl.SSLContext
) -> list[Fetched]:
    server = await start()
    async with server:
        port = int(server.sockets[0].getsockname()[1])
        return await asyncio.to_thread(_run_clients, client, port, ctx)


# -- the matrix ---------------------------------------------------------------------------------


@pytest.mark.parametrize("client", ["uvloop", "asyncio", "blocking"])
@pytest.mark.parametrize(
    "policy", ["graceful", "peer-first timeout=2s fallback=graceful", "default", "abort"]
)
def test_no_byte_lost_over_tls(loop_name: str, client: str, policy: str, tmp_path: Any) -> None:
    """Every response arrives whole under every policy but ``abort``; an ``abort``
    report that cut a response says it reset the connection and discarded bytes."""
    if client == "uvloop":
        pytest.importorskip("uvloop")
        _warm_up("uvloop")  # (its process-wide fds, before run() counts them)
    certs = tls(str(tmp_path))
    reports: list[CloseReport] = []

    async def main() -> list[Fetched]:
        fetched = await _serve(
            lambda: tcpclose.aio.start_server(
                _handle,
                "127.0.0.1",
                0,
                ssl=certs.server,
                close_policy=policy,
                on_close=reports.append,
            ),
            client,
            certs.client,
        )
        await wait_for(lambda: len(reports) == len(fetched), 15, "every report")
        return fetched

    if policy in ("abort", "default"):
        # (abort: TC101, data discarded; default: TC102, unread request bodies)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tcpclose.DataLossWarning)
            fetched = run(loop_name, main, timeout=60)
    else:
        fetched = run(loop_name, main, timeout=60)
    assert len(fetched) == len(_requests())
    by_port = {r.peer[1]: r for r in reports if r.peer is not None}
    if policy == "abort":
        assert all(by_port[f.local_port].rst_sent for f in fetched)
        for f in fetched:
            if not f.intact:  # its report says how much it threw away
                assert by_port[f.local_port].discarded_bytes > 0, f
    elif policy == "default":
        # asyncio's own TLS close, as it does it: the baseline. It cuts now and then
        # (unread request data behind its close_notify ends the TLS layer's shutdown
        # at once), and its report cannot always tell; every connection is reported.
        assert set(by_port) == {f.local_port for f in fetched}
    else:
        cut = [f for f in fetched if not f.whole]
        assert not cut, [(f.size, f.received, f.error) for f in cut]
        assert not any(r.rst_sent for r in reports)


def test_fin_right_behind_close_notify_cuts_uvloop_clients(tmp_path: Any) -> None:
    """The failure the matrix guards against, with no library in the way: a server that
    sends its FIN right behind its close_notify cuts uvloop TLS clients' responses."""
    pytest.importorskip("uvloop")
    certs = tls(str(tmp_path))

    class FinAfterNotify(asyncio.Protocol):
        """Writes the response; once the TLS layer has it all, close_notify and, right
        behind it, the FIN (asyncio's TCP transport under the TLS one)."""

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            self.transport = transport

        def data_received(self, data: bytes) -> None:
            if b"\n" in data:
                self.transport.write(_RESPONSES[int(data.split(b"\n")[0])])
                self.close_when_flushed()

        def close_when_flushed(self) -> None:
            if self.transport.get_write_buffer_size():
                asyncio.get_running_loop().call_later(0.001, self.close_when_flushed)
                return
            self.transport.close()  # close_notify
            self.transport._ssl_protocol._transport.write_eof()  # type: ignore[attr-defined]

    async def main() -> list[Fetched]:
        loop = asyncio.get_running_loop()
        return await _serve(
            lambda: loop.create_server(FinAfterNotify, "127.0.0.1", 0, ssl=certs.server),
            "uvloop",
            certs.client,
        )

    # (A server written by hand: its own leftovers are not what this test is about.)
    fetched = run("asyncio", main, timeout=60, expected_errors=("",), check_fds=False)
    assert any(not f.whole for f in fetched), "no response was cut: the matrix could not fail"


def test_a_tls_error_is_named_by_its_reason_not_as_an_errno() -> None:
    """An SSLError's errno is OpenSSL's code: code 1 was reported as EPERM (issue 20,
    the TLS soak: a flooding peer's data after our close_notify)."""
    from tcpclose._observe import errno_name

    ctx = ssl.create_default_context()
    a, b = socket.socketpair()
    with a, b, ctx.wrap_socket(a, server_hostname="x", do_handshake_on_connect=False) as tls_a:
        b.sendall(b"this is not TLS" * 10)
        with pytest.raises(ssl.SSLError) as raised:
            tls_a.do_handshake()
    name = errno_name(raised.value)
    assert name.startswith("SSLError: ")
    assert "EPERM" not in name
