"""Close latency per mode, and the RST trap, on loopback with plain sockets.

Part 1 — latency: for each mode, N connections whose peer (another process) reads
the whole response and then closes. We time
``tcpclose.close`` (reports on and off) against a plain ``socket.close()``.

Part 2 — the RST trap: N connections where the peer sent a body we never read, we
answer with a response that is still partly queued in our kernel, and close. We count
how many responses arrived whole, with plain ``close()`` and with each policy.

Usage: python benchmarks/bench_close.py [--quick] [--connections N] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tcpclose

RESULTS = Path(__file__).parent / "results" / "close.json"


_PEER_PROGRAM = """
import socket, sys
host, port, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
for _ in range(count):
    s = socket.create_connection((host, port))
    got = 0
    try:
        while got < size:
            chunk = s.recv(65536)
            if not chunk:
                break
            got += len(chunk)
    except OSError:
        pass
    s.close()
"""


def latency(n: int) -> dict[str, Any]:
    """Median seconds per close, per mode, with a cooperating peer in another process
    (it reads the whole response, then closes), so that the timings are not shared
    with a peer thread's share of the GIL."""
    lst = socket.create_server(("127.0.0.1", 0), backlog=256)
    host, port = lst.getsockname()[:2]
    response = b"r" * 1024
    closers: dict[str, Callable[[socket.socket], object]] = {
        "plain close()": lambda s: s.close(),
        "default": lambda s: tcpclose.close(s, "default"),
        "graceful": lambda s: tcpclose.close(s, "graceful"),
        "graceful report=False": lambda s: tcpclose.close(s, "graceful", report=False),
        "peer-first": lambda s: tcpclose.close(s, "peer-first"),
        "peer-first report=False": lambda s: tcpclose.close(s, "peer-first", report=False),
        "abort": lambda s: tcpclose.close(s, "abort"),
        "abort report=False": lambda s: tcpclose.close(s, "abort", report=False),
    }
    out: dict[str, Any] = {}
    for name, closer in closers.items():
        peer = subprocess.Popen(
            [sys.executable, "-c", _PEER_PROGRAM, host, str(port), str(n), str(len(response))]
        )
        samples = []
        try:
            for _ in range(n):
                server, _ = lst.accept()
                server.sendall(response)
                if name.startswith("abort"):
                    # let the response be acknowledged first: abort discards the rest
                    deadline = time.monotonic() + 5
                    while tcpclose.queues(server).outgoing and time.monotonic() < deadline:
                        time.sleep(0.0001)
                start = time.perf_counter()
                closer(server)
                samples.append(time.perf_counter() - start)
        finally:
            peer.wait(timeout=60)
        out[name] = {
            "median_us": statistics.median(samples) * 1e6,
            "p90_us": sorted(samples)[int(len(samples) * 0.9)] * 1e6,
        }
        print(
            f"  {name:<26} median {out[name]['median_us']:9.1f} µs"
            f"   p90 {out[name]['p90_us']:9.1f} µs"
        )
    lst.close()
    return out


def rst_trap(n: int) -> dict[str, Any]:
    """How many of n responses arrive whole when the request body was never read."""
    body = os.urandom(64 * 1024)
    response = os.urandom(256 * 1024)
    digest = hashlib.sha256(response).digest()
    closers: dict[str, Callable[[socket.socket], object]] = {
        "plain close()": lambda s: s.close(),
        "graceful": lambda s: tcpclose.close(s, "graceful"),
        "peer-first": lambda s: tcpclose.close(s, "peer-first timeout=5s"),
    }
    lst = socket.create_server(("127.0.0.1", 0), backlog=256)
    out: dict[str, Any] = {}
    for name, closer in closers.items():
        whole = reset = 0
        lost_bytes = 0
        for _ in range(n):
            client = socket.socket()
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
            client.connect(lst.getsockname())
            server, _ = lst.accept()
            server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
            client.sendall(body)
            start_reading = threading.Event()
            received: list[bytes] = []
            how: list[str] = []

            def read(
                client: socket.socket = client,
                start_reading: threading.Event = start_reading,
                received: list[bytes] = received,
                how: list[str] = how,
            ) -> None:
                start_reading.wait(10)
                try:
                    while sum(map(len, received)) < len(response):
                        chunk = client.recv(65536)
                        if not chunk:
                            how.append("eof")
                            break
                        received.append(chunk)
                except ConnectionResetError:
                    how.append("reset")
                client.close()

            reader = threading.Thread(target=read, daemon=True)
            reader.start()
            server.sendall(response)
            start_reading.set()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", tcpclose.TcpCloseWarning)
                closer(server)
            reader.join(10)
            data = b"".join(received)
            if hashlib.sha256(data).digest() == digest:
                whole += 1
            lost_bytes += len(response) - len(data)
            reset += how == ["reset"]
        out[name] = {
            "connections": n,
            "whole": whole,
            "reset_seen": reset,
            "bytes_lost": lost_bytes,
        }
        print(
            f"  {name:<14} {whole:4d}/{n} whole   {reset:4d} resets   {lost_bytes:>10,d} bytes lost"
        )
    lst.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few connections (CI)")
    parser.add_argument("--connections", type=int, default=None)
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    n = args.connections or (20 if args.quick else 500)
    print(f"close latency, loopback, {n} connections per mode")
    lat = latency(n)
    plain = lat["plain close()"]["median_us"]
    for row in lat.values():
        row["ratio_to_plain"] = row["median_us"] / plain
    print(f"\nRST trap: 64 KiB request body never read, 256 KiB response, {n} connections")
    trap = rst_trap(max(10, n // 5))
    result = {
        "benchmark": "close",
        "connections": n,
        "latency": lat,
        "rst_trap": trap,
        "kernel": os.uname().release,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
