"""Short connections against asyncio servers: plain asyncio vs tcpclose.aio, per policy.

A separate client process opens N short connections (64 at a time): it sends a
request, reads a response of known length and closes as soon as it has all of it.
The server, in this process, is ``asyncio.start_server`` with a handler that writes
the response and calls ``writer.close()`` (plain), or ``tcpclose.aio.start_server``
with the same handler returning, for each policy, with reports on (an ``on_close``
receives every report) and off. All runs happen in one invocation, on loopback.

For each run: connections per second (the client's wall time), the ratio to plain
asyncio, the server's CPU time per connection, client-side errors (a reset before the
whole response arrived) and the TIME_WAIT entries left on the server's side of the
port (``tcpclose.kernel.dump``).

Reference rows, plain ``asyncio.start_server`` with no library logic, give the floors:

* "asyncio, graceful by hand": the handler does a graceful close itself
  (``write_eof()``, read to EOF, ``close()``): what waiting for the peer's FIN costs,
  the floor for ``graceful`` and ``peer-first`` with reports off;
* "... + report reads": the same closes (plain ``close()``, graceful by hand) plus the
  three kernel reads a report is made of (``SO_COOKIE`` and ``TCP_INFO`` before the
  close, the sock_diag lookup of the 4-tuple after it): the floors with reports on.

The rounds are interleaved and each round runs in a shuffled order (seeded), so that a
slow spell of the machine, or the TIME_WAIT entries earlier runs leave in the kernel's
tables, do not always fall on the same rows; the table shows each row's median.

Targets: >= 0.9x plain with reports off, >= 0.8x with reports on; peer-first leaves no
TIME_WAIT on the server's side.

Usage: python benchmarks/bench_aio.py [--quick] [--connections N] [--loop asyncio|uvloop]
       [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import platform
import random
import resource
import socket
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

RESULTS = Path(__file__).parent / "results" / "aio.json"
REQUEST = b"GET / HTTP/1.1\r\n\r\n"
RESPONSE_SIZE = 4096
CONCURRENCY = 64
RUN_TIMEOUT_S = 120.0


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


# -- the server side ---------------------------------------------------------------------------


RESPONSE = b"r" * RESPONSE_SIZE


#: ``struct tcp_info``'s size on Linux 6.x: what a report reads before the close.
_TCP_INFO_SIZE = 232
#: ``SO_COOKIE`` on Linux (the socket module does not name it).
_SO_COOKIE = getattr(socket, "SO_COOKIE", 57)


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


def _close(writer: asyncio.StreamWriter, report_reads: bool) -> None:
    """``writer.close()``; with ``report_reads``, the report's kernel reads around it
    (the transport closes the fd on the next loop turn: the lookup runs after it)."""
    lookup = _report_reads(writer) if report_reads else None
    writer.close()
    if lookup is not None:
        asyncio.get_running_loop().call_soon(lookup)


async def _plain_handler(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, report_reads: bool = False
) -> None:
    """Plain asyncio: answer, then ``writer.close()``."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(RESPONSE)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    _close(writer, report_reads)


async def _graceful_by_hand(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, report_reads: bool = False
) -> None:
    """A reference: a graceful close written in the handler, no library."""
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


#: The policy names of the runs without tcpclose, and their handlers.
PLAIN = None
BY_HAND = "asyncio-graceful-by-hand"
BY_HAND_REPORTED = "asyncio-close-by-hand-report-reads"
GRACEFUL_BY_HAND_REPORTED = "asyncio-graceful-by-hand-report-reads"
_HANDLERS: dict[str | None, Callable[..., Any]] = {
    PLAIN: _plain_handler,
    BY_HAND: _graceful_by_hand,
    BY_HAND_REPORTED: functools.partial(_plain_handler, report_reads=True),
    GRACEFUL_BY_HAND_REPORTED: functools.partial(_graceful_by_hand, report_reads=True),
}


async def _one_run(name: str, policy: str | None, report: bool, total: int) -> dict[str, Any]:
    import tcpclose.aio

    reports = 0
    open_conns = 0

    def count(_: object) -> None:
        nonlocal reports
        reports += 1

    if policy is None or policy in _HANDLERS:
        handler = _HANDLERS[policy]

        async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            nonlocal open_conns
            open_conns += 1
            try:
                await handler(reader, writer)
            finally:
                open_conns -= 1

        server: Any = await asyncio.start_server(plain, "127.0.0.1", 0, backlog=1024)
    else:
        server = await tcpclose.aio.start_server(
            _policy_handler,
            "127.0.0.1",
            0,
            backlog=1024,
            close_policy=policy,
            on_close=count if report else None,
        )
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
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    result: dict[str, Any] = json.loads(out)
    # Let the last closes finish (bounded), then count what the kernel holds.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        busy = open_conns if policy in _HANDLERS else server.open_connections
        if not busy:
            break
        await asyncio.sleep(0.01)
    cpu = _cpu_s() - cpu_before
    server.close()
    await server.wait_closed()
    result.update(
        name=name,
        policy=policy,
        reports=report,
        reports_received=reports,
        connections_per_s=total / result["elapsed_s"],
        server_cpu_us_per_conn=cpu / total * 1e6,
        server_time_wait=_server_time_wait(port),
        client_time_wait=_client_time_wait(port),
    )
    return result


RUNS: list[tuple[str, str | None, bool]] = [
    ("plain asyncio", PLAIN, False),
    ("asyncio, graceful by hand", BY_HAND, False),
    ("asyncio, close by hand + report reads", BY_HAND_REPORTED, True),
    ("asyncio, graceful by hand + report reads", GRACEFUL_BY_HAND_REPORTED, True),
    ("graceful, reports off", "graceful", False),
    ("graceful, reports on", "graceful", True),
    ("peer-first, reports off", "peer-first timeout=5s", False),
    ("peer-first, reports on", "peer-first timeout=5s", True),
    ("abort, reports off", "abort", False),
    ("abort, reports on", "abort", True),
    ("default, reports off", "default", False),
    ("default, reports on", "default", True),
]


async def _all_runs(total: int, rounds: int, seed: int) -> list[list[dict[str, Any]]]:
    """``rounds`` rounds of every run, interleaved and each in a shuffled order, so that
    a slow spell of the machine (or the TIME_WAIT entries of earlier runs) hits all of
    them alike; the table uses each run's median."""
    samples: list[list[dict[str, Any]]] = [[] for _ in RUNS]
    shuffler = random.Random(seed)
    await _one_run("warm-up", PLAIN, False, min(total, 1000))  # imports, allocator
    for number in range(rounds):
        await _room_for_time_wait(total * len(RUNS))
        print(f"round {number + 1}/{rounds}", flush=True)
        order = list(range(len(RUNS)))
        shuffler.shuffle(order)
        for index in order:
            name, policy, report = RUNS[index]
            samples[index].append(await _one_run(name, policy, report, total))
    return samples


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    if len(ordered) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def _summarize(samples: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    rows = []
    for (name, policy, report), runs in zip(RUNS, samples, strict=True):
        rows.append(
            {
                "name": name,
                "policy": policy,
                "reports": report,
                "connections_per_s": _median([r["connections_per_s"] for r in runs]),
                "server_cpu_us_per_conn": _median([r["server_cpu_us_per_conn"] for r in runs]),
                "server_time_wait": max((r["server_time_wait"] or 0) for r in runs),
                "client_time_wait": max((r["client_time_wait"] or 0) for r in runs),
                "errors": sum(r["errors"] for r in runs),
                "samples": runs,
            }
        )
    plain = rows[0]
    for row in rows:
        row["ratio_to_plain"] = row["connections_per_s"] / plain["connections_per_s"]
        row["cpu_ratio_to_plain"] = row["server_cpu_us_per_conn"] / plain["server_cpu_us_per_conn"]
    return rows


def _has_target(row: dict[str, Any]) -> bool:
    return row["policy"] not in _HANDLERS


def _print_table(rows: list[dict[str, Any]], total: int) -> None:
    print(
        f"\n  {'server':<42} {'conn/s':>8} {'ratio':>6} {'target':>7}"
        f" {'server CPU/conn':>16} {'TIME_WAIT here':>15} {'errors':>7}"
    )
    for row in rows:
        target = "" if not _has_target(row) else (">=0.8" if row["reports"] else ">=0.9")
        print(
            f"  {row['name']:<42} {row['connections_per_s']:8.0f} {row['ratio_to_plain']:5.2f}x"
            f" {target:>7} {row['server_cpu_us_per_conn']:11.0f} µs"
            f" {row['cpu_ratio_to_plain']:4.2f}x"
            f" {row['server_time_wait']:>9}/{total} {row['errors']:>7}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 connections per run (CI)")
    parser.add_argument("--connections", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median)")
    parser.add_argument("--seed", type=int, default=6, help="seed of the shuffled run order")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--client", nargs=4, metavar=("HOST", "PORT", "N", "CONC"))
    args = parser.parse_args(argv)
    if args.client:
        host, port, n, conc = args.client
        client_main(host, int(port), int(n), int(conc))
        return 0
    total = 500 if args.quick else args.connections
    rounds = 1 if args.quick else args.rounds
    warnings.simplefilter("ignore")  # abort's DataLossWarning is the point of that run
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop
    if args.loop == "uvloop":
        import uvloop

        loop_factory = uvloop.new_event_loop
    print(
        f"{total} connections per run, {CONCURRENCY} concurrent, {RESPONSE_SIZE} B responses,"
        f" server on {args.loop}, client (uvloop) in another process, {rounds} round(s)"
    )
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        samples = runner.run(_all_runs(total, rounds, args.seed))
    results = _summarize(samples)
    _print_table(results, total)
    plain = results[0]["connections_per_s"]
    verdicts = []
    for r in results:
        if not _has_target(r):
            continue
        target = 0.8 if r["reports"] else 0.9
        r["target"] = target
        r["meets_target"] = r["ratio_to_plain"] >= target
        verdicts.append(r["meets_target"])
    peer_first_tw = [
        r["server_time_wait"] for r in results if (r["policy"] or "").startswith("peer-first")
    ]
    summary = {
        "plain_connections_per_s": plain,
        "all_ratio_targets_met": all(verdicts),
        "peer_first_server_time_wait": peer_first_tw,
        "peer_first_leaves_no_time_wait": all(tw == 0 for tw in peer_first_tw),
    }
    print(
        f"ratio targets (>=0.9x reports off, >=0.8x on): "
        f"{'met' if summary['all_ratio_targets_met'] else 'NOT met'};"
        f" peer-first server TIME_WAIT: {peer_first_tw}"
    )
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
        "runs": results,
        "summary": summary,
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


if __name__ == "__main__":
    raise SystemExit(main())
