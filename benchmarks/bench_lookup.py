"""The kernel view's cost, with 0, 10,000 and 50,000 TIME_WAIT sockets on loopback.

Measured at each population:

* ``tcpclose.lookup()`` of an ESTABLISHED 4-tuple, of TIME_WAIT 4-tuples, and of a
  4-tuple that does not exist, against a bare sock_diag round trip made from this
  process (one prepacked request sent, one reply received into a buffer, nothing
  decoded): the floor any lookup has to stand on. The two alternate, batch by batch,
  so that load from other programs falls on both alike;
* where a lookup's microseconds go: each step timed alone (argument parsing, packing
  the request, the round trip, decoding the reply, building the ``KernelState``);
* reading and parsing ``/proc/net/tcp`` and ``tcp6`` (what a procfs-based lookup costs),
  and ``psutil.net_connections("tcp")``;
* ``list(tcpclose.kernel.dump())`` and ``tcpclose.kernel.summary()`` (the counting
  path of ``tcpclose states``: no object per socket) against the wall time of
  ``ss -tan``, alternating.

The TIME_WAIT sockets are made here: clients on 127.0.0.1 connect to listeners on
127.0.0.2-127.0.0.9 and the *server* side closes first, so the TIME_WAIT entries sit on
the eight listening ports. (Clients closing first would leave them on 127.0.0.1's
ephemeral ports and, at 50,000, starve every other program on the machine that binds
127.0.0.1:0.) Counts are checked with the kernel view itself and /proc/net/sockstat.
TIME_WAIT lasts 60 s, so each stage is built and measured well within that.

The benchmark runs in a network namespace of its own (``unshare(CLONE_NEWNET)``, loopback
up; root needed): the host's TIME_WAIT table is neither filled by it nor counted in it,
and ``ss``, ``/proc/net/tcp`` and psutil see the same namespace as the lookups.

Usage: python benchmarks/bench_lookup.py [--quick] [--counts 0,10000,50000] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tcpclose
import tcpclose.kernel
from tcpclose import KernelState, TcpState
from tcpclose._kernel import DEFAULT_DUMP_STATES
from tcpclose._kernel._address import parse_four_tuple, split_four_tuple
from tcpclose._kernel._diag import (
    NETLINK_SOCK_DIAG,
    NLMSG_SEQ,
    SOCKID,
    encode_lookup_request,
    lookup_answer,
    lookup_request,
)
from tcpclose._kernel._netlink import channel
from tcpclose._kernel._procfs import ProcfsBackend
from tcpclose._kernel._types import new_kernel_state

RESULTS = Path(__file__).parent / "results" / "lookup.json"
DESTINATIONS = [f"127.0.0.{i}" for i in range(2, 10)]
BATCH = 400  # connections open at once while making TIME_WAIT (well under somaxconn)

Address = tuple[str, int]


# -- making TIME_WAIT ----------------------------------------------------------------------------


class TimeWaitFarm:
    """Listeners on 127.0.0.2-9 whose accepted sockets close first."""

    def __init__(self) -> None:
        self.listeners: list[socket.socket] = []
        for host in DESTINATIONS:
            lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lst.bind((host, 0))
            lst.listen(BATCH * 2)
            self.listeners.append(lst)
        self.addresses = {lst.getsockname() for lst in self.listeners}
        self.samples: list[tuple[Address, Address]] = []  # some TIME_WAIT 4-tuples

    def count(self) -> int:
        """Our TIME_WAIT entries, counted by the kernel view (filtered in the kernel by
        state, then by our listening addresses)."""
        return sum(
            1
            for st in tcpclose.kernel.dump(states=[TcpState.TIME_WAIT], family=socket.AF_INET)
            if st.local in self.addresses
        )

    def grow_to(self, target: int, budget_s: float) -> int:
        """Add TIME_WAIT entries until ``target`` are counted or ``budget_s`` passes."""
        deadline = time.monotonic() + budget_s
        have = self.count()
        rounds = 0
        while have < target and time.monotonic() < deadline and rounds < 1000:
            rounds += 1
            self._batch(min(BATCH, target - have))
            have = self.count() if rounds % 10 == 0 or have + BATCH >= target else have + BATCH
        return self.count()

    def _batch(self, n: int) -> None:
        clients: list[socket.socket] = []
        servers: list[socket.socket] = []
        try:
            for i in range(n):
                lst = self.listeners[i % len(self.listeners)]
                client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                clients.append(client)
                client.connect(lst.getsockname())
            for i in range(n):
                server, _ = self.listeners[i % len(self.listeners)].accept()
                servers.append(server)
            if len(self.samples) < 2000:
                for server in servers[:: max(1, n // 20)]:
                    self.samples.append((server.getsockname(), server.getpeername()))
        finally:
            for server in servers:  # the server closes first: TIME_WAIT lands here
                server.close()
            for client in clients:
                client.close()

    def close(self) -> None:
        for lst in self.listeners:
            lst.close()


def sockstat_time_wait() -> int:
    for line in Path("/proc/net/sockstat").read_text().splitlines():
        if line.startswith("TCP:"):
            fields = line.split()
            return int(fields[fields.index("tw") + 1])
    return -1


# -- timing ---------------------------------------------------------------------------------------


def per_call_us(fn: Callable[[], object], calls: int) -> dict[str, float]:
    """Median and 99th percentile of single calls, microseconds (after a warm-up of
    a tenth as many calls, not counted). Each sample includes the clock's own cost."""
    for _ in range(calls // 10):
        fn()
    samples = []
    clock = time.perf_counter_ns
    for _ in range(calls):
        start = clock()
        fn()
        samples.append(clock() - start)
    samples.sort()
    return {
        "median_us": samples[len(samples) // 2] / 1000,
        "p99_us": samples[int(len(samples) * 0.99)] / 1000,
    }


BATCH_CALLS = 100


def batch_us(
    fns: dict[str, Callable[[], object]], calls: int, quantile: float = 0.5
) -> dict[str, float]:
    """The ``quantile`` (default the median) over batches of :data:`BATCH_CALLS` calls
    of the mean time per call, in microseconds, for each of ``fns``; their batches
    alternate (A B C A B C ...), so a burst of load from elsewhere hits all of them.
    ``calls`` per function in all."""
    names = list(fns)
    samples: dict[str, list[float]] = {name: [] for name in names}
    clock = time.perf_counter_ns
    steps = range(BATCH_CALLS)
    for name in names:  # warm-up
        for _ in steps:
            fns[name]()
    for _ in range(max(1, calls // BATCH_CALLS)):
        for name in names:
            fn = fns[name]
            start = clock()
            for _ in steps:
                fn()
            samples[name].append((clock() - start) / BATCH_CALLS / 1000)
    if quantile == 0.5:
        return {name: statistics.median(values) for name, values in samples.items()}
    return {name: sorted(values)[int(len(values) * quantile)] for name, values in samples.items()}


def median_ms(fn: Callable[[], object], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def alternating_ms(fns: dict[str, Callable[[], object]], repeat: int) -> dict[str, float]:
    """Median wall time of each of ``fns`` in milliseconds, the runs alternating."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeat):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) * 1000 for name, values in samples.items()}


def read_and_parse_proc() -> int:
    procfs = ProcfsBackend()
    return sum(1 for _ in procfs.dump(DEFAULT_DUMP_STATES, None, (socket.AF_INET, socket.AF_INET6)))


def run_ss() -> int:
    exe = shutil.which("ss")
    assert exe is not None
    out = subprocess.run([exe, "-tan"], capture_output=True, check=True, timeout=60).stdout
    return out.count(b"\n")


class BareRoundTrip:
    """One sock_diag exact request and its reply, nothing else: a socket of its own, a
    request packed once, the reply received into a reused buffer and not looked at."""

    def __init__(self, local: Address, peer: Address) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
        self.sock.settimeout(1.0)
        self.request = encode_lookup_request(parse_four_tuple(local, peer), seq=1)
        self.buffer = bytearray(8192)

    def __call__(self) -> int:
        self.sock.send(self.request)
        return self.sock.recv_into(self.buffer)

    def close(self) -> None:
        self.sock.close()


def breakdown(conn: tuple[Address, Address], calls: int) -> dict[str, float]:
    """Each step of ``tcpclose.lookup()`` of ``conn`` timed alone, microseconds per
    call (batch medians). The steps add up to about the whole: the rest is calls
    between them and the per-thread channel."""
    local, peer = conn
    four = split_four_tuple(local, peer)
    chan = channel()
    made = chan.state(four)
    request = chan.request_bytes
    seq = NLMSG_SEQ.unpack_from(request, 8)[0]
    sockid = SOCKID.pack(four[2], four[4], four[1], four[3])
    size = chan.request(four)  # the reply, for decoding alone (seq is the request's)
    reply = bytes(chan.buffer[:size])
    seq = NLMSG_SEQ.unpack_from(reply, 8)[0]
    fields = (
        made.state, made.source, made.local, made.peer, made.timer, made.seconds_left,
        made.retransmits, made.recv_queue, made.send_queue, made.uid, made.inode, made.cookie,
    )  # fmt: skip
    bare = BareRoundTrip(local, peer)
    try:
        return batch_us(
            {
                "empty_call": lambda: None,
                "parse_addresses": lambda: split_four_tuple(local, peer),
                "pack_request": lambda: lookup_request(four, None, 7),
                "bare_round_trip": bare,
                "channel_state": lambda: chan.state(four),
                "decode_reply": lambda: lookup_answer(reply, size, four, seq, sockid),
                "kernel_state_dataclass_init": lambda: KernelState(*fields),
                "kernel_state_fast_init": lambda: new_kernel_state(*fields),
                "lookup": lambda: tcpclose.lookup(local, peer),
            },
            calls,
        )
    finally:
        bare.close()


def measure(
    farm: TimeWaitFarm,
    conn: tuple[Address, Address],
    calls: int,
    repeat: int,
    psutil_mod: Any,
) -> dict[str, Any]:
    local, peer = conn
    miss = (("127.0.0.1", 1), ("127.0.0.1", 2))
    assert tcpclose.lookup(local, peer).state is TcpState.ESTABLISHED
    assert tcpclose.lookup(*miss).state is TcpState.CLOSED
    row: dict[str, Any] = {}
    samples = farm.samples[-200:] or [conn]
    index = iter(range(10**9))

    def tw_lookup() -> None:
        local_tw, peer_tw = samples[next(index) % len(samples)]
        tcpclose.lookup(local_tw, peer_tw)

    bare = BareRoundTrip(local, peer)
    try:
        timed = batch_us(
            {
                "bare_round_trip_us": bare,
                "lookup_us": lambda: tcpclose.lookup(local, peer),
                "lookup_miss_us": lambda: tcpclose.lookup(*miss),
                "lookup_time_wait_us": tw_lookup,
            },
            calls,
        )
    finally:
        bare.close()
    row.update(timed)
    row["lookup_over_bare_round_trip"] = timed["lookup_us"] / timed["bare_round_trip_us"]
    # For information: the fastest tenth of the batches, when other programs' load
    # (the machine is shared) interrupted least.
    bare = BareRoundTrip(local, peer)
    try:
        fastest = batch_us(
            {"bare": bare, "lookup": lambda: tcpclose.lookup(local, peer)}, calls, quantile=0.1
        )
    finally:
        bare.close()
    row["lookup_over_bare_round_trip_fastest_tenth"] = fastest["lookup"] / fastest["bare"]
    row["lookup_per_call_p99_us"] = per_call_us(lambda: tcpclose.lookup(local, peer), calls // 4)[
        "p99_us"
    ]
    procfs = ProcfsBackend()
    four = parse_four_tuple(local, peer)
    row["procfs_lookup_us"] = median_ms(lambda: procfs.lookup(four), repeat) * 1000
    row["proc_parse_us"] = median_ms(read_and_parse_proc, repeat) * 1000
    if psutil_mod is not None:
        row["psutil_us"] = (
            median_ms(lambda: psutil_mod.net_connections(kind="tcp"), max(3, repeat // 2)) * 1000
        )
    walls = alternating_ms(
        {
            "dump_ms": lambda: list(tcpclose.kernel.dump()),
            "summary_ms": tcpclose.kernel.summary,
            "ss_tan_ms": run_ss,
        },
        repeat,
    )
    row.update(walls)
    row["dump_over_ss"] = walls["dump_ms"] / walls["ss_tan_ms"]
    row["summary_over_ss"] = walls["summary_ms"] / walls["ss_tan_ms"]
    row["dump_entries"] = sum(1 for _ in tcpclose.kernel.dump())
    return row


def enter_own_namespace() -> str:
    """Move this process into a new network namespace with loopback up; the reason
    when that cannot be done (not Linux, not root), else ``""``."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests import _session_netns

    _session_netns.enter_private_namespace()
    return "" if _session_netns.private else _session_netns.status


# -- main ----------------------------------------------------------------------------------------


def _rounded(value: Any) -> Any:
    """Floats to 3 decimals (microseconds and milliseconds need no more)."""
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small counts, few repeats (CI)")
    parser.add_argument("--counts", help="TIME_WAIT populations, e.g. 0,10000,50000")
    parser.add_argument("--json", type=Path, default=RESULTS, help=f"default {RESULTS}")
    args = parser.parse_args(argv)
    refused = enter_own_namespace()
    if refused:
        print(f"needs a network namespace of its own: {refused}", file=sys.stderr)
        return 1
    netns = os.stat("/proc/self/ns/net").st_ino
    load_before = os.getloadavg()
    if tcpclose.kernel.backend() != "netlink":
        print(f"kernel view is {tcpclose.kernel.backend()!r}: nothing to measure")
        return 0
    counts = (
        [int(c) for c in args.counts.split(",")]
        if args.counts
        else ([0, 1000, 3000] if args.quick else [0, 10_000, 50_000])
    )
    calls, repeat = (2000, 3) if args.quick else (30_000, 9)
    try:
        import psutil
    except ImportError:  # the bench extra is not installed
        psutil = None

    lst = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(lst.getsockname())
    server, _ = lst.accept()
    conn = (server.getsockname(), server.getpeername())
    farm = TimeWaitFarm()
    rows: list[dict[str, Any]] = []
    try:
        for target in counts:
            started = time.monotonic()
            have = farm.grow_to(target, budget_s=40) if target else farm.count()
            built_s = time.monotonic() - started
            row: dict[str, Any] = {
                "time_wait_target": target,
                "time_wait_ours": have,
                "time_wait_total": sockstat_time_wait(),
                "build_s": round(built_s, 2),
            }
            gc.collect()
            row.update(measure(farm, conn, calls, repeat, psutil))
            row["time_wait_total_after"] = sockstat_time_wait()
            rows.append(row)
            print(
                f"  TIME_WAIT {row['time_wait_total']:>6} (ours {have}): lookup "
                f"{row['lookup_us']:.2f} us, bare round trip {row['bare_round_trip_us']:.2f} us, "
                f"dump {row['dump_ms']:.1f} ms, summary {row['summary_ms']:.1f} ms, "
                f"ss {row['ss_tan_ms']:.1f} ms",
                file=sys.stderr,
            )
        steps = breakdown(conn, calls)
    finally:
        farm.close()
        for sock in (client, server, lst):
            sock.close()

    first, last = rows[0], rows[-1]
    summary = {
        "lookup_us_at_max": last["lookup_us"],
        "bare_round_trip_us_at_max": last["bare_round_trip_us"],
        "lookup_over_bare_round_trip_at_max": last["lookup_over_bare_round_trip"],
        "lookup_growth_0_to_max": last["lookup_us"] / first["lookup_us"],
        # the same, each lookup taken relative to the round trip measured beside it: what
        # is left when the machine's speed changed between the populations (load)
        "lookup_over_bare_growth_0_to_max": (
            last["lookup_over_bare_round_trip"] / first["lookup_over_bare_round_trip"]
        ),
        "psutil_over_lookup_at_max": (
            last["psutil_us"] / last["lookup_us"] if "psutil_us" in last else None
        ),
        "proc_parse_over_lookup_at_max": last["proc_parse_us"] / last["lookup_us"],
        "dump_over_ss_at_max": last["dump_over_ss"],
        "summary_over_ss_at_max": last["summary_over_ss"],
    }
    targets = [
        (
            "lookup / bare sock_diag round trip at max (x)",
            summary["lookup_over_bare_round_trip_at_max"],
            "<=",
            2.2,
        ),
        ("lookup growth from 0 to max (x)", summary["lookup_growth_0_to_max"], "<=", 1.2),
        ("psutil / lookup at max (x)", summary["psutil_over_lookup_at_max"], ">=", 80_000.0),
        (
            "/proc/net/tcp parsing / lookup at max (x)",
            summary["proc_parse_over_lookup_at_max"],
            ">=",
            60_000.0,
        ),
        ("dump() / ss -tan at max (x)", summary["dump_over_ss_at_max"], "<=", 1.0),
        ("summary() / ss -tan at max (x)", summary["summary_over_ss_at_max"], "<=", 0.5),
    ]
    target_rows: list[dict[str, Any]] = [
        {
            "target": name,
            "measured": value,
            "limit": f"{op} {limit}",
            "met": value is not None and (value <= limit if op == "<=" else value >= limit),
        }
        for name, value, op, limit in targets
    ]
    result = {
        "benchmark": "kernel view: lookup, /proc/net/tcp, psutil, dump vs ss",
        "mode": "quick" if args.quick else "full",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "backend": tcpclose.kernel.backend(),
        "network_namespace": f"own (net:[{netns}])",
        "load_average_1m_before": load_before[0],
        "load_average_1m_after": os.getloadavg()[0],
        "calls_per_lookup_median": calls,
        "calls_per_batch": BATCH_CALLS,
        "repeats_per_median": repeat,
        **summary,
        "populations": rows,
        "lookup_steps_us": [{"step": name, "median_us": us} for name, us in steps.items()],
        "targets": target_rows,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(_rounded(result), indent=2) + "\n")

    header = (
        f"{'TIME_WAIT':>9} {'bare RT':>8} {'lookup':>8} {'TW hit':>8} {'miss':>8} "
        f"{'procfs':>10} {'/proc all':>10} {'psutil':>10} {'dump':>8} {'summary':>8} "
        f"{'ss -tan':>8}"
    )
    print(header)
    print(
        f"{'':>9} {'us':>8} {'us':>8} {'us':>8} {'us':>8} {'us':>10} {'us':>10} {'us':>10} "
        f"{'ms':>8} {'ms':>8} {'ms':>8}"
    )
    for row in rows:
        print(
            f"{row['time_wait_total']:>9} {row['bare_round_trip_us']:>8.2f} "
            f"{row['lookup_us']:>8.2f} "
            f"{row['lookup_time_wait_us']:>8.2f} {row['lookup_miss_us']:>8.2f} "
            f"{row['procfs_lookup_us']:>10.0f} {row['proc_parse_us']:>10.0f} "
            f"{row.get('psutil_us', float('nan')):>10.0f} {row['dump_ms']:>8.1f} "
            f"{row['summary_ms']:>8.1f} {row['ss_tan_ms']:>8.1f}"
        )
    print("\nwhere a lookup's time goes (each step alone, us per call):")
    for name, us in steps.items():
        print(f"  {name:<28} {us:6.2f}")
    print()
    for entry in target_rows:
        mark = "met" if entry["met"] else "NOT MET"
        measured = "n/a" if entry["measured"] is None else f"{entry['measured']:.3g}"
        print(f"  [{mark}] {entry['target']}: {measured} (target {entry['limit']})")
    print(f"\nwritten to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
