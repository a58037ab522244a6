"""The ``tcpclose`` command line: ``demo``, ``states``, ``lookup``, ``audit``.

Also ``python -m tcpclose``. Every subcommand has ``--help`` with examples.

Exit codes (the same for every subcommand):

* 0 -- success: ``demo`` ran, ``states`` printed, ``lookup`` found a socket for the
  4-tuple, ``audit`` found nothing of severity error. ``states --watch`` also exits 0
  when stopped with Ctrl-C.
* 1 -- the command ran and the answer is negative: ``lookup`` found no socket (the
  4-tuple is CLOSED); ``audit`` found an error-severity problem.
* 2 -- bad arguments, or the command could not run (the kernel view is unavailable,
  the demo's client process failed, ``audit --root`` is not a directory with
  ``proc/`` in it...): one line on stderr, no traceback. No command at all prints the
  help on stderr and exits 2 too.
* 130 -- interrupted with Ctrl-C (``demo``, ``lookup``, ``audit``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import IO, Final, NoReturn

from . import _kernel
from ._audit import audit, read_sysctls
from ._errors import TcpCloseError
from ._findings import Finding, Severity, count_by_severity
from ._kernel._address import format_address, parse_endpoint
from ._kernel._types import KernelState, TcpState, TimerKind
from ._version import __version__
from ._warnings import DOCS_URL

__all__ = ("build_parser", "main")

Handler = Callable[[argparse.Namespace], int]

PROG: Final = "tcpclose"

_EXIT_STATUS = """\
exit status:
  0    success (lookup: a socket exists; audit: no error-severity finding)
  1    the answer is negative (lookup: CLOSED, no socket; audit: an error finding)
  2    bad arguments, or the command could not run (one line on stderr)
  130  interrupted (Ctrl-C); states --watch exits 0 on Ctrl-C
"""


class UsageError(Exception):
    """Bad arguments: printed as one line, exit status 2.

    Attributes:
        command: the subcommand (``"lookup"``), or ``""`` for the top level.
    """

    def __init__(self, command: str, message: str) -> None:
        super().__init__(message)
        self.command = command

    def __str__(self) -> str:
        message = super().__str__()
        return (
            f"{PROG}: error: {self.command}: {message}"
            if self.command
            else (f"{PROG}: error: {message}")
        )


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (no usage dump), raised as
    :class:`UsageError` so that :func:`main` returns instead of exiting."""

    def error(self, message: str) -> NoReturn:
        command = self.prog.removeprefix(PROG).strip()
        raise UsageError(command, message)


def _fail(command: str, message: str) -> int:
    print(UsageError(command, message), file=sys.stderr)
    return 2


def _positive_int(low: int, high: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {low} to {high}, got {value}")
        return value

    return parse


def _seconds(low: float, high: float) -> Callable[[str], float]:
    def parse(text: str) -> float:
        raw = text.strip().lower().removesuffix("s")
        try:
            value = float(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
        if not math.isfinite(value) or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {low:g} to {high:g} seconds, got {text}")
        return value

    return parse


def _format_seconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f} s"


# -- audit ----------------------------------------------------------------------------

_AUDIT_EPILOG = f"""\
examples:
  tcpclose audit                   check sysctls, counters and every TCP socket
  tcpclose audit --port 443        only sockets with local or remote port 443
  tcpclose audit --json | jq -r '.findings[].code'
  tcpclose audit >/dev/null || echo 'error-severity finding'   (health check, CI)

Host-wide sysctl and counter checks always run; --port narrows the socket table.
Each code is explained at {DOCS_URL}

exit status: 0 no finding of severity error, 1 at least one, 2 bad arguments or failure.
"""


def _port_number(text: str) -> int:
    try:
        port = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a port number, got {text!r}") from None
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"expected a port from 1 to 65535, got {port}")
    return port


def _configure_audit(cmd: argparse.ArgumentParser) -> None:
    cmd.formatter_class = argparse.RawDescriptionHelpFormatter
    cmd.epilog = _AUDIT_EPILOG
    cmd.add_argument(
        "--port",
        type=_port_number,
        metavar="P",
        help="look only at sockets with local or remote port P",
    )
    cmd.add_argument("--json", action="store_true", help="print the findings as JSON")
    cmd.add_argument(
        "--root",
        default="/",
        metavar="DIR",
        help="read proc/... below DIR instead of / (a captured snapshot)",
    )
    cmd.set_defaults(handler=_run_audit)


def _format_findings(findings: Sequence[Finding]) -> str:
    """The findings as a table: code, severity, title, then evidence/advice/docs."""
    if not findings:
        return "no findings"
    lines = [f"{'CODE':<6} {'SEVERITY':<8} TITLE"]
    indent = " " * 16
    for f in findings:
        lines.append(f"{f.code:<6} {f.severity.value:<8} {f.title}")
        if f.evidence:
            lines.append(f"{indent}evidence: {f.evidence_text}")
        lines.append(f"{indent}advice:   {f.advice}")
        lines.append(f"{indent}docs:     {f.docs_url}")
    counts = ", ".join(f"{n} {s.value}" for s, n in count_by_severity(findings).items())
    noun = "finding" if len(findings) == 1 else "findings"
    lines.append("")
    lines.append(f"{len(findings)} {noun}: {counts}")
    return "\n".join(lines)


def _check_root(root: str) -> None:
    """``--root`` must be a directory with ``proc/`` in it: else nothing would be read
    and the health check would pass on no facts at all."""
    if not os.path.isdir(root):
        reason = "no such directory" if not os.path.exists(root) else "not a directory"
        raise UsageError("audit", f"--root {root}: {reason}")
    if not os.path.isdir(os.path.join(root, "proc")):
        raise UsageError("audit", f"--root {root}: no proc/ directory in it to read")


def _run_audit(args: argparse.Namespace) -> int:
    _check_root(args.root)
    try:
        findings = audit(args.port, root=args.root)
    except (OSError, ValueError, TcpCloseError) as exc:
        print(f"tcpclose audit: {exc}", file=sys.stderr)
        return 2
    if args.json:
        counts = {s.value: n for s, n in count_by_severity(findings).items()}
        document = {"findings": [f.as_dict() for f in findings], "counts": counts}
        print(json.dumps(document, indent=2))
    else:
        print(_format_findings(findings))
    return 1 if any(f.severity is Severity.ERROR for f in findings) else 0


# -- states ---------------------------------------------------------------------------

_STATES_EPILOG = """\
examples:
  tcpclose states                          whose TIME_WAIT, which destinations, what to do
  tcpclose states --port 8080              only sockets with local or remote port 8080
  tcpclose states --state time-wait,fin-wait2
  tcpclose states --watch 2                refresh every 2 s: changes and rates per second
  tcpclose states --close-wait-age 60      CLOSE_WAIT held 60 s or more: leaks
  tcpclose states --watch 1 --count 5 --json   five JSON lines, one per second

TIME_WAIT is split by who closed first: "accepted" on a listening port (a server
here closed first; also towards a client's ephemeral port once the listener is gone),
"outgoing" on an ephemeral port (a client here closed first), "bound" on a port a
client here bound on purpose. "ports in use" counts the
sockets towards a destination whose local port is in the ephemeral range
(net.ipv4.ip_local_port_range minus ip_local_reserved_ports): connect() needs a
free one per destination, so "full" is how close that destination is to "Cannot
assign requested address" (EADDRNOTAVAIL). The TIME_WAIT table line compares the
kernel's TIME_WAIT count with net.ipv4.tcp_max_tw_buckets: past it the kernel
closes without TIME_WAIT and counts TCPTimeWaitOverflow. A CLOSE_WAIT socket is
held at least as long as the kernel's time since it last received a segment (the
peer's FIN or later; sock_diag's tcp_info), or since --watch first saw it.
Each finding ends in one line of advice with a link. With --state, only the
sockets in those states are counted.

"""

#: Names accepted by --state besides the TcpState names: what ss prints.
_STATE_ALIASES: Final = {"ESTAB": TcpState.ESTABLISHED, "UNCONN": TcpState.CLOSE}


def _parse_states(values: Sequence[str] | None) -> list[TcpState] | None:
    if not values:
        return None
    accepted = [s for s in TcpState if s > 0]
    wanted: list[TcpState] = []
    for value in values:
        for word in value.split(","):
            key = word.strip().upper().replace("-", "_")
            if not key:
                continue
            state = _STATE_ALIASES.get(key) or TcpState.__members__.get(key)
            if state is None or state not in accepted:
                names = ", ".join(s.name for s in accepted)
                raise UsageError("states", f"bad state {word.strip()!r}; accepted: {names}")
            if state not in wanted:
                wanted.append(state)
    return wanted or None


def _configure_states(cmd: argparse.ArgumentParser) -> None:
    cmd.formatter_class = argparse.RawDescriptionHelpFormatter
    cmd.epilog = _STATES_EPILOG + _EXIT_STATUS
    cmd.add_argument(
        "--port", type=_port_number, metavar="P", help="only sockets with local or remote port P"
    )
    cmd.add_argument(
        "--state",
        action="append",
        metavar="S",
        help="only sockets in state S (e.g. time-wait, established; comma-separated or repeated)",
    )
    cmd.add_argument(
        "--json", action="store_true", help="print JSON (one line per refresh with --watch)"
    )
    cmd.add_argument(
        "--watch",
        type=_seconds(0.1, 3600),
        metavar="SECONDS",
        help="refresh every SECONDS (0.1 to 3600) until Ctrl-C or --count",
    )
    cmd.add_argument(
        "--count",
        type=_positive_int(1, 1_000_000),
        metavar="N",
        help="with --watch: stop after N refreshes",
    )
    cmd.add_argument(
        "--top",
        type=_positive_int(1, 10_000),
        default=10,
        metavar="N",
        help="rows per table (default 10)",
    )
    cmd.add_argument(
        "--close-wait-age",
        type=_seconds(0, 86400),
        default=60.0,
        metavar="SECONDS",
        help="CLOSE_WAIT held this long is a leak; shows its process (default 60)",
    )
    cmd.set_defaults(handler=_run_states)


def _run_states(args: argparse.Namespace) -> int:
    from ._hostview import collect_host_view
    from ._states import CloseWaitAges, find_leaks, format_view, view_as_dict

    states = _parse_states(args.state)
    if args.count is not None and args.watch is None:
        raise UsageError("states", "--count needs --watch")
    if _kernel.backend() == "unsupported":
        return _fail("states", "no kernel view of TCP sockets on this platform")
    sysctls = read_sysctls()
    clear = sys.stdout.isatty() and not args.json and args.watch is not None
    refreshes = 0
    ages = CloseWaitAges()
    previous = None
    try:
        while True:
            try:
                view = collect_host_view(states, args.port, sysctls=sysctls)
            except (OSError, TcpCloseError) as exc:
                return _fail("states", f"kernel view failed: {exc}")
            refreshes += 1
            seen = ages.update(view.close_wait, view.close_wait_received)
            # how long each is held: the kernel says (sock_diag), or --watch remembers
            knows_age = args.watch is not None or bool(view.close_wait_received)
            leak_after = args.close_wait_age if knows_age else None
            leaks = find_leaks(view, seen, args.close_wait_age) if knows_age else []
            if args.json:
                document = view_as_dict(
                    view,
                    top=args.top,
                    leaks=leaks,
                    previous=previous,
                    leak_after=leak_after,
                )
                print(json.dumps(document, indent=None if args.watch else 2))
            else:
                if clear:
                    sys.stdout.write("\x1b[H\x1b[2J")
                if args.watch is not None:
                    if refreshes > 1 and not clear:
                        print()
                    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                    print(f"-- {stamp}, every {args.watch:g} s (Ctrl-C to stop) --")
                print(
                    format_view(
                        view,
                        top=args.top,
                        leaks=leaks,
                        previous=previous,
                        leak_after=leak_after,
                    )
                )
            sys.stdout.flush()
            previous = view
            if args.watch is None or (args.count is not None and refreshes >= args.count):
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


# -- lookup ---------------------------------------------------------------------------

_LOOKUP_EPILOG = """\
examples:
  tcpclose lookup 127.0.0.1:8080 127.0.0.1:51234     the server's end of a connection
  tcpclose lookup 127.0.0.1:51234 127.0.0.1:8080     the client's end of it
  tcpclose lookup '[::1]:8080' '[::1]:51234' --json
  tcpclose lookup 10.0.0.5:443 10.0.0.9:40000 && echo 'still there'

LOCAL is the end whose socket you ask about, as its getsockname() says; PEER the
other end. Addresses are literal IPv4 or IPv6 (in brackets) with a port; host names
are not resolved. IPv4-mapped IPv6 (::ffff:a.b.c.d) equals plain IPv4.

"""


def _parse_address(text: str) -> tuple[str, int]:
    """``"127.0.0.1:80"`` or ``"[::1]:80"`` -> ``(host, port)``.

    Raises:
        ValueError: with the reason, to be shown as ``bad address 'text': reason``.
    """
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep or not rest.startswith(":"):
            raise ValueError("expected [v6]:port")
        port_text = rest[1:]
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError("expected host:port or [v6]:port")
        if ":" in host:
            raise ValueError("an IPv6 address goes in brackets: [v6]:port")
    if not host:
        raise ValueError("no host before the port")
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"expected a port number after the host, got {port_text!r}")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"expected a port from 1 to 65535, got {port}")
    try:
        parse_endpoint((host, port), "address")
    except ValueError as exc:
        if "%" in host:  # a scope: the kernel view says what is wrong with it
            raise ValueError(str(exc)) from None
        raise ValueError(
            f"expected a literal IPv4 or IPv6 address (host names are not resolved), got {host!r}"
        ) from None
    return host, port


def _configure_lookup(cmd: argparse.ArgumentParser) -> None:
    cmd.formatter_class = argparse.RawDescriptionHelpFormatter
    cmd.epilog = _LOOKUP_EPILOG + _EXIT_STATUS
    cmd.add_argument(
        "local", metavar="LOCAL", help="the socket's own address, host:port or [v6]:port"
    )
    cmd.add_argument("peer", metavar="PEER", help="the other end's address, host:port or [v6]:port")
    cmd.add_argument("--json", action="store_true", help="print the kernel state as JSON")
    cmd.set_defaults(handler=_run_lookup)


def _format_lookup(local: tuple[str, int], peer: tuple[str, int], state: KernelState) -> str:
    head = f"{format_address(local)} -> {format_address(peer)}  {state.state.name}"
    if state.state is TcpState.CLOSED:
        return head + " (no socket for this 4-tuple)"
    timer = "-"
    if state.timer is not None:
        timer = state.timer.name.lower()
        if state.timer is not TimerKind.OFF and state.seconds_left is not None:
            timer += f", {state.seconds_left:.1f} s left"
    rows = [
        ("timer", timer),
        ("retransmits", _dash(state.retransmits)),
        ("queues", f"recv-q {_dash(state.recv_queue)}, send-q {_dash(state.send_queue)}"),
        ("uid / inode", f"{_dash(state.uid)} / {_dash(state.inode)}"),
        ("cookie", _dash(state.cookie)),
        ("source", state.source),
    ]
    if state.local is not None and state.peer is not None:
        kernel_view = f"{format_address(state.local)} -> {format_address(state.peer)}"
        if kernel_view != f"{format_address(local)} -> {format_address(peer)}":
            rows.insert(0, ("kernel's view", kernel_view))
    return "\n".join([head, *(f"  {name:<12}  {value}" for name, value in rows)])


def _dash(value: object) -> str:
    return "-" if value is None else str(value)


def _run_lookup(args: argparse.Namespace) -> int:
    ends: list[tuple[str, int]] = []
    for text in (args.local, args.peer):
        try:
            ends.append(_parse_address(text))
        except ValueError as exc:
            raise UsageError("lookup", f"bad address {text!r}: {exc}") from None
    local, peer = ends
    try:
        state = _kernel.lookup(local, peer)
    except ValueError as exc:
        raise UsageError(
            "lookup", str(exc).replace("local_addr and peer_addr", "LOCAL and PEER")
        ) from None
    if state.state is TcpState.UNKNOWN:
        return _fail("lookup", f"the kernel view cannot tell (source: {state.source})")
    if args.json:
        document = {"query": {"local": list(local), "peer": list(peer)}, **state.as_dict()}
        print(json.dumps(document, indent=2))
    else:
        print(_format_lookup(local, peer, state))
    return 0 if state.exists else 1


# -- demo -----------------------------------------------------------------------------

_DEMO_EPILOG = """\
examples:
  tcpclose demo                                  every policy, both scenarios, 200 connections
  tcpclose demo --connections 1000
  tcpclose demo --policies graceful,abort --scenario unread-body
  tcpclose demo --json | jq '.runs[] | {policy, scenario, server_time_wait}'

Each run starts a tcpclose.aio server on 127.0.0.1 (a fresh port) with the policy;
a client in a separate process makes the connections. TIME_WAIT is counted in the
kernel's socket table after each run, bytes lost by the client against responses
it knows in advance, RSTs from the errors the client got. Needs no setup or root;
leaves TIME_WAIT entries behind (they expire in 60 s), as real traffic would.

scenarios:
  cooperating  the client reads the whole response (16 KiB) and closes
  unread-body  the client sent a body the server never reads and reads the
               256 KiB response late: a plain close() sends RST and loses data

"""


def _parse_policies(text: str) -> list[str]:
    from ._demo import POLICIES

    aliases = {"client-first": "peer-first", "client-initiated": "peer-first"}
    names: list[str] = []
    for word in text.split(","):
        name = word.strip().lower()
        name = aliases.get(name, name)
        if name not in POLICIES:
            accepted = ", ".join(POLICIES)
            raise argparse.ArgumentTypeError(
                f"unknown policy {word.strip()!r}; accepted: {accepted}"
            )
        if name not in names:
            names.append(name)
    return names


def _configure_demo(cmd: argparse.ArgumentParser) -> None:
    cmd.formatter_class = argparse.RawDescriptionHelpFormatter
    cmd.epilog = _DEMO_EPILOG + _EXIT_STATUS
    cmd.add_argument(
        "--connections",
        type=_positive_int(1, 10_000),
        default=200,
        metavar="N",
        help="connections per policy and scenario (default 200)",
    )
    cmd.add_argument(
        "--policies",
        type=_parse_policies,
        metavar="LIST",
        help="comma-separated: default, graceful, peer-first, abort (default: all four)",
    )
    cmd.add_argument(
        "--scenario",
        choices=("cooperating", "unread-body", "both"),
        default="both",
        help="which client behaviour to run (default both)",
    )
    cmd.add_argument(
        "--concurrency",
        type=_positive_int(1, 500),
        default=20,
        metavar="N",
        help="connections the client keeps open at once (default 20)",
    )
    cmd.add_argument("--json", action="store_true", help="print the results as JSON")
    cmd.set_defaults(handler=_run_demo)


class _ProgressBar:
    """``[#####.....] 640/1600  graceful, unread-body`` on one line of a terminal."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self._last = 0.0
        self._width = 0

    def __call__(self, done: int, total: int, label: str) -> None:
        now = time.monotonic()
        if done < total and now - self._last < 0.05:
            return
        self._last = now
        filled = 30 * done // max(total, 1)
        text = f"\r[{'#' * filled}{'.' * (30 - filled)}] {done}/{total}  {label}"
        self._width = max(self._width, len(text))
        self._stream.write(text.ljust(self._width))
        self._stream.flush()

    def clear(self) -> None:
        """Blank the line, and the ``^C`` a terminal may have echoed after it."""
        if self._width:
            self._stream.write("\r" + " " * (self._width + 2) + "\r")
            self._stream.flush()
            self._width = 0


#: The demo's last line: where to go next, on the reader's own host.
DEMO_NEXT: Final = "Next: 'tcpclose states' shows the host's TIME_WAIT, 'tcpclose audit' its risks."


def _run_demo(args: argparse.Namespace) -> int:
    from . import _demo  # loads tcpclose.aio: only for this command

    if _kernel.backend() == "unsupported":
        return _fail("demo", "no kernel view of TCP sockets on this platform to count with")
    policies: list[str] = args.policies or list(_demo.POLICIES)
    scenarios = list(_demo.SCENARIOS) if args.scenario == "both" else [args.scenario]
    progress = _ProgressBar(sys.stderr) if sys.stderr.isatty() else None
    client = _demo.ClientProcess()
    finished = False
    try:
        try:
            client.start()
            result = asyncio.run(
                _demo.run_demo(
                    policies,
                    scenarios,
                    args.connections,
                    concurrency=args.concurrency,
                    progress=progress,
                    client=client,
                )
            )
            finished = True
        finally:  # whatever ends the run (Ctrl-C too), the progress line goes first
            if progress is not None:
                progress.clear()
            client.close(kill=not finished)
    except KeyboardInterrupt:
        print(f"{PROG}: demo: interrupted", file=sys.stderr)
        return 130
    except (_demo.DemoError, OSError, TcpCloseError) as exc:
        return _fail("demo", str(exc))
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print(_demo.format_table(result))
        print()
        print(DEMO_NEXT)
    return 0


# -- the parser -----------------------------------------------------------------------

_MAIN_EPILOG = (
    """\
examples:
  tcpclose demo                      see every close policy at work on loopback
  tcpclose states --port 8080        where the TIME_WAIT of port 8080 are
  tcpclose lookup 127.0.0.1:8080 127.0.0.1:51234
  tcpclose audit                     risky close/reuse settings on this host

Run 'tcpclose COMMAND --help' for a command's options and examples.

"""
    + _EXIT_STATUS
)


# -- run (issue 15): the zero-code launcher ----------------------------------------------------

_RUN_EPILOG = """\
Runs COMMAND with the close policy applied in every Python process it starts (worker
processes included), with no change to its code: asyncio servers (create_server of
asyncio's loops and uvloop's), socketserver servers (http.server, wsgiref and the
servers built on them) and gunicorn's sync and gthread workers. The policy comes
from --policy, else TCPCLOSE_POLICY, else "graceful"; TCPCLOSE_POLICY=off turns the
patches off. How it works and what it patches: the "Your server" page of the docs.

examples:
  tcpclose run --policy "peer-first timeout=2s" -- python -m http.server 8000
  TCPCLOSE_POLICY=graceful tcpclose run --log-reports -- hypercorn app:app
  tcpclose run --log-reports 0.01 -- gunicorn -w 4 app:app

exit status: COMMAND's own; 2 for a bad policy; 127 when COMMAND cannot be run.
"""


def _configure_run(cmd: argparse.ArgumentParser) -> None:
    cmd.formatter_class = argparse.RawDescriptionHelpFormatter
    cmd.epilog = _RUN_EPILOG
    cmd.add_argument("--policy", metavar="TEXT", help="the close policy (default: TCPCLOSE_POLICY)")
    cmd.add_argument(
        "--log-reports",
        nargs="?",
        const=True,
        default=False,
        type=float,
        metavar="FRACTION",
        help="log one line per close on stderr; with FRACTION (0 to 1), that share of the "
        "ordinary closes (closes that sent RST or warned are always logged)",
    )
    cmd.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...")
    cmd.set_defaults(handler=_run_run)


def _run_run(args: argparse.Namespace) -> int:
    from ._launcher import command_environment, exec_command

    command = list(args.command)
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise UsageError("run", "expected a command after --")
    try:
        env = command_environment(args.policy, log_reports=args.log_reports)
    except (TcpCloseError, ValueError) as exc:
        raise UsageError("run", str(exc)) from exc
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        exec_command(command, env)
    except OSError as exc:
        print(f"{PROG} run: cannot run {command[0]}: {exc.strerror or exc}", file=sys.stderr)
        return 127
    return 0  # (not reached: the command replaced this process)


def build_parser() -> argparse.ArgumentParser:
    """The ``tcpclose`` argument parser (errors raise :class:`UsageError`)."""
    parser = _Parser(
        prog=PROG,
        description="Close TCP connections on purpose and see what the kernel did.",
        epilog=_MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"tcpclose {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    configure: dict[str, Callable[[argparse.ArgumentParser], None]] = {
        "demo": _configure_demo,
        "states": _configure_states,
        "lookup": _configure_lookup,
        "audit": _configure_audit,
        "run": _configure_run,
    }
    for name, help_text in (
        ("demo", "run every close policy over loopback connections and compare the results"),
        ("states", "count TCP sockets by state; TIME_WAIT by port and destination"),
        ("lookup", "show one 4-tuple's kernel state, timer and queues"),
        ("audit", "check sysctls and the socket table for risky close/reuse settings"),
        ("run", "run a command with a close policy in every Python server it starts"),
    ):
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        configure[name](cmd)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the exit status (see the module docstring)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:  # no command: the help, as a usage error (a script's typo shows)
        parser.print_help(sys.stderr)
        return 2
    try:
        return handler(args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (``| head``): stop quietly, without a traceback at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0
