"""Helpers for the asyncio tests: run a coroutine on a named loop, real blocking peers
on threads, TLS contexts, and leak checks.

No pytest-asyncio: :func:`run` makes a fresh loop per test with
``asyncio.Runner(loop_factory=...)``, records everything that reaches the loop's
exception handler, and checks that the test left no task, fd or "Task was destroyed
but it is pending" behind. Peers are plain blocking sockets on threads (driven through
``asyncio.to_thread``), so each side of a connection is real and independent.
Waiting is on events or on observed state with a deadline, never a bare sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import hashlib
import socket
import ssl
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trustme

import tcpclose
from tcpclose import KernelState, TcpState
from tests._support import open_fd_count

T = TypeVar("T")

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def loop_factory(loop_name: str) -> LoopFactory:
    """The event loop constructor for ``"asyncio"`` or ``"uvloop"``."""
    if loop_name == "uvloop":
        import uvloop

        factory: LoopFactory = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


@dataclass
class LoopRun:
    """What :func:`run` saw besides the result."""

    errors: list[dict[str, Any]] = field(default_factory=list)

    def messages(self) -> list[str]:
        return [str(ctx.get("message", "")) for ctx in self.errors]


def run(
    loop_name: str,
    main: Callable[[], Awaitable[T]],
    *,
    timeout: float = 20.0,
    expected_errors: tuple[str, ...] = (),
    check_fds: bool = True,
) -> T:
    """Run ``main()`` on a fresh ``loop_name`` loop and check it cleaned up after itself.

    Fails when ``main`` takes longer than ``timeout``, when a task other than ``main``'s
    is still pending at its end, when the process has a different number of open fds
    afterwards, or when the loop's exception handler received anything whose message
    does not contain one of ``expected_errors``.
    """
    seen = LoopRun()
    _warm_up(loop_name)
    fds_before = open_fd_count()

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        seen.errors.append(context)

    async def wrapped() -> T:
        asyncio.get_running_loop().set_exception_handler(handler)
        result = await asyncio.wait_for(main(), timeout)
        leftover = await settle_tasks()
        assert not leftover, f"tasks left pending: {leftover}"
        return result

    with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
        result = runner.run(wrapped())
    gc.collect()
    unexpected = [
        ctx for ctx in seen.errors if not any(e in str(ctx.get("message")) for e in expected_errors)
    ]
    assert not unexpected, f"loop exception handler got: {unexpected}"
    destroyed = [m for m in seen.messages() if "destroyed but it is pending" in m]
    assert not destroyed, destroyed
    if check_fds:
        wait_until_sync(lambda: open_fd_count() == fds_before, 5.0, "fd count back to the start")
    return result


_WARM: set[str] = set()


def _warm_up(loop_name: str) -> None:
    """Open what stays open for the process's lifetime before fds are counted: the
    kernel view's netlink socket (one per thread) and uvloop's process-wide pipe."""
    tcpclose.lookup(("127.0.0.1", 1), ("127.0.0.1", 2))
    if loop_name in _WARM:
        return
    with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
        runner.run(asyncio.sleep(0))
    _WARM.add(loop_name)


async def settle_tasks(timeout: float = 5.0) -> set[asyncio.Task[Any]]:
    """Wait (bounded) for tasks other than the current one to finish; return the rest."""
    me = asyncio.current_task()
    deadline = time.monotonic() + timeout
    while True:
        others = {t for t in asyncio.all_tasks() if t is not me and not t.done()}
        if not others or time.monotonic() >= deadline:
            return others
        await asyncio.wait(others, timeout=deadline - time.monotonic())


def wait_until_sync(predicate: Callable[[], object], timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(0.01)


async def wait_for_state(
    local: tuple[str, int],
    peer: tuple[str, int],
    states: tuple[TcpState, ...],
    timeout: float = 5.0,
) -> KernelState:
    """Poll ``tcpclose.lookup`` until the 4-tuple is in one of ``states``."""
    deadline = time.monotonic() + timeout
    while True:
        state = tcpclose.lookup(local, peer)
        if state.state in states:
            return state
        if time.monotonic() >= deadline:
            raise AssertionError(f"{local}->{peer} stayed {state.state.name}, wanted {states}")
        await asyncio.sleep(0.01)


async def wait_for(predicate: Callable[[], object], timeout: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` in the loop until true, bounded."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")
        await asyncio.sleep(0.005)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(size: int, seed: int = 1) -> bytes:
    """``size`` bytes that are not all alike (so a truncation changes the digest)."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    reps = size // len(block) + 1
    return (block * reps)[:size]


def addr(raw: Any) -> tuple[str, int]:
    return str(raw[0]), int(raw[1])


# -- peers (blocking sockets on threads) ----------------------------------------------------


@dataclass
class PeerResult:
    """What a blocking peer saw."""

    data: bytes = b""
    error: str | None = None  # errno name, e.g. "ECONNRESET"
    eof: bool = False  # saw a clean EOF (FIN, or TLS close_notify)
    local: tuple[str, int] | None = None
    peer: tuple[str, int] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def reset(self) -> bool:
        return self.error == "ECONNRESET"


def _errno_name(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):  # its errno is an SSL error code, not errno
        return type(exc).__name__
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def recv_exactly(
    sock: socket.socket, n: int, result: PeerResult, chunk_size: int = 1 << 20, pause: float = 0.0
) -> None:
    """Read up to ``n`` bytes into ``result.data``; stop at EOF or an error. A slow
    reader (``pause`` seconds between ``chunk_size`` reads) keeps the sender's queue full.
    """
    chunks = []
    got = 0
    try:
        while got < n:
            if pause:
                time.sleep(pause)  # pacing the reader, not waiting for a condition
            chunk = sock.recv(min(chunk_size, n - got))
            if not chunk:
                result.eof = True
                break
            chunks.append(chunk)
            got += len(chunk)
    except OSError as exc:
        result.error = _errno_name(exc)
    result.data = b"".join(chunks)


def wait_eof(sock: socket.socket, result: PeerResult, timeout: float = 5.0) -> None:
    """Read and drop until EOF, an error or ``timeout``."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
        result.eof = True
    except TimeoutError:
        result.extra["eof_timeout"] = True
    except OSError as exc:
        result.error = _errno_name(exc)


def connect(address: tuple[str, int], family: int = socket.AF_INET) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(address)
    return sock


def set_linger_zero(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


@dataclass
class Client:
    """A scripted blocking client, run with ``await client.run(address)``.

    The script: connect, send ``request`` (and ``body``), read ``expect`` bytes, then
    ``after``: ``"close"`` (close at once: the client closes first), ``"eof-close"``
    (wait for the server's FIN, then close), ``"hold"`` (keep the socket open until
    ``release`` is set), ``"reset"`` (wait for the server's FIN, then RST),
    ``"flood"`` (send ``flood_chunk`` until an error or ``release``), ``"trickle"``
    (send a byte every ``trickle_s`` until an error or ``release``).
    """

    request: bytes = b"GET\n"
    body: bytes = b""
    expect: int = 0
    after: str = "close"
    read: bool = True
    release: threading.Event = field(default_factory=threading.Event)
    connected: threading.Event = field(default_factory=threading.Event)
    got_response: threading.Event = field(default_factory=threading.Event)
    flood_chunk: int = 64 * 1024
    trickle_s: float = 0.05
    read_chunk: int = 1 << 20
    read_pause_s: float = 0.0
    family: int = socket.AF_INET
    result: PeerResult = field(default_factory=PeerResult)

    async def run(self, address: tuple[str, int]) -> PeerResult:
        return await asyncio.to_thread(self._run, address)

    def _run(self, address: tuple[str, int]) -> PeerResult:
        result = self.result
        with connect(address, self.family) as sock:
            result.local = addr(sock.getsockname())
            result.peer = addr(sock.getpeername())
            self.connected.set()
            try:
                sock.sendall(self.request + self.body)
            except OSError as exc:
                result.error = _errno_name(exc)
                self.got_response.set()
                return result
            if self.read and self.expect:
                recv_exactly(sock, self.expect, result, self.read_chunk, self.read_pause_s)
            self.got_response.set()
            if result.error:
                return result
            self._after(sock, result)
        return result

    def _after(self, sock: socket.socket, result: PeerResult) -> None:
        after = self.after
        if after == "close":
            return
        if after == "eof-close":
            wait_eof(sock, result)
        elif after == "hold":
            self.release.wait(10)
            wait_eof(sock, result, timeout=2)  # then see how the connection ended
        elif after == "hold-close":
            self.release.wait(10)
        elif after == "reset":
            wait_eof(sock, result)
            set_linger_zero(sock)
        elif after in ("flood", "trickle"):
            data = b"z" * (self.flood_chunk if after == "flood" else 1)
            deadline = time.monotonic() + 15
            try:
                while not self.release.is_set() and time.monotonic() < deadline:
                    sock.sendall(data)
                    if after == "trickle":
                        self.release.wait(self.trickle_s)
            except OSError as exc:
                result.error = _errno_name(exc)
        else:  # pragma: no cover - a typo in a test
            raise ValueError(after)


# -- TLS ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    """A CA, a server context for ``localhost``/``127.0.0.1``, a client context."""

    ca: trustme.CA
    server: ssl.SSLContext
    client: ssl.SSLContext
    ca_file: str
    cert_file: str
    key_file: str


_TLS: Tls | None = None


def tls(tmpdir: str) -> Tls:
    """One CA and certificate for the whole test run (trustme is slow-ish)."""
    global _TLS
    if _TLS is None:
        ca = trustme.CA()
        cert = ca.issue_cert("localhost", "127.0.0.1", "::1")
        server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(server)
        client = ssl.create_default_context()
        ca.configure_trust(client)
        ca_file = f"{tmpdir}/ca.pem"
        cert_file = f"{tmpdir}/cert.pem"
        key_file = f"{tmpdir}/key.pem"
        ca.cert_pem.write_to_path(ca_file)
        cert.cert_chain_pems[0].write_to_path(cert_file)
        cert.private_key_pem.write_to_path(key_file)
        _TLS = Tls(ca, server, client, ca_file, cert_file, key_file)
    return _TLS


@dataclass
class TlsClient:
    """A blocking TLS client: send ``request``, read ``expect`` bytes, then ``after``:

    * ``"read-close"``: keep reading: record whether the server's close_notify came
      (``result.extra["close_notify"]``), then whether a TCP FIN followed
      (``result.extra["fin_after_close_notify"]``), then close;
    * ``"notify-close"``: send our close_notify without waiting for the server's, then
      close the TCP socket (what ``openssl s_client`` does);
    * ``"plain-close"``: close the TCP socket without close_notify;
    * ``"hold"``: keep it open until ``release``.
    """

    context: ssl.SSLContext
    request: bytes = b"GET\n"
    expect: int = 0
    after: str = "read-close"
    release: threading.Event = field(default_factory=threading.Event)
    result: PeerResult = field(default_factory=PeerResult)

    async def run(self, address: tuple[str, int]) -> PeerResult:
        return await asyncio.to_thread(self._run, address)

    def _run(self, address: tuple[str, int]) -> PeerResult:
        result = self.result
        raw = connect(address)
        result.local = addr(raw.getsockname())
        result.peer = addr(raw.getpeername())
        try:
            tls_sock = self.context.wrap_socket(
                raw, server_hostname="localhost", suppress_ragged_eofs=False
            )
        except OSError as exc:
            result.error = _errno_name(exc)
            raw.close()
            return result
        with contextlib.ExitStack() as stack:
            stack.callback(tls_sock.close)  # the TLS socket owns the fd now
            stack.callback(self._record_state, tls_sock, result)
            try:
                tls_sock.sendall(self.request)
                if self.expect:
                    recv_exactly(tls_sock, self.expect, result)
                if result.error:
                    return result
                self._after(tls_sock, result)
            except ssl.SSLEOFError:
                result.error = "SSLEOFError"  # FIN without close_notify
            except OSError as exc:
                result.error = _errno_name(exc)
        return result

    @staticmethod
    def _record_state(sock: ssl.SSLSocket, result: PeerResult) -> None:
        """Our TCP state at the end: CLOSE after a reset, CLOSE_WAIT after a FIN.
        (Python's ssl reports a reset in the middle of a record as SSLEOFError.)"""
        with contextlib.suppress(OSError, ValueError):
            info = tcpclose.tcp_info(sock)
            result.extra["tcp_state"] = info.state if info is not None else None

    def _after(self, tls_sock: ssl.SSLSocket, result: PeerResult) -> None:
        if self.after == "read-close":
            tls_sock.settimeout(5)
            while True:
                try:
                    chunk = tls_sock.recv(65536)
                except ssl.SSLEOFError:
                    result.error = "SSLEOFError"
                    return
                if not chunk:
                    break
            result.extra["close_notify"] = True
            # Before we answer it: did the server's FIN follow its close_notify on its
            # own (CLOSE_WAIT here), or does it wait for our answer?
            result.extra["fin_before_answer"] = _wait_for_state(tls_sock, TcpState.CLOSE_WAIT, 0.3)
            plain = tls_sock.unwrap()  # answer it; then the TCP stream must end
            with plain:
                plain.settimeout(5)
                try:
                    result.extra["fin_after_close_notify"] = plain.recv(1) == b""
                except OSError as exc:
                    result.error = _errno_name(exc)
            result.eof = True
        elif self.after == "notify-close":
            tls_sock.setblocking(False)
            with contextlib.suppress(ssl.SSLWantReadError, ssl.SSLWantWriteError):
                tls_sock.unwrap()  # sends close_notify; does not wait for ours
        elif self.after == "plain-close":
            pass
        elif self.after == "hold":
            self.release.wait(15)
        else:  # pragma: no cover
            raise ValueError(self.after)


def _wait_for_state(sock: socket.socket, state: TcpState, timeout: float) -> bool:
    """Poll the kernel until ``sock`` is in ``state``; False at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        info = tcpclose.tcp_info(sock)
        if info is not None and info.state is state:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.002)


@contextlib.contextmanager
def thread_running(target: Callable[[], None]) -> Iterator[threading.Thread]:
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        yield thread
    finally:
        thread.join(15)


# -- the server side: one app, four ways to close -----------------------------------------------

#: How the app's connections are closed: plain asyncio (for the "without the library"
#: half of a test), or through each of tcpclose.aio's entry points.
ENTRIES = ("aclose", "start_server", "with_policy")


@dataclass
class AppServer:
    """A tiny request/response server: read one line, answer ``response``, close.

    ``entry`` says how the close happens: ``"plain"`` (``writer.close()``),
    ``"plain-abort"`` (``transport.abort()``), ``"aclose"`` (``asyncio.start_server`` +
    ``aclose``), ``"start_server"`` (``tcpclose.aio.start_server``, the handler returns)
    or ``"with_policy"`` (a protocol class under ``with_policy``, calling
    ``transport.close()``). The request body, if any, is never read by the app (the
    protocol pauses reading; the stream handler reads one line only).
    """

    entry: str
    policy: Any = "graceful"
    response: bytes = b""
    host: str = "127.0.0.1"
    allow_data_loss: bool = False
    reports: list[Any] = field(default_factory=list)
    addrs: list[tuple[tuple[str, int], tuple[str, int]]] = field(default_factory=list)
    server: Any = None

    async def __aenter__(self) -> AppServer:
        import functools

        import tcpclose.aio

        loop = asyncio.get_running_loop()
        if self.entry == "with_policy":
            factory = tcpclose.aio.with_policy(
                functools.partial(AppProtocol, self), self.policy, on_close=self.reports.append
            )
            self.server = await loop.create_server(factory, self.host, 0)
        elif self.entry == "start_server":
            self.server = await tcpclose.aio.start_server(
                self._handler,
                self.host,
                0,
                close_policy=self.policy,
                on_close=self.reports.append,
            )
        else:
            self.server = await asyncio.start_server(self._handler, self.host, 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        await self.server.wait_closed()

    @property
    def address(self) -> tuple[str, int]:
        return addr(self.server.sockets[0].getsockname())

    async def _handler(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        import tcpclose.aio

        self.addrs.append(
            (addr(writer.get_extra_info("sockname")), addr(writer.get_extra_info("peername")))
        )
        await reader.readline()
        writer.write(self.response)
        if self.entry == "plain":
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
        elif self.entry == "plain-abort":
            writer.transport.abort()
        elif self.entry == "aclose":
            report = await tcpclose.aio.aclose(
                writer, self.policy, allow_data_loss=self.allow_data_loss
            )
            self.reports.append(report)

    async def report(self, index: int = 0, timeout: float = 10.0) -> Any:
        """The ``index``-th close report, once there is one."""
        await wait_for(lambda: len(self.reports) > index, timeout, "a close report")
        return self.reports[index]


class AppProtocol(asyncio.Protocol):
    """The app as a protocol class (with ``__slots__``, as aiohttp's and Sanic's are)."""

    __slots__ = ("app", "buf", "transport")

    def __init__(self, app: AppServer) -> None:
        self.app = app
        self.buf = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.app.addrs.append(
            (addr(transport.get_extra_info("sockname")), addr(transport.get_extra_info("peername")))
        )

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if b"\n" in self.buf:
            raise AssertionError("data after pause_reading()")
        self.buf += data
        if b"\n" in self.buf:
            # Flow control, as real servers do: the request body is not read now.
            self.transport.pause_reading()
            self.transport.write(self.app.response)
            self.transport.close()


async def spawn_piped(cmd: list[str]) -> asyncio.subprocess.Process:
    """Start ``cmd`` with stdin, stdout and stderr as pipes."""
    return await asyncio.create_subprocess_exec(
        *cmd,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def curl(
    url: str, *args: str, body: bytes | None = None, pace: float = 0.0
) -> tuple[int, bytes, bytes]:
    """Run curl; with ``pace``, read its output 64 KiB at a time with that pause, so
    that curl reads the socket as slowly (our kernel queue stays full meanwhile)."""
    cmd = ["curl", "-sS", "--max-time", "20", "-H", "Expect:", *args, url]
    if body is not None:
        cmd += ["--data-binary", "@-"]
    proc = await spawn_piped(cmd)
    assert proc.stdin is not None
    assert proc.stdout is not None
    assert proc.stderr is not None

    async def feed(stdin: asyncio.StreamWriter) -> None:
        try:
            if body is not None:
                stdin.write(body)
                await stdin.drain()
        except ConnectionError:
            pass  # curl stopped reading its input: the answer came first
        stdin.close()

    async def read_out(stdout: asyncio.StreamReader) -> bytes:
        chunks = []
        while chunk := await stdout.read(65536):
            chunks.append(chunk)
            if pace:
                await asyncio.sleep(pace)  # pacing the reader, not waiting for a state
        return b"".join(chunks)

    _, out, err = await asyncio.gather(feed(proc.stdin), read_out(proc.stdout), proc.stderr.read())
    code = await proc.wait()
    return code, out, err
