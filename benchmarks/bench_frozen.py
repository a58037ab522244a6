"""Did ``_frozen.positional_constructor`` pay? (issue 21, item 4)

tcpclose used to build the close path's frozen dataclasses by calling their slot
descriptors directly (``tcpclose/_frozen.py``, removed after this measurement) instead
of the dataclass ``__init__``, which goes through ``object.__setattr__`` once per field.
:func:`slot_constructor` below is that technique, kept here so that the measurement
can be repeated. In one run:

1. per object: ns to build each class it served (``PlanResult``, ``Observed``,
   ``CloseReport``, ``TcpInfo``) with the slot setters and with the class itself;
2. per close: how many of each a real ``tcpclose.close()`` builds (counted by wrapping
   the constructors), for each mode, reports on and off;
3. per close: the close's median time with plain construction (what tcpclose does) and
   with the slot setters swapped in, interleaved in blocks, and the computed saving
   (count x per-object saving) as a share of that median.

The closes are on loopback, in-process: the client sends its FIN first, so every mode
ends at once (graceful and peer-first see the peer's EOF; abort and default close).
Runs in a network namespace of its own when root (the client sockets end in TIME_WAIT).

Usage: python benchmarks/bench_frozen.py [--quick] [--closes N] [--json PATH]
(run it with each interpreter: each run fills in its own version in the results file)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import operator
import os
import platform
import socket
import statistics
import sys
import time
import timeit
from collections import deque
from collections.abc import Callable, Iterator
from itertools import repeat
from pathlib import Path
from typing import Any

import tcpclose
from tcpclose import _observe, _plan, _report
from tcpclose._kernel import _tcpinfo
from tcpclose._plan import Outcome, PlanResult
from tcpclose._policy import CloseMode, ClosePolicy
from tcpclose._report import CloseReport, Observed

RESULTS = Path(__file__).parent / "results" / "frozen.json"

#: (module, global name, class): the name each call site looks up when it builds one.
SITES: tuple[tuple[Any, str, type], ...] = (
    (_plan, "_new_result" if hasattr(_plan, "_new_result") else "PlanResult", PlanResult),
    (_observe, "Observed", Observed),
    (_report, "CloseReport", CloseReport),
    (_tcpinfo, "TcpInfo", _tcpinfo.TcpInfo),
)


def slot_constructor(cls: type) -> Callable[..., Any]:
    """A function taking every field of the frozen, slotted dataclass ``cls``
    positionally and setting each slot through its member descriptor from C: what
    ``tcpclose._frozen.positional_constructor`` did."""
    setters = tuple(cls.__dict__[f.name].__set__ for f in dataclasses.fields(cls))
    new, call = object.__new__, operator.call

    def make(*values: Any) -> Any:
        obj: Any = new(cls)
        deque(map(call, setters, repeat(obj), values), 0)
        return obj

    return make


MODES = ("graceful", "peer-first", "abort", "default")

#: What the measurement decided (kept in the results file).
DECISION = (
    "removed (commit 'Frozen dataclasses built plainly'): per close the slot setters saved "
    "0.0-0.8 us of 39-78 us on 3.11 (at most 2%), 0.3-3.3 us on 3.12 and 0.2-3.9 us on 3.13 "
    "(at most 6%), against 0.1-4 us between two identical arms and 10-20% between runs on "
    "this shared machine"
)


def _sample_values(cls: type) -> tuple[Any, ...]:
    """Realistic field values for ``cls``, in field order."""
    if cls is PlanResult:
        return (
            CloseMode.GRACEFUL,
            CloseMode.GRACEFUL,
            Outcome.PEER_EOF,
            None,
            0,
            True,
            True,
            False,
            False,
            1.0,
            1.0001,
            (),
        )
    if cls is Observed:
        return (
            ("127.0.0.1", 8080),
            ("127.0.0.1", 40000),
            b"\0" * 232,
            0,
            0,
            None,
            (),
            None,
            "close",
        )
    if cls is CloseReport:
        result = PlanResult(*_sample_values(PlanResult))
        return (
            ClosePolicy.parse("graceful"),
            result.mode_applied,
            None,
            result.outcome,
            ("127.0.0.1", 8080),
            ("127.0.0.1", 40000),
            0,
            0,
            0,
            True,
            True,
            False,
            False,
            b"\0" * 232,
            None,
            0.0001,
            (),
            None,
            "close",
            False,
        )
    return tuple(range(len(dataclasses.fields(cls))))


def per_object(repeat: int, number: int) -> dict[str, Any]:
    """Median ns per object, slot setters vs the class, interleaved."""
    out: dict[str, Any] = {}
    for _, _, cls in SITES:
        fast = slot_constructor(cls)
        values = _sample_values(cls)
        assert fast(*values) == cls(*values)
        fast_ns: list[float] = []
        plain_ns: list[float] = []
        for _ in range(repeat):
            fast_ns.append(timeit.timeit(functools.partial(fast, *values), number=number) / number)
            plain_ns.append(timeit.timeit(functools.partial(cls, *values), number=number) / number)
        # best of the repeats, as timeit reports: on a shared machine the slower ones
        # measure the other jobs
        fast_best, plain_best = min(fast_ns) * 1e9, min(plain_ns) * 1e9
        fields = len(dataclasses.fields(cls))
        out[cls.__name__] = {
            "fields": fields,
            "fast_ns": round(fast_best, 1),
            "plain_ns": round(plain_best, 1),
            "saved_ns": round(plain_best - fast_best, 1),
            "saved_ns_per_field": round((plain_best - fast_best) / fields, 1),
            "ratio_plain_to_fast": round(plain_best / fast_best, 2),
            "fast_median_ns": round(statistics.median(fast_ns) * 1e9, 1),
            "plain_median_ns": round(statistics.median(plain_ns) * 1e9, 1),
        }
        row = out[cls.__name__]
        print(
            f"  {cls.__name__:<12} {row['fields']:3d} fields  fast {row['fast_ns']:7.1f} ns"
            f"  plain {row['plain_ns']:7.1f} ns  saved {row['saved_ns']:7.1f} ns"
        )
    return out


@contextlib.contextmanager
def _slot_constructors() -> Iterator[None]:
    """Every site builds through the slot setters, as tcpclose did before."""
    saved = [(module, name, getattr(module, name)) for module, name, _ in SITES]
    try:
        for module, name, cls in SITES:
            setattr(module, name, slot_constructor(cls))
        yield
    finally:
        for module, name, plain in saved:
            setattr(module, name, plain)


def _pair(listener: socket.socket) -> tuple[socket.socket, socket.socket]:
    client = socket.create_connection(listener.getsockname()[:2])
    server, _ = listener.accept()
    return client, server


def _one_close(listener: socket.socket, mode: str, report: bool) -> float:
    """Seconds for one ``tcpclose.close`` of a server socket whose client already sent
    FIN and a few bytes (read by the drain)."""
    client, server = _pair(listener)
    try:
        server.sendall(b"response")
        client.sendall(b"tail")
        client.shutdown(socket.SHUT_WR)
        deadline = time.monotonic() + 5
        while tcpclose.queues(server).unread < 4 and time.monotonic() < deadline:
            time.sleep(0.0001)
        if mode in ("abort", "default"):  # nothing unread for these: no RST, no warning
            server.recv(64)
        start = time.perf_counter()
        tcpclose.close(server, mode, report=report)
        return time.perf_counter() - start
    finally:
        client.close()


def objects_per_close(listener: socket.socket) -> dict[str, dict[str, int]]:
    """How many objects of each class one close builds, per mode and report setting."""
    counts: dict[str, int] = {}
    saved = [(module, name, getattr(module, name)) for module, name, _ in SITES]

    def counting(cls_name: str, make: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*values: Any) -> Any:
            counts[cls_name] = counts.get(cls_name, 0) + 1
            return make(*values)

        return wrapper

    out: dict[str, dict[str, int]] = {}
    try:
        for module, name, cls in SITES:
            setattr(module, name, counting(cls.__name__, getattr(module, name)))
        for mode in MODES:
            for report in (True, False):
                counts.clear()
                _one_close(listener, mode, report)
                out[f"{mode}{'' if report else ' report=False'}"] = dict(counts)
    finally:
        for module, name, fast in saved:
            setattr(module, name, fast)
    return out


def per_close(
    listener: socket.socket, closes: int, blocks: int, objects: dict[str, Any], counts: Any
) -> dict[str, Any]:
    """Median µs per close, slot setters vs plain constructors, interleaved."""
    out: dict[str, Any] = {}
    for mode in MODES:
        for report in (True, False):
            key = f"{mode}{'' if report else ' report=False'}"
            fast: list[float] = []
            plain: list[float] = []
            again: list[float] = []  # plain once more: how far two identical arms differ
            per_block = closes // blocks
            for _ in range(blocks):
                plain.extend(_one_close(listener, mode, report) for _ in range(per_block))
                with _slot_constructors():
                    fast.extend(_one_close(listener, mode, report) for _ in range(per_block))
                again.extend(_one_close(listener, mode, report) for _ in range(per_block))
            fast_us, plain_us = statistics.median(fast) * 1e6, statistics.median(plain) * 1e6
            again_us = statistics.median(again) * 1e6
            computed_ns = sum(objects[c]["saved_ns"] * n for c, n in counts[key].items())
            out[key] = {
                "objects": counts[key],
                "fast_median_us": round(fast_us, 2),
                "plain_median_us": round(plain_us, 2),
                "plain_again_median_us": round(again_us, 2),
                "measured_saving_us": round(plain_us - fast_us, 2),
                "noise_us": round(abs(plain_us - again_us), 2),
                "computed_saving_ns": round(computed_ns, 1),
                "computed_share_of_close_percent": round(100 * computed_ns / (fast_us * 1e3), 2),
            }
            row = out[key]
            share = row["computed_share_of_close_percent"]
            print(
                f"  {key:<24} fast {row['fast_median_us']:7.1f} µs  plain"
                f" {row['plain_median_us']:7.1f} µs  computed saving"
                f" {row['computed_saving_ns']:6.0f} ns = {share:.1f}%;  measured"
                f" {row['measured_saving_us']:+.2f} µs, plain vs plain {row['noise_us']:.2f} µs"
            )
    return out


def enter_own_namespace() -> str:
    """Into a network namespace of its own when root; says where the run is."""
    if os.geteuid() != 0:
        return "host (not root)"
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests import _session_netns

    _session_netns.enter_private_namespace()
    return "own" if _session_netns.private else _session_netns.status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few repeats (a smoke run)")
    parser.add_argument("--closes", type=int, default=None, help="closes per mode and setting")
    parser.add_argument("--json", type=Path, default=RESULTS)
    args = parser.parse_args()
    namespace = enter_own_namespace()
    closes = args.closes or (40 if args.quick else 2000)
    blocks = 4 if args.quick else 20
    print(f"Python {platform.python_version()}, namespace: {namespace}")
    print("per object (best of interleaved repeats):")
    objects = per_object(repeat=3 if args.quick else 15, number=2000 if args.quick else 20000)
    listener = socket.create_server(("127.0.0.1", 0), backlog=512)
    try:
        counts = objects_per_close(listener)
        print("objects per close:", json.dumps(counts))
        print(f"per close ({closes} closes each, fast and plain interleaved in {blocks} blocks):")
        closes_out = per_close(listener, closes, blocks, objects, counts)
    finally:
        listener.close()
    run = {
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs)",
        "network_namespace": namespace,
        "per_object": objects,
        "per_close": closes_out,
    }
    # One file for every interpreter: this run replaces its own version's entry.
    result: dict[str, Any] = {"benchmark": "frozen", "decision": DECISION, "by_python": {}}
    if args.json.exists():
        previous = json.loads(args.json.read_text())
        if previous.get("benchmark") == "frozen":
            result["by_python"] = previous.get("by_python", {})
    result["by_python"][f"py{sys.version_info.major}{sys.version_info.minor}"] = run
    result["by_python"] = dict(sorted(result["by_python"].items()))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
