"""Two "hosts" on one machine for fault tests: network namespaces joined by a veth pair.

``create_two_hosts()`` makes a *server* and a *client* namespace, joined by one veth pair
with addresses from a test-only range that exists nowhere else (``10.203.0.0/30`` and
``fd00:203::/64``), loopback up in each. Nothing is routed out of them and the root
namespace is never touched: the veth pair is created inside the server namespace with
its peer end placed straight into the client namespace.

Code runs "on a host" through a worker thread that entered the namespace with
``setns(2)``: a socket created in that thread belongs to the namespace for its whole life
and can then be used from any thread, blocking or under asyncio
(``loop.create_server(sock=...)``, ``asyncio.open_connection(sock=...)``).
Subprocesses (``nft``, ``tc``, ``ss``) run with ``ip netns exec``.

Faults are reversible objects scoped to one host:

* ``host.faults.drop_all()``, ``drop_fin()``, ``drop_rst()``, ``drop_first_fin()``,
  ``drop_pure_acks()`` and the general ``drop(match)`` / ``drop_first(match)``: nftables
  rules with counters in the host's own ``inet tcpclose`` table. By default they drop
  what the host *receives*, which the sender sees as loss on the wire (see ``Faults``);
* ``host.link_down()``: ``ip link set <veth> down``;
* ``host.slow_link(rate=..., burst=..., latency=...)``: a ``tbf`` root qdisc (``netem``
  is not available in this kernel);
* ``two_hosts.vanish(host)``: the host disappears without a word (its namespace is
  deleted, while the other end's link stays up).

Everything is torn down on every path: by the context manager, by an ``atexit`` hook for
interrupted runs, and by ``sweep_stale_namespaces()`` for runs that were killed (every
namespace name carries the pid of the process that made it).

Example (with the ``two_hosts`` and ``needs_nft`` fixtures of ``tests/faults/conftest.py``)::

    @pytest.mark.netns
    @pytest.mark.usefixtures("needs_nft")
    def test_close_with_silent_peer(two_hosts: TwoHosts) -> None:
        client, server = two_hosts.connect_pair()          # client ns <-> server ns
        here, there = addr(client), addr(server)
        with two_hosts.client.faults.drop_all() as dead:   # the client goes quiet
            report = tcpclose.close(server, "graceful idle_timeout=0.5s")
            assert dead.packets() >= 1
        assert two_hosts.server.tcp_state(there, here) == "FIN-WAIT-1"
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import fcntl
import functools
import itertools
import os
import queue
import re
import shutil
import socket as stdlib_socket
import struct
import subprocess
import sys
import termios
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Literal, ParamSpec, Self, TypeVar

import pytest

from tests._support import SsEntry, ss_lookup, wait_until

__all__ = (
    "Direction",
    "Fault",
    "Faults",
    "Host",
    "LinkDown",
    "NftCounts",
    "NftFault",
    "SlowLink",
    "TbfStats",
    "TwoHosts",
    "create_two_hosts",
    "current_namespace_inode",
    "netns_unavailable",
    "nft_unavailable",
    "send_queue_bytes",
    "sweep_stale_namespaces",
    "tc_unavailable",
    "total_retransmits",
    "unread_bytes",
)

T = TypeVar("T")
P = ParamSpec("P")

#: Every namespace this module makes is called ``tcpclose-test-<pid>-<seq>-<role>``.
NAME_PREFIX = "tcpclose-test"
_NAME_RE = re.compile(rf"^{NAME_PREFIX}-(\d+)-")
_NETNS_DIR = "/run/netns"
_CLONE_NEWNET = 0x40000000  # os.CLONE_NEWNET from 3.12 on

#: Addresses inside the namespaces. They are only ever configured on the veth pair,
#: inside namespaces this module created; the same addresses serve every pair.
SERVER_IPV4, CLIENT_IPV4, IPV4_PREFIX = "10.203.0.1", "10.203.0.2", 30
SERVER_IPV6, CLIENT_IPV6, IPV6_PREFIX = "fd00:203::1", "fd00:203::2", 64

#: How long one host operation (create a socket, write a sysctl, run ss) may take.
CALL_TIMEOUT_S = 30.0
#: How long a subprocess (ip, nft, tc, ss) may take.
COMMAND_TIMEOUT_S = 10.0

Direction = Literal["input", "output", "both"]

_NFT_TABLE = "tcpclose"
_TCP_HEADER_WORDS = range(5, 16)  # tcp doff: 20..60 header bytes

_sequence = itertools.count(1)
_live_lock = threading.Lock()
_live_namespaces: set[str] = set()


# -- commands ------------------------------------------------------------------------------


def _run(
    argv: Sequence[str],
    *,
    check: bool = True,
    stdin: str | None = None,
    timeout: float = COMMAND_TIMEOUT_S,
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text; on failure raise with the command and its stderr."""
    proc = subprocess.run(
        list(argv), input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip()
        raise RuntimeError(f"`{' '.join(argv)}` exited {proc.returncode}: {detail}")
    return proc


# -- availability (skip reasons) ------------------------------------------------------------


@functools.cache
def netns_unavailable() -> str | None:
    """Why namespaces cannot be used here (a skip reason), or None when they can.

    Probes once per process by creating and deleting a namespace.
    """
    if not sys.platform.startswith("linux"):
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "creating network namespaces needs root"
    if shutil.which("ip") is None:
        return "iproute2 (`ip`) is not installed"
    name = _namespace_name(next(_sequence), "probe")
    with _live_lock:
        _live_namespaces.add(name)
    try:
        proc = _run(["ip", "netns", "add", name], check=False)
        if proc.returncode != 0:
            return f"cannot create a network namespace here: {proc.stderr.strip()}"
    finally:
        _destroy_namespace(name)
    return None


@functools.cache
def nft_unavailable() -> str | None:
    """Why nftables faults cannot be used here (a skip reason), or None when they can."""
    if shutil.which("nft") is None:
        return "nftables (`nft`) is not installed (CI's .ci/run installs it)"
    reason = netns_unavailable()
    if reason is not None:
        return reason
    name = _namespace_name(next(_sequence), "probe")
    with _live_lock:
        _live_namespaces.add(name)
    try:
        _run(["ip", "netns", "add", name])
        proc = _run(
            ["ip", "netns", "exec", name, "nft", "add", "table", "inet", "probe"], check=False
        )
        if proc.returncode != 0:
            return f"nftables does not work in a namespace here: {proc.stderr.strip()}"
    finally:
        _destroy_namespace(name)
    return None


def tc_unavailable() -> str | None:
    """Why ``tc`` (traffic control) faults cannot be used here, or None when they can."""
    if shutil.which("tc") is None:
        return "iproute2 `tc` is not installed"
    return netns_unavailable()


# -- namespace bookkeeping --------------------------------------------------------------------


def _namespace_name(seq: int, role: str) -> str:
    return f"{NAME_PREFIX}-{os.getpid()}-{seq}-{role}"


def _namespace_exists(name: str) -> bool:
    return os.path.exists(os.path.join(_NETNS_DIR, name))


def _destroy_namespace(name: str) -> None:
    """Delete a namespace this module made, leaving nothing behind.

    A namespace outlives its name while any socket in it is still open, including orphaned
    TCP sockets still retransmitting a FIN. So first abort every TCP socket in it
    (``ss -K``, best effort), then delete its veth interfaces (which removes both ends of
    each pair at once), then the name. Missing namespaces are ignored.
    """
    try:
        if not _namespace_exists(name):
            return
        _run(["ip", "netns", "exec", name, "ss", "-K", "-tan"], check=False)
        links = _run(["ip", "-n", name, "-o", "link", "show", "type", "veth"], check=False)
        for line in links.stdout.splitlines():
            m = re.match(r"^\d+:\s+([^:@\s]+)", line)
            if m:
                _run(["ip", "-n", name, "link", "del", m.group(1)], check=False)
        proc = _run(["ip", "netns", "del", name], check=False)
        if proc.returncode != 0 and _namespace_exists(name):
            raise RuntimeError(f"could not delete namespace {name}: {proc.stderr.strip()}")
    finally:
        with _live_lock:
            _live_namespaces.discard(name)


@atexit.register
def _destroy_leftovers() -> None:
    """Delete namespaces a run left behind when it was interrupted before its teardown."""
    with _live_lock:
        names = sorted(_live_namespaces)
    for name in names:
        with contextlib.suppress(Exception):
            _destroy_namespace(name)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale_namespaces() -> list[str]:
    """Delete namespaces left by earlier runs whose process no longer exists.

    Only names made by this module (``tcpclose-test-<pid>-...``) with a dead pid are
    touched; a parallel run's namespaces stay. Returns the names deleted.
    """
    proc = _run(["ip", "netns", "list"], check=False)
    removed: list[str] = []
    for line in proc.stdout.splitlines():
        fields = line.split()
        if not fields:
            continue
        m = _NAME_RE.match(fields[0])
        if m is None or _pid_alive(int(m.group(1))):
            continue
        _destroy_namespace(fields[0])
        removed.append(fields[0])
    return removed


# -- entering a namespace ---------------------------------------------------------------------


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]
    libc.setns.restype = ctypes.c_int
    return libc


def _setns(fd: int) -> None:
    """Move the calling *thread* into the network namespace ``fd`` refers to."""
    if sys.version_info >= (3, 12):
        os.setns(fd, os.CLONE_NEWNET)
        return
    if _libc().setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def _enter_namespace(name: str) -> None:
    fd = os.open(os.path.join(_NETNS_DIR, name), os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(fd)
    finally:
        os.close(fd)


def current_namespace_inode() -> int:
    """The inode of the calling thread's network namespace (equal inodes: same namespace)."""
    return os.stat("/proc/thread-self/ns/net").st_ino


class _NamespaceThread:
    """One daemon thread living in a namespace, running submitted calls in order.

    A daemon thread, so that a call that never returns cannot keep the interpreter from
    exiting; every wait for a result is bounded by ``CALL_TIMEOUT_S``.
    """

    def __init__(self, netns: str) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], object], Future[object]] | None] = (
            queue.SimpleQueue()
        )
        self._ready: Future[int] = Future()
        self._thread = threading.Thread(
            target=self._main, args=(netns,), name=f"netns:{netns}", daemon=True
        )
        self._thread.start()
        inode = self._ready.result(timeout=CALL_TIMEOUT_S)
        expected = os.stat(os.path.join(_NETNS_DIR, netns)).st_ino
        if inode != expected:
            raise RuntimeError(f"thread for {netns} is in namespace {inode}, not {expected}")

    def _main(self, netns: str) -> None:
        try:
            _enter_namespace(netns)
            self._ready.set_result(current_namespace_inode())
        except BaseException as exc:
            self._ready.set_exception(exc)
            return
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, future = job
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def call(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread:
            return fn()  # already here: queueing would wait on ourselves
        if not self._thread.is_alive():
            raise RuntimeError("the namespace thread has stopped")
        future: Future[object] = Future()
        self._jobs.put((fn, future))
        result = future.result(timeout=CALL_TIMEOUT_S)
        return result  # type: ignore[return-value]  # the future holds fn's own result

    def stop(self) -> None:
        self._jobs.put(None)
        self._thread.join(timeout=CALL_TIMEOUT_S)


# -- socket helpers (work on any socket) ------------------------------------------------------


def send_queue_bytes(sock: stdlib_socket.socket) -> int:
    """Bytes written but not yet acknowledged by the peer (``SIOCOUTQ``)."""
    buf = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    value: int = struct.unpack("i", buf)[0]
    return value


def unread_bytes(sock: stdlib_socket.socket) -> int:
    """Bytes received and not yet read by the application (``SIOCINQ``)."""
    buf = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    value: int = struct.unpack("i", buf)[0]
    return value


# struct tcp_info (include/uapi/linux/tcp.h): 8 one-byte fields, then u32s;
# tcpi_total_retrans is the 24th u32, at byte offset 100.
_TCPI_TOTAL_RETRANS_OFFSET = 100


def total_retransmits(sock: stdlib_socket.socket) -> int:
    """Segments this connection has retransmitted (``TCP_INFO.tcpi_total_retrans``)."""
    raw = sock.getsockopt(stdlib_socket.IPPROTO_TCP, stdlib_socket.TCP_INFO, 104)
    value: int = struct.unpack_from("I", raw, _TCPI_TOTAL_RETRANS_OFFSET)[0]
    return value


def _address_family(host: str) -> int:
    return stdlib_socket.AF_INET6 if ":" in host else stdlib_socket.AF_INET


# -- faults -----------------------------------------------------------------------------------


class Fault:
    """A fault in force until ``remove()`` (idempotent); also a context manager."""

    def __init__(self, description: str) -> None:
        self.description = description
        self.active = True

    def remove(self) -> None:
        """Undo the fault. Does nothing when it is already removed."""
        if self.active:
            self.active = False
            self._undo()

    def _undo(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"<{type(self).__name__} {self.description!r} {state}>"


@dataclass(frozen=True, slots=True)
class NftCounts:
    """What an nftables fault's counters saw: packets and bytes it dropped."""

    packets: int
    bytes: int


class NftFault(Fault):
    """nftables rules in a host's ``inet tcpclose`` table (and the sets they use).

    Its ``counter drop`` rules are what ``counts()`` adds up; a rule without a counter
    only marks flows in a set.
    """

    def __init__(
        self,
        faults: Faults,
        description: str,
        rules: Sequence[tuple[str, int]],
        set_names: Sequence[str] = (),
    ) -> None:
        super().__init__(description)
        self._faults = faults
        self.rules = tuple(rules)  # (chain, handle)
        self._set_names = tuple(set_names)

    def counts(self) -> NftCounts:
        """Packets and bytes dropped by this fault's rules so far (while it is active)."""
        if not self.active:
            raise RuntimeError(f"{self.description}: counters are gone with the removed rules")
        table = self._faults.counters()
        mine = [table[handle] for _, handle in self.rules if handle in table]
        return NftCounts(sum(c.packets for c in mine), sum(c.bytes for c in mine))

    def packets(self) -> int:
        """Packets dropped so far."""
        return self.counts().packets

    def _undo(self) -> None:
        lines = [f"delete rule inet {_NFT_TABLE} {chain} handle {h}" for chain, h in self.rules]
        lines += [f"delete set inet {_NFT_TABLE} {name}" for name in self._set_names]
        self._faults.nft_script("\n".join(lines))


class Faults:
    """nftables faults for one host: rules on its veth only, so loopback keeps working.

    Each host gets its own ``table inet tcpclose`` with an ``input`` and an ``output``
    chain (filter hooks, priority 0, policy accept), made on first use. Every fault adds
    ``<iifname|oifname> "<veth>" <match> counter drop`` rules; ``counts()`` reads the
    counters back.

    Where the drop happens matters to the sender's TCP:

    * ``direction="input"`` (the default): this host never receives the packets. To the
      sender this is loss on the wire: the segment counts as sent, the retransmission
      timer runs (ss ``timer:(on,...)``) and ``tcpi_total_retrans`` grows. To lose the
      client's FIN, put ``drop_fin()`` on the *server*.
    * ``direction="output"``: this host's own stack refuses to send them. The sender's
      TCP sees a local send error, not a loss: the segment is not counted as sent, a
      FIN waits under the zero-window probe timer (``timer:(persist,...)``), and
      nothing counts as a retransmission.
    """

    def __init__(self, host: Host) -> None:
        self._host = host
        self._table_made = False
        self._sets = itertools.count(1)

    def nft_script(self, script: str) -> str:
        """Run an nft script in the host's namespace (``nft --echo --handle -f -``)."""
        return self._host.run(["nft", "--echo", "--handle", "-f", "-"], stdin=script).stdout

    def _ensure_table(self) -> None:
        if self._table_made:
            return
        reason = nft_unavailable()
        if reason is not None:
            # A test that reaches for a packet fault without asking for nftables first
            # (it needs one only on some of its paths) is skipped here, not failed.
            pytest.skip(reason)
        self.nft_script(
            f"table inet {_NFT_TABLE} {{\n"
            "  chain input { type filter hook input priority 0; policy accept; }\n"
            "  chain output { type filter hook output priority 0; policy accept; }\n"
            "}\n"
        )
        self._table_made = True

    def _chains(self, direction: Direction) -> list[tuple[str, str]]:
        ifname = self._host.ifname
        chains = {"input": f'iifname "{ifname}"', "output": f'oifname "{ifname}"'}
        if direction == "both":
            return list(chains.items())
        if direction not in chains:
            raise ValueError(f"direction must be input, output or both, got {direction!r}")
        return [(direction, chains[direction])]

    def _add_rules(
        self,
        description: str,
        rules: Sequence[tuple[str, str]],
        set_names: Sequence[str] = (),
    ) -> NftFault:
        self._ensure_table()
        script = [
            f"add set inet {_NFT_TABLE} {name} "
            "{ type inet_service . inet_service; flags dynamic; }"
            for name in set_names
        ]
        script += [f"add rule inet {_NFT_TABLE} {chain} {body}" for chain, body in rules]
        echo = self.nft_script("\n".join(script))
        handles: list[tuple[str, int]] = []
        for line in echo.splitlines():
            m = re.match(rf"^add rule inet {_NFT_TABLE} (\w+) .*# handle (\d+)$", line)
            if m:
                handles.append((m.group(1), int(m.group(2))))
        if len(handles) != len(rules):
            raise RuntimeError(f"expected {len(rules)} rule handles from nft, got: {echo!r}")
        return NftFault(self, description, handles, set_names)

    def drop(self, match: str, direction: Direction = "input") -> NftFault:
        """Drop packets matching an nft expression, e.g. ``"tcp flags & syn == syn"``.

        Adds ``<iifname|oifname> "<veth>" <match> counter drop`` to the chosen chain(s);
        ``input`` (default) looks like loss on the wire to the sender, see ``Faults``.
        """
        rules = [
            (chain, f"{scope} {match} counter drop") for chain, scope in self._chains(direction)
        ]
        return self._add_rules(f"drop {match} ({direction})", rules)

    def drop_all(self, direction: Direction = "both") -> NftFault:
        """Drop everything crossing the veth (both directions by default): a dead peer."""
        rules = [(chain, f"{scope} counter drop") for chain, scope in self._chains(direction)]
        return self._add_rules(f"drop all ({direction})", rules)

    def drop_fin(self, direction: Direction = "input") -> NftFault:
        """Drop every segment carrying FIN: ``tcp flags & fin == fin``."""
        return self.drop("tcp flags & fin == fin", direction)

    def drop_rst(self, direction: Direction = "input") -> NftFault:
        """Drop every segment carrying RST: ``tcp flags & rst == rst``."""
        return self.drop("tcp flags & rst == rst", direction)

    def drop_first(self, match: str, direction: Direction = "input") -> NftFault:
        """Drop only the first packet matching ``match`` of each connection.

        Per connection (keyed by source and destination port) and counted from the moment
        the fault is added: the rule drops a packet and remembers the flow in a dynamic
        set, so the retransmission passes. Add it just before the step whose packet should
        be lost once (e.g. ``"tcp flags & (syn|fin|rst|psh|ack) == ack"`` right before the
        final ACK).
        """
        if direction == "both":
            raise ValueError("drop_first works on one direction: input or output")
        set_name = f"seen_{next(self._sets)}"
        rules = [
            (
                chain,
                f"{scope} {match} tcp sport . tcp dport != @{set_name} "
                f"add @{set_name} {{ tcp sport . tcp dport }} counter drop",
            )
            for chain, scope in self._chains(direction)
        ]
        return self._add_rules(f"drop first {match} ({direction})", rules, [set_name])

    def drop_first_fin(self, direction: Direction = "input") -> NftFault:
        """Drop the first FIN of each connection; its retransmission goes through."""
        return self.drop_first("tcp flags & fin == fin", direction)

    def drop_pure_acks(self, direction: Direction = "input") -> NftFault:
        """Drop segments that only acknowledge (ACK set, no SYN/FIN/RST/PSH/URG, no payload).

        On our own host (input), the data we send keeps arriving at the peer but its
        acknowledgements never reach us, so it stays in our send queue. "No payload" is
        exact: the IP length equals the TCP header length (one rule per data offset, IPv4
        and IPv6).
        """
        rules = [
            (chain, f"{scope} {pure_ack} counter drop")
            for chain, scope in self._chains(direction)
            for pure_ack in _pure_ack_matches()
        ]
        return self._add_rules(f"drop pure ACKs ({direction})", rules)

    def drop_final_ack(self) -> NftFault:
        """Lose, once per connection, the last ACK this host receives after its own FIN.

        For the host that closes second: once it has received the peer's FIN and sent
        its own (``input`` and ``output`` mark the connection), the first pure ACK it
        receives for that connection is dropped, so it sits in LAST-ACK and retransmits
        its FIN; the answer to that gets through. Requiring the peer's FIN first keeps
        a late pure ACK of earlier data, or a window update the peer sent while it was
        still reading, from being taken for the final one (with only this host's FIN
        required, one CI run saw the close end CLOSED where LAST-ACK was due).
        Install it before the peer's FIN arrives.
        """
        got_fin = f"pfin_{next(self._sets)}"
        sent_fin, dropped = f"fin_{next(self._sets)}", f"seen_{next(self._sets)}"
        ifname = self._host.ifname
        # Keys are (this host's port . peer's port) both ways.
        rules = [
            (
                "output",
                f'oifname "{ifname}" tcp flags & fin == fin add @{sent_fin} '
                "{ tcp sport . tcp dport }",
            ),
            (
                "input",
                f'iifname "{ifname}" tcp flags & fin == fin add @{got_fin} '
                "{ tcp dport . tcp sport }",
            ),
        ]
        rules += [
            (
                "input",
                f'iifname "{ifname}" {pure_ack} tcp dport . tcp sport @{got_fin} '
                f"tcp dport . tcp sport @{sent_fin} "
                f"tcp dport . tcp sport != @{dropped} add @{dropped} {{ tcp dport . tcp sport }} "
                "counter drop",
            )
            for pure_ack in _pure_ack_matches()
        ]
        return self._add_rules("drop final ACK", rules, [got_fin, sent_fin, dropped])

    def counters(self) -> dict[int, NftCounts]:
        """Every rule's counter in the host's table, by rule handle."""
        self._ensure_table()
        text = self._host.run(["nft", "-a", "list", "table", "inet", _NFT_TABLE]).stdout
        found: dict[int, NftCounts] = {}
        for line in text.splitlines():
            m = re.search(r"counter packets (\d+) bytes (\d+).*# handle (\d+)$", line)
            if m:
                found[int(m.group(3))] = NftCounts(int(m.group(1)), int(m.group(2)))
        return found


def _pure_ack_matches() -> list[str]:
    """nft matches for a segment that only acknowledges: ACK alone, no payload.

    No payload means the IP length equals the TCP header length (``tcp doff`` words);
    nft cannot compute that, so there is one match per data offset and IP version.
    """
    flags = "tcp flags & (syn|fin|rst|psh|urg|ack) == ack"
    matches = []
    for words in _TCP_HEADER_WORDS:
        header = 4 * words
        matches.append(f"{flags} ip length {20 + header} tcp doff {words}")
        matches.append(f"{flags} ip6 length {header} tcp doff {words}")
    return matches


class LinkDown(Fault):
    """A host's veth set down (``ip link set <veth> down``); ``remove()`` sets it up again."""

    def __init__(self, host: Host) -> None:
        super().__init__(f"{host.ifname} down in {host.netns}")
        self._host = host
        _run(["ip", "-n", host.netns, "link", "set", host.ifname, "down"])

    def _undo(self) -> None:
        _run(["ip", "-n", self._host.netns, "link", "set", self._host.ifname, "up"])


@dataclass(frozen=True, slots=True)
class TbfStats:
    """``tc -s qdisc show`` figures of a tbf qdisc."""

    sent_bytes: int
    sent_packets: int
    dropped: int
    overlimits: int


class SlowLink(Fault):
    """A token-bucket rate limit on a host's outgoing traffic (``tc qdisc ... tbf``).

    ``tc qdisc add dev <veth> root tbf rate <rate> burst <burst> latency <latency>``;
    ``remove()`` deletes the root qdisc.
    """

    def __init__(self, host: Host, rate: str, burst: str, latency: str) -> None:
        super().__init__(f"tbf rate {rate} burst {burst} latency {latency} on {host.ifname}")
        self._host = host
        _run(
            [
                *("tc", "-n", host.netns, "qdisc", "add", "dev", host.ifname, "root", "tbf"),
                *("rate", rate, "burst", burst, "latency", latency),
            ]
        )

    def stats(self) -> TbfStats:
        """Bytes and packets the qdisc sent, and how often it dropped or held back."""
        text = _run(["tc", "-n", self._host.netns, "-s", "qdisc", "show", "dev", self._host.ifname])
        m = re.search(r"Sent (\d+) bytes (\d+) pkt \(dropped (\d+), overlimits (\d+)", text.stdout)
        if m is None:
            raise RuntimeError(f"no tbf statistics in: {text.stdout!r}")
        return TbfStats(*(int(g) for g in m.groups()))

    def _undo(self) -> None:
        _run(["tc", "-n", self._host.netns, "qdisc", "del", "dev", self._host.ifname, "root"])


# -- hosts ------------------------------------------------------------------------------------


class Host:
    """One end of the pair: a namespace with a veth and its addresses.

    Sockets made through ``socket()``, ``listen()``, ``connect()`` (and accepted by
    ``TwoHosts.connect_pair()``) are ordinary ``stdlib_socket.socket`` objects living in this
    namespace; they are tracked and aborted at teardown if still open.
    """

    def __init__(self, role: str, netns: str, ifname: str, ipv4: str, ipv6: str | None) -> None:
        self.role = role
        self.netns = netns
        self.ifname = ifname
        self.ipv4 = ipv4
        self.ipv6 = ipv6
        self.vanished = False
        self._thread: _NamespaceThread | None = _NamespaceThread(netns)
        self._sockets: list[tuple[stdlib_socket.socket, int]] = []  # (socket, inode at creation)
        self._processes: list[subprocess.Popen[bytes]] = []
        self.faults = Faults(self)

    def __repr__(self) -> str:
        return f"<Host {self.role} {self.netns} {self.ipv4}>"

    # running code in the namespace

    def call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn(*args, **kwargs)`` in this host's namespace thread; return its result.

        For short operations (creating sockets, writing sysctls, running ss): calls run one
        at a time, each bounded by ``CALL_TIMEOUT_S``.
        """
        if self._thread is None:
            raise RuntimeError(f"{self.role} host has vanished or been torn down")
        return self._thread.call(functools.partial(fn, *args, **kwargs))

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        stdin: str | None = None,
        timeout: float = COMMAND_TIMEOUT_S,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in the namespace (``ip netns exec <ns> ...``), capturing text."""
        if self.vanished:
            raise RuntimeError(f"{self.role} host has vanished")
        return _run(
            ["ip", "netns", "exec", self.netns, *argv], check=check, stdin=stdin, timeout=timeout
        )

    def popen(
        self,
        argv: Sequence[str],
        *,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = subprocess.PIPE,
        stderr: int | None = subprocess.PIPE,
    ) -> subprocess.Popen[bytes]:
        """Start a long-running process in the namespace (``ip netns exec <ns> ...``).

        ``ip netns exec`` execs the command, so the Popen's pid is the command's own. The
        process is terminated (then killed) at teardown if it is still running.
        """
        if self.vanished:
            raise RuntimeError(f"{self.role} host has vanished")
        proc = subprocess.Popen(
            ["ip", "netns", "exec", self.netns, *argv], stdin=stdin, stdout=stdout, stderr=stderr
        )
        self._processes.append(proc)
        return proc

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Move the *calling* thread into this namespace for the ``with`` block.

        For code that makes its own sockets (e.g. a server helper given a host and port).
        Everything the thread does inside the block happens in the namespace: under asyncio
        that includes other tasks that run while the block awaits, and a thread started
        inside the block (an executor worker, say) stays in the namespace for good. Prefer
        ``call()`` and passing ``sock=``; keep ``entered()`` blocks short and await-free
        where possible.
        """
        if self.vanished:
            raise RuntimeError(f"{self.role} host has vanished")
        saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            _enter_namespace(self.netns)
            try:
                yield
            finally:
                _setns(saved)
        finally:
            os.close(saved)

    def sysctl(self, key: str, value: str | int | None = None) -> str:
        """Read (and first write, when ``value`` is given) a sysctl of this namespace.

        ``key`` as for sysctl(8): ``net.ipv4.tcp_fin_timeout``.
        """
        path = "/proc/sys/" + key.replace(".", "/")

        def access() -> str:
            if value is not None:
                with open(path, "w") as f:
                    f.write(f"{value}\n")
            with open(path) as f:
                return f.read().strip()

        return self.call(access)

    # sockets

    def _track(self, sock: stdlib_socket.socket) -> stdlib_socket.socket:
        self._sockets.append((sock, os.fstat(sock.fileno()).st_ino))
        return sock

    def address(self, family: int = stdlib_socket.AF_INET) -> str:
        """This host's address on the veth for ``family``."""
        if family == stdlib_socket.AF_INET:
            return self.ipv4
        if family == stdlib_socket.AF_INET6 and self.ipv6 is not None:
            return self.ipv6
        raise ValueError(f"{self.role} host has no address for family {family!r}")

    def socket(
        self,
        family: int = stdlib_socket.AF_INET,
        type: int = stdlib_socket.SOCK_STREAM,
        proto: int = 0,
    ) -> stdlib_socket.socket:
        """A new socket created in this namespace (blocking, tracked for teardown)."""
        return self._track(self.call(stdlib_socket.socket, family, type, proto))

    def listen(
        self, family: int = stdlib_socket.AF_INET, port: int = 0, backlog: int = 128
    ) -> stdlib_socket.socket:
        """A listening TCP socket bound to this host's veth address."""
        sock = self.socket(family)
        sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_REUSEADDR, 1)
        sock.bind((self.address(family), port))
        sock.listen(backlog)
        return sock

    def connect(
        self, address: tuple[str, int], *, timeout: float = 5.0, local_port: int = 0
    ) -> stdlib_socket.socket:
        """A TCP socket connected from this host to ``address`` (blocking once connected)."""
        family = _address_family(address[0])
        sock = self.socket(family)
        if local_port:
            sock.bind((self.address(family), local_port))
        sock.settimeout(timeout)
        sock.connect(address)
        sock.settimeout(None)
        return sock

    # what the kernel shows

    def ss(self, local: tuple[str, int], peer: tuple[str, int]) -> SsEntry | None:
        """``ss -tanoi`` for one 4-tuple as this namespace sees it (None: no socket)."""
        return self.call(ss_lookup, local, peer)

    def tcp_state(self, local: tuple[str, int], peer: tuple[str, int]) -> str | None:
        """The ss state name (``ESTAB``, ``FIN-WAIT-1``, ...) of a 4-tuple, or None."""
        entry = self.ss(local, peer)
        return None if entry is None else entry.state

    def wait_state(
        self, local: tuple[str, int], peer: tuple[str, int], state: str | None, timeout: float = 5.0
    ) -> SsEntry | None:
        """Poll ss until the 4-tuple is in ``state`` (None: gone); return the entry."""

        def reached() -> tuple[SsEntry | None] | None:
            entry = self.ss(local, peer)
            current = None if entry is None else entry.state
            return (entry,) if current == state else None

        where = f"{local}->{peer} in {self.role}"
        return wait_until(reached, timeout, 0.02, f"{where} to reach {state or 'no socket'}")[0]

    # link-level faults

    def link_down(self) -> LinkDown:
        """Set this host's veth down (the other end loses carrier); reversible."""
        return LinkDown(self)

    def slow_link(
        self, rate: str = "8mbit", burst: str = "32kb", latency: str = "400ms"
    ) -> SlowLink:
        """Rate-limit this host's outgoing traffic with tbf; reversible."""
        return SlowLink(self, rate, burst, latency)

    # teardown

    def _release_sockets(self) -> None:
        """Abort (RST, no orphan left) every tracked socket the test has not closed.

        A tracked fd number that now refers to another file (closed behind the socket
        object's back and reused) is detached, never closed.
        """
        sockets, self._sockets = self._sockets, []
        for sock, inode in sockets:
            fd = sock.fileno()
            if fd < 0:
                continue
            try:
                same = os.fstat(fd).st_ino == inode
            except OSError:
                same = False
            if not same:
                sock.detach()
                continue
            with contextlib.suppress(OSError):
                sock.setsockopt(
                    stdlib_socket.SOL_SOCKET, stdlib_socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            sock.close()

    def _stop_processes(self) -> None:
        """Terminate (then kill) processes started by ``popen()``; close their pipes."""
        processes, self._processes = self._processes, []
        for proc in processes:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    pipe.close()

    def _shutdown(self) -> None:
        self._stop_processes()
        self._release_sockets()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.stop()


class TwoHosts:
    """A server host and a client host joined by a veth pair. Build with ``create_two_hosts()``."""

    def __init__(self, server: Host, client: Host, seq: int) -> None:
        self.server = server
        self.client = client
        self._seq = seq
        self._limbo: str | None = None

    @property
    def hosts(self) -> tuple[Host, Host]:
        return self.server, self.client

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Names of every namespace this pair made (server, client, and limbo if any)."""
        names = [self.server.netns, self.client.netns]
        if self._limbo is not None:
            names.append(self._limbo)
        return tuple(names)

    @property
    def has_ipv6(self) -> bool:
        return self.server.ipv6 is not None and self.client.ipv6 is not None

    def connect_pair(
        self, family: int = stdlib_socket.AF_INET, listener: stdlib_socket.socket | None = None
    ) -> tuple[stdlib_socket.socket, stdlib_socket.socket]:
        """A connected ``(client_side, server_side)`` pair across the veth, both blocking.

        With ``listener`` (from ``server.listen()``) the server side is accepted from it and
        the listener stays open; otherwise a temporary one is made and closed.
        """
        lst = listener if listener is not None else self.server.listen(family)
        try:
            client_side = self.client.connect(lst.getsockname()[:2])
            lst.settimeout(5.0)
            server_side, _ = lst.accept()
            server_side.settimeout(None)
            self.server._track(server_side)
        finally:
            if listener is None:
                lst.close()
        return client_side, server_side

    def vanish(self, host: Host) -> None:
        """Make ``host`` disappear without a word, as a machine losing power would.

        Its veth end is first moved into a third, address-less "limbo" namespace and set
        up there, so the other host keeps carrier and its packets go out and are never
        answered (no RST, no ICMP). Then the host's sockets are aborted (their RSTs have
        nowhere to go), its thread stops, and its namespace is deleted. Irreversible.
        """
        if host.vanished:
            return
        limbo = _namespace_name(self._seq, "limbo")
        with _live_lock:
            _live_namespaces.add(limbo)
        _run(["ip", "netns", "add", limbo])
        self._limbo = limbo
        _run(["ip", "-n", host.netns, "link", "set", host.ifname, "netns", limbo])
        _run(["ip", "-n", limbo, "link", "set", host.ifname, "up"])
        host._shutdown()
        host.vanished = True
        _destroy_namespace(host.netns)

    def close(self) -> None:
        """Tear everything down: sockets, threads, namespaces (and so the veth pair)."""
        errors: list[BaseException] = []
        for host in self.hosts:
            try:
                host._shutdown()
            except Exception as exc:
                errors.append(exc)
        for name in self.namespaces:
            try:
                _destroy_namespace(name)
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]


def _configure(host: Host) -> None:
    """Loopback and veth up, addresses on the veth (IPv6 without DAD)."""
    batch = ["link set lo up", f"addr add {host.ipv4}/{IPV4_PREFIX} dev {host.ifname}"]
    if host.ipv6 is not None:
        # Keep the IPv6 address across link down/up (the kernel drops it by default).
        host.sysctl(f"net.ipv6.conf.{host.ifname}.keep_addr_on_down", 1)
        batch.append(f"addr add {host.ipv6}/{IPV6_PREFIX} dev {host.ifname} nodad")
    batch.append(f"link set {host.ifname} up")
    _run(["ip", "-n", host.netns, "-batch", "-"], stdin="\n".join(batch) + "\n")


def _ipv6_in(host: Host) -> bool:
    def probe() -> bool:
        try:
            with open("/proc/sys/net/ipv6/conf/all/disable_ipv6") as f:
                return f.read().strip() == "0"
        except OSError:
            return False

    return host.call(probe)


@contextlib.contextmanager
def create_two_hosts(ipv6: bool = True) -> Iterator[TwoHosts]:
    """Build a server and a client namespace joined by a veth pair; tear down on exit.

    The server gets ``10.203.0.1`` / ``fd00:203::1``, the client ``10.203.0.2`` /
    ``fd00:203::2``. IPv6 is left out when ``ipv6`` is false or the kernel has it
    disabled (``TwoHosts.has_ipv6``). Teardown runs however the block ends.
    """
    sweep_stale_namespaces()
    seq = next(_sequence)
    names = {role: _namespace_name(seq, role) for role in ("server", "client")}
    ifnames = {"server": "veth-server", "client": "veth-client"}
    hosts: dict[str, Host] = {}
    pair: TwoHosts | None = None
    with _live_lock:
        _live_namespaces.update(names.values())
    try:
        for name in names.values():
            _run(["ip", "netns", "add", name])
        _run(
            [
                *("ip", "-n", names["server"], "link", "add", ifnames["server"], "type", "veth"),
                *("peer", "name", ifnames["client"], "netns", names["client"]),
            ]
        )
        v4 = {"server": SERVER_IPV4, "client": CLIENT_IPV4}
        v6 = {"server": SERVER_IPV6, "client": CLIENT_IPV6}
        for role in ("server", "client"):
            hosts[role] = Host(
                role, names[role], ifnames[role], v4[role], v6[role] if ipv6 else None
            )
        use_v6 = ipv6 and all(_ipv6_in(h) for h in hosts.values())
        for host in hosts.values():
            if not use_v6:
                host.ipv6 = None
            _configure(host)
        pair = TwoHosts(hosts["server"], hosts["client"], seq)
        yield pair
    finally:
        if pair is not None:
            pair.close()
        else:
            for host in hosts.values():
                with contextlib.suppress(Exception):
                    host._shutdown()
            for name in names.values():
                _destroy_namespace(name)
