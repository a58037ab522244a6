"""Short connections against asyncio servers: tcpclose.aio, per policy, against the
same closes written by hand.

A separate client process opens N short connections (64 at a time): it sends a
request, reads a response of known length and closes as soon as it has all of it.
The server, in this process, is ``asyncio.start_server`` with a handler that writes
the response and closes, or ``tcpclose.aio.start_server`` with the same handler
returning. All rows run in one invocation, on loopback, in a network namespace of the
benchmark's own when run as root (the TIME_WAIT counts are then this run's alone).

Rows (``kind`` in the JSON):

* floors, plain ``asyncio.start_server`` with no library code, each named for the close
  its handler does:

  - ``plain asyncio``: ``writer.close()``; the floor of ``default`` with reports off;
  - ``by hand: graceful``: ``write_eof()``, read to EOF, ``close()``; the floor of
    ``graceful`` and ``peer-first`` with reports off;
  - ``by hand: abort``: ``SO_LINGER {1, 0}``, then ``transport.abort()`` (the fd's
    close sends the RST); the floor of ``abort`` with reports off;
  - ``by hand: close + report reads``, ``by hand: graceful + report reads``,
    ``by hand: abort + report reads``: the same closes plus the three kernel reads a
    report is made of, with raw system calls (``SO_COOKIE`` and ``TCP_INFO`` before the
    close, the ``sock_diag`` lookup of the 4-tuple after it); the floors with reports on;

* the library: each policy with reports off, with reports on (``eager``: the kernel
  state looked up at each close, the default), and, when ``tcpclose.aio.start_server``
  takes a ``kernel_state`` keyword, with reports on and ``kernel_state="lazy"`` (looked
  up on first access: this benchmark's ``on_close`` counts reports and never reads it)
  and one ``graceful`` row with the sampled setting (``--sampled``, default
  ``sampled:0.1``); without that keyword those rows are skipped and the output says why;

* calibration: ``plain asyncio`` plus a busy-wait of 2, 5 and 10 µs per connection in
  the handler: how much throughput a microsecond of server CPU costs on this loop
  (uvloop's plain server outruns the client, so extra server CPU first shows as idle
  client time and then, past a knee, as lost throughput); ``plain asyncio, again``, the
  same server as ``plain asyncio`` under another name (an A/A row: its ratio to plain
  would be 1.00 on a machine that runs the same code at the same speed every time, and
  its distance from 1.00 is how finely this run can tell two rows apart); and the bare
  wrapper rows (below).

For each row: connections per second (the client's wall time), its ratio to plain
asyncio and to its floor, the server's CPU time per connection (``getrusage`` of the
server process over the run, divided by N) and its excess over the floor's, client-side
errors (a response cut short), reports delivered, and the TIME_WAIT entries left on
the server's and on the client's side of the port (``tcpclose.kernel.dump``).

The rounds are interleaved and each round runs every row in a shuffled order (seeded),
so that a slow spell of the machine, or the TIME_WAIT entries earlier runs leave in the
kernel's tables, do not always fall on the same rows; each row's figures are medians
over the rounds, and a ratio is the ratio of two medians from the same rounds.

Targets (issue 16), each printed as met / NOT met and stored under ``targets``:

* reports off: every policy >= 0.97x its floor (``graceful`` and ``peer-first``:
  ``by hand: graceful``; ``abort``: ``by hand: abort``; ``default``: ``plain asyncio``);
* reports on, ``eager``: >= 0.95x the same floor + report reads;
* reports on, ``lazy``: >= 0.92x the reports-off floor;
* ``peer-first`` leaves 0 TIME_WAIT on the server's side, where ``by hand: graceful``
  leaves one per connection (less the client ports that repeat within a run);
* every response whole (0 client errors) and every report delivered.

Instruction counts (``--instructions``): after the timed rounds, each non-calibration
row runs once more in a server process of its own under ``valgrind --tool=callgrind``
(hardware counters through ``perf`` are not available on every virtual machine;
callgrind counts user-space instructions only, repeatable to well under 1 %). The
server runs a warm-up of ``--instructions-warmup`` connections, then ``os.getsid(0)``,
which callgrind is told to zero its counters before (``--zero-before=os_getsid``),
then ``--instructions-connections`` connections from the native client, then, once its
last close finished, ``os.getpgid(0)``, which callgrind dumps the counters before
(``--dump-before=os_getpgid``). Instructions per connection = the dumped total / N: no
interpreter start-up, imports or warm-up in it, and nothing of the client. Under
callgrind the server runs some 50 times slower, so the client's 64 connections always
wait on it, as in the timed runs. The busy-wait rows are left out: their wait is wall
time, which valgrind stretches.

Usage: python benchmarks/bench_aio.py [--quick] [--connections N] [--rounds R]
       [--loop asyncio|uvloop] [--instructions] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import inspect
import json
import os
import platform
import random
import re
import resource
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

RESULTS = Path(__file__).parent / "results" / "aio.json"
REQUEST = b"GET / HTTP/1.1\r\n\r\n"
RESPONSE_SIZE = 4096
CONCURRENCY = 64
RUN_TIMEOUT_S = 120.0
#: The busy-wait calibration rows: µs of spin per connection.
BUSY_WAIT_US = (2.0, 5.0, 10.0)
#: A server process under callgrind: at most this long per row.
INSTRUCTIONS_TIMEOUT_S = 900.0


# -- the client process ------------------------------------------------------------------------


class _ClientConnection(asyncio.Protocol):
    """One short connection: request, read RESPONSE_SIZE bytes, close at once."""

    def __init__(self, done: asyncio.Future[bool]) -> None:
        self.done = done
        self.got = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports do not subclass asyncio.Transport: no isinstance check)
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= RESPONSE_SIZE and self.transport is not None:
            self.transport.close()  # the client closes as soon as it has everything
            if not self.done.done():
                self.done.set_result(True)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(self.got >= RESPONSE_SIZE)


async def _client(host: str, port: int, total: int, concurrency: int) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    remaining = total
    ok = errors = 0

    async def worker() -> None:
        nonlocal remaining, ok, errors
        while remaining > 0:
            remaining -= 1
            done: asyncio.Future[bool] = loop.create_future()
            try:
                await loop.create_connection(functools.partial(_ClientConnection, done), host, port)
                whole = await asyncio.wait_for(done, 10)
            except (TimeoutError, OSError):
                whole = False
            if whole:
                ok += 1
            else:
                errors += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "ok": ok, "errors": errors}


def client_main(host: str, port: int, total: int, concurrency: int) -> None:
    try:
        import uvloop

        result = uvloop.run(_client(host, port, total, concurrency))
    except ImportError:
        result = asyncio.run(_client(host, port, total, concurrency))
    print(json.dumps(result))


# -- the server's handlers: the floors, written by hand ----------------------------------------


RESPONSE = b"r" * RESPONSE_SIZE

#: ``struct tcp_info``'s size on Linux 6.x: what a report reads before the close.
_TCP_INFO_SIZE = 232
#: ``SO_COOKIE`` on Linux (the socket module does not name it).
_SO_COOKIE = getattr(socket, "SO_COOKIE", 57)
#: ``struct linger {l_onoff = 1, l_linger = 0}``: the fd's close sends RST.
_LINGER_ZERO = struct.pack("ii", 1, 0)


def _report_reads(writer: asyncio.StreamWriter) -> Callable[[], None]:
    """What a report of the close needs from the kernel, done by hand with raw
    ``getsockopt`` calls: the socket's cookie and TCP_INFO now; returns the sock_diag
    lookup of the 4-tuple, to be run once the fd is closed."""
    from tcpclose import kernel

    sock = writer.get_extra_info("socket")
    local, peer = writer.get_extra_info("sockname"), writer.get_extra_info("peername")
    cookie = int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, _SO_COOKIE, 8), sys.byteorder)
    sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)

    def lookup() -> None:
        kernel.lookup(local, peer, cookie=cookie)

    return lookup


def _close(writer: asyncio.StreamWriter, report_reads: bool, abort: bool = False) -> None:
    """``writer.close()`` (with ``abort``: ``SO_LINGER {1, 0}`` then
    ``transport.abort()``, as the library's ``abort``); with ``report_reads``, the
    report's kernel reads around it (the transport closes the fd on the next loop turn:
    the lookup runs after it)."""
    lookup = _report_reads(writer) if report_reads else None
    if abort:
        writer.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_ZERO
        )
        writer.transport.abort()
    else:
        writer.close()
    if lookup is not None:
        asyncio.get_running_loop().call_soon(lookup)


def _busy_wait(us: float) -> None:
    """Spin (no sleep, no system call) for ``us`` microseconds of wall time."""
    end = time.perf_counter_ns() + int(us * 1000)
    while time.perf_counter_ns() < end:
        pass


async def _plain_handler(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    report_reads: bool = False,
    abort: bool = False,
    busy_wait_us: float = 0.0,
) -> None:
    """Plain asyncio: answer, then ``writer.close()`` (or the abort by hand)."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(RESPONSE)
    except (asyncio.IncompleteReadError, ConnectionError):
        report_reads = abort = False  # (the connection is gone: nothing to read)
    if busy_wait_us:
        _busy_wait(busy_wait_us)
    _close(writer, report_reads, abort)


async def _graceful_by_hand(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, report_reads: bool = False
) -> None:
    """A graceful close written in the handler, no library."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(RESPONSE)
        writer.write_eof()
        while await reader.read(65536):
            pass
    except (asyncio.IncompleteReadError, ConnectionError):
        report_reads = False  # (the connection is gone: nothing to read)
    _close(writer, report_reads)


async def _policy_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(RESPONSE)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    # returning applies the policy


class _BareTransport:
    """The least a library standing between a transport and the application's
    protocol can be: ``close()`` becomes the graceful close (FIN now, the fd's close
    once the peer's FIN came), or stays the transport's own; everything else is the
    real transport's."""

    __slots__ = ("_conn", "_real")

    def __init__(self, conn: _BareWrapper, real: asyncio.Transport) -> None:
        self._conn = conn
        self._real = real

    def write(self, data: bytes) -> None:
        self._real.write(data)

    def close(self) -> None:
        conn = self._conn
        if not conn.closing:
            conn.closing = True
            if conn.graceful:
                self._real.write_eof()
                if conn.tracked is not None:
                    conn.timer = conn.loop.call_later(DRAIN_BOUND_S, self._real.abort)
            else:
                self._real.close()

    def is_closing(self) -> bool:
        return self._conn.closing or self._real.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._real.get_extra_info(name, default)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


class _BareWrapper(asyncio.Protocol):
    """A protocol that forwards every callback to the application's, and closes the
    transport once the peer's FIN arrives after a graceful ``close()``: the calibration
    rows ``BARE_WRAPPER`` and ``BARE_WRAPPER_PLAIN`` (no policy, no plan, no report, no
    bookkeeping), and ``BARE_WRAPPER_BOUNDED`` (``tracked``: a set of open connections,
    and a timer bounding each drain)."""

    __slots__ = ("closing", "graceful", "inner", "loop", "real", "timer", "tracked")

    def __init__(
        self,
        inner: asyncio.Protocol,
        graceful: bool,
        loop: asyncio.AbstractEventLoop,
        tracked: set[_BareWrapper] | None = None,
    ) -> None:
        self.inner = inner
        self.graceful = graceful
        self.closing = False
        self.loop = loop
        self.tracked = tracked
        self.timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.real = cast(asyncio.Transport, transport)
        if self.tracked is not None:
            self.tracked.add(self)
        self.inner.connection_made(_BareTransport(self, self.real))  # type: ignore[arg-type]

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        if self.closing:
            if self.timer is not None:
                self.timer.cancel()
            self.real.close()
            return True
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.tracked is not None:
            self.tracked.discard(self)
        self.inner.connection_lost(None if self.closing else exc)


async def _closed_by_bare_wrapper(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """The library's handler, then ``writer.close()``: the bare wrapper's close."""
    await _policy_handler(reader, writer)
    writer.close()


# -- the rows ----------------------------------------------------------------------------------

FLOOR, LIBRARY, CALIBRATION = "floor", "library", "calibration"

PLAIN = "plain asyncio"
GRACEFUL_BY_HAND = "by hand: graceful"
ABORT_BY_HAND = "by hand: abort"
CLOSE_READS = "by hand: close + report reads"
GRACEFUL_READS = "by hand: graceful + report reads"
ABORT_READS = "by hand: abort + report reads"
#: Calibration: ``plain asyncio`` again (A/A): the run's own resolution.
PLAIN_AGAIN = "plain asyncio, again"
#: Calibration: the graceful close, and the plain one, through the thinnest possible
#: wrapper protocol (what standing between transport and protocol costs at the least).
BARE_WRAPPER = "by hand: graceful through a bare wrapper"
BARE_WRAPPER_PLAIN = "by hand: plain close through a bare wrapper"
#: Calibration: the bare wrapper's graceful close with what the project asks of every
#: close besides (a bounded wait: a timer per drain; the server's set of open
#: connections, for its shutdown), and nothing else.
BARE_WRAPPER_BOUNDED = "by hand: graceful through a bare wrapper, drain bounded, tracked"
#: The drain's bound in that row (its value does not change what the timer costs).
DRAIN_BOUND_S = 5.0
_BARE_WRAPPERS = (BARE_WRAPPER, BARE_WRAPPER_PLAIN, BARE_WRAPPER_BOUNDED)

#: The floors' handlers, by row name.
_FLOOR_HANDLERS: dict[str, Callable[..., Any]] = {
    PLAIN: _plain_handler,
    GRACEFUL_BY_HAND: _graceful_by_hand,
    ABORT_BY_HAND: functools.partial(_plain_handler, abort=True),
    CLOSE_READS: functools.partial(_plain_handler, report_reads=True),
    GRACEFUL_READS: functools.partial(_graceful_by_hand, report_reads=True),
    ABORT_READS: functools.partial(_plain_handler, report_reads=True, abort=True),
}

#: (label, policy text, floor with reports off, floor with reports on)
POLICIES: tuple[tuple[str, str, str, str], ...] = (
    ("graceful", "graceful", GRACEFUL_BY_HAND, GRACEFUL_READS),
    ("peer-first", "peer-first timeout=5s", GRACEFUL_BY_HAND, GRACEFUL_READS),
    ("abort", "abort", ABORT_BY_HAND, ABORT_READS),
    ("default", "default", PLAIN, CLOSE_READS),
)

#: Issue 16's targets: a row's ratio to its floor.
TARGET_REPORTS_OFF = 0.97
TARGET_EAGER = 0.95
TARGET_LAZY = 0.92


@dataclass(frozen=True)
class Row:
    """One server set-up the benchmark measures."""

    name: str
    kind: str
    #: the policy text (library rows), else None
    policy: str | None = None
    reports: bool = False
    #: what a report's kernel state is: "eager" (the library's default, not passed),
    #: "lazy", "sampled"; None with reports off and for the floors
    kernel_state: str | None = None
    #: the value passed as ``kernel_state=`` (None: the keyword is not passed)
    kernel_state_arg: object = None
    busy_wait_us: float = 0.0
    #: the row it is compared with, and the ratio to it that issue 16 asks for
    floor: str | None = None
    target: float | None = None

    def handler(self) -> Callable[..., Any]:
        if self.busy_wait_us:
            return functools.partial(_plain_handler, busy_wait_us=self.busy_wait_us)
        return _FLOOR_HANDLERS[PLAIN if self.name == PLAIN_AGAIN else self.name]


def kernel_state_support() -> str:
    """``""`` when ``tcpclose.aio.start_server`` takes a ``kernel_state`` keyword (its
    own, or one of :class:`~tcpclose.aio.ServerOptions`), else why the rows that need
    it are skipped."""
    import tcpclose.aio

    parameters = inspect.signature(tcpclose.aio.start_server).parameters
    options = getattr(tcpclose.aio, "ServerOptions", None)
    if "kernel_state" in parameters or "kernel_state" in getattr(options, "__annotations__", {}):
        return ""
    return "tcpclose.aio.start_server takes no kernel_state keyword (issue 16 item 4 not merged)"


def _argument(text: str) -> object:
    """``--sampled`` as given: a number when it reads as one, else the text."""
    with contextlib.suppress(ValueError):
        return float(text)
    return text


def make_rows(kernel_state: bool, sampled: str) -> list[Row]:
    """Every row, floors first (``plain asyncio`` first of all: the ratios' baseline).
    ``kernel_state``: whether the library takes the keyword (the lazy and sampled rows)."""
    rows = [Row(name, FLOOR) for name in _FLOOR_HANDLERS]
    for label, policy, floor_off, floor_on in POLICIES:
        rows.append(
            Row(
                f"{label}, reports off",
                LIBRARY,
                policy,
                False,
                None,
                None,
                0.0,
                floor_off,
                TARGET_REPORTS_OFF,
            )
        )
        rows.append(
            Row(
                f"{label}, reports on, eager",
                LIBRARY,
                policy,
                True,
                "eager",
                None,
                0.0,
                floor_on,
                TARGET_EAGER,
            )
        )
        if kernel_state:
            rows.append(
                Row(
                    f"{label}, reports on, lazy",
                    LIBRARY,
                    policy,
                    True,
                    "lazy",
                    "lazy",
                    0.0,
                    floor_off,
                    TARGET_LAZY,
                )
            )
    if kernel_state:
        rows.append(
            Row(
                f"graceful, reports on, {sampled}",
                LIBRARY,
                "graceful",
                True,
                "sampled",
                _argument(sampled),
                floor=GRACEFUL_READS,
            )
        )
    rows.extend(
        Row(f"plain + busy-wait {us:g} µs", CALIBRATION, busy_wait_us=us, floor=PLAIN)
        for us in BUSY_WAIT_US
    )
    rows.append(Row(PLAIN_AGAIN, CALIBRATION, floor=PLAIN))
    rows.append(Row(BARE_WRAPPER, CALIBRATION, floor=GRACEFUL_BY_HAND))
    rows.append(Row(BARE_WRAPPER_PLAIN, CALIBRATION, floor=PLAIN))
    rows.append(Row(BARE_WRAPPER_BOUNDED, CALIBRATION, floor=GRACEFUL_BY_HAND))
    return rows


def skipped_rows(reason: str, sampled: str) -> list[dict[str, Any]]:
    """The rows (and targets) left out when the library lacks ``kernel_state``."""
    if not reason:
        return []
    names = [f"{label}, reports on, lazy" for label, *_ in POLICIES]
    names.append(f"graceful, reports on, {sampled}")
    return [{"name": name, "reason": reason} for name in names]


# -- one run -----------------------------------------------------------------------------------


def _server_time_wait(port: int) -> int | None:
    """TIME_WAIT entries whose local port is the server's."""
    try:
        from tcpclose import kernel

        return sum(
            1 for s in kernel.dump(states="TIME_WAIT", port=port) if s.local and s.local[1] == port
        )
    except Exception:  # an unsupported platform: not measured
        return None


def _client_time_wait(port: int) -> int | None:
    try:
        from tcpclose import kernel

        return sum(
            1 for s in kernel.dump(states="TIME_WAIT", port=port) if s.peer and s.peer[1] == port
        )
    except Exception:
        return None


def _time_wait_count() -> tuple[int, int] | None:
    """TIME_WAIT sockets now and the kernel's cap on them (Linux), else None."""
    try:
        with open("/proc/net/sockstat") as f:
            text = f.read()
        with open("/proc/sys/net/ipv4/tcp_max_tw_buckets") as f:
            cap = int(f.read())
        now = int(text.split(" tw ", 1)[1].split()[0])
    except (OSError, IndexError, ValueError):
        return None
    return now, cap


async def _room_for_time_wait(needed: int, limit_s: float = 65.0) -> None:
    """Wait (at most ``limit_s``, TIME_WAIT lasts 60 s) until a round's worth of new
    TIME_WAIT entries fits under ``tcp_max_tw_buckets``: past the cap the kernel makes
    no more of them, and the TIME_WAIT column would undercount."""
    deadline = time.monotonic() + limit_s
    while (counts := _time_wait_count()) is not None and counts[0] + needed > counts[1]:
        if time.monotonic() > deadline:
            print(f"TIME_WAIT {counts[0]} of {counts[1]}: the counts may be low", flush=True)
            return
        await asyncio.sleep(0.5)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def _start(row: Row) -> tuple[Any, Callable[[], int], Callable[[], int]]:
    """The row's server on an ephemeral port; functions giving its open connections
    and the reports it delivered."""
    import tcpclose.aio

    if row.name in _BARE_WRAPPERS:
        return await _start_bare_wrapper(
            graceful=row.name != BARE_WRAPPER_PLAIN, bounded=row.name == BARE_WRAPPER_BOUNDED
        )
    if row.policy is None:
        handler = row.handler()
        open_conns = 0

        async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal open_conns
            open_conns += 1
            try:
                await handler(reader, writer)
            finally:
                open_conns -= 1

        server: Any = await asyncio.start_server(plain, "127.0.0.1", 0, backlog=1024)
        return server, lambda: open_conns, lambda: 0
    reports = 0

    def count(_: object) -> None:
        nonlocal reports
        reports += 1

    extra: dict[str, Any] = {}
    if row.kernel_state_arg is not None:
        extra["kernel_state"] = row.kernel_state_arg
    server = await tcpclose.aio.start_server(
        _policy_handler,
        "127.0.0.1",
        0,
        backlog=1024,
        close_policy=row.policy,
        on_close=count if row.reports else None,
        **extra,
    )
    return server, lambda: server.open_connections, lambda: reports


async def _start_bare_wrapper(
    *, graceful: bool, bounded: bool = False
) -> tuple[Any, Callable[[], int], Callable[[], int]]:
    """A bare wrapper row's server: ``asyncio.start_server``'s protocol behind
    :class:`_BareWrapper` (``bounded``: with its drain timer and connection set)."""
    loop = asyncio.get_running_loop()
    open_conns = 0
    tracked: set[_BareWrapper] | None = set() if bounded else None

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal open_conns
        open_conns += 1
        try:
            await _closed_by_bare_wrapper(reader, writer)
        finally:
            open_conns -= 1

    def factory() -> asyncio.Protocol:
        reader = asyncio.StreamReader(loop=loop)
        inner = asyncio.StreamReaderProtocol(reader, handler, loop=loop)
        return _BareWrapper(inner, graceful, loop, tracked)

    server = await loop.create_server(factory, "127.0.0.1", 0, backlog=1024)
    return server, lambda: open_conns, lambda: 0


async def _one_run(row: Row, total: int, *, mark_for_callgrind: bool = False) -> dict[str, Any]:
    """``total`` connections against the row's server. With ``mark_for_callgrind``, the
    window callgrind counts is marked by ``os.getsid`` (zero) after the client started
    and ``os.getpgid`` (dump) once the last close has finished (see the module's doc)."""
    server, busy, delivered = await _start(row)
    port = server.sockets[0].getsockname()[1]
    cpu_before = _cpu_s()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        __file__,
        "--client",
        "127.0.0.1",
        str(port),
        str(total),
        str(CONCURRENCY),
        stdout=asyncio.subprocess.PIPE,
    )
    if mark_for_callgrind:
        os.getsid(0)  # callgrind: --zero-before=os_getsid
    try:
        out, _ = await asyncio.wait_for(
            proc.communicate(), RUN_TIMEOUT_S * (50 if mark_for_callgrind else 1)
        )
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    result: dict[str, Any] = json.loads(out)
    # Let the last closes finish (bounded), then count what the kernel holds.
    deadline = time.monotonic() + 10
    while busy() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    if mark_for_callgrind:
        os.getpgid(0)  # callgrind: --dump-before=os_getpgid
    cpu = _cpu_s() - cpu_before
    server.close()
    await server.wait_closed()
    result.update(
        name=row.name,
        reports_received=delivered(),
        connections_per_s=total / result["elapsed_s"],
        server_cpu_us_per_conn=cpu / total * 1e6,
        server_time_wait=_server_time_wait(port),
        client_time_wait=_client_time_wait(port),
    )
    return result


async def _all_runs(
    rows: list[Row], total: int, rounds: int, seed: int
) -> list[list[dict[str, Any]]]:
    """``rounds`` rounds of every row, interleaved and each in a shuffled order, so that
    a slow spell of the machine (or the TIME_WAIT entries of earlier runs) hits all of
    them alike; the table uses each row's median."""
    samples: list[list[dict[str, Any]]] = [[] for _ in rows]
    shuffler = random.Random(seed)
    await _one_run(rows[0], min(total, 1000))  # warm-up: imports, allocator
    for number in range(rounds):
        await _room_for_time_wait(total * len(rows))
        print(f"round {number + 1}/{rounds}", flush=True)
        order = list(range(len(rows)))
        shuffler.shuffle(order)
        for index in order:
            samples[index].append(await _one_run(rows[index], total))
    return samples


# -- instruction counts (callgrind) ------------------------------------------------------------

#: callgrind's dump of the marked window: ``summary: <instructions>``.
_SUMMARY = re.compile(r"^summary:\s*(\d+)", re.MULTILINE)


def instructions_unavailable() -> str:
    """``""`` when valgrind can count, else why not."""
    if shutil.which("valgrind") is None:
        return "valgrind is not installed"
    return ""


def count_instructions(
    row: Row, total: int, warmup: int, loop: str, sampled: str
) -> dict[str, Any]:
    """The row's server in a process of its own under callgrind: instructions per
    connection over ``total`` connections, after ``warmup`` of them."""
    with tempfile.TemporaryDirectory(prefix="bench_aio_callgrind_") as tmp:
        out = Path(tmp) / "callgrind.out"
        command = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            "--zero-before=os_getsid",
            "--dump-before=os_getpgid",
            sys.executable,
            __file__,
            "--serve",
            row.name,
            "--connections",
            str(total),
            "--instructions-warmup",
            str(warmup),
            "--loop",
            loop,
            "--sampled",
            sampled,
        ]
        env = dict(os.environ, PYTHONHASHSEED="0")  # the same dict layouts every time
        started = time.monotonic()
        proc = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=INSTRUCTIONS_TIMEOUT_S,
            env=env,
            check=False,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{row.name} under callgrind failed:\n{proc.stdout}\n{proc.stderr}")
        dumps = sorted(Path(tmp).glob("callgrind.out.1"))
        if len(dumps) != 1:
            raise RuntimeError(f"{row.name}: no callgrind dump of the marked window")
        match = _SUMMARY.search(dumps[0].read_text())
        if match is None:
            raise RuntimeError(f"{row.name}: no summary line in {dumps[0].name}")
        run = json.loads(proc.stdout.strip().splitlines()[-1])
    return {
        "instructions_per_conn": int(match.group(1)) / total,
        "errors": run["errors"],
        "wall_s": time.monotonic() - started,
    }


# -- the summary -------------------------------------------------------------------------------


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def summarize(rows: list[Row], samples: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One record per row: medians over the rounds, ratios to plain and to the floor
    (the columns a reader wants first come first: the docs' tables keep this order)."""
    median = {
        row.name: (
            _median([r["connections_per_s"] for r in runs]),
            _median([r["server_cpu_us_per_conn"] for r in runs]),
        )
        for row, runs in zip(rows, samples, strict=True)
    }
    plain_rate, plain_cpu = median[PLAIN]
    records = []
    for row, runs in zip(rows, samples, strict=True):
        rate, cpu = median[row.name]
        floor = median.get(row.floor or "")
        ratio_to_floor = None if floor is None else rate / floor[0]
        records.append(
            {
                "name": row.name,
                "connections_per_s": rate,
                "ratio_to_plain": rate / plain_rate,
                "floor": row.floor,
                "ratio_to_floor": ratio_to_floor,
                "target_vs_floor": row.target,
                "meets_target": (
                    None
                    if row.target is None or ratio_to_floor is None
                    else ratio_to_floor >= row.target
                ),
                "server_cpu_us_per_conn": cpu,
                "server_cpu_us_over_floor": None if floor is None else cpu - floor[1],
                # The floor's CPU over the row's: the throughput ratio a server that
                # alone sets the pace would show; load from elsewhere moves it less.
                "cpu_ratio_to_floor": None if floor is None else floor[1] / cpu,
                "instructions_per_conn": None,
                "instructions_over_floor": None,
                "instructions_ratio_to_floor": None,
                "server_time_wait": max((r["server_time_wait"] or 0) for r in runs),
                "client_time_wait": max((r["client_time_wait"] or 0) for r in runs),
                "errors": sum(r["errors"] for r in runs),
                "reports_missing": (
                    sum(r["ok"] + r["errors"] - r["reports_received"] for r in runs)
                    if row.reports and row.kind == LIBRARY
                    else 0
                ),
                "kind": row.kind,
                "policy": row.policy,
                "reports": row.reports,
                "kernel_state": row.kernel_state,
                "busy_wait_us": row.busy_wait_us,
                "cpu_ratio_to_plain": cpu / plain_cpu,
                "instructions_ratio_to_plain": None,
                "samples": runs,
            }
        )
    return records


def add_instructions(records: list[dict[str, Any]], counted: dict[str, dict[str, Any]]) -> None:
    """Put the callgrind counts beside the timed figures."""
    by_name = {r["name"]: r for r in records}
    for record in records:
        found = counted.get(record["name"])
        record["instructions_per_conn"] = None if found is None else found["instructions_per_conn"]
    plain = by_name[PLAIN]["instructions_per_conn"]
    for record in records:
        own = record["instructions_per_conn"]
        floor = by_name.get(record["floor"] or "", {}).get("instructions_per_conn")
        record["instructions_ratio_to_plain"] = None if own is None or not plain else own / plain
        record["instructions_over_floor"] = None if own is None or floor is None else own - floor
        record["instructions_ratio_to_floor"] = None if own is None or not floor else floor / own


def targets(
    records: list[dict[str, Any]], total: int
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The ratio targets, one record each; and the other checks (TIME_WAIT, whole
    responses, reports), with ``all_targets_met`` over both."""
    by_name = {r["name"]: r for r in records}
    # The A/A row: how far the same code strayed from itself in this run.
    again = by_name.get(PLAIN_AGAIN)
    noise = None if again is None else abs(1 - again["ratio_to_plain"])
    ratio_targets = []
    for record in records:
        if record["target_vs_floor"] is None:
            continue
        floor = by_name[record["floor"]]
        ratio = record["ratio_to_floor"]
        ratio_targets.append(
            {
                "row": record["name"],
                "floor": record["floor"],
                "ratio_to_floor": record["ratio_to_floor"],
                "target": record["target_vs_floor"],
                "met": record["meets_target"],
                "server_cpu_us_over_floor": record["server_cpu_us_over_floor"],
                "instructions_over_floor": record["instructions_over_floor"],
                "cpu_ratio_to_floor": record["cpu_ratio_to_floor"],
                "instructions_ratio_to_floor": record["instructions_ratio_to_floor"],
                "connections_per_s": record["connections_per_s"],
                "floor_connections_per_s": floor["connections_per_s"],
                # The verdict is closer to the target than the A/A row to 1.00.
                "within_noise": (
                    None
                    if noise is None or ratio is None
                    else abs(ratio - record["target_vs_floor"]) < noise
                ),
            }
        )
    peer_first = [
        r["server_time_wait"] for r in records if (r["policy"] or "").startswith("peer-first")
    ]
    by_hand = by_name[GRACEFUL_BY_HAND]["server_time_wait"]
    library = [r for r in records if r["kind"] == LIBRARY]
    errors = sum(r["errors"] for r in records)
    missing = sum(r["reports_missing"] for r in library)
    checks: dict[str, Any] = {
        "same_code_ratio": None if again is None else again["ratio_to_plain"],
        "peer_first_server_time_wait": peer_first,
        "graceful_by_hand_server_time_wait": by_hand,
        "connections_per_run": total,
        "peer_first_leaves_no_time_wait": all(tw == 0 for tw in peer_first) and by_hand > 0,
        "client_errors": errors,
        "reports_missing": missing,
        "every_response_whole": errors == 0 and missing == 0,
    }
    checks["all_targets_met"] = (
        all(t["met"] for t in ratio_targets)
        and checks["peer_first_leaves_no_time_wait"]
        and checks["every_response_whole"]
    )
    return ratio_targets, checks


def calibration(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The busy-wait rows: µs of spin against throughput lost."""
    return [
        {
            "busy_wait_us": r["busy_wait_us"],
            "ratio_to_plain": r["ratio_to_plain"],
            "server_cpu_us_over_plain": r["server_cpu_us_over_floor"],
            "throughput_lost_per_us": (1 - r["ratio_to_plain"]) / r["busy_wait_us"],
        }
        for r in records
        if r["kind"] == CALIBRATION and r["busy_wait_us"]
    ]


# -- output ------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def _times(value: float | None) -> str:
    return "    -" if value is None else f"{value:4.2f}x"


def print_table(records: list[dict[str, Any]], total: int) -> None:
    print(
        f"\n  {'row':<44} {'conn/s':>7} {'plain':>5} {'floor':>5} {'target':>6}"
        f" {'CPU µs/conn':>11} {'+floor':>6} {'instr/conn':>10} {'TW here':>10} {'errors':>6}"
    )
    kind = ""
    for r in records:
        if r["kind"] != kind:
            kind = r["kind"]
            print(f"  [{kind}]")
        target = "" if r["target_vs_floor"] is None else f">={r['target_vs_floor']:.2f}"
        over_floor = _fmt(r["server_cpu_us_over_floor"], "+6.1f")
        print(
            f"  {r['name']:<44} {r['connections_per_s']:7.0f} {_times(r['ratio_to_plain'])}"
            f" {_times(r['ratio_to_floor'])} {target:>6}"
            f" {r['server_cpu_us_per_conn']:11.1f} {over_floor:>6}"
            f" {_fmt(r['instructions_per_conn'], ',.0f'):>10}"
            f" {r['server_time_wait']:>5}/{total} {r['errors']:>6}"
        )


def print_verdicts(
    ratio_targets: list[dict[str, Any]],
    checks: dict[str, Any],
    skipped: list[dict[str, Any]],
    rounds: int,
) -> None:
    print(f"\ntargets (issue 16): ratios of medians over {rounds} interleaved round(s)")
    same = checks.get("same_code_ratio")
    if same is not None:
        print(
            f"  resolution: {PLAIN_AGAIN!r} ran at {same:.3f}x {PLAIN!r} (the same server):"
            f" a verdict marked ~ is closer to its target than that"
        )
    for t in ratio_targets:
        verdict = "met    " if t["met"] else "NOT met"
        instructions = t["instructions_ratio_to_floor"]
        print(
            f"  {verdict}{'~' if t['within_noise'] else ' '} {t['row']:<34}"
            f" {t['ratio_to_floor']:.3f}x {t['floor']}"
            f" (>= {t['target']:.2f}; server CPU {t['server_cpu_us_over_floor']:+.1f} µs/conn,"
            f" CPU ratio {t['cpu_ratio_to_floor']:.2f}x, instructions ratio"
            f" {_times(instructions).strip()})"
        )
    for s in skipped:
        print(f"  skipped  {s['name']}: {s['reason']}")
    total = checks["connections_per_run"]
    verdict = "met    " if checks["peer_first_leaves_no_time_wait"] else "NOT met"
    print(
        f"  {verdict}  peer-first leaves no server TIME_WAIT:"
        f" {checks['peer_first_server_time_wait']} (by hand: graceful leaves"
        f" {checks['graceful_by_hand_server_time_wait']} of {total})"
    )
    verdict = "met    " if checks["every_response_whole"] else "NOT met"
    print(
        f"  {verdict}  every response whole: {checks['client_errors']} client errors,"
        f" {checks['reports_missing']} reports missing"
    )
    print(f"  all targets {'met' if checks['all_targets_met'] else 'NOT met'}")


def print_calibration(rows: list[dict[str, Any]], loop: str) -> None:
    if not rows:
        return
    parts = [
        f"+{c['busy_wait_us']:g} µs -> {c['ratio_to_plain']:.2f}x"
        f" ({c['server_cpu_us_over_plain']:+.1f} µs CPU)"
        for c in rows
    ]
    print(f"\nbusy-wait calibration on {loop}: " + ", ".join(parts))


# -- main --------------------------------------------------------------------------------------


def enter_own_namespace() -> str:
    """Move into a network namespace of our own (root): the TIME_WAIT counts are then
    this run's alone. Returns where the benchmark runs."""
    if os.geteuid() != 0:
        return "host namespace (not root)"
    from tests import _session_netns

    _session_netns.enter_private_namespace()
    return _session_netns.status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 connections, 1 round (CI)")
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (median)")
    parser.add_argument("--seed", type=int, default=6, help="seed of the shuffled run order")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument(
        "--sampled", default="sampled:0.1", help="the kernel_state= value of the sampled row"
    )
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions per connection (callgrind)"
    )
    parser.add_argument("--instructions-connections", type=int, default=500)
    parser.add_argument("--instructions-warmup", type=int, default=100)
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--client", nargs=4, metavar=("HOST", "PORT", "N", "CONC"))
    parser.add_argument("--serve", metavar="ROW", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if args.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    warnings.simplefilter("ignore")  # abort's DataLossWarning is the point of that row
    if args.client:
        host, port, n, conc = args.client
        client_main(host, int(port), int(n), int(conc))
        return 0
    if args.serve:
        with asyncio.Runner(loop_factory=loop_factory) as runner:
            by_name = {r.name: r for r in make_rows(not kernel_state_support(), args.sampled)}
            result = runner.run(
                _serve(by_name[args.serve], args.connections, args.instructions_warmup)
            )
        print(json.dumps(result))
        return 0

    namespace = enter_own_namespace()
    total = 500 if args.quick else args.connections
    rounds = 1 if args.quick else args.rounds
    no_kernel_state = kernel_state_support()
    rows = make_rows(not no_kernel_state, args.sampled)
    skipped = skipped_rows(no_kernel_state, args.sampled)
    load_before = os.getloadavg()
    print(
        f"{total} connections per run, {CONCURRENCY} concurrent, {RESPONSE_SIZE} B responses,"
        f" server on {args.loop}, client (uvloop) in another process, {rounds} round(s),"
        f" {len(rows)} rows; {namespace}; load average {load_before[0]:.2f}"
    )
    for s in skipped:
        print(f"skipped: {s['name']}: {s['reason']}")
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        samples = runner.run(_all_runs(rows, total, rounds, args.seed))
    load_after = os.getloadavg()
    cpus = os.cpu_count() or 1
    if max(load_before[0], load_after[0]) > cpus:
        print(
            f"the machine was loaded (load average {load_before[0]:.1f} before,"
            f" {load_after[0]:.1f} after, {cpus} CPUs): the client and the server competed"
            " with other work, and throughput ratios may follow that more than the server;"
            " the CPU and instruction ratios are steadier"
        )
    records = summarize(rows, samples)
    instructions_note = "not counted (run with --instructions)"
    if args.instructions:
        instructions_note = instructions_unavailable()
        if instructions_note:
            print(f"instructions not counted: {instructions_note}")
        else:
            counted = {}
            for row in rows:
                if row.busy_wait_us:
                    continue  # (a spin's instructions say nothing)
                print(f"callgrind: {row.name}", flush=True)
                try:
                    counted[row.name] = count_instructions(
                        row,
                        args.instructions_connections,
                        args.instructions_warmup,
                        args.loop,
                        args.sampled,
                    )
                except (RuntimeError, subprocess.TimeoutExpired) as exc:  # keep the rest
                    print(f"  not counted: {exc}", flush=True)
                else:
                    print(f"  {counted[row.name]['instructions_per_conn']:,.0f} per connection")
            add_instructions(records, counted)
            instructions_note = (
                f"callgrind, {args.instructions_connections} connections after"
                f" {args.instructions_warmup} of warm-up, in a server process of their own"
            )
    else:
        add_instructions(records, {})
    print_table(records, total)
    ratio_targets, checks = targets(records, total)
    calibrated = calibration(records)
    print_calibration(calibrated, args.loop)
    print_verdicts(ratio_targets, checks, skipped, rounds)
    document = {
        "benchmark": "aio short connections",
        "connections_per_run": total,
        "rounds": rounds,
        "order_seed": args.seed,
        "concurrency": CONCURRENCY,
        "response_bytes": RESPONSE_SIZE,
        "loop": args.loop,
        "python": platform.python_version(),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "namespace": namespace,
        "load_average_1m_before": load_before[0],
        "load_average_1m_after": load_after[0],
        "instructions": instructions_note,
        "runs": records,
        "targets": ratio_targets,
        "checks": checks,
        "skipped": skipped,
        "calibration": calibrated,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    existing: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        existing = json.loads(args.json.read_text())
    if not isinstance(existing, dict) or "by_loop" not in existing:
        existing = {"by_loop": {}}
    existing["by_loop"][args.loop] = document
    args.json.write_text(json.dumps(existing, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


async def _serve(row: Row, total: int, warmup: int) -> dict[str, Any]:
    """The server side of :func:`count_instructions` (runs under callgrind)."""
    await _one_run(row, warmup)
    return await _one_run(row, total, mark_for_callgrind=True)


if __name__ == "__main__":
    raise SystemExit(main())
