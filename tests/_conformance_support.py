"""The conformance suite's drivers: every way tcpclose applies a policy, behind one
small interface, so that one behaviour test runs unchanged through each of them.

A driver makes a loopback connection whose client end (``Conn.peer``) is a plain
blocking socket for the test to play the peer with, and whose server end is *ours*,
held the way that driver's users hold it:

* ``sync``: a ``socket.socket``, closed by :func:`tcpclose.close`;
* ``background``: the same socket handed to a :class:`tcpclose.BackgroundCloser`;
* ``asyncio`` / ``uvloop``: an ``asyncio.start_server`` connection on that loop,
  closed by :func:`tcpclose.aio.aclose` on its ``StreamWriter``;
* ``loop-adapter``: the same server created under :func:`tcpclose.aio.install_policy`
  on asyncio's loop; the application's own ``writer.close()`` applies the policy;
* ``start_server``: :func:`tcpclose.aio.start_server` on uvloop; the policy applies
  when the handler returns. With the loop adapter this runs the ``with_policy`` path
  on both loops, as ``aclose`` runs on both.

The application never reads what the peer sends (an event-loop driver pauses reading
as soon as the connection exists): whatever the peer sends stays unread in our kernel
until a close drains it, as in the RST trap. ``policy=None`` means no tcpclose at all:
the driver's plain close (``socket.close()``, ``writer.close()``), for the "without the
library" half of a test.

Every close goes through :meth:`Conn.close`, which records the warnings it issued and
the bytes of ours still queued just before it, and checks what every close must hold:
the fd released, the report's facts consistent with the state it reports, and ``ss``
(a separate program) agreeing with that state. The asyncio loops run on a thread of
their own for the test's duration; at the end the driver checks that the loop's
exception handler received nothing, that no task was left pending and that the
process's fd count is back where it started.

Only public APIs are used, so that the suite survives changes to the drivers' insides.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import socket
import ssl
import struct
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

import pytest

import tcpclose
import tcpclose.aio
from tcpclose import CloseMode, ClosePolicy, CloseReport, Outcome, TcpState
from tests._aio_support import loop_factory, settle_tasks
from tests._support import (
    RESET_ERRORS,
    addr,
    has_ipv6_loopback,
    listener,
    open_fd_count,
    ss_lookup,
    wait_until,
)

T = TypeVar("T")
_LINGER_ZERO: Final = struct.pack("ii", 1, 0)
Address = tuple[str, int]
PolicyArg = str | ClosePolicy | None

#: Every driver, in the order the suite runs them.
DRIVERS: Final = ("sync", "background", "asyncio", "uvloop", "loop-adapter", "start_server")
#: The drivers that run on an event loop (and so can carry TLS).
LOOP_DRIVERS: Final = frozenset({"asyncio", "uvloop", "loop-adapter", "start_server"})

#: uvloop's clock (libuv's) counts whole milliseconds, and the kernel's timestamps
#: jiffies: a duration may end up to this much before its bound.
CLOCK_GRAIN_S: Final = 0.002
#: The allowance the project gives every bound.
TOLERANCE: Final = 1.10
#: How long a close may take to come back at most, whatever the test.
CLOSE_TIMEOUT_S: Final = 20.0


def families() -> list[int]:
    """IPv4, and IPv6 when ``::1`` exists: the families a cheap behaviour runs over."""
    return [socket.AF_INET, socket.AF_INET6] if has_ipv6_loopback() else [socket.AF_INET]


def warning_codes(caught: list[warnings.WarningMessage]) -> tuple[str, ...]:
    return tuple(str(getattr(w.message, "code", type(w.message).__name__)) for w in caught)


@dataclass(frozen=True)
class Closed:
    """What one :meth:`Conn.close` did.

    Attributes:
        report: the close's report (None for a plain close).
        warnings: codes of the warnings issued while the close ran, in any thread.
        queued: bytes of ours the peer had not acknowledged just before the close
            (kernel send queue, plus an event loop's transport buffer).
        wall: seconds from the call until the report was in the caller's hands.
    """

    report: CloseReport | None
    warnings: tuple[str, ...]
    queued: int
    wall: float

    def get(self) -> CloseReport:
        assert self.report is not None, "a plain close has no report"
        return self.report


class Conn:
    """One connection: ``peer`` is the test's blocking client socket; the server end
    is ours, held by the driver."""

    driver: Driver
    peer: socket.socket
    policy: ClosePolicy | None
    #: Our end's address and the peer's, as our socket sees them.
    local: Address
    remote: Address

    def send(self, data: bytes) -> None:
        """Write ``data`` as the application would: the sync drivers block until the
        kernel took it all; a loop driver writes to its transport, which buffers."""
        raise NotImplementedError

    def send_nowait(self, data: bytes) -> int:
        """Write what the driver takes without waiting for the peer; return how much
        (a transport buffers everything; a socket takes what its kernel queue holds)."""
        raise NotImplementedError

    def unread(self) -> int:
        """Bytes the peer sent that sit unread in our kernel receive queue."""
        state = tcpclose.lookup(self.local, self.remote)
        return state.recv_queue or 0

    def state(self) -> TcpState:
        return tcpclose.lookup(self.local, self.remote).state

    def fileno(self) -> int:
        """Our end's fd (to share with a child process, as after ``fork()``)."""
        raise NotImplementedError

    def peer_state(self) -> TcpState:
        return tcpclose.lookup(self.remote, self.local).state

    def close(self, *, plain_abort: bool = False) -> Closed:
        """Close our end with the connection's policy (or, for a plain connection, the
        driver's own close, or its own abort with ``plain_abort``); return what it did
        once the report is in (a plain close: once the fd is released).

        Checks what every close must hold (see the module docstring)."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            start = time.monotonic()
            report, queued = self._close(plain_abort)
            wall = time.monotonic() - start
        closed = Closed(report, warning_codes(caught), queued, wall)
        if report is not None:
            check_report(self, closed)
        return closed

    def _close(self, plain_abort: bool) -> tuple[CloseReport | None, int]:
        raise NotImplementedError

    def release(self) -> None:
        """After the test: let go of whatever the test left open (peer reset)."""
        if self.peer.fileno() != -1:
            with contextlib.suppress(OSError):
                self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
            self.peer.close()


class Driver:
    """Makes connections for one driver; :meth:`finish` checks the driver left
    nothing behind."""

    name: str
    #: The errno names a report may give after the peer's reset (see RESET_ERRORS).
    reset_errors: frozenset[str] = frozenset({"ECONNRESET"})

    def __init__(self) -> None:
        self.conns: list[Conn] = []

    @property
    def on_a_loop(self) -> bool:
        """An event-loop driver: its transport buffers writes, and it can carry TLS."""
        return self.name in LOOP_DRIVERS

    def connect(
        self,
        family: int = socket.AF_INET,
        policy: PolicyArg = None,
        *,
        peer_rcvbuf: int | None = None,
        ssl_server: ssl.SSLContext | None = None,
        ssl_client: ssl.SSLContext | None = None,
    ) -> Conn:
        """A new connection over ``family`` loopback whose close applies ``policy``
        (None: the driver's plain close). ``peer_rcvbuf`` sets the client's
        ``SO_RCVBUF`` before it connects; with ``ssl_server`` (loop drivers only) the
        connection is TLS and ``Conn.peer`` an ``ssl.SSLSocket`` that did its
        handshake with ``ssl_client``."""
        lst = listener(family)
        client = socket.socket(family, socket.SOCK_STREAM)
        if peer_rcvbuf is not None:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, peer_rcvbuf)
        resolved = tcpclose.ClosePolicy.parse(policy) if isinstance(policy, str) else policy
        try:
            conn = self._accept(lst, client, resolved, ssl_server, ssl_client)
        except BaseException:
            client.close()
            lst.close()
            raise
        self.conns.append(conn)
        return conn

    def _accept(
        self,
        lst: socket.socket,
        client: socket.socket,
        policy: ClosePolicy | None,
        ssl_server: ssl.SSLContext | None,
        ssl_client: ssl.SSLContext | None,
    ) -> Conn:
        raise NotImplementedError

    def finish(self) -> None:
        for conn in self.conns:
            conn.release()


# -- the socket drivers ---------------------------------------------------------------------------


class _SocketConn(Conn):
    def __init__(
        self, driver: Driver, peer: socket.socket, ours: socket.socket, policy: ClosePolicy | None
    ) -> None:
        self.driver = driver
        self.peer = peer
        self.ours = ours
        self.policy = policy
        self.local = addr(ours)
        self.remote = addr(ours, peer=True)

    def fileno(self) -> int:
        return self.ours.fileno()

    def send(self, data: bytes) -> None:
        self.ours.setblocking(True)
        self.ours.sendall(data)

    def send_nowait(self, data: bytes) -> int:
        self.ours.setblocking(False)
        sent = 0
        while sent < len(data):
            try:
                sent += self.ours.send(data[sent : sent + 256 * 1024])
            except BlockingIOError:
                break
        return sent

    def _close(self, plain_abort: bool) -> tuple[CloseReport | None, int]:
        queued = tcpclose.queues(self.ours).outgoing
        if self.policy is None:
            self.ours.close()
            return None, queued
        report = self._policy_close(self.policy)
        assert self.ours.fileno() == -1, "the socket object still holds its fd"
        return report, queued

    def _policy_close(self, policy: ClosePolicy) -> CloseReport:
        raise NotImplementedError

    def release(self) -> None:
        super().release()
        if self.ours.fileno() != -1:
            self.ours.close()


class _SyncConn(_SocketConn):
    def _policy_close(self, policy: ClosePolicy) -> CloseReport:
        return tcpclose.close(self.ours, policy)


class _BackgroundConn(_SocketConn):
    driver: BackgroundDriver

    def _policy_close(self, policy: ClosePolicy) -> CloseReport:
        reports: queue.Queue[CloseReport] = queue.Queue()
        taken = self.driver.closer.close(self.ours, policy, on_close=reports.put)
        assert taken, "the background closer was full"
        # Handed over: the caller's object no longer owns the fd, at once.
        assert self.ours.fileno() == -1
        return reports.get(timeout=CLOSE_TIMEOUT_S)


class _SocketDriver(Driver):
    conn_class: type[_SocketConn]

    def _accept(
        self,
        lst: socket.socket,
        client: socket.socket,
        policy: ClosePolicy | None,
        ssl_server: ssl.SSLContext | None,
        ssl_client: ssl.SSLContext | None,
    ) -> Conn:
        assert ssl_server is None, f"{self.name} closes plain TCP sockets only"
        with lst:
            client.connect(lst.getsockname()[:2])
            ours, _ = lst.accept()
        return self.conn_class(self, client, ours, policy)


class SyncDriver(_SocketDriver):
    name = "sync"
    conn_class = _SyncConn


class BackgroundDriver(_SocketDriver):
    name = "background"
    conn_class = _BackgroundConn

    def __init__(self) -> None:
        super().__init__()
        self.closer = tcpclose.BackgroundCloser(name="conformance-closer")

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.closer.shutdown(timeout=5)


# -- the event-loop drivers ---------------------------------------------------------------------


class LoopThread:
    """An event loop running on its own thread until :meth:`stop`; :meth:`call` runs a
    coroutine function in it and waits for its result."""

    def __init__(self, loop_name: str) -> None:
        self.loop_name = loop_name
        self.errors: list[dict[str, Any]] = []
        self.failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Future[None] | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name=f"loop:{loop_name}", daemon=True)
        self._thread.start()
        assert self._ready.wait(10), "the loop thread never started"
        assert self.failure is None, self.failure

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    def _main(self) -> None:
        try:
            with asyncio.Runner(loop_factory=loop_factory(self.loop_name)) as runner:
                runner.run(self._serve())
        except BaseException as exc:
            self.failure = exc
        finally:
            self._ready.set()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: self.errors.append(ctx))
        self._loop = loop
        self._stop = loop.create_future()
        self._ready.set()
        await self._stop
        leftover = await settle_tasks()
        assert not leftover, f"tasks left pending: {leftover}"

    def call(self, fn: Callable[[], Awaitable[T]], timeout: float = CLOSE_TIMEOUT_S) -> T:
        async def wrapped() -> T:
            return await fn()

        return asyncio.run_coroutine_threadsafe(wrapped(), self.loop).result(timeout)

    def stop(self) -> None:
        stop = self._stop
        if stop is not None:

            def set_stop() -> None:
                if not stop.done():
                    stop.set_result(None)

            self.loop.call_soon_threadsafe(set_stop)
        self._thread.join(15)
        assert not self._thread.is_alive(), "the loop thread did not stop"
        if self.failure is not None:
            raise AssertionError(f"the {self.loop_name} loop failed") from self.failure
        assert not self.errors, f"the loop's exception handler got: {self.errors}"
        destroyed = [c for c in self.errors if "destroyed but it is pending" in str(c)]
        assert not destroyed, destroyed


@dataclass
class _Hooks:
    """How one loop connection and the test meet: the handler hands over its writer;
    ``on_close`` hands over the report; ``close_now`` tells a handler-return driver
    that the application is done."""

    accepted: Future[asyncio.StreamWriter]
    reports: Future[CloseReport]
    close_now: Future[None]

    @classmethod
    def new(cls) -> _Hooks:
        return cls(Future(), Future(), Future())

    def on_close(self, report: CloseReport) -> None:
        if not self.reports.done():
            self.reports.set_result(report)


class _LoopConn(Conn):
    driver: LoopDriver

    def __init__(
        self,
        driver: LoopDriver,
        peer: socket.socket,
        writer: asyncio.StreamWriter,
        server: asyncio.AbstractServer,
        policy: ClosePolicy | None,
        hooks: _Hooks,
    ) -> None:
        self.driver = driver
        self.peer = peer
        self.writer = writer  # (held: a StreamWriter collected unclosed closes its transport)
        self.server = server
        self.policy = policy
        self.hooks = hooks
        self.local = _address(writer.get_extra_info("sockname"))
        self.remote = _address(writer.get_extra_info("peername"))

    def fileno(self) -> int:
        fd: int = self.writer.get_extra_info("socket").fileno()
        return fd

    def send(self, data: bytes) -> None:
        self.driver.loop.call_soon_threadsafe(self.writer.write, data)

    def send_nowait(self, data: bytes) -> int:
        self.send(data)
        return len(data)

    def _queued(self) -> int:
        """In the loop: the transport's buffer plus the kernel's send queue."""
        transport = self.writer.transport
        sock = transport.get_extra_info("socket")
        return transport.get_write_buffer_size() + tcpclose.queues(sock).outgoing

    def _close(self, plain_abort: bool) -> tuple[CloseReport | None, int]:
        policy = self.policy
        driver = self.driver

        async def plain() -> int:
            queued = self._queued()
            if plain_abort:
                self.writer.transport.abort()
            else:
                self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            return queued

        if policy is None:
            return None, driver.thread.call(plain)

        async def with_policy() -> tuple[CloseReport, int]:
            queued = self._queued()
            report = await driver.apply(self, policy)
            # The application's protocol hears of the end exactly when it is over.
            with contextlib.suppress(OSError):
                await asyncio.wait_for(self.writer.wait_closed(), 5)
            return report, queued

        return driver.thread.call(with_policy)

    async def reported(self) -> CloseReport:
        """The report ``on_close`` delivered."""
        return await asyncio.wait_for(asyncio.wrap_future(self.hooks.reports), CLOSE_TIMEOUT_S)

    def release(self) -> None:
        super().release()
        if not self.hooks.close_now.done():
            self.hooks.close_now.set_result(None)

        async def close() -> None:
            if not self.writer.transport.is_closing():
                self.writer.transport.abort()
            self.server.close()
            await asyncio.wait_for(self.server.wait_closed(), 5)

        self.driver.thread.call(close)


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class LoopDriver(Driver):
    """``asyncio.start_server`` on a loop thread, closed by ``aclose``; subclasses
    change how the server is made and how a policy applies."""

    loop_name = "asyncio"
    reset_errors = RESET_ERRORS

    def __init__(self) -> None:
        super().__init__()
        if self.loop_name == "uvloop":
            pytest.importorskip("uvloop")
        self.thread = LoopThread(self.loop_name)

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.thread.loop

    def _accept(
        self,
        lst: socket.socket,
        client: socket.socket,
        policy: ClosePolicy | None,
        ssl_server: ssl.SSLContext | None,
        ssl_client: ssl.SSLContext | None,
    ) -> Conn:
        address = lst.getsockname()[:2]
        hooks = _Hooks.new()

        async def handle(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # The application reads nothing: what the peer sends stays in our kernel.
            # (uvloop's transports are not asyncio.Transport subclasses.)
            cast(asyncio.Transport, writer.transport).pause_reading()
            hooks.accepted.set_result(writer)

        async def serve() -> asyncio.AbstractServer:
            lst.setblocking(False)
            if policy is None:  # no tcpclose: the loop's own server
                return await asyncio.start_server(handle, sock=lst, ssl=ssl_server)
            return await self.start_server(handle, lst, policy, ssl_server, hooks)

        server = self.thread.call(serve)
        client.settimeout(10)
        client.connect(address)
        peer = client
        if ssl_server is not None:
            assert ssl_client is not None
            peer = ssl_client.wrap_socket(
                client, server_hostname="localhost", suppress_ragged_eofs=False
            )
        peer.settimeout(None)
        writer = hooks.accepted.result(10)
        if not isinstance(server, tcpclose.aio.PolicyServer):  # (whose close() closes conns)
            self.thread.call(_stop_listening(server))
        return _LoopConn(self, peer, writer, server, policy, hooks)

    async def start_server(
        self,
        handle: Handler,
        lst: socket.socket,
        policy: ClosePolicy,
        ssl_server: ssl.SSLContext | None,
        hooks: _Hooks,
    ) -> asyncio.AbstractServer:
        return await asyncio.start_server(handle, sock=lst, ssl=ssl_server)

    async def apply(self, conn: _LoopConn, policy: ClosePolicy) -> CloseReport:
        return await tcpclose.aio.aclose(conn.writer, policy)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.thread.stop()


def _stop_listening(server: asyncio.AbstractServer) -> Callable[[], Awaitable[None]]:
    async def stop() -> None:
        server.close()  # stop listening; the connection goes on (wait_closed: at release)

    return stop


class AsyncioDriver(LoopDriver):
    name = "asyncio"
    loop_name = "asyncio"


class UvloopDriver(LoopDriver):
    name = "uvloop"
    loop_name = "uvloop"


class LoopAdapterDriver(LoopDriver):
    """``install_policy(policy, loop=...)`` while the server is created; the
    application's own ``writer.close()`` then goes through the policy (``with_policy``
    underneath), and the report comes to ``on_close``."""

    name = "loop-adapter"
    loop_name = "asyncio"

    async def start_server(
        self,
        handle: Handler,
        lst: socket.socket,
        policy: ClosePolicy,
        ssl_server: ssl.SSLContext | None,
        hooks: _Hooks,
    ) -> asyncio.AbstractServer:
        loop = asyncio.get_running_loop()
        with tcpclose.aio.install_policy(policy, loop=loop, on_close=hooks.on_close):
            return await asyncio.start_server(handle, sock=lst, ssl=ssl_server)

    async def apply(self, conn: _LoopConn, policy: ClosePolicy) -> CloseReport:
        conn.writer.close()
        return await conn.reported()


class StartServerDriver(LoopDriver):
    """``tcpclose.aio.start_server`` on uvloop: the policy applies when the handler
    returns; the report comes to ``on_close``. (With the loop adapter on asyncio's
    loop, this covers the ``with_policy`` path on both loops.)"""

    name = "start_server"
    loop_name = "uvloop"

    async def start_server(
        self,
        handle: Handler,
        lst: socket.socket,
        policy: ClosePolicy,
        ssl_server: ssl.SSLContext | None,
        hooks: _Hooks,
    ) -> asyncio.AbstractServer:
        async def handle_then_return(
            reader: asyncio.StreamReader, writer: asyncio.StreamWriter
        ) -> None:
            await handle(reader, writer)
            await asyncio.wrap_future(hooks.close_now)  # the application is done

        return await tcpclose.aio.start_server(
            handle_then_return,
            sock=lst,
            ssl=ssl_server,
            close_policy=policy,
            on_close=hooks.on_close,
        )

    async def apply(self, conn: _LoopConn, policy: ClosePolicy) -> CloseReport:
        conn.hooks.close_now.set_result(None)
        return await conn.reported()


_DRIVER_CLASSES: Final[dict[str, type[Driver]]] = {
    "sync": SyncDriver,
    "background": BackgroundDriver,
    "asyncio": AsyncioDriver,
    "uvloop": UvloopDriver,
    "loop-adapter": LoopAdapterDriver,
    "start_server": StartServerDriver,
}


@contextlib.contextmanager
def driver_named(name: str) -> Iterator[Driver]:
    """The driver ``name`` for one test; afterwards, nothing of it may be left open."""
    if getattr(_DRIVER_CLASSES[name], "loop_name", None) == "uvloop":
        pytest.importorskip("uvloop")
        _warm_up_uvloop()
    tcpclose.lookup(("127.0.0.1", 1), ("127.0.0.1", 2))  # this thread's netlink channel
    fds_before = open_fd_count()
    driver = _DRIVER_CLASSES[name]()
    try:
        yield driver
    finally:
        driver.finish()
    wait_until(lambda: open_fd_count() == fds_before, 5.0, message="the fd count back")


_WARM: set[str] = set()


def _warm_up_uvloop() -> None:
    """libuv opens a process-wide pipe with its first loop and keeps it: not a leak."""
    if "uvloop" not in _WARM:
        import uvloop

        uvloop.new_event_loop().close()
        _WARM.add("uvloop")


# -- what every report must hold ------------------------------------------------------------------

#: Where a socket whose fd is closed may go next on its own.
_LATER: Final[dict[TcpState, frozenset[TcpState]]] = {
    TcpState.FIN_WAIT1: frozenset(
        {TcpState.FIN_WAIT2, TcpState.CLOSING, TcpState.TIME_WAIT, TcpState.CLOSED}
    ),
    TcpState.FIN_WAIT2: frozenset({TcpState.TIME_WAIT, TcpState.CLOSED}),
    TcpState.CLOSING: frozenset({TcpState.TIME_WAIT, TcpState.CLOSED}),
    TcpState.LAST_ACK: frozenset({TcpState.CLOSED}),
    TcpState.TIME_WAIT: frozenset({TcpState.CLOSED}),
    TcpState.CLOSED: frozenset(),
}
_SS_LABELS: Final = {s.label: s for s in TcpState if s.value > 0}


def ss_state(local: Address, peer: Address) -> TcpState:
    """The 4-tuple's state as ``ss`` shows it (CLOSED: no line)."""
    entry = ss_lookup(local, peer)
    return TcpState.CLOSED if entry is None else _SS_LABELS[entry.state]


def check_report(conn: Conn, closed: Closed) -> None:
    """What every report must hold, whatever the driver and the behaviour."""
    report = closed.get()
    assert report.local == conn.local, report
    # (A socket the peer reset before the close cannot tell its peer any more.)
    assert report.peer == conn.remote or report.outcome is Outcome.RESET, report
    assert report.policy == conn.policy, report
    assert set(report.warnings) == set(closed.warnings), (closed.warnings, report)
    if report.peer is None:  # (nor its 4-tuple: the sync drivers then look up nothing)
        assert conn.state() is TcpState.CLOSED, report
        return
    assert report.kernel_state is not None, report
    reported = report.kernel_state.state
    seen = ss_state(conn.local, conn.remote)
    if reported is TcpState.ESTABLISHED:
        # Only while another fd (a forked child's) still holds the socket: the kernel
        # then sent nothing, and the report must not claim an RST.
        assert report.kernel_state.inode, report
        assert not report.rst_sent, report
        assert seen is TcpState.ESTABLISHED, report
        return
    assert reported in _LATER, f"a closed fd cannot leave {reported.name}: {report}"
    assert seen is reported or seen in _LATER[reported], (
        f"the report says {reported.name}, ss then showed {seen.name}: {report}"
    )
    if report.mode is CloseMode.ABORT:
        assert report.rst_sent, report
    if report.rst_sent:
        assert reported is TcpState.CLOSED, report
    elif report.peer_closed_first:  # (our FIN, if any, went second)
        assert reported in (TcpState.LAST_ACK, TcpState.CLOSED), report
    elif report.fin_sent:
        assert reported in _LATER[TcpState.FIN_WAIT1] | {TcpState.FIN_WAIT1}, report
    if reported is TcpState.TIME_WAIT:
        assert report.kernel_state.seconds_left is not None, report
        assert 50 < report.kernel_state.seconds_left <= 60, report
    assert report.drained_bytes <= report.policy.max_drain_bytes, report
    assert report.duration >= 0


def within(duration: float, bound: float, *, slack: float = 0.0) -> bool:
    """``duration`` ended at ``bound``: not before it (less the clock's grain), and
    within the project's 10 % after it (plus ``slack`` where a test says why)."""
    return bound - CLOCK_GRAIN_S <= duration <= bound * TOLERANCE + slack


def _address(raw: Any) -> Address:
    return str(raw[0]), int(raw[1])
