"""Measure ``peer-first`` against real HTTP clients: who closes first, how long the close
takes, errors seen by the client, and where TIME_WAIT lands.

Run as root, in a network namespace of its own (it counts TIME_WAIT)::

    unshare -n sh -c 'ip link set lo up && .venv/bin/python benchmarks/peer_first_clients.py'

Clients (each skipped when its program is missing): a Python client that closes as
soon as it has a Content-Length response ("python-prompt"), ``curl`` on a
Content-Length body ("curl-cl"), ``h2load --h1`` with one request per connection
("h2load"), ``curl`` on a close-delimited body ("curl-close"), ``ab`` (HTTP/1.0,
reads to the end of the stream). Policies: plain close, the old recommendation
with the old rule's wait (``peer-first timeout=5s grace=1h fallback=auto``: a grace
past the timeout leaves the timeout alone to end the wait), and the new default.

Writes ``benchmarks/results/peer_first_clients.json`` and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import tcpclose
import tcpclose.aio
import tcpclose.kernel

RESULTS = Path(__file__).resolve().parent / "results" / "peer_first_clients.json"
BODY = b"x" * 2000


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    request = await reader.readuntil(b"\r\n\r\n")
    if b" /close" in request.split(b"\r\n", 1)[0]:
        head = b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n"
    else:
        head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(BODY)
    writer.write(head + BODY)
    writer.close()


def _python_prompt(port: int, n: int) -> int:
    errors = 0
    for _ in range(n):
        try:
            with socket.create_connection(("127.0.0.1", port)) as sock:
                sock.sendall(b"GET /cl HTTP/1.1\r\nHost: x\r\n\r\n")
                data = b""
                while not data.endswith(BODY):
                    chunk = sock.recv(65536)
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            errors += 1
    return errors


def _run_client(kind: str, port: int, n: int) -> tuple[int, float]:
    """Run ``n`` connections of client ``kind``; (client errors, seconds)."""
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    if kind == "python-prompt":
        errors = _python_prompt(port, n)
    elif kind in ("curl-cl", "curl-close"):
        path = "/cl" if kind == "curl-cl" else "/close"
        errors = 0
        for _ in range(n):
            fetched = subprocess.run(
                ["curl", "-s", "-o", "/dev/null", "--max-time", "20", url + path], check=False
            )
            errors += fetched.returncode != 0
    elif kind == "h2load":
        done = subprocess.run(
            ["h2load", "--h1", "-n", str(n), "-c", "1", "-m", "1", url + "/cl"],
            capture_output=True,
            text=True,
            check=False,
        )
        errors = 0 if " 0 failed, 0 errored" in done.stdout else n
    elif kind == "ab":
        done = subprocess.run(
            ["ab", "-q", "-n", str(n), "-c", "1", "-s", "20", url + "/close"],
            capture_output=True,
            text=True,
            check=False,
        )
        failed = [line for line in done.stdout.splitlines() if line.startswith("Failed requests")]
        errors = n if done.returncode else int(failed[0].split()[-1]) if failed else 0
    else:
        raise ValueError(kind)
    return errors, time.monotonic() - started


def _time_wait(port: int) -> tuple[int, int]:
    """TIME_WAIT entries (server side, client side) for the server's port."""
    here = there = 0
    for state in tcpclose.kernel.dump(states=[tcpclose.TcpState.TIME_WAIT]):
        if state.local is not None and state.local[1] == port:
            here += 1
        elif state.peer is not None and state.peer[1] == port:
            there += 1
    return here, there


def measure(kind: str, policy: str, n: int, loop_name: str) -> dict[str, Any]:
    reports: list[tcpclose.CloseReport] = []
    ready = threading.Event()
    stop: list[asyncio.AbstractEventLoop] = []
    port_box: list[int] = []

    async def serve() -> None:
        pol = policy if policy != "plain" else "default"
        server = await tcpclose.aio.start_server(
            _handle, "127.0.0.1", 0, close_policy=pol, on_close=reports.append
        )
        port_box.append(server.sockets[0].getsockname()[1])
        stop.append(asyncio.get_running_loop())
        ready.set()
        async with server:
            await asyncio.Event().wait()

    def thread() -> None:
        runner: Callable[[Coroutine[Any, Any, None]], None]
        if loop_name == "uvloop":
            import uvloop

            runner = uvloop.run
        else:
            runner = asyncio.run
        try:
            runner(serve())
        except RuntimeError:
            pass

    t = threading.Thread(target=thread, daemon=True)
    t.start()
    ready.wait(10)
    port = port_box[0]
    errors, seconds = _run_client(kind, port, n)
    deadline = time.monotonic() + 15
    while len(reports) < n and time.monotonic() < deadline:
        time.sleep(0.01)
    here, there = _time_wait(port)
    loop = stop[0]
    loop.call_soon_threadsafe(loop.stop)
    t.join(5)
    durations = [r.duration for r in reports]
    return {
        "client": kind,
        "policy": policy,
        "loop": loop_name,
        "connections": n,
        "client_errors": errors,
        "client_seconds": round(seconds, 3),
        "rst_sent": sum(r.rst_sent for r in reports),
        "peer_closed_first": sum(r.peer_closed_first for r in reports),
        "fallbacks": sum(r.fallback is not None for r in reports),
        "close_ms_median": round(statistics.median(durations) * 1000, 2) if durations else None,
        "close_ms_p99": round(sorted(durations)[int(len(durations) * 0.99) - 1] * 1000, 2)
        if durations
        else None,
        "close_ms_max": round(max(durations) * 1000, 2) if durations else None,
        "closes_within_50ms": sum(d <= 0.05 for d in durations),
        "time_wait_server": here,
        "time_wait_client": there,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=200)
    parser.add_argument("--clients", default="python-prompt,curl-cl,h2load,curl-close,ab")
    parser.add_argument(
        "--policies",
        default="plain|peer-first timeout=5s grace=1h fallback=auto|peer-first",
    )
    parser.add_argument("--loops", default="asyncio,uvloop")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    if socket.gethostname() and Path("/proc/net/tcp").exists() is False:
        sys.exit("needs Linux")
    rows = []
    for loop_name in args.loops.split(","):
        for kind in args.clients.split(","):
            program = {"curl-cl": "curl", "curl-close": "curl"}.get(kind, kind)
            if kind != "python-prompt" and shutil.which(program) is None:
                print(f"skip {kind}: {program} not installed", file=sys.stderr)
                continue
            for policy in args.policies.split("|"):
                n = args.n
                if "grace=1h" in policy and kind in ("curl-close", "ab"):
                    n = min(n, 4)  # 5 s each: a few show it
                row = measure(kind, policy, n, loop_name)
                rows.append(row)
                print(json.dumps(row), flush=True)
                time.sleep(0.2)
    Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
