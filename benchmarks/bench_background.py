"""The background closer: how long the handing thread is held, against closing inline.

N connections are accepted from a cooperating peer in another process (it reads what
we send and closes once it sees our FIN, or at once when told to close first). Each
round closes all N, one after the other from one thread, and times each call:

* ``plain close()``: ``sock.close()``, the floor (no policy at all);
* ``tcpclose.close graceful``: the policy run inline, the caller waits for the peer;
* ``BackgroundCloser.close graceful``: the hand-over; the caller does not wait. Also
  timed: the whole burst of N hand-overs, and how long until the closer has closed
  every socket (its throughput).

Medians and 99th percentiles in microseconds, ratios to the plain close, over the
rounds. Run as root, it moves into a network namespace of its own first (the TIME_WAIT
entries it makes stay out of the host's table).

Usage: python benchmarks/bench_background.py [--quick] [--connections N] [--rounds R]
[--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tcpclose

RESULTS = Path(__file__).parent / "results" / "background.json"

_PEER_PROGRAM = """
import selectors, socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = [socket.create_connection((host, port)) for _ in range(count)]
sel = selectors.DefaultSelector()
for s in socks:
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
sys.stdout.write("connected\\n"); sys.stdout.flush()
left = count
while left:
    for key, _ in sel.select(30):
        s = key.fileobj
        try:
            data = s.recv(65536)
        except OSError:
            data = b""
        if not data:
            sel.unregister(s); s.close(); left -= 1
"""


def _accept_all(lst: socket.socket, n: int) -> tuple[subprocess.Popen[str], list[socket.socket]]:
    host, port = lst.getsockname()[:2]
    peer = subprocess.Popen(
        [sys.executable, "-c", _PEER_PROGRAM, host, str(port), str(n)],
        stdout=subprocess.PIPE,
        text=True,
    )
    socks = [lst.accept()[0] for _ in range(n)]
    assert peer.stdout is not None
    assert peer.stdout.readline().strip() == "connected"
    for s in socks:
        s.sendall(b"response")
    return peer, socks


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def one_round(
    lst: socket.socket, n: int, name: str, make: Callable[[], tuple[Callable[[Any], object], Any]]
) -> dict[str, float]:
    peer, socks = _accept_all(lst, n)
    closer_call, closer = make()
    samples: list[float] = []
    clock = time.perf_counter
    burst_start = clock()
    for s in socks:
        t0 = clock()
        closer_call(s)
        samples.append(clock() - t0)
    burst = clock() - burst_start
    all_closed = burst
    if isinstance(closer, tcpclose.BackgroundCloser):
        assert closer.wait_idle(60), f"{closer.held} closes still pending"
        all_closed = clock() - burst_start
        closer.shutdown()
    peer.wait(60)
    return {
        "median_us": statistics.median(samples) * 1e6,
        "p99_us": _percentile(samples, 0.99) * 1e6,
        "max_us": max(samples) * 1e6,
        "burst_ms": burst * 1e3,
        "all_closed_ms": all_closed * 1e3,
    }


def run(n: int, rounds: int) -> dict[str, Any]:
    lst = socket.create_server(("127.0.0.1", 0), backlog=min(n, 4096))
    cases: dict[str, Callable[[], tuple[Callable[[Any], object], Any]]] = {
        "plain close()": lambda: (lambda s: s.close(), None),
        "tcpclose.close graceful": lambda: (
            lambda s: tcpclose.close(s, "graceful", report=False),
            None,
        ),
        "BackgroundCloser.close graceful": _background_case,
    }
    out: dict[str, Any] = {}
    for name, make in cases.items():
        rows = [one_round(lst, n, name, make) for _ in range(rounds)]
        out[name] = {
            key: statistics.median(row[key] for row in rows)
            for key in ("median_us", "p99_us", "max_us", "burst_ms", "all_closed_ms")
        }
        out[name]["rounds"] = rows
    lst.close()
    plain = out["plain close()"]["median_us"]
    inline = out["tcpclose.close graceful"]["median_us"]
    for row in out.values():
        row["ratio_to_plain"] = row["median_us"] / plain
        row["ratio_to_inline_graceful"] = row["median_us"] / inline
    return out


def _background_case() -> tuple[Callable[[Any], object], Any]:
    closer = tcpclose.BackgroundCloser(max_sockets=1 << 16)
    policy = tcpclose.ClosePolicy.parse("graceful")
    return (lambda s: closer.close(s, policy)), closer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="200 connections, 1 round (CI)")
    parser.add_argument("--connections", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    namespace = "host"
    if os.geteuid() == 0:
        from tests import _session_netns

        _session_netns.enter_private_namespace()
        namespace = _session_netns.status
    n = args.connections or (200 if args.quick else 1000)
    rounds = args.rounds or (1 if args.quick else 7)
    print(f"{n} connections per round, {rounds} rounds, namespace: {namespace}")
    results = run(n, rounds)
    for name, row in results.items():
        print(
            f"  {name:<34} median {row['median_us']:8.1f} µs  p99 {row['p99_us']:9.1f} µs"
            f"  x{row['ratio_to_plain']:6.1f} plain  x{row['ratio_to_inline_graceful']:5.2f} inline"
            f"  burst {row['burst_ms']:7.1f} ms  all closed {row['all_closed_ms']:7.1f} ms"
        )
    document = {
        "benchmark": "background",
        "connections": n,
        "rounds": rounds,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "namespace": namespace,
        "results": results,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
