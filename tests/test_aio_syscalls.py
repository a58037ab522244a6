"""Per-close system calls only where needed (issue 16, item 4), on both loops.

``SO_LINGER`` is read where it can change (the listener, once; a connection whose
socket the application had), not on every close; uvloop connections get one socket
view for their socket options; the report's kernel state is looked up eagerly (by
default, one loop callback for the closes ending in one turn), lazily or for a sample.
"""

from __future__ import annotations

import asyncio
import gc
import os
import pickle
import socket
import struct
import time
from typing import Any

import pytest

import tcpclose.aio
from tcpclose import BlockingCloseWarning, CloseReport, PolicyError, TcpState
from tests._aio_support import Client, payload, run, wait_for
from tests._support import ss_lookup

pytestmark = pytest.mark.timeout(60)

RESPONSE = payload(16 * 1024, seed=16)
LINGER_ONE_SECOND = struct.pack("ii", 1, 1)
LINGER_ZERO = struct.pack("ii", 1, 0)


def address(server: Any) -> tuple[str, int]:
    name = server.sockets[0].getsockname()
    return str(name[0]), int(name[1])


async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readline()
    writer.write(RESPONSE)  # returning closes with the policy


def client() -> Client:
    """A client that waits for the server's FIN: the server closes first (TIME_WAIT)."""
    return Client(request=b"GET\n", expect=len(RESPONSE), after="eof-close")


class LingerSetter(asyncio.Protocol):
    """Answers the first line and closes; sets ``linger`` (when given) on its socket
    through the transport it was handed first."""

    def __init__(self, linger: bytes | None) -> None:
        self.linger = linger
        self.transport: Any = None
        self.seen = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.linger is not None:
            sock = transport.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, self.linger)

    def data_received(self, data: bytes) -> None:
        self.seen += data
        if b"\n" in self.seen:
            self.transport.write(RESPONSE)
            self.transport.close()


def test_linger_inherited_from_the_listener_is_still_turned_off(loop_name: str) -> None:
    """Accepted sockets inherit their listener's SO_LINGER: without the library the
    accepted socket shows the listener's {1, 1}. A server given such a listener reads
    it once when it starts, and every close still finds the inherited linger and turns
    it off (TC201); a server whose listener does not linger has no close ask."""

    # Without the library: the kernel copies the listener's setting.
    with socket.create_server(("127.0.0.1", 0)) as lsock:
        lsock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ONE_SECOND)
        with socket.create_connection(lsock.getsockname()):
            accepted, _ = lsock.accept()
            with accepted:
                got = accepted.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8)
                assert got == LINGER_ONE_SECOND

    async def serve(linger: bytes | None) -> list[CloseReport]:
        listener = socket.create_server(("127.0.0.1", 0))
        if linger is not None:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        listener.setblocking(False)
        reports: list[CloseReport] = []
        server = await tcpclose.aio.start_server(
            respond, sock=listener, close_policy="graceful", on_close=reports.append
        )
        for _ in range(3):
            result = await client().run(address(server))
            assert result.data == RESPONSE
        await wait_for(lambda: len(reports) == 3, what="three reports")
        server.close()
        await server.wait_closed()
        return reports

    with pytest.warns(BlockingCloseWarning, match="TC201"):
        lingering = run(loop_name, lambda: serve(LINGER_ONE_SECOND))
    assert [("TC201" in r.warnings) for r in lingering] == [True, True, True]
    plain = run(loop_name, lambda: serve(None))
    assert not any(r.warnings for r in plain)


def test_linger_set_by_the_protocol_is_still_turned_off(loop_name: str) -> None:
    """Under ``with_policy`` on a listener of the application's own, the factory's first
    close learns that its listener does not linger, and later closes do not ask. A
    protocol that sets SO_LINGER {1, 1} through ``get_extra_info("socket")`` has its
    close check it all the same: found, turned off, TC201."""
    lingers = [None, LINGER_ONE_SECOND, None]
    reports: list[CloseReport] = []
    factory = tcpclose.aio.with_policy(
        lambda: LingerSetter(lingers.pop(0)), "graceful", on_close=reports.append
    )
    known: list[bool | None] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", 0)
        known.append(factory.listener.inherited)  # (not known before the first close)
        for n in range(3):
            result = await client().run(address(server))
            assert result.data == RESPONSE
            await wait_for(lambda n=n: len(reports) == n + 1, what="the report")  # type: ignore[misc]
            known.append(factory.listener.inherited)
        server.close()
        await server.wait_closed()

    with pytest.warns(BlockingCloseWarning, match="TC201"):
        run(loop_name, main)
    assert [("TC201" in r.warnings) for r in reports] == [False, True, False]
    # The exposed socket's finding says nothing of the listener.
    assert known == [None, False, False, False]


def test_linger_zero_set_by_the_protocol_is_left_to_reset(loop_name: str) -> None:
    """SO_LINGER {1, 0} set by the application is its abortive choice: the close reads
    it (the application had the socket), finds nothing that would block, leaves it, and
    the fd's close resets as the kernel does it: the client sees ECONNRESET after the
    whole response, and ss shows nothing left of the 4-tuple on our side."""
    reports: list[CloseReport] = []
    factory = tcpclose.aio.with_policy(
        lambda: LingerSetter(LINGER_ZERO), "default", on_close=reports.append
    )

    async def main() -> tuple[Any, CloseReport]:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(factory, "127.0.0.1", 0)
        peer = client()
        result = await peer.run(address(server))
        await wait_for(lambda: len(reports) == 1, what="the report")
        server.close()
        await server.wait_closed()
        return result, reports[0]

    result, report = run(loop_name, main)
    assert result.data == RESPONSE
    assert result.error == "ECONNRESET"
    assert not report.warnings
    assert report.kernel_state is not None
    assert report.kernel_state.state is TcpState.CLOSED
    assert report.local is not None
    assert report.peer is not None
    assert ss_lookup(report.local, report.peer) is None


def test_uvloop_socket_view_never_touches_a_reused_descriptor() -> None:
    """uvloop's pseudo-socket makes a socket object per getsockopt; a connection's
    view makes one and keeps it. Once the transport has closed the descriptor, the
    view refuses (ValueError, as the pseudo-socket does) even when the number already
    belongs to a new connection, and dropping it closes nothing."""
    uvloop = pytest.importorskip("uvloop")
    from tcpclose._aio_transport import _SocketView, socket_view

    async def main() -> None:
        transports: asyncio.Queue[asyncio.Transport] = asyncio.Queue()

        class Keep(asyncio.Protocol):
            def connection_made(self, transport: asyncio.BaseTransport) -> None:
                transports.put_nowait(transport)  # type: ignore[arg-type]

        loop = asyncio.get_running_loop()
        server = await loop.create_server(Keep, "127.0.0.1", 0)
        first = socket.create_connection(address(server))
        transport = await transports.get()
        pseudo = transport.get_extra_info("socket")
        view = socket_view(pseudo)
        assert isinstance(view, _SocketView)
        option = (socket.SOL_SOCKET, socket.SO_LINGER, 8)
        assert view.getsockopt(*option) == pseudo.getsockopt(*option) == struct.pack("ii", 0, 0)
        info = tcpclose.tcp_info(view)
        assert info is not None
        assert info.state is TcpState.ESTABLISHED
        fd = view.fileno()
        transport.close()
        await wait_for(lambda: pseudo.fileno() == -1, what="uvloop closing the fd")
        second = socket.create_connection(address(server))
        other = await transports.get()
        reused = other.get_extra_info("socket").fileno() == fd
        with pytest.raises(ValueError, match="negative file descriptor"):
            view.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_ZERO)
        if reused:  # (the usual case: the lowest free number)
            got = other.get_extra_info("socket").getsockopt(*option)
            assert got == struct.pack("ii", 0, 0)
        del view
        gc.collect()
        os.fstat(other.get_extra_info("socket").fileno())  # still open
        other.close()
        first.close()
        second.close()
        server.close()
        await server.wait_closed()

    assert uvloop is not None
    run("uvloop", main)


def _two_servers(
    loop_name: str, modes: tuple[str, ...], connections: int = 1, *, read_after_s: float = 0.0
) -> tuple[list[list[CloseReport]], float]:
    """Serve ``connections`` clients on one server per kernel_state mode; the reports,
    and the seconds between the last close and the end of ``main``."""
    collected: list[list[CloseReport]] = [[] for _ in modes]

    async def main() -> float:
        servers = [
            await tcpclose.aio.start_server(
                respond,
                "127.0.0.1",
                0,
                close_policy="graceful",
                on_close=reports.append,
                kernel_state=mode,
            )
            for mode, reports in zip(modes, collected, strict=True)
        ]
        for _ in range(connections):
            for server in servers:
                await client().run(address(server))
        await wait_for(lambda: all(len(r) == connections for r in collected), what="reports")
        closed = time.monotonic()
        # Let the TIME_WAIT timers run before anything reads the lazy state.
        await wait_for(lambda: time.monotonic() >= closed + read_after_s, timeout=5)
        for server in servers:
            server.close()
            await server.wait_closed()
        return time.monotonic() - closed

    waited = run(loop_name, main)
    return collected, waited


def test_kernel_state_lazy_is_looked_up_when_first_read(loop_name: str) -> None:
    """``kernel_state="lazy"``: the report's kernel state is looked up when first read,
    and says what the kernel holds then: TIME_WAIT with the time left as ss shows it
    now, not as it was at the close (the eager report's)."""
    (eager_reports, lazy_reports), waited = _two_servers(
        loop_name, ("eager", "lazy"), read_after_s=1.5
    )
    eager, lazy = eager_reports[0], lazy_reports[0]
    assert eager.kernel_state_mode == "eager"
    assert lazy.kernel_state_mode == "lazy"
    assert lazy.local is not None
    assert lazy.peer is not None
    entry = ss_lookup(lazy.local, lazy.peer)
    assert entry is not None
    assert entry.state == "TIME-WAIT"
    state = lazy.kernel_state
    assert state is not None
    assert state.state is TcpState.TIME_WAIT
    assert eager.kernel_state is not None
    assert eager.kernel_state.seconds_left is not None
    assert state.seconds_left is not None
    assert waited >= 1.5
    # Read 1.5 s after the closes: the timer has run down since the eager lookup.
    assert state.seconds_left < eager.kernel_state.seconds_left - 1.0
    assert entry.timer_seconds is not None
    assert abs(entry.timer_seconds - state.seconds_left) < 1.5
    # A lazy report is a CloseReport like any other: it pickles as one, compares by value.
    copy = pickle.loads(pickle.dumps(lazy))
    assert type(copy) is CloseReport
    assert copy.kernel_state == state
    assert copy.as_dict() == lazy.as_dict()
    assert "TIME_WAIT" in str(lazy)


def test_kernel_state_sampled(loop_name: str) -> None:
    """``kernel_state="sampled:0.5"``: half the closes are looked up (eagerly), the
    others report none; every report says which mode it was made under."""
    (sampled,), _ = _two_servers(loop_name, ("sampled:0.5",), connections=4)
    assert [r.kernel_state_mode for r in sampled] == ["sampled:0.5"] * 4
    looked_up = [r for r in sampled if r.kernel_state is not None]
    assert len(looked_up) == 2
    assert all(r.kernel_state.state is TcpState.TIME_WAIT for r in looked_up)  # type: ignore[union-attr]


def test_aclose_kernel_state_lazy_and_off(loop_name: str) -> None:
    """``aclose(..., kernel_state="lazy")``: TIME_WAIT when read; ``report=False``
    says ``off``."""

    async def main() -> list[CloseReport]:
        made: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.readline()
            writer.write(RESPONSE)
            await made.put(writer)

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        reports = []
        options: dict[str, Any]
        for options in ({"kernel_state": "lazy"}, {"report": False}):
            task = asyncio.ensure_future(client().run(address(server)))
            writer = await made.get()
            reports.append(await tcpclose.aio.aclose(writer, "graceful", **options))
            await task
        server.close()
        await server.wait_closed()
        return reports

    lazy, off = run(loop_name, main)
    assert lazy.kernel_state_mode == "lazy"
    assert lazy.kernel_state is not None
    assert lazy.kernel_state.state is TcpState.TIME_WAIT
    assert off.kernel_state_mode == "off"
    assert off.kernel_state is None


@pytest.mark.parametrize(
    "value", ["sometimes", "sampled", "sampled:0", "sampled:1.5", "sampled:x", "lazy:0.1", ""]
)
def test_kernel_state_invalid_values(value: str) -> None:
    """A wrong ``kernel_state`` is a PolicyError naming it and listing what is
    accepted; a number instead of text is a TypeError."""
    with pytest.raises(PolicyError, match="kernel_state") as caught:
        tcpclose.aio.with_policy(asyncio.Protocol, "graceful", kernel_state=value)
    assert "sampled:FRACTION" in str(caught.value)
    with pytest.raises(TypeError, match="kernel_state"):
        tcpclose.aio.with_policy(asyncio.Protocol, "graceful", kernel_state=0.5)  # type: ignore[arg-type]


def test_kernel_state_spellings() -> None:
    """Case and spaces do not matter; the report states the canonical spelling."""
    for text, canonical in (
        ("EAGER", "eager"),
        (" lazy ", "lazy"),
        ("sampled:0.010", "sampled:0.01"),
    ):
        factory = tcpclose.aio.with_policy(asyncio.Protocol, "graceful", kernel_state=text)
        assert factory.kernel_state == canonical
        assert pickle.loads(pickle.dumps(factory)).kernel_state == canonical


def test_closes_ending_in_one_turn_are_completed_by_one_callback(loop_name: str) -> None:
    """The closes that end in one loop turn are completed (their kernel state looked up,
    their reports delivered) by one loop callback; one that fails there does not stop
    the others, and the loop's exception handler gets its error."""
    from tcpclose._aio_closer import _Deadlines

    completed: list[str] = []
    handled: list[dict[str, Any]] = []

    class Done:
        def __init__(self, name: str, fail: bool) -> None:
            self.name = name
            self.fail = fail

        def _complete(self) -> None:
            completed.append(self.name)
            if self.fail:
                raise ValueError("broken report")

    async def main() -> int:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: handled.append(context))
        deadlines = _Deadlines.of(loop)
        ready_before = len(getattr(loop, "_ready", ()))
        for name, fail in (("a", False), ("b", True), ("c", False)):
            deadlines.complete_soon(Done(name, fail))  # type: ignore[arg-type]
        scheduled = len(getattr(loop, "_ready", ())) - ready_before
        await wait_for(lambda: len(completed) == 3, what="every close completed")
        return scheduled

    scheduled = run(loop_name, main)
    assert completed == ["a", "b", "c"]
    assert [str(c.get("exception")) for c in handled] == ["broken report"]
    if loop_name == "asyncio":  # (uvloop keeps its ready queue out of sight)
        assert scheduled == 1


def test_abort_clients_report_each_connection(loop_name: str) -> None:
    """Closes that end in the same turn (a server aborting its clients) each get their
    own kernel state, looked up together on the next turn: no TIME_WAIT, RST sent."""
    reports: list[CloseReport] = []
    peers = [Client(request=b"", after="hold") for _ in range(5)]

    async def main() -> None:
        async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()

        server = await tcpclose.aio.start_server(
            hold, "127.0.0.1", 0, close_policy="graceful", on_close=reports.append
        )
        tasks = [asyncio.ensure_future(peer.run(address(server))) for peer in peers]
        await wait_for(lambda: server.open_connections == 5, what="five connections")
        server.abort_clients()
        await wait_for(lambda: len(reports) == 5, what="five reports")
        for peer in peers:
            peer.release.set()
        await asyncio.gather(*tasks)
        server.close()
        await server.wait_closed()

    run(loop_name, main)
    assert len({r.peer for r in reports}) == 5
    for report in reports:
        assert report.rst_sent
        assert report.kernel_state is not None
        assert report.kernel_state.state is TcpState.CLOSED
