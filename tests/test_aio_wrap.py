"""with_policy: what real asyncio servers require of it (ADOPTION.md), on both loops.

A protocol under ``with_policy`` runs unchanged: slotted classes, factories called
with keywords, pickled factories, ``set_protocol`` re-targeting, the full transport
surface. And the decided close semantics: ``connection_lost`` exactly once,
``abort()`` during a pending close does not cut it short, ``write_eof()`` under
peer-first sends no FIN, the ``eof_received`` combination, reading resumed for the
drain, data after the protocol's close discarded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import pickle
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

import pytest

import tcpclose.aio
from tcpclose import CloseReport, TcpState
from tcpclose._plan import Outcome
from tests._aio_support import Client, payload, run, sha256, wait_for, wait_for_state

pytestmark = pytest.mark.timeout(60)

RESPONSE = payload(64 * 1024)


class Recorder(asyncio.Protocol):
    """Records every callback; answers the first line with RESPONSE, then runs
    ``script(self)`` (which usually closes)."""

    __slots__ = ("calls", "data", "eof_answer", "lost", "script", "transport")

    def __init__(
        self, script: Callable[[Recorder], None] | None = None, eof_answer: bool | None = None
    ) -> None:
        self.calls: list[str] = []
        self.data = b""
        self.lost: list[BaseException | None] = []
        self.script = script
        self.eof_answer = eof_answer
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.calls.append("made")
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.calls.append("data")
        first = b"\n" not in self.data
        self.data += data
        if first and b"\n" in self.data:
            self.transport.write(RESPONSE)
            if self.script is not None:
                self.script(self)

    def eof_received(self) -> bool | None:
        self.calls.append("eof")
        return self.eof_answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append("lost")
        self.lost.append(exc)
        # uvicorn closes its transport inside connection_lost: a no-op here.
        self.transport.close()


async def serve(
    factory: Callable[..., asyncio.BaseProtocol], policy: str, reports: list[CloseReport]
) -> asyncio.AbstractServer:
    loop = asyncio.get_running_loop()
    wrapped = tcpclose.aio.with_policy(factory, policy, on_close=reports.append)
    return await loop.create_server(wrapped, "127.0.0.1", 0)


def address(server: asyncio.AbstractServer) -> tuple[str, int]:
    sockets: Any = getattr(server, "sockets", ())
    name = sockets[0].getsockname()
    return str(name[0]), int(name[1])


async def one_exchange(
    factory: Callable[..., asyncio.BaseProtocol], policy: str, client: Client
) -> tuple[CloseReport, Any]:
    reports: list[CloseReport] = []
    server = await serve(factory, policy, reports)
    try:
        peer = await client.run(address(server))
        await wait_for(lambda: reports, 10, "the report")
    finally:
        server.close()
        await server.wait_closed()
    return reports[0], peer


def test_slotted_protocol_and_connection_lost_once(loop_name: str) -> None:
    """A protocol with __slots__ (as aiohttp's, Sanic's) works; it gets
    connection_lost exactly once, with None, even though it calls close() again
    inside connection_lost (as uvicorn does)."""
    made: list[Recorder] = []

    def factory() -> Recorder:
        proto = Recorder(script=lambda p: p.transport.close())
        made.append(proto)
        return proto

    async def main() -> None:
        client = Client(expect=len(RESPONSE), after="eof-close")
        report, peer = await one_exchange(factory, "graceful", client)
        assert sha256(peer.data) == sha256(RESPONSE)
        assert report.outcome is Outcome.PEER_EOF
        assert report.trigger == "close"
        (proto,) = made
        assert proto.calls.count("lost") == 1
        assert proto.lost == [None]
        assert proto.calls[0] == "made"
        assert proto.calls[-1] == "lost"
        assert not hasattr(proto, "__dict__")

    run(loop_name, main)


class Configured(asyncio.Protocol):
    """A protocol class taking keyword configuration, like uvicorn's and Sanic's."""

    alpn_protocols = ("http/1.1",)
    websocket_handshake = True

    def __init__(self, *args: Any, config: str = "", **kwargs: Any) -> None:
        self.args = args
        self.config = config
        self.kwargs = kwargs


def report_sink(report: CloseReport) -> None:
    """A module-level on_close (picklable)."""


def test_factory_forwards_arguments_attributes_and_pickles() -> None:
    """The factory forwards *args/**kwargs exactly, forwards attribute lookups (uvicorn
    reads alpn_protocols; Sanic tests hasattr(protocol, "websocket_handshake")), and
    survives pickling (uvicorn --workers, Sanic's spawned workers)."""
    factory = tcpclose.aio.with_policy(Configured, "peer-first timeout=2s", on_close=report_sink)
    wrapper = factory(1, 2, config="x", server_state="s")
    inner = wrapper.get_inner()
    assert isinstance(inner, Configured)
    assert inner.args == (1, 2)
    assert inner.config == "x"
    assert inner.kwargs == {"server_state": "s"}
    assert factory.alpn_protocols == ("http/1.1",)
    assert hasattr(factory, "websocket_handshake")
    assert not hasattr(factory, "no_such_attribute")
    clone = pickle.loads(pickle.dumps(factory))
    assert clone.protocol_factory is Configured
    assert clone.policy == factory.policy
    assert clone.on_close is report_sink
    assert isinstance(clone(config="y").get_inner(), Configured)
    # A closure cannot be pickled, and that is the wrapped factory's business.
    local = tcpclose.aio.with_policy(lambda: Configured(), "graceful")
    with pytest.raises((pickle.PicklingError, AttributeError)):
        pickle.dumps(local)


def test_factory_rejects_bad_input() -> None:
    with pytest.raises(TypeError, match="protocol factory"):
        tcpclose.aio.with_policy(42, "graceful")  # type: ignore[arg-type]
    with pytest.raises(tcpclose.PolicyError):
        tcpclose.aio.with_policy(Configured, "gracefull")


def test_transport_surface(loop_name: str) -> None:
    """The proxy transport keeps the whole surface: the real socket from
    get_extra_info (setsockopt, getpeername), write buffer limits, pause/resume,
    is_closing true as soon as close() is called, unknown attributes forwarded."""
    seen: dict[str, Any] = {}

    def script(p: Recorder) -> None:
        t = p.transport
        sock = t.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        seen["nodelay"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        seen["peername"] = t.get_extra_info("peername")
        seen["sockpeer"] = sock.getpeername()
        t.set_write_buffer_limits(high=1 << 20)
        seen["limits"] = t.get_write_buffer_limits()
        seen["buffer"] = t.get_write_buffer_size()
        seen["can_write_eof"] = t.can_write_eof()
        t.pause_reading()
        seen["reading_paused"] = not t.is_reading()
        t.resume_reading()
        seen["reading"] = t.is_reading()
        seen["closing_before"] = t.is_closing()
        seen["paused"] = t._paused  # a private attribute, forwarded to the real transport
        t.close()
        seen["closing_after"] = t.is_closing()
        t.write(b"dropped after close")  # ignored, as a closing TLS transport does
        seen["protocol"] = t.get_protocol() is p

    async def main() -> None:
        client = Client(expect=len(RESPONSE), after="eof-close")
        report, peer = await one_exchange(lambda: Recorder(script), "graceful", client)
        assert sha256(peer.data) == sha256(RESPONSE)  # nothing after close() went out
        assert report.outcome is Outcome.PEER_EOF

    run(loop_name, main)
    assert seen["nodelay"]
    assert seen["peername"][:2] == seen["sockpeer"][:2]
    assert seen["limits"][1] == 1 << 20
    assert seen["can_write_eof"] is True
    assert seen["reading_paused"] is True
    assert seen["reading"] is True
    assert seen["closing_before"] is False
    assert seen["closing_after"] is True
    assert seen["paused"] is False
    assert seen["protocol"] is True


class Second(asyncio.Protocol):
    """The protocol a first one hands over to (uvicorn's WebSocket upgrade)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.data = b""
        self.transport: Any = None

    def data_received(self, data: bytes) -> None:
        self.calls.append("data")
        self.data += data

    def eof_received(self) -> bool | None:
        self.calls.append("eof")
        self.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.calls.append("lost")


def test_set_protocol_retargets_the_wrapper(loop_name: str) -> None:
    """T'.set_protocol(new) re-targets the wrapper's inner protocol: data, EOF and
    connection_lost then reach the new protocol; get_protocol() returns it."""
    first: list[Recorder] = []
    second = Second()

    def script(p: Recorder) -> None:
        second.transport = p.transport
        p.transport.set_protocol(second)
        assert p.transport.get_protocol() is second

    def factory() -> Recorder:
        proto = Recorder(script)
        first.append(proto)
        return proto

    async def main() -> None:
        reports: list[CloseReport] = []
        server = await serve(factory, "peer-first timeout=2s", reports)
        try:
            await asyncio.to_thread(_upgrade_client, address(server))
            await wait_for(lambda: reports, 10, "the report")
        finally:
            server.close()
            await server.wait_closed()
        report = reports[0]
        await wait_for(lambda: "lost" in second.calls, 5, "second protocol's connection_lost")
        assert report.peer_closed_first
        assert b"after-upgrade" in second.data
        assert second.calls[-2:] == ["eof", "lost"]
        assert "lost" not in first[0].calls

    run(loop_name, main)


def _upgrade_client(addr: tuple[str, int]) -> None:
    with socket.create_connection(addr, timeout=5) as sock:
        sock.sendall(b"upgrade\n")
        got = 0
        while got < len(RESPONSE):
            chunk = sock.recv(65536)
            assert chunk
            got += len(chunk)
        sock.sendall(b"after-upgrade")


def test_abort_during_pending_close_does_not_cut_it_short(loop_name: str) -> None:
    """Sanic calls abort() one loop turn after every close(): the pending graceful
    close finishes (no RST, the client gets everything); with no close under way,
    abort() is an abortive close and the report says the protocol asked for it."""

    def close_then_abort(p: Recorder) -> None:
        p.transport.close()
        asyncio.get_running_loop().call_soon(p.transport.abort)

    def abort_only(p: Recorder) -> None:
        p.transport.abort()

    async def main() -> None:
        client = Client(expect=len(RESPONSE), after="eof-close")
        report, peer = await one_exchange(lambda: Recorder(close_then_abort), "graceful", client)
        assert peer.error is None
        assert sha256(peer.data) == sha256(RESPONSE)
        assert report.outcome is Outcome.PEER_EOF
        assert not report.rst_sent
        assert report.state is TcpState.TIME_WAIT
        client = Client(read=False, after="hold")
        client.release.set()
        report, peer = await one_exchange(lambda: Recorder(abort_only), "graceful", client)
        assert report.trigger == "abort"
        assert report.outcome is Outcome.ABORTED
        assert report.rst_sent
        assert report.state is TcpState.CLOSED

    run(loop_name, main)


def test_write_eof_under_peer_first_grace_then_fin(loop_name: str) -> None:
    """Issue 14: write_eof() under peer-first: the peer gets the grace to close first;
    then our FIN goes out (RFC 6455 clients wait for it). Data and the peer's EOF still
    reach the protocol either way. Under graceful, write_eof() passes through."""
    protos: list[Recorder] = []

    def factory() -> Recorder:
        proto = Recorder(lambda p: p.transport.write_eof())
        protos.append(proto)
        return proto

    async def main() -> None:
        # A prompt peer: it closes within the grace; no FIN from us, no TIME_WAIT here.
        reports: list[CloseReport] = []
        server = await serve(factory, "peer-first grace=300ms", reports)
        try:
            peer = await asyncio.to_thread(_peer_first_client, address(server), 0.1)
            await wait_for(lambda: reports, 10, "the report")
        finally:
            server.close()
            await server.wait_closed()
        assert peer["eof_after"] is None
        proto = protos[0]
        assert b"more data" in proto.data
        assert proto.calls[-2:] == ["eof", "lost"]
        report = reports[0]
        assert report.trigger == "write-eof"
        assert report.fallback is None
        assert report.peer_closed_first
        assert report.outcome is Outcome.PEER_EOF
        assert report.state is TcpState.CLOSED
        # A peer waiting for our FIN: it comes after the grace (the old rule sent none
        # and both sides waited for the other until the timeout).
        protos.clear()
        reports.clear()
        server = await serve(factory, "peer-first grace=300ms fallback=abort", reports)
        try:
            peer = await asyncio.to_thread(_peer_first_client, address(server), 2.0)
            await wait_for(lambda: reports, 10, "the report")
        finally:
            server.close()
            await server.wait_closed()
        assert peer["eof_after"] is not None
        assert 0.25 <= peer["eof_after"] <= 0.3 + 0.05
        assert b"more data" in protos[0].data  # sent after our FIN: still delivered
        assert protos[0].calls[-2:] == ["eof", "lost"]
        report = reports[0]
        assert report.fallback is tcpclose.Fallback.GRACEFUL  # never a reset here
        assert report.fin_sent
        assert not report.rst_sent
        assert report.outcome is Outcome.PEER_EOF
        # graceful: the FIN goes out now.
        client = Client(expect=len(RESPONSE), after="eof-close")
        reports.clear()
        server = await serve(factory, "graceful", reports)
        try:
            result = await client.run(address(server))
        finally:
            server.close()
            await server.wait_closed()
        assert result.eof

    run(loop_name, main)


def _peer_first_client(addr: tuple[str, int], wait_eof: float) -> dict[str, Any]:
    """Read the response, wait up to ``wait_eof`` for the server's EOF, send more, close."""
    with socket.create_connection(addr, timeout=5) as sock:
        sock.sendall(b"GET\n")
        got = 0
        while got < len(RESPONSE):
            chunk = sock.recv(65536)
            assert chunk
            got += len(chunk)
        received = time.monotonic()
        sock.settimeout(wait_eof)
        try:
            eof_after = time.monotonic() - received if sock.recv(1) == b"" else None
        except TimeoutError:
            eof_after = None
        sock.sendall(b"more data")
        return {"eof_after": eof_after}


@pytest.mark.parametrize("answer", [True, None])
def test_eof_received_combination(loop_name: str, answer: bool | None) -> None:
    """The protocol's eof_received answer, combined with the policy: True keeps the
    connection open until the protocol closes; None (uvicorn, aiohttp) means "close
    now", and that close is the policy's (reported, trigger peer-eof)."""
    protos: list[Recorder] = []

    def factory() -> Recorder:
        proto = Recorder(eof_answer=answer)
        protos.append(proto)
        return proto

    async def main() -> None:
        reports: list[CloseReport] = []
        server = await serve(factory, "graceful", reports)
        try:
            await Client(expect=len(RESPONSE), after="close").run(address(server))
            await wait_for(lambda: protos and "eof" in protos[0].calls, 5, "eof_received")
            proto = protos[0]
            if answer:
                # Still open: the protocol may write after the peer's FIN; then closes.
                assert "lost" not in proto.calls
                assert not reports
                proto.transport.close()
            await wait_for(lambda: reports, 10, "the report")
            await wait_for(lambda: "lost" in proto.calls, 5, "connection_lost")
        finally:
            server.close()
            await server.wait_closed()
        report = reports[0]
        assert report.trigger == ("close" if answer else "peer-eof")
        assert report.peer_closed_first
        assert report.state is TcpState.CLOSED
        assert protos[0].lost == [None]

    run(loop_name, main)


def test_reading_resumed_and_data_after_close_discarded(loop_name: str) -> None:
    """The protocol paused reading (flow control) and closed: the policy resumes
    reading, drains what the peer still sends (no RST), and none of it reaches the
    protocol."""
    protos: list[Recorder] = []

    def script(p: Recorder) -> None:
        p.transport.pause_reading()
        p.transport.close()
        p.transport.resume_reading()  # moot while the policy drains
        p.transport.pause_reading()

    def factory() -> Recorder:
        proto = Recorder(script)
        protos.append(proto)
        return proto

    async def main() -> None:
        body = payload(512 * 1024, seed=9)
        client = Client(body=body, expect=len(RESPONSE), after="eof-close")
        report, peer = await one_exchange(factory, "graceful", client)
        assert peer.error is None
        assert sha256(peer.data) == sha256(RESPONSE)
        assert report.outcome is Outcome.PEER_EOF
        assert not report.rst_sent
        received_by_protocol = len(protos[0].data)
        assert received_by_protocol + report.drained_bytes == len(b"GET\n" + body)
        assert report.drained_bytes > 0
        assert "eof" not in protos[0].calls

    run(loop_name, main)


class Buffered(asyncio.BufferedProtocol):
    """A BufferedProtocol (asyncio's SSLProtocol is one; so are some fast parsers)."""

    def __init__(self) -> None:
        self.buf = bytearray(1024)
        self.data = b""
        self.transport: Any = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def get_buffer(self, sizehint: int) -> bytearray:
        return self.buf

    def buffer_updated(self, nbytes: int) -> None:
        self.data += bytes(self.buf[:nbytes])
        if b"\n" in self.data:
            self.transport.write(RESPONSE)
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        pass


def test_buffered_protocol(loop_name: str) -> None:
    """A BufferedProtocol gets its data through get_buffer/buffer_updated."""

    async def main() -> None:
        client = Client(expect=len(RESPONSE), after="eof-close")
        report, peer = await one_exchange(Buffered, "graceful", client)
        assert sha256(peer.data) == sha256(RESPONSE)
        assert report.outcome is Outcome.PEER_EOF

    run(loop_name, main)


@pytest.mark.parametrize("cap", [100 * 1024, 256 * 1024, 300 * 1024])
def test_buffered_protocol_drain_stops_at_the_byte_cap(loop_name: str, cap: int) -> None:
    """A flooding peer against a BufferedProtocol: the wrapper reads into its own
    buffer, at most what is left of max_drain_bytes, whatever a transport would read
    at once (256 KiB); the caps below, at and above that size read exactly the cap."""

    async def main() -> None:
        client = Client(expect=len(RESPONSE), after="flood")
        policy = f"graceful max_drain_bytes={cap}B idle_timeout=5s linger_time=5s"
        task = asyncio.ensure_future(one_exchange(Buffered, policy, client))
        try:
            report, _ = await task
        finally:
            client.release.set()
        assert report.outcome is Outcome.BYTE_CAP, report
        assert report.drained_bytes == cap, report

    run(loop_name, main)


def test_on_close_errors_are_logged_not_raised(
    loop_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An on_close that raises is logged on the tcpclose logger; the loop never sees it."""

    def bad(report: CloseReport) -> None:
        raise RuntimeError("boom")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        factory = tcpclose.aio.with_policy(
            lambda: Recorder(lambda p: p.transport.close()), "graceful", on_close=bad
        )
        server = await loop.create_server(factory, "127.0.0.1", 0)
        try:
            await Client(expect=len(RESPONSE), after="eof-close").run(address(server))
            await wait_for(lambda: "on_close" in caplog.text, 5, "the log record")
        finally:
            server.close()
            await server.wait_closed()

    with caplog.at_level(logging.ERROR, logger="tcpclose"):
        run(loop_name, main)
    assert "boom" in caplog.text


def test_sendfile_through_the_proxy_transport() -> None:
    """loop.sendfile() (aiohttp's FileResponse) works on the proxy transport: it falls
    back to reading and writing, through set_protocol and flow control."""
    content = payload(300 * 1024, seed=11)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[int] = loop.create_future()
        with tempfile.NamedTemporaryFile(delete=False) as handle:
            handle.write(content)
        try:

            class FileSender(asyncio.Protocol):
                def connection_made(self, transport: asyncio.BaseTransport) -> None:
                    self.transport = transport

                def data_received(self, data: bytes) -> None:
                    async def send() -> None:
                        with open(handle.name, "rb") as f:
                            sent = await loop.sendfile(self.transport, f)  # type: ignore[arg-type]
                        done.set_result(sent)
                        self.transport.close()

                    self.task = loop.create_task(send())

            factory = tcpclose.aio.with_policy(FileSender, "graceful")
            server = await loop.create_server(factory, "127.0.0.1", 0)
            try:
                peer = await Client(expect=len(content), after="eof-close").run(address(server))
                assert await done == len(content)
            finally:
                server.close()
                await server.wait_closed()
        finally:
            os.unlink(handle.name)
        assert sha256(peer.data) == sha256(content)

    run("asyncio", main)


def test_wrapper_tells_closing_peer_state(loop_name: str) -> None:
    """After the close, the 4-tuple is gone from the kernel here for peer-first (the
    peer holds TIME_WAIT)."""

    async def main() -> None:
        client = Client(expect=len(RESPONSE), after="close")
        report, peer = await one_exchange(
            lambda: Recorder(lambda p: p.transport.close()), "peer-first timeout=2s", client
        )
        assert report.state is TcpState.CLOSED
        assert peer.local is not None
        assert peer.peer is not None
        await wait_for_state(peer.local, peer.peer, (TcpState.TIME_WAIT,))

    run(loop_name, main)
