"""Soak: many connections through ``tcpclose.aio.start_server``, with misbehaving peers.

The server (this process) runs one ``tcpclose.aio.start_server`` per policy on
loopback: ``graceful``, ``peer-first`` with each fallback, and ``abort``, all with
short bounds. A client process opens ``--connections`` connections, each to a policy
and with a behaviour drawn from a seeded mix:

==============  ==========================================================================
close-first     reads the whole response, then closes (the peer closes first)
silent          reads the whole response, then says nothing until the server ends it
flood           reads the whole response, then floods junk until the server ends it
slow            a small receive buffer and a pause longer than peer-first's timeout
                before reading: the server closes with its response still queued
close-early     sends its request and closes without reading anything (abandons)
reset           reads half of the response, then resets the connection (abandons)
==============  ==========================================================================

Every request body and every response is checksummed end to end (SHA-256): the
server checks the body, the client the response.

Invariants (the exit status is non-zero when one fails):

* every connection is accounted for: the client finished it, the server's handler ran
  and ``on_close`` got its report;
* no corrupted byte anywhere, and no request body lost;
* lost response bytes are 0 for every connection of a non-abort policy whose peer did
  not abandon it (``graceful``, ``peer-first`` with ``fallback=graceful`` or ``auto``),
  and for ``fallback=abort`` unless the server did reset that connection;
* every close ends within its policy's bound (+10 %, plus ``--late`` seconds for a
  loop busy with ``--concurrency`` other connections, whose timers run late, or twice
  the worst loop lag measured in the main run when that is more);
* the servers' ``wait_closed()`` returns within 30 s of ``close()``;
* the server process's fds and asyncio tasks are back to their baseline, and its RSS
  grew by less than 10 MiB from the baseline (taken after a warm-up of
  ``--warmup`` connections, once first-use allocations are made);
* the run ends within ``--time-limit`` seconds (a hard cap: the client stops opening
  connections and the run fails).

With ``--tls`` every connection is TLS: the servers get an ``ssl=`` context with a
certificate made by ``trustme`` at run time (a throwaway CA, in memory), and the
client process trusts that CA (its PEM travels in the client's plan; no file is
written). The same invariants hold, except that the RSS check is on the RSS after
``malloc_trim(0)`` (see ``check``). The server's loop lag (how late a 10 ms timer
runs) is measured during the main run, to tell a late timer from a late close.

Results go to ``benchmarks/results/soak[_netns][_tls][_uvloop].json`` unless ``--json``
says otherwise.

Usage: python benchmarks/soak.py [--quick] [--tls] [--uvloop] [--connections N] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ctypes
import dataclasses
import gc
import hashlib
import json
import os
import random
import socket
import ssl
import struct
import subprocess
import sys
import time
import tracemalloc
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import tcpclose
import tcpclose.aio
from tcpclose import CloseMode, ClosePolicy, CloseReport, Fallback

RESULTS_DIR: Final = Path(__file__).parent / "results"
#: The name the certificate is issued for, and the name the client checks.
TLS_NAME: Final = "localhost"

IDLE_S: Final = 0.2
TIMEOUT_S: Final = 0.3
LINGER_S: Final = 1.0
_BOUNDS: Final = f"idle_timeout={IDLE_S}s linger_time={LINGER_S}s max_drain_bytes=256KiB"
POLICIES: Final[dict[str, str]] = {
    "graceful": f"graceful {_BOUNDS}",
    "peer-first/graceful": f"peer-first timeout={TIMEOUT_S}s fallback=graceful {_BOUNDS}",
    "peer-first/auto": f"peer-first timeout={TIMEOUT_S}s fallback=auto {_BOUNDS}",
    "peer-first/abort": f"peer-first timeout={TIMEOUT_S}s fallback=abort {_BOUNDS}",
    "abort": "abort",
}
#: Policies that promise to deliver every byte (unless the peer abandons the connection).
KEEPS_DATA: Final = frozenset({"graceful", "peer-first/graceful", "peer-first/auto"})

BEHAVIOURS: Final[dict[str, int]] = {  # name: weight
    "close-first": 40,
    "silent": 15,
    "flood": 10,
    "slow": 10,
    "close-early": 15,
    "reset": 10,
}
ABANDONING: Final = frozenset({"close-early", "reset"})

#: Request header: connection id, body length, response length, the peer's behaviour
#: (its index in BEHAVIOURS, so the server can file each report under it), SHA-256 of
#: the body.
REQUEST: Final = struct.Struct("!IIIB32s")
#: Response header: response length, SHA-256 of the response.
RESPONSE: Final = struct.Struct("!I32s")
SLOW_PAUSE_S: Final = 0.4  # > peer-first's timeout, < linger_time
SLOW_RESPONSE: Final = 1 << 20
FLOOD_BYTES: Final = 1 << 20
BLOB_SIZE: Final = 2 << 20
PEER_WAIT_S: Final = 5.0
WAIT_CLOSED_S: Final = 30.0
#: An abort waits for nothing: its bound is the time its syscalls and report take.
ABORT_BOUND_S: Final = 0.05  # how long a client waits for the server's end of a connection


def blob(seed: int) -> bytes:
    """The bytes every payload is sliced from, the same in both processes."""
    return random.Random(seed).randbytes(BLOB_SIZE)


def payload(data: bytes, conn_id: int, size: int) -> memoryview:
    start = (conn_id * 7919) % (BLOB_SIZE - size)
    return memoryview(data)[start : start + size]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trimmed_rss_bytes() -> int:
    """RSS after a full collection and glibc's ``malloc_trim(0)``, which hands freed
    heap pages back to the kernel. Freed memory that malloc keeps (e.g. after a burst
    of large transport buffers) then no longer counts; memory still in use does."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


@dataclasses.dataclass(frozen=True)
class Tls:
    """The servers' TLS context and the PEM of the CA the client must trust."""

    server: ssl.SSLContext
    ca_pem: str


def make_tls() -> Tls:
    """A throwaway CA and a certificate for ``TLS_NAME``, in memory (trustme is only
    needed for ``--tls``)."""
    import trustme

    ca = trustme.CA()
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(TLS_NAME).configure_cert(server)
    return Tls(server, ca.cert_pem.bytes().decode())


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def bound_of(policy: ClosePolicy, fallback: Fallback | None) -> float:
    if policy.mode is CloseMode.GRACEFUL:
        return policy.linger_time
    if policy.mode is CloseMode.PEER_FIRST:
        return policy.timeout + (policy.linger_time if fallback is Fallback.GRACEFUL else 0.0)
    return ABORT_BOUND_S


# -- the client process ------------------------------------------------------------------------


@dataclasses.dataclass
class ClientTally:
    """What the client saw, as counters (no per-connection records)."""

    connections: int = 0
    connect_errors: int = 0
    request_bytes: int = 0
    response_bytes_expected: int = 0
    response_bytes_received: int = 0
    lost_bytes: dict[str, int] = dataclasses.field(default_factory=dict)  # by policy
    lost_bytes_abandoned: int = 0
    lost_without_reset: dict[str, int] = dataclasses.field(default_factory=dict)
    corrupted: int = 0
    resets_seen: int = 0
    eofs_seen: int = 0
    by_behaviour: dict[str, int] = dataclasses.field(default_factory=dict)
    timed_out: bool = False
    errors: list[str] = dataclasses.field(default_factory=list)

    def add(self, mapping: dict[str, int], key: str, n: int = 1) -> None:
        mapping[key] = mapping.get(key, 0) + n

    def error(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)


async def _read_response(
    reader: asyncio.StreamReader, limit: int | None
) -> tuple[int, bytes, bytes, str]:
    """Read the response header and up to ``limit`` bytes of the response (all when
    None). Returns (announced length, digest, data, how it ended)."""
    try:
        head = await reader.readexactly(RESPONSE.size)
    except asyncio.IncompleteReadError as exc:
        return 0, b"", b"", "eof" if not exc.partial else "short"
    except ConnectionError:
        return 0, b"", b"", "reset"
    size, digest = RESPONSE.unpack(head)
    want = size if limit is None else min(size, limit)
    chunks: list[bytes] = []
    got = 0
    try:
        while got < want:
            chunk = await reader.read(min(256 * 1024, want - got))
            if not chunk:
                return size, digest, b"".join(chunks), "eof"
            chunks.append(chunk)
            got += len(chunk)
    except ConnectionError:
        return size, digest, b"".join(chunks), "reset"
    return size, digest, b"".join(chunks), "done"


async def _wait_end(reader: asyncio.StreamReader) -> str:
    """Read (and drop) until the server ends the connection: "eof", "reset" or "timeout"."""
    try:
        async with asyncio.timeout(PEER_WAIT_S):
            while await reader.read(65536):
                pass
        return "eof"
    except ConnectionError:  # reset, or a flood's write that met the reset
        return "reset"
    except TimeoutError:
        return "timeout"


def _linger_zero(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


async def one_client(
    tally: ClientTally,
    data: bytes,
    conn_id: int,
    host: str,
    port: int,
    policy: str,
    behaviour: str,
    rng: random.Random,
    tls: ssl.SSLContext | None,
) -> None:
    body = bytes(payload(data, conn_id + 1, rng.randint(1, 16 * 1024)))
    size = SLOW_RESPONSE if behaviour == "slow" else rng.randint(1, 64 * 1024)
    kind = list(BEHAVIOURS).index(behaviour)
    head = REQUEST.pack(conn_id, len(body), size, kind, hashlib.sha256(body).digest())
    secure: dict[str, Any] = {} if tls is None else {"ssl": tls, "server_hostname": TLS_NAME}
    try:
        if behaviour == "slow":
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16 * 1024)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (host, port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=1 << 20, **secure)
            # Really not reading: otherwise the loop reads into the StreamReader at once
            # (and a StreamReader raises a reset before handing out what it buffered).
            transport = writer.transport
            assert isinstance(transport, asyncio.ReadTransport)
            transport.pause_reading()
        else:
            reader, writer = await asyncio.open_connection(host, port, limit=1 << 20, **secure)
    except OSError as exc:
        tally.connect_errors += 1
        tally.error(f"connect: {exc!r}")
        return
    tally.connections += 1
    tally.add(tally.by_behaviour, behaviour)
    try:
        writer.write(head + body)
        await writer.drain()
        tally.request_bytes += len(body)
        if behaviour == "close-early":
            tally.response_bytes_expected += size
            tally.lost_bytes_abandoned += size
            return
        if behaviour == "slow":
            await asyncio.sleep(SLOW_PAUSE_S)  # the fault itself: not reading yet
            transport = writer.transport
            assert isinstance(transport, asyncio.ReadTransport)
            transport.resume_reading()
        limit = size // 2 if behaviour == "reset" else None
        announced, digest, got, how = await _read_response(reader, limit)
        tally.response_bytes_expected += size
        tally.response_bytes_received += len(got)
        if announced and announced != size:
            tally.corrupted += 1
            tally.error(f"{conn_id}: announced {announced} bytes, asked {size}")
        if behaviour == "reset":
            tally.lost_bytes_abandoned += size - len(got)
            _linger_zero(writer)
            # abort(): a TLS transport's close() would first send close_notify and wait
            # for the answer; the plain one resets the same either way.
            writer.transport.abort()
            return
        whole = len(got) == size
        if whole and hashlib.sha256(got).digest() != digest:
            tally.corrupted += 1
            tally.error(f"{conn_id}: response digest mismatch")
        if how == "reset":
            tally.resets_seen += 1
        if not whole:
            lost = size - len(got)
            tally.add(tally.lost_bytes, policy, lost)
            if how != "reset":
                tally.add(tally.lost_without_reset, policy, lost)
            if policy in KEEPS_DATA or how != "reset":
                tally.error(f"{conn_id} {policy} {behaviour}: {lost} bytes lost ({how})")
            return
        if behaviour == "close-first":
            return
        if behaviour == "flood":
            junk = bytes(payload(data, conn_id, 64 * 1024))

            async def flood() -> None:
                with contextlib.suppress(OSError):
                    for _ in range(FLOOD_BYTES // len(junk)):
                        # Over TLS, drain() does not notice at once that the TCP
                        # connection is lost, and asyncio's TLS transport writes on,
                        # logging each send: stop at the first sign of the end.
                        if writer.is_closing() or reader.at_eof():
                            break
                        writer.write(junk)
                        await writer.drain()
                        await asyncio.sleep(0)  # let the loop deliver a reset

            flooding = asyncio.create_task(flood())
            end = await _wait_end(reader)
            flooding.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await flooding
        else:
            end = await _wait_end(reader)
        if end == "reset":
            tally.resets_seen += 1
        elif end == "eof":
            tally.eofs_seen += 1
        else:
            tally.error(f"{conn_id} {policy} {behaviour}: the server never ended it")
    except OSError as exc:
        if behaviour not in ABANDONING:
            tally.error(f"{conn_id} {policy} {behaviour}: {exc!r}")
    finally:
        with contextlib.suppress(OSError):
            writer.close()
            await writer.wait_closed()


async def run_clients(plan: dict[str, Any]) -> ClientTally:
    tally = ClientTally()
    data = blob(plan["seed"])
    rng = random.Random(plan["seed"])
    names = list(BEHAVIOURS)
    weights = [BEHAVIOURS[n] for n in names]
    ports: dict[str, int] = plan["ports"]
    policies = list(ports)
    deadline = time.monotonic() + plan["time_limit"]
    limit = asyncio.Semaphore(plan["concurrency"])
    tasks: set[asyncio.Task[None]] = set()
    tls = None
    if plan["ca_pem"] is not None:
        tls = ssl.create_default_context(cadata=plan["ca_pem"])
    for conn_id in range(plan["connections"]):
        if time.monotonic() >= deadline:
            tally.timed_out = True
            break
        await limit.acquire()
        policy = policies[conn_id % len(policies)]
        behaviour = rng.choices(names, weights)[0]
        task = asyncio.create_task(
            one_client(
                tally,
                data,
                conn_id,
                plan["host"],
                ports[policy],
                policy,
                behaviour,
                random.Random(rng.random()),
                tls,
            )
        )
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        task.add_done_callback(lambda _t: limit.release())
    if tasks:
        await asyncio.wait(tasks, timeout=max(1.0, deadline - time.monotonic()) + 10)
    for task in tasks:
        task.cancel()
        tally.timed_out = True
    return tally


def client_main(plan_text: str) -> None:
    plan = json.loads(plan_text)
    tally = asyncio.run(run_clients(plan))
    print(json.dumps(dataclasses.asdict(tally)), flush=True)


# -- the server (this process) ----------------------------------------------------------------


@dataclasses.dataclass
class ServerTally:
    handlers: int = 0
    handler_errors: int = 0
    bodies_bad: int = 0
    request_bytes: int = 0
    response_bytes: int = 0
    reports: int = 0
    outcomes: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    by_policy: dict[str, collections.Counter[str]] = dataclasses.field(default_factory=dict)
    #: policy -> behaviour -> outcome (with "/fallback") -> count
    by_behaviour: dict[str, dict[str, collections.Counter[str]]] = dataclasses.field(
        default_factory=dict
    )
    #: the behaviour of each connection whose handler has read its request, by peer address
    behaviour_of: dict[tuple[str, int], str] = dataclasses.field(default_factory=dict)
    rst_sent: int = 0
    peer_resets: int = 0
    drained_bytes: int = 0
    discarded_bytes: int = 0
    max_over_bound_s: float = 0.0
    over_bound: int = 0
    #: "policy behaviour" -> [closes over their bound (+10 %), the most over, seconds]
    over_bound_by: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    loop_errors: list[str] = dataclasses.field(default_factory=list)


def make_handler(tally: ServerTally, data: bytes) -> Any:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tally.handlers += 1
        try:
            async with asyncio.timeout(10):
                conn_id, body_len, size, kind, digest = REQUEST.unpack(
                    await reader.readexactly(REQUEST.size)
                )
                body = await reader.readexactly(body_len)
        except (asyncio.IncompleteReadError, OSError, TimeoutError) as exc:
            tally.handler_errors += 1
            tally.loop_errors.append(f"handler: {exc!r}")
            return
        tally.request_bytes += body_len
        peer = writer.get_extra_info("peername")
        tally.behaviour_of[peer[0], peer[1]] = list(BEHAVIOURS)[kind]
        if hashlib.sha256(body).digest() != digest:
            tally.bodies_bad += 1
        response = payload(data, conn_id, size)
        writer.write(RESPONSE.pack(size, hashlib.sha256(response).digest()))
        writer.write(response)
        tally.response_bytes += size
        # returning closes the connection with the server's policy

    return handle


def make_on_close(tally: ServerTally, name: str, late_s: float) -> Any:
    counter = tally.by_policy.setdefault(name, collections.Counter())

    def on_close(report: CloseReport) -> None:
        tally.reports += 1
        outcome = report.outcome.value
        tally.outcomes[outcome] += 1
        key = outcome if report.fallback is None else f"{outcome}/{report.fallback.value}"
        counter[key] += 1
        peer = None if report.peer is None else (report.peer[0], report.peer[1])
        behaviour = tally.behaviour_of.pop(peer, "unknown") if peer else "unknown"
        tally.by_behaviour.setdefault(name, {}).setdefault(behaviour, collections.Counter())[
            key
        ] += 1
        tally.rst_sent += report.rst_sent
        tally.peer_resets += outcome == "reset"
        tally.drained_bytes += report.drained_bytes
        if outcome == "error" and len(tally.loop_errors) < 20:
            tally.loop_errors.append(f"outcome error ({behaviour}): {report}")
        tally.discarded_bytes += report.discarded_bytes
        over = report.duration - bound_of(report.policy, report.fallback) * 1.1
        if over > 0:
            tally.over_bound += 1
            tally.max_over_bound_s = max(tally.max_over_bound_s, over)
            cell = tally.over_bound_by.setdefault(f"{name} {behaviour}", [0, 0.0])
            cell[0] += 1
            cell[1] = max(cell[1], over)
            if over > late_s and len(tally.loop_errors) < 20:
                tally.loop_errors.append(f"over its bound by {over:.3f}s: {report}")

    return on_close


async def serve(
    args: argparse.Namespace,
    host: str = "127.0.0.1",
    client_prefix: tuple[str, ...] = (),
    tls: Tls | None = None,
) -> dict[str, Any]:
    """Run the servers on ``host`` (over TLS with ``tls``); the client process is started
    with ``client_prefix`` (e.g. ``ip netns exec <ns>``) in front of its command line."""
    loop = asyncio.get_running_loop()
    tally = ServerTally()

    def on_loop_error(_loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if len(tally.loop_errors) < 20:
            tally.loop_errors.append(f"loop: {context.get('message')} {context.get('exception')!r}")

    loop.set_exception_handler(on_loop_error)
    data = blob(args.seed)
    handler = make_handler(tally, data)
    servers = {
        name: await tcpclose.aio.start_server(
            handler,
            host,
            0,
            close_policy=text,
            on_close=make_on_close(tally, name, args.late),
            backlog=1024,
            ssl=None if tls is None else tls.server,
        )
        for name, text in POLICIES.items()
    }
    ports = {name: server.sockets[0].getsockname()[1] for name, server in servers.items()}
    started = time.monotonic()
    rss_start = rss_bytes()

    async def clients(n: int, seed: int, time_limit: float) -> dict[str, Any]:
        plan = {
            "connections": n,
            "seed": seed,
            "host": host,
            "ports": ports,
            "concurrency": args.concurrency,
            "time_limit": time_limit,
            "ca_pem": None if tls is None else tls.ca_pem,
        }
        proc = await asyncio.create_subprocess_exec(
            *client_prefix,
            sys.executable,
            __file__,
            "--client",
            json.dumps(plan),
            stdout=subprocess.PIPE,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), time_limit + 30)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if proc.returncode != 0:
            raise RuntimeError(f"client process exited {proc.returncode}")
        result: dict[str, Any] = json.loads(out)
        return result

    lags: list[float] = []

    async def measure_lag() -> None:
        while True:
            t0 = loop.time()
            await asyncio.sleep(0.01)
            lags.append(loop.time() - t0 - 0.01)

    async def settle(expected_reports: int) -> None:
        deadline = time.monotonic() + 10
        while tally.reports < expected_reports and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        me = asyncio.current_task()
        while time.monotonic() < deadline:
            if not [t for t in asyncio.all_tasks() if t not in (me, ticker) and not t.done()]:
                break
            await asyncio.sleep(0.05)

    if args.trace_memory:
        tracemalloc.start(8)
    # warm-up: first-use allocations (buffers, caches, code paths)
    ticker: asyncio.Task[None] | None = None
    warm = await clients(args.warmup, args.seed + 1, args.time_limit)
    await settle(warm["connections"])
    gc.collect()
    snapshot = tracemalloc.take_snapshot() if args.trace_memory else None
    fds_before = fd_count()
    tasks_before = len(asyncio.all_tasks())
    rss_before = rss_bytes()
    rss_before_trimmed = trimmed_rss_bytes()
    reports_before = tally.reports
    time_left = args.time_limit - (time.monotonic() - started)
    ticker = asyncio.create_task(measure_lag())
    main_run = await clients(args.connections, args.seed, max(1.0, time_left))
    ticker.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ticker
    await settle(reports_before + main_run["connections"])
    gc.collect()
    fds_after = fd_count()
    tasks_after = len(asyncio.all_tasks())
    rss_after = rss_bytes()
    rss_after_trimmed = trimmed_rss_bytes()
    growth: list[str] = []
    if snapshot is not None:
        diff = tracemalloc.take_snapshot().compare_to(snapshot, "traceback")
        growth = [
            str(stat) + "\n" + "\n".join(stat.traceback.format())
            for stat in diff[: args.trace_memory]
        ]
        tracemalloc.stop()
    elapsed = time.monotonic() - started
    for server in servers.values():
        server.close()
    hung: list[str] = []
    for name, server in servers.items():
        try:
            async with asyncio.timeout(WAIT_CLOSED_S):
                await server.wait_closed()
        except TimeoutError:
            hung.append(f"{name}: wait_closed() still waiting after {WAIT_CLOSED_S}s")
    return {
        "server": tally,
        "warmup": warm,
        "client": main_run,
        "fds_before": fds_before,
        "fds_after": fds_after,
        "tasks_before": tasks_before,
        "tasks_after": tasks_after,
        "rss_start": rss_start,
        "rss_before": rss_before,
        "rss_after": rss_after,
        "rss_before_trimmed": rss_before_trimmed,
        "rss_after_trimmed": rss_after_trimmed,
        "elapsed_s": elapsed,
        "reports_main": tally.reports - reports_before,
        "memory_growth": growth,
        "loop_lag_s": sorted(lags),
        "wait_closed_hung": hung,
    }


def _quantile(ordered: list[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def late_allowance(res: dict[str, Any], args: argparse.Namespace) -> float:
    """How late a close may end past its bound (+10 %) before it counts as the close's
    fault: ``--late``, or twice the worst loop lag measured in the main run when that is
    more. A close's timer runs no earlier than the loop gets to it, and its end needs
    one more pass (the transport closes the fd in a callback; the report's lookup comes
    after it). Over TLS the loop also does every handshake and every record's crypto:
    on this 2-core machine its worst stall (e.g. 252-288 ms, p99 42-77 ms, over 20,000
    connections) passes ``--late``, and a close that met two stalls ran 264 ms late
    where the worst stall was 252 ms."""
    late: float = args.late
    return max(late, 2 * _quantile(res["loop_lag_s"], 1.0))


def check(res: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """The invariants; returns what failed."""
    failed: list[str] = []
    server: ServerTally = res["server"]
    client = res["client"]
    warm = res["warmup"]
    total = client["connections"] + warm["connections"]
    if client["timed_out"] or warm["timed_out"]:
        failed.append(f"the time limit of {args.time_limit}s was reached")
    if client["connections"] != args.connections:
        failed.append(f"{client['connections']} of {args.connections} connections were made")
    if client["connect_errors"] or warm["connect_errors"]:
        failed.append("connect errors")
    if server.handlers != total:
        failed.append(f"{server.handlers} handlers ran for {total} connections")
    if server.reports != total:
        failed.append(f"{server.reports} reports for {total} connections")
    if server.handler_errors:
        failed.append(f"{server.handler_errors} handlers could not read their request")
    if server.bodies_bad or client["corrupted"] or warm["corrupted"]:
        failed.append("corrupted bytes")
    if server.request_bytes != client["request_bytes"] + warm["request_bytes"]:
        failed.append("request bytes lost")
    for tally in (client, warm):
        for policy, lost in tally["lost_bytes"].items():
            if policy in KEEPS_DATA and lost:
                failed.append(f"{lost} response bytes lost under {policy}")
        for policy, lost in tally["lost_without_reset"].items():
            if lost:
                failed.append(f"{lost} response bytes lost under {policy} without a reset")
    # Tracing allocations slows the loop and keeps traces: no verdict on time or RSS.
    if server.max_over_bound_s > late_allowance(res, args) and not args.trace_memory:
        failed.append(
            f"a close ran {server.max_over_bound_s:.3f}s past its bound (+10%), "
            f"loop lag at most {_quantile(res['loop_lag_s'], 1.0):.3f}s"
        )
    if server.loop_errors and any(e.startswith("loop:") for e in server.loop_errors):
        failed.append("errors reached the loop's exception handler")
    if client["errors"]:
        failed.append(f"client errors, e.g. {client['errors'][:3]}")
    failed.extend(res["wait_closed_hung"])
    if res["fds_after"] != res["fds_before"]:
        failed.append(f"fds {res['fds_before']} -> {res['fds_after']}")
    if res["tasks_after"] != res["tasks_before"]:
        failed.append(f"tasks {res['tasks_before']} -> {res['tasks_after']}")
    growth = res["rss_after"] - res["rss_before"]
    what = "RSS"
    if args.tls:
        # Over TLS, glibc keeps most of what the TLS buffers freed: RSS as read grew by
        # 88 MiB over 1,000 connections and 306 MiB over 20,000 (asyncio loop), while
        # after malloc_trim(0) the growth was 1.7 and 3.4 MiB, and a plain asyncio TLS
        # server (no tcpclose) grew 24 MiB as read, 1.3 MiB trimmed, over 5,000. Freed
        # memory that malloc holds is not a leak: over TLS the check is on the trimmed
        # RSS, the memory in use. Both are in the results.
        growth = res["rss_after_trimmed"] - res["rss_before_trimmed"]
        what = "RSS after malloc_trim"
    if growth >= 10 << 20 and not args.trace_memory:
        failed.append(f"{what} grew by {growth / (1 << 20):.1f} MiB")
    return failed


def serve_in_namespaces(
    args: argparse.Namespace,
    factory: Callable[[], asyncio.AbstractEventLoop] | None,
    tls: Tls | None,
) -> dict[str, Any]:
    """The soak across two network namespaces (root only), with packet loss: the
    server's host loses the first FIN of every connection it receives and the client's
    host the final ACK of every close it ends second, so that every close goes
    through a retransmission. Uses the test suite's two-host fixture."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tcpclose._kernel._netlink import reset_channel
    from tests._netns import create_two_hosts, netns_unavailable, nft_unavailable

    reason = netns_unavailable() or nft_unavailable()
    if reason is not None:
        raise SystemExit(f"--netns: {reason}")
    with create_two_hosts(ipv6=False) as hosts:
        hosts.server.faults.drop_first_fin()
        hosts.client.faults.drop_final_ack()
        prefix = ("ip", "netns", "exec", hosts.client.netns)
        with hosts.server.entered():
            reset_channel()  # lookups from this thread must see the server namespace
            try:
                with asyncio.Runner(loop_factory=factory) as runner:
                    return runner.run(serve(args, hosts.server.ipv4, prefix, tls))
            finally:
                reset_channel()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1,000 connections (CI)")
    parser.add_argument("--connections", type=int, default=None, help="default 20,000")
    parser.add_argument("--warmup", type=int, default=None, help="connections before the baseline")
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--time-limit", type=float, default=None, help="hard cap, seconds")
    parser.add_argument(
        "--late",
        type=float,
        default=0.25,
        help="seconds a busy loop's timers may run late past a bound (+10%%)",
    )
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument(
        "--json", type=Path, default=None, help="default results/soak[_netns][_tls][_uvloop].json"
    )
    parser.add_argument("--uvloop", action="store_true", help="run the server on uvloop")
    parser.add_argument("--tls", action="store_true", help="every connection over TLS")
    parser.add_argument(
        "--trace-memory",
        type=int,
        default=0,
        metavar="N",
        help="trace allocations; print the N that grew most after the baseline",
    )
    parser.add_argument(
        "--netns",
        action="store_true",
        help="across two network namespaces with FINs and final ACKs lost once (root)",
    )
    parser.add_argument("--client", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.client is not None:
        client_main(args.client)
        return 0
    if args.connections is None:
        args.connections = 1_000 if args.quick else 20_000
    if args.warmup is None:
        args.warmup = 200 if args.quick else 1_000
    if args.json is None:
        suffix = "".join(
            name
            for name, on in (("_netns", args.netns), ("_tls", args.tls), ("_uvloop", args.uvloop))
            if on
        )
        args.json = RESULTS_DIR / f"soak{suffix}.json"
    if args.time_limit is None:
        args.time_limit = 45.0 if args.quick else 900.0
    warnings.simplefilter("ignore", tcpclose.TcpCloseWarning)  # aborts warn by design
    factory = None
    if args.uvloop:
        import uvloop

        factory = uvloop.new_event_loop
    tls = make_tls() if args.tls else None
    if args.netns:
        res = serve_in_namespaces(args, factory, tls)
    else:
        with asyncio.Runner(loop_factory=factory) as runner:
            res = runner.run(serve(args, tls=tls))
    failed = check(res, args)
    server: ServerTally = res["server"]
    client = res["client"]
    summary = {
        "connections": client["connections"],
        "warmup_connections": res["warmup"]["connections"],
        "elapsed_s": round(res["elapsed_s"], 2),
        "loop": "uvloop" if args.uvloop else "asyncio",
        "network": "two namespaces, FIN and final ACK lost once" if args.netns else "loopback",
        "tls": args.tls,
        "concurrency": args.concurrency,
        "policies": POLICIES,
        "behaviours": client["by_behaviour"],
        "request_bytes": client["request_bytes"],
        "response_bytes": client["response_bytes_expected"],
        "response_bytes_received": client["response_bytes_received"],
        "lost_bytes_by_policy": client["lost_bytes"],
        "lost_bytes_keeping_policies": sum(
            v for k, v in client["lost_bytes"].items() if k in KEEPS_DATA
        ),
        "lost_bytes_abandoned_by_peer": client["lost_bytes_abandoned"],
        "resets_seen_by_clients": client["resets_seen"],
        "rst_sent_by_server": server.rst_sent,
        "peer_resets_seen_by_server": server.peer_resets,
        "outcomes": dict(server.outcomes),
        "outcomes_by_policy": {k: dict(v) for k, v in server.by_policy.items()},
        "outcomes_by_policy_and_behaviour": {
            policy: {behaviour: dict(c) for behaviour, c in by.items()}
            for policy, by in server.by_behaviour.items()
        },
        "drained_bytes": server.drained_bytes,
        "discarded_bytes": server.discarded_bytes,
        "closes_over_bound": server.over_bound,
        "max_over_bound_s": round(server.max_over_bound_s, 4),
        "loop_lag_p99_ms": round(_quantile(res["loop_lag_s"], 0.99) * 1000, 1),
        "loop_lag_max_ms": round(_quantile(res["loop_lag_s"], 1.0) * 1000, 1),
        "late_allowance_s": round(late_allowance(res, args), 4),
        "closes_over_bound_by_policy_and_behaviour": {
            key: {"closes": int(n), "max_over_s": round(worst, 4)}
            for key, (n, worst) in sorted(server.over_bound_by.items())
        },
        "fds_before": res["fds_before"],
        "fds_after": res["fds_after"],
        "tasks_before": res["tasks_before"],
        "tasks_after": res["tasks_after"],
        "rss_start_mib": round(res["rss_start"] / (1 << 20), 2),
        "rss_before_mib": round(res["rss_before"] / (1 << 20), 2),
        "rss_after_mib": round(res["rss_after"] / (1 << 20), 2),
        "rss_growth_mib": round((res["rss_after"] - res["rss_before"]) / (1 << 20), 2),
        "rss_before_trimmed_mib": round(res["rss_before_trimmed"] / (1 << 20), 2),
        "rss_after_trimmed_mib": round(res["rss_after_trimmed"] / (1 << 20), 2),
        "rss_growth_trimmed_mib": round(
            (res["rss_after_trimmed"] - res["rss_before_trimmed"]) / (1 << 20), 2
        ),
        "errors": server.loop_errors[:10] + client["errors"][:10],
        "memory_growth": res["memory_growth"],
        "failed": failed,
    }
    width = max(len(k) for k in summary)
    for key, value in summary.items():
        print(f"{key:<{width}}  {value}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    if failed:
        print("FAILED: " + "; ".join(failed), file=sys.stderr)
        return 1
    print("ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
