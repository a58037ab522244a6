"""Shared machinery of the fault matrix (issue 9): policies, close runners, peers, checks.

A matrix case makes a fresh two-host pair, connects a client (the misbehaving peer, in
the client namespace) to a server socket (ours, in the server namespace), starts the
close with one driver on a thread that lives in the server namespace, plays the fault
from the test's own thread while the close runs, and then checks:

* the close returned within its policy's bound (+10 %), and not before the wait the
  policy promises (an idle timeout really waited ``idle_timeout``, and so on);
* the report's outcome, mode and fallback name what happened;
* the report's ``kernel_state`` is what the case expects, and ``ss`` inside the server
  namespace agrees with it (the same state, or one the kernel may have moved on to
  since: ``LAST-ACK`` may be gone, ``FIN-WAIT-1`` may have become ``FIN-WAIT-2``);
* the close raised nothing, issued exactly the warnings expected, and the process's fd
  count (and, under asyncio, the loop's task count) is back where it started.

The close runs in the server namespace because the kernel view's sock_diag socket is
per thread and answers for the namespace the thread was in when it was opened: a
lookup made from the root namespace would not see the namespaced socket at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import socket
import ssl
import struct
import threading
import time
import warnings
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import pytest

import tcpclose
from tcpclose import CloseMode, ClosePolicy, CloseReport, Fallback, TcpState
from tcpclose._kernel._netlink import reset_channel
from tests._netns import Host, TwoHosts
from tests._support import Peer, SsEntry, addr, open_fd_count, wait_until

KIB: Final = 1024

#: How a close is carried out: the blocking driver, or aclose() on asyncio's loop or uvloop.
DriverName = Literal["sync", "asyncio", "uvloop"]
DRIVERS: Final[tuple[DriverName, ...]] = ("sync", "asyncio", "uvloop")

#: The policies of the matrix, with short times so that the whole matrix stays fast.
IDLE_S: Final = 0.2
LINGER_S: Final = 0.6
TIMEOUT_S: Final = 0.3
#: peer-first's grace, longer than its timeout: the matrix measures every bound under
#: faults, so its peer-first waits the whole timeout for the peer's FIN whatever the
#: kernel shows (the grace itself is tested with real clients in test_peer_first_*).
GRACE_S: Final = 60.0
#: Not a multiple of any read or segment size, so that a drain that reads whole
#: chunks past the cap cannot land on it exactly by chance.
CAP: Final = 200_003
_BOUNDS: Final = f"idle_timeout={IDLE_S}s linger_time={LINGER_S}s max_drain_bytes={CAP}"
POLICIES: Final[dict[str, ClosePolicy]] = {
    "graceful": ClosePolicy.parse(f"graceful {_BOUNDS}"),
    "peer-first/graceful": ClosePolicy.parse(
        f"peer-first timeout={TIMEOUT_S}s grace={GRACE_S}s fallback=graceful {_BOUNDS}"
    ),
    "peer-first/abort": ClosePolicy.parse(
        f"peer-first timeout={TIMEOUT_S}s grace={GRACE_S}s fallback=abort {_BOUNDS}"
    ),
    "peer-first/auto": ClosePolicy.parse(
        f"peer-first timeout={TIMEOUT_S}s grace={GRACE_S}s fallback=auto {_BOUNDS}"
    ),
    "abort": ClosePolicy.abort(),
}
POLICY_NAMES: Final = tuple(POLICIES)

#: An abort waits for nothing: its "bound" is the time its few syscalls and the
#: report's lookups take, generously, on a loaded 2-core machine.
ABORT_BOUND_S: Final = 0.05
#: uvloop's clock (libuv's) counts whole milliseconds: its timers may fire up to 1 ms
#: before the float deadline. Lower bounds on a duration allow for that.
CLOCK_GRAIN_S: Final = 0.002
#: The allowance the issue gives on every bound.
TOLERANCE: Final = 1.10

_LINGER_ZERO: Final = struct.pack("ii", 1, 0)


def bound_of(policy: ClosePolicy, fallback: Fallback | None) -> float:
    """The documented upper bound of a close's duration (see ``tcpclose._plan``):
    graceful ≤ linger_time; peer-first ≤ timeout, + linger_time when the graceful
    fallback ran; abort: nothing waited for (``ABORT_BOUND_S``)."""
    if policy.mode is CloseMode.GRACEFUL:
        return policy.linger_time
    if policy.mode is CloseMode.PEER_FIRST:
        extra = policy.linger_time if fallback is Fallback.GRACEFUL else 0.0
        return policy.timeout + extra
    return ABORT_BOUND_S


def with_times(policy: ClosePolicy, **changes: Any) -> ClosePolicy:
    """``policy`` with other bounds (abort has none and is returned as it is)."""
    if policy.mode is CloseMode.ABORT:
        return policy
    data = policy.as_dict()
    data.update(
        (key, value)
        for key, value in changes.items()
        if key != "timeout" or policy.mode is CloseMode.PEER_FIRST
    )
    return ClosePolicy.from_mapping(data)


# -- the close, on a thread in the server namespace ----------------------------------------------


@dataclass
class CloseResult:
    """What one close did, as seen from the thread that ran it."""

    report: CloseReport | None = None
    error: BaseException | None = None
    wall: float = 0.0  # seconds from calling the close to its return
    warning_codes: tuple[str, ...] = ()
    tasks_before: int | None = None  # asyncio: tasks of the loop before the transport
    tasks_after: int | None = None  # ... and after the close, once settled
    loop_errors: list[dict[str, Any]] = field(default_factory=list)

    def get(self) -> CloseReport:
        if self.error is not None:
            raise AssertionError(f"the close raised {self.error!r}") from self.error
        assert self.report is not None
        return self.report


class CloseRun:
    """One close running on its own thread inside ``host``'s namespace.

    ``started`` is set just before the driver is called (after an asyncio transport,
    and its TLS handshake, exist). ``result()`` joins with a bound.

    The thread records the warnings the close issues (``warnings.catch_warnings``; the
    test's own thread issues none meanwhile) and, under asyncio, the loop's task count
    and whatever reached its exception handler.
    """

    def __init__(
        self,
        host: Host,
        sock: socket.socket,
        policy: ClosePolicy,
        driver: DriverName,
        *,
        allow_data_loss: bool = False,
        ssl_context: ssl.SSLContext | None = None,
        before_close: Callable[[asyncio.StreamWriter], Awaitable[None]] | None = None,
    ) -> None:
        self.host = host
        self.policy = policy
        self.driver = driver
        self.started = threading.Event()
        self.result_value = CloseResult()
        self._sock = sock
        self._allow = allow_data_loss
        self._ssl = ssl_context
        self._before_close = before_close
        self._thread = threading.Thread(target=self._main, name=f"close:{driver}", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        out = self.result_value
        try:
            with self.host.entered(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    if self.driver == "sync":
                        self._run_sync()
                    else:
                        self._run_aio()
                finally:
                    reset_channel()  # this thread's sock_diag socket: no fd left behind
            out.warning_codes = tuple(
                str(getattr(w.message, "code", type(w.message).__name__)) for w in caught
            )
        except BaseException as exc:
            out.error = exc
        finally:
            self.started.set()  # never leave a waiter hanging

    def _run_sync(self) -> None:
        out = self.result_value
        self.started.set()
        t0 = time.monotonic()
        try:
            out.report = tcpclose.close(self._sock, self.policy, allow_data_loss=self._allow)
        finally:
            out.wall = time.monotonic() - t0

    def _run_aio(self) -> None:
        import tcpclose.aio

        out = self.result_value
        factory = _loop_factory(self.driver)

        async def main() -> None:
            loop = asyncio.get_running_loop()
            loop.set_exception_handler(lambda _loop, ctx: out.loop_errors.append(ctx))
            out.tasks_before = len(asyncio.all_tasks())
            writer = await _stream_writer(self._sock, self._ssl)
            if self._before_close is not None:
                await self._before_close(writer)
            self.started.set()
            t0 = time.monotonic()
            try:
                out.report = await tcpclose.aio.aclose(
                    writer, self.policy, allow_data_loss=self._allow
                )
            finally:
                out.wall = time.monotonic() - t0
            # The close is callback-driven: nothing of it may still be running.
            await asyncio.sleep(0)
            out.tasks_after = len(asyncio.all_tasks())

        with asyncio.Runner(loop_factory=factory) as runner:
            runner.run(asyncio.wait_for(main(), 20))

    def result(self, timeout: float = 15.0) -> CloseResult:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the {self.driver} close did not return in {timeout}s"
        return self.result_value


class ServerRun:
    """``tcpclose.aio.start_server`` on ``listener`` (in ``host``'s namespace), on its
    own thread: the handler writes ``response`` to the first connection and returns,
    which closes it with the policy; ``on_close`` hands over the report.

    ``started`` is set when the handler returns (the close begins). ``wall`` is from
    then to ``on_close``. The server is closed after that one report, and the task
    count is compared with the one before the server existed.
    """

    def __init__(
        self,
        host: Host,
        listener: socket.socket,
        policy: ClosePolicy,
        driver: DriverName,
        response: bytes,
    ) -> None:
        assert driver != "sync"
        self.host = host
        self.policy = policy
        self.driver = driver
        self.started = threading.Event()
        self.listening = threading.Event()
        #: Set by the test once the peer is connected: the handler waits for it.
        self.peer_connected = threading.Event()
        self.result_value = CloseResult()
        self._listener = listener
        self._response = response
        self._thread = threading.Thread(target=self._main, name=f"server:{driver}", daemon=True)
        self._thread.start()
        assert self.listening.wait(15), "the server never started"

    def _main(self) -> None:
        out = self.result_value
        try:
            with self.host.entered(), warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with asyncio.Runner(loop_factory=_loop_factory(self.driver)) as runner:
                        runner.run(asyncio.wait_for(self._serve(), 20))
                finally:
                    reset_channel()
            out.warning_codes = tuple(
                str(getattr(w.message, "code", type(w.message).__name__)) for w in caught
            )
        except BaseException as exc:
            out.error = exc
        finally:
            self.started.set()
            self.listening.set()

    async def _serve(self) -> None:
        import tcpclose.aio

        out = self.result_value
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, ctx: out.loop_errors.append(ctx))
        out.tasks_before = len(asyncio.all_tasks())
        reported: asyncio.Future[CloseReport] = loop.create_future()
        returned_at: list[float] = []

        def on_close(report: CloseReport) -> None:
            if not reported.done():
                reported.set_result(report)

        async def handle(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            # Hold on until the peer's connect() has returned: a fast abort could
            # otherwise reset the connection before the peer even saw it established.
            deadline = time.monotonic() + 10
            while not self.peer_connected.is_set() and time.monotonic() < deadline:
                await asyncio.sleep(0.001)
            writer.write(self._response)
            returned_at.append(time.monotonic())
            self.started.set()

        self._listener.setblocking(False)
        server = await tcpclose.aio.start_server(
            handle, sock=self._listener, close_policy=self.policy, on_close=on_close
        )
        self.listening.set()
        try:
            out.report = await reported
            out.wall = time.monotonic() - returned_at[0]
        finally:
            server.close()
            await server.wait_closed()
        await asyncio.sleep(0)
        out.tasks_after = len(asyncio.all_tasks())

    def result(self, timeout: float = 15.0) -> CloseResult:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"the {self.driver} server did not finish"
        return self.result_value


def _loop_factory(driver: DriverName) -> Callable[[], asyncio.AbstractEventLoop]:
    if driver == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


async def _stream_writer(
    sock: socket.socket, context: ssl.SSLContext | None
) -> asyncio.StreamWriter:
    """An asyncio stream over an accepted socket (TLS server side with ``context``)."""
    loop = asyncio.get_running_loop()
    sock.setblocking(False)
    if context is None:
        _, writer = await asyncio.open_connection(sock=sock)
        return writer
    reader = asyncio.StreamReader()
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.connect_accepted_socket(
        lambda: protocol, sock=sock, ssl=context, ssl_handshake_timeout=10
    )
    return asyncio.StreamWriter(transport, protocol, reader, loop)


# -- peers: the client side, plain blocking sockets on threads -----------------------------------


def read_until_end(sock: socket.socket, timeout: float = 10.0) -> tuple[bytes, str]:
    """Read until EOF or an error: ``(data, "eof" | "reset" | errno name)``."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no EOF within {timeout}s")
        sock.settimeout(left)
        try:
            chunk = sock.recv(256 * KIB)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return b"".join(chunks), "reset"
        except OSError as exc:
            return b"".join(chunks), type(exc).__name__
        if not chunk:
            return b"".join(chunks), "eof"
        chunks.append(chunk)


class Streamer:
    """A peer that sends ``chunk`` bytes every ``every`` seconds (0: as fast as the
    kernel takes them) on a thread, until ``stop()`` or an error; bounded at 20 s.
    ``sent`` counts the bytes the kernel took so far."""

    def __init__(self, sock: socket.socket, chunk: int, every: float) -> None:
        self.sent = 0
        self._sock = sock
        self._chunk = chunk
        self._every = every
        self._stop = threading.Event()
        self._peer = Peer(self._run, name="streamer")

    def _run(self) -> int:
        data = b"s" * self._chunk
        deadline = time.monotonic() + 20
        self._sock.settimeout(0.05)
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.sent += self._sock.send(data)
            except TimeoutError:
                continue
            except OSError:
                break
            if self._every:
                self._stop.wait(self._every)
        return self.sent

    def stop(self) -> int:
        self._stop.set()
        sent: int = self._peer.result()
        return sent


def fill_send_queue(sock: socket.socket, payload: bytes) -> int:
    """Send from ``payload`` without blocking until the kernel takes no more."""
    sock.setblocking(False)
    sent = 0
    try:
        while sent < len(payload):
            try:
                sent += sock.send(payload[sent : sent + 256 * KIB])
            except BlockingIOError:
                break
    finally:
        sock.setblocking(True)
    assert sent < len(payload), "the send queue never filled"
    return sent


def reset(sock: socket.socket) -> None:
    """Close with RST (``SO_LINGER {1, 0}``)."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO)
    sock.close()


# -- the kernel, seen from outside ---------------------------------------------------------------

_BY_LABEL: Final = {s.label: s for s in TcpState if s.value > 0}

#: Where a socket whose fd is closed may go next, on its own (no new connection).
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


def ss_state(entry: SsEntry | None) -> TcpState:
    return TcpState.CLOSED if entry is None else _BY_LABEL[entry.state]


def check_kernel_agrees(host: Host, report: CloseReport) -> SsEntry | None:
    """``ss`` in ``host``'s namespace agrees with the report's kernel state, and the
    report agrees with itself. Returns the ss entry."""
    assert report.local is not None
    assert report.peer is not None
    assert report.kernel_state is not None, report
    reported = report.kernel_state.state
    entry = host.ss(report.local, report.peer)
    seen = ss_state(entry)
    assert reported in _LATER, f"a closed fd cannot leave {reported.name}: {report}"
    assert seen is reported or seen in _LATER[reported], (
        f"report says {reported.name}, ss then showed {seen.name}: {report}"
    )
    # The report's own facts fit the state it reports.
    if report.rst_sent:
        assert reported is TcpState.CLOSED, report
    elif report.fin_sent:
        assert reported in {
            TcpState.FIN_WAIT1,
            TcpState.FIN_WAIT2,
            TcpState.CLOSING,
            TcpState.TIME_WAIT,
            TcpState.CLOSED,  # reset by the peer after our FIN
        }, report
    elif report.peer_closed_first:
        assert reported in {TcpState.LAST_ACK, TcpState.CLOSED}, report
    if reported is TcpState.TIME_WAIT:
        assert report.kernel_state.seconds_left is not None
        assert 50 < report.kernel_state.seconds_left <= 60
    return entry


# -- one case: the pair, the baseline, the close, the checks -------------------------------------


class Case:
    """One cell of the matrix: a fresh pair of hosts, a policy and a driver.

    ``fds_before`` is measured once the pair's namespaces exist and before any
    connection: at ``finish()`` every socket of the case must be gone again.
    """

    def __init__(
        self,
        hosts: TwoHosts,
        policy_name: str,
        driver: DriverName,
        family: int = socket.AF_INET,
    ) -> None:
        self.hosts = hosts
        self.server = hosts.server
        self.client = hosts.client
        self.policy_name = policy_name
        self.policy = POLICIES[policy_name]
        self.driver = driver
        self.family = family
        self.listener = self.server.listen(family)
        self.fds_before = open_fd_count()
        self._peer_sockets: list[socket.socket] = []

    def connect(self, *, peer_rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
        """``(peer, ours)``: a connection from the client host to our listener."""
        if peer_rcvbuf is None:
            peer, ours = self.hosts.connect_pair(listener=self.listener)
        else:
            peer = self.client.socket(self.family)
            peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, peer_rcvbuf)
            peer.settimeout(5)
            peer.connect(self.listener.getsockname()[:2])
            peer.settimeout(None)
            self.listener.settimeout(5)
            ours, _ = self.listener.accept()
            ours.settimeout(None)
        self._peer_sockets.append(peer)
        return peer, ours

    def track(self, peer: socket.socket) -> None:
        """Reset ``peer`` at the end of the case if the test left it open."""
        self._peer_sockets.append(peer)

    def start_close(
        self,
        ours: socket.socket,
        policy: ClosePolicy | None = None,
        **kwargs: Any,
    ) -> CloseRun:
        run = CloseRun(self.server, ours, policy or self.policy, self.driver, **kwargs)
        assert run.started.wait(15), "the close never started"
        return run

    def close_and_check(
        self,
        run: CloseRun | ServerRun,
        *,
        outcome: tcpclose.Outcome,
        states: set[TcpState],
        min_duration: float = 0.0,
        warnings_expected: tuple[str, ...] = (),
    ) -> CloseReport:
        """Wait for ``run`` and check what every cell checks."""
        result = run.result()
        report = result.get()
        policy = run.policy
        bound = bound_of(policy, report.fallback)
        assert report.outcome is outcome, f"expected {outcome.value}: {report}"
        assert report.duration <= bound * TOLERANCE, f"bound {bound}s: {report}"
        assert result.wall <= bound * TOLERANCE + _wall_allowance(run.driver), (
            f"returned after {result.wall:.3f}s, bound {bound}s: {report}"
        )
        assert report.duration >= min_duration - CLOCK_GRAIN_S, (
            f"ended before {min_duration}s: {report}"
        )
        assert report.kernel_state is not None, report
        if report.kernel_state.state not in states and self._held_by_a_child(report, states):
            return report  # (see _held_by_a_child: the report said so, the rest followed)
        assert report.kernel_state.state in states, f"expected one of {states}: {report}"
        check_kernel_agrees(self.server, report)
        assert result.warning_codes == warnings_expected, (result.warning_codes, report)
        if report.mode is CloseMode.ABORT:
            assert report.rst_sent, report
        if run.driver != "sync":
            assert result.tasks_after == result.tasks_before, result
            assert not result.loop_errors, result.loop_errors
        return report

    def _held_by_a_child(self, report: CloseReport, states: set[TcpState]) -> bool:
        """The harness's own race, not the library's: this process starts ``nft``,
        ``ip`` and ``ss`` from other threads while a close runs, and a child between
        its fork and its exec holds a copy of every fd. A close that lands in that
        window releases nothing yet: the kernel state after it is still ESTABLISHED,
        owned (inode != 0), and the report says no RST was sent (issue 20). Once the
        child has exec'd (closing its copies), the 4-tuple must reach an expected state.
        Seen about 1 case in 200."""
        state = report.kernel_state
        if state is None or state.state is not TcpState.ESTABLISHED or not state.inode:
            return False
        assert not report.rst_sent, f"ESTABLISHED after the close, yet rst_sent: {report}"
        assert report.local is not None
        assert report.peer is not None
        local, peer = report.local, report.peer
        wait_until(
            lambda: ss_state(self.server.ss(local, peer)) in states,
            2.0,
            message=f"the 4-tuple to reach {states} once the forked child let go",
        )
        return True

    def finish(self) -> None:
        """Close what the test left open, then the fd count must be back at the start."""
        for sock in self._peer_sockets:
            if sock.fileno() != -1:
                reset(sock)
        try:
            wait_until(lambda: open_fd_count() == self.fds_before, 5, message="fd count")
        except AssertionError:
            raise AssertionError(
                f"{open_fd_count()} fds open, {self.fds_before} before the case: {fd_table()}"
            ) from None


@functools.cache
def warm_up_uvloop() -> None:
    """Make and close one uvloop loop: libuv opens a process-wide pipe (its signal
    lock) with the first loop and keeps it, which is not a leak of the case that
    happens to come first."""
    import uvloop

    uvloop.new_event_loop().close()


def fd_table() -> dict[int, str]:
    """What each of this process's fds is (for failure messages)."""
    table = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            table[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return table


def _wall_allowance(driver: DriverName) -> float:
    # What a report costs on top of the plan's own duration (Watch, lookups), and for
    # asyncio the turn of the loop on which connection_lost arrives.
    return 0.01 if driver == "sync" else 0.02


def drained(
    host: Host, ours: tuple[str, int], peer: tuple[str, int], streamer: Streamer | None = None
) -> Callable[[], bool]:
    """A predicate: ss shows our receive queue empty (the drain read what came), and
    with ``streamer``, that it has sent at least 4 KiB more since this was made (so
    the close has been reading, not just an application before it)."""
    floor = 0 if streamer is None else streamer.sent + 4 * KIB

    def check() -> bool:
        if streamer is not None and streamer.sent < floor:
            return False
        entry = host.ss(ours, peer)
        return entry is not None and entry.recv_q == 0

    return check


def send_queue_empty(
    host: Host, local: tuple[str, int], peer: tuple[str, int]
) -> Callable[[], bool]:
    """A predicate: ss shows the socket with nothing unacknowledged in its send queue."""

    def check() -> bool:
        entry = host.ss(local, peer)
        return entry is not None and entry.send_q == 0

    return check


def prepare_driver(name: DriverName) -> DriverName:
    """Skip a driver this build lacks; warm uvloop up once (libuv's process-wide pipe)."""
    if name != "sync":
        pytest.importorskip("tcpclose.aio", reason="the asyncio driver has not landed yet")
    if name == "uvloop":
        pytest.importorskip("uvloop")
        warm_up_uvloop()
    return name


@contextlib.contextmanager
def case_of(
    hosts: TwoHosts, policy_name: str, driver: DriverName, family: int = socket.AF_INET
) -> Iterator[Case]:
    case = Case(hosts, policy_name, driver, family)
    yield case
    case.finish()


def endpoints(sock: socket.socket) -> tuple[tuple[str, int], tuple[str, int]]:
    return addr(sock), addr(sock, peer=True)


def urandom(size: int) -> bytes:
    return os.urandom(size)
