"""The client half of ``tcpclose demo``, run in a separate process.

``python -m tcpclose._demo_client`` reads one JSON command per line on stdin, runs
that many connections against the demo server and writes one JSON result per line on
stdout. It exits on end of input. It ignores SIGINT: the demo process owns it and
ends it (closing its stdin, or killing it), also on Ctrl-C.

Each connection sends a request line ``<id> <response_bytes> <body_bytes>\\n``,
optionally followed by a body the server never reads, and reads the response, whose
content it knows in advance (:func:`response_bytes`), so that it can tell how many
bytes arrived intact. The client closes with a plain ``close()``, like most clients.

Only the standard library is used here: this module runs in a fresh interpreter.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hashlib
import json
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Final

__all__ = ("Command", "ConnectionResult", "RunResult", "main", "response_bytes")

#: How long one connection may take on the client before it gives up (seconds).
CONNECTION_TIMEOUT: Final = 10.0
_CHUNK: Final = 64 * 1024
_RESET_ERRNOS: Final = frozenset({errno.ECONNRESET, errno.EPIPE})


@functools.lru_cache(maxsize=4)
def _pattern(length: int) -> bytes:
    return hashlib.shake_256(b"tcpclose demo response").digest(length)


def response_bytes(conn_id: int, length: int) -> bytes:
    """The response the server sends on connection ``conn_id``: the id in the first
    8 bytes (so responses cannot be mixed up), then a fixed pseudo-random pattern.

    >>> response_bytes(1, 12)[:8]
    b'\\x00\\x00\\x00\\x00\\x00\\x00\\x00\\x01'
    >>> len(response_bytes(7, 100))
    100
    """
    if length < 8:
        raise ValueError(f"response length: expected at least 8 bytes, got {length}")
    return conn_id.to_bytes(8, "big") + _pattern(length)[8:]


def request_line(conn_id: int, response_length: int, body_length: int) -> bytes:
    """The first line a demo client sends."""
    return f"{conn_id} {response_length} {body_length}\n".encode("ascii")


def parse_request_line(line: bytes) -> tuple[int, int, int] | None:
    """``b"3 16384 0\\n"`` -> ``(3, 16384, 0)``; None when malformed.

    >>> parse_request_line(b"3 16384 0\\n")
    (3, 16384, 0)
    >>> parse_request_line(b"") is None
    True
    """
    parts = line.split()
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return None
    conn_id, length, body = (int(p) for p in parts)
    if not 8 <= length <= 64 * 1024 * 1024:
        return None
    return conn_id, length, body


@dataclass(frozen=True, slots=True)
class Command:
    """One run: ``connections`` connections to ``host:port``.

    Attributes:
        host, port: the server.
        connections: how many connections to make.
        concurrency: how many at a time.
        response_length: the response size each connection asks for.
        body_length: bytes sent after the request line that the server never reads.
        read_delay: seconds between sending the request and starting to read.
        rcvbuf: ``SO_RCVBUF`` set before connecting (0: the system default).
        details: also return each connection's ``[port, intact, reset, eof, error]``
            (for debugging a run).
    """

    host: str
    port: int
    connections: int
    concurrency: int = 50
    response_length: int = 16 * 1024
    body_length: int = 0
    read_delay: float = 0.0
    rcvbuf: int = 0
    details: bool = False

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Command:
        return cls(
            host=str(data["host"]),
            port=int(data["port"]),
            connections=int(data["connections"]),
            concurrency=int(data.get("concurrency", 50)),
            response_length=int(data.get("response_length", 16 * 1024)),
            body_length=int(data.get("body_length", 0)),
            read_delay=float(data.get("read_delay", 0.0)),
            rcvbuf=int(data.get("rcvbuf", 0)),
            details=bool(data.get("details", False)),
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "connections": self.connections,
            "concurrency": self.concurrency,
            "response_length": self.response_length,
            "body_length": self.body_length,
            "read_delay": self.read_delay,
            "rcvbuf": self.rcvbuf,
            "details": self.details,
        }


@dataclass(slots=True)
class ConnectionResult:
    """What one client connection saw.

    Attributes:
        local_port: the client's port (0 when the connect failed).
        intact: response bytes received that match the expected content, from the start.
        corrupt: bytes were received that do not match (never expected: a bug).
        reset: ECONNRESET (or EPIPE, how Linux reports a reset after the peer's FIN)
            on a receive, a send, or the check after the response.
        eof_before_close: the server's FIN had arrived when the client closed.
        error: another error (errno name), e.g. ``ETIMEDOUT``.
    """

    local_port: int = 0
    intact: int = 0
    corrupt: bool = False
    reset: bool = False
    eof_before_close: bool = False
    error: str | None = None


@dataclass(slots=True)
class RunResult:
    """Totals over one run's connections, as sent back to the demo."""

    local_ports: list[int] = field(default_factory=list)
    connections: int = 0
    completed: int = 0
    resets: int = 0
    eof_before_close: int = 0
    bytes_expected: int = 0
    bytes_intact: int = 0
    corrupt: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    elapsed: float = 0.0
    details: list[list[object]] | None = None

    def add(self, result: ConnectionResult, expected: int) -> None:
        self.connections += 1
        if result.local_port:
            self.local_ports.append(result.local_port)
        self.bytes_expected += expected
        self.bytes_intact += result.intact
        self.completed += result.intact == expected
        self.resets += result.reset
        self.eof_before_close += result.eof_before_close
        self.corrupt += result.corrupt
        if result.error is not None:
            self.errors[result.error] = self.errors.get(result.error, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "local_ports": self.local_ports,
            "connections": self.connections,
            "completed": self.completed,
            "resets": self.resets,
            "eof_before_close": self.eof_before_close,
            "bytes_expected": self.bytes_expected,
            "bytes_intact": self.bytes_intact,
            "bytes_lost": self.bytes_expected - self.bytes_intact,
            "corrupt": self.corrupt,
            "errors": self.errors,
            "elapsed": self.elapsed,
            **({"details": self.details} if self.details is not None else {}),
        }


def _errno_name(exc: OSError) -> str:
    if isinstance(exc, TimeoutError) and exc.errno is None:
        return "ETIMEDOUT"
    return errno.errorcode.get(exc.errno or 0, type(exc).__name__)


def _intact_prefix(received: memoryview, expected: bytes) -> int:
    """How many bytes at the start of ``received`` equal ``expected``."""
    n = len(received)
    if received == expected[:n]:
        return n
    lo, hi = 0, n  # binary search for the first mismatch
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if received[:mid] == expected[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


async def _send_body(loop: asyncio.AbstractEventLoop, sock: socket.socket, length: int) -> None:
    chunk = bytes(min(length, _CHUNK))
    left = length
    while left > 0:
        n = min(left, len(chunk))
        await loop.sock_sendall(sock, chunk[:n])
        left -= n


async def _one(conn_id: int, cmd: Command, result: ConnectionResult) -> None:
    """One connection; fills ``result`` as it goes (so a timeout keeps what was seen)."""
    loop = asyncio.get_running_loop()
    expected = response_bytes(conn_id, cmd.response_length)
    buf = bytearray(cmd.response_length)
    view = memoryview(buf)
    got = 0
    sock = socket.socket(socket.AF_INET6 if ":" in cmd.host else socket.AF_INET)
    sender: asyncio.Task[None] | None = None
    try:
        if cmd.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, cmd.rcvbuf)
        sock.setblocking(False)
        await loop.sock_connect(sock, (cmd.host, cmd.port))
        result.local_port = sock.getsockname()[1]
        await loop.sock_sendall(sock, request_line(conn_id, cmd.response_length, cmd.body_length))
        if cmd.body_length:
            sender = asyncio.create_task(_send_body(loop, sock, cmd.body_length))
        if cmd.read_delay:
            await asyncio.sleep(cmd.read_delay)
        while got < len(buf):
            n = await loop.sock_recv_into(sock, view[got:])
            if n == 0:
                result.eof_before_close = True
                break
            got += n
        if got == len(buf):
            # Before closing, look (without waiting) whether the connection has already
            # ended, as connection pools do: the server's FIN, or its RST.
            try:
                extra = sock.recv(1)
            except BlockingIOError:
                pass
            else:
                if extra:
                    result.corrupt = True  # more than the response: never expected
                else:
                    result.eof_before_close = True
        if sender is not None:
            await sender
            sender = None
    except OSError as exc:
        if exc.errno in _RESET_ERRNOS:
            result.reset = True
        else:
            result.error = _errno_name(exc)
    finally:
        if sender is not None:
            if not sender.done():
                sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender
            if not sender.cancelled():
                send_error = sender.exception()
                if isinstance(send_error, OSError) and send_error.errno in _RESET_ERRNOS:
                    result.reset = True
        sock.close()
        result.intact = _intact_prefix(view[:got], expected)
        result.corrupt = result.corrupt or result.intact < got
        view.release()


async def run(cmd: Command) -> RunResult:
    """Make ``cmd.connections`` connections, ``cmd.concurrency`` at a time."""
    started = time.monotonic()
    limit = asyncio.Semaphore(max(1, cmd.concurrency))
    results = [ConnectionResult() for _ in range(cmd.connections)]

    async def guarded(conn_id: int) -> None:
        async with limit:
            try:
                async with asyncio.timeout(CONNECTION_TIMEOUT):
                    await _one(conn_id, cmd, results[conn_id])
            except TimeoutError:
                results[conn_id].error = "ETIMEDOUT"

    await asyncio.gather(*(guarded(i) for i in range(cmd.connections)))
    total = RunResult()
    for result in results:
        total.add(result, cmd.response_length)
    total.elapsed = time.monotonic() - started
    if cmd.details:
        total.details = [
            [r.local_port, r.intact, r.reset, r.eof_before_close, r.error] for r in results
        ]
    return total


def main() -> int:
    """Serve commands from stdin until it ends; return the exit status."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            cmd = Command.from_dict(json.loads(line))
        except (ValueError, KeyError, TypeError) as exc:
            reply: dict[str, Any] = {"error": f"bad command: {exc}"}
        else:
            reply = asyncio.run(run(cmd)).as_dict()
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
