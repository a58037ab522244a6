"""The close plan's own cost on the common path of each policy, in instructions.

A close that goes as expected runs the same few plan steps every time: for
``graceful`` flush, FIN, the peer's FIN, close; for ``peer-first`` flush, the kernel
says our bytes are acknowledged, the peer's FIN, close; for ``abort`` SO_LINGER {1, 0}
and close; for ``default`` the close alone. This script drives the plan through those
steps N times per policy with no socket at all, exactly as a driver does (make the
plan, ask for each action, feed each event, take the result once, as the report
does), so that what it counts
is the plan and nothing else.

Two rows per policy: the steps alone (reports off: nobody asks for the result) and
the steps plus the result (reports on: the report is built from it).

Instruction counts come from callgrind (``valgrind --tool=callgrind``): on a shared,
loaded machine they repeat exactly from run to run (the same count to the
instruction, with ``PYTHONHASHSEED`` fixed), where wall time does not. Each row is
counted with N and with 0 closes; the difference over N is the cost of one close. The
µs figure beside it is wall time (``time.perf_counter``, best of five rounds, outside
valgrind): a guide only on a busy machine.

Usage::

    python benchmarks/bench_plan.py [--closes N] [--json PATH --label NAME]
    python benchmarks/bench_plan.py --run POLICY N [--result]   # one loop (what valgrind runs)

``--json`` adds this run's rows under ``NAME`` to the file (other labels are kept):
``benchmarks/results/plan.json`` holds ``before`` (the interpreter alone, run from
a checkout of the commit before the course) and ``after``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tcpclose import _plan
from tcpclose._plan import Event
from tcpclose._policy import ClosePolicy

POLICIES = ("graceful", "peer-first", "abort", "default")

#: The events each action of the common path is answered with.
_ANSWERS: dict[type, Event] = {
    _plan.Flush: Event.FLUSHED,
    _plan.ShutdownWrite: Event.DONE,
    _plan.Receive: Event.PEER_EOF,
    _plan.SetLingerZero: Event.DONE,
    _plan.Close: Event.DONE,
}


def _start() -> Callable[..., Any]:
    """The plan a driver starts: the fast path where the plan has one."""
    start: Callable[..., Any] = getattr(_plan, "start_plan", _plan.ClosePlan)
    return start


def run(policy_text: str, closes: int, *, result: bool = True) -> float:
    """Drive ``closes`` plans along the common path (taking the result once when
    ``result``); return the wall time (s)."""
    policy = ClosePolicy.parse(policy_text)
    start = _start()
    answers = _ANSWERS
    acked = Event.ACKED
    measure_acked = _plan.MeasureAcked
    t0 = time.perf_counter()
    for i in range(closes):
        now = float(i)
        plan = start(policy, now)
        while not plan.done:
            action = plan.next_action()
            if type(action) is measure_acked:
                plan.feed(acked, now, rtt=0.0001, since_sent=0.0)
            else:
                plan.feed(answers[type(action)], now)
        if result:
            plan.result()  # (built once, for the report)
    return time.perf_counter() - t0


def _instructions(policy_text: str, closes: int, *, result: bool) -> int:
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("valgrind not found (Debian package valgrind)")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        subprocess.run(
            [
                valgrind,
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                __file__,
                "--run",
                policy_text,
                str(closes),
                *(["--result"] if result else []),
            ],
            check=True,
            capture_output=True,
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        text = out.read_text()
    match = re.search(r"^(?:summary|totals): (\d+)", text, re.MULTILINE)
    assert match is not None, "no totals in callgrind's output"
    return int(match.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--closes", type=int, default=2000)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--label", default="after")
    parser.add_argument("--run", nargs=2, metavar=("POLICY", "N"))
    parser.add_argument("--result", action="store_true")
    args = parser.parse_args(argv)
    if args.run:
        run(args.run[0], int(args.run[1]), result=args.result)
        return 0
    rows: dict[str, dict[str, float]] = {}
    for text in POLICIES:
        base = _instructions(text, 0, result=False)
        for result in (False, True):
            full = _instructions(text, args.closes, result=result)
            per_close = (full - base) / args.closes
            wall = min(run(text, 20000, result=result) for _ in range(5)) / 20000
            row = f"{text} + result" if result else text
            rows[row] = {"instructions_per_close": round(per_close), "us_per_close": wall * 1e6}
            print(f"{row:<22} {per_close:>9,.0f} instructions/close  {wall * 1e6:6.2f} us/close")
    if args.json:
        saved = json.loads(args.json.read_text()) if args.json.exists() else {}
        saved[args.label] = {
            "closes": args.closes,
            "plan": "start_plan" if hasattr(_plan, "start_plan") else "ClosePlan",
            "python": sys.version.split()[0],
            "rows": rows,
        }
        args.json.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
