"""Shared helpers for tests: real loopback sockets, polling with deadlines, ``ss``.

Nothing here fakes the kernel. Waiting is always "poll an observed condition until a
deadline", never a bare sleep.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import tcpclose.kernel
from tcpclose.kernel import Summary, TcpState

T = TypeVar("T")

LOOPBACK: dict[int, str] = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}

# After a peer's RST, Linux hands ECONNRESET to the first call that meets it and
# ENOTCONN or EPIPE to the calls after it. The sync driver makes the first call itself;
# an event loop may have made it already (uvloop's libuv often has), so a report from
# an asyncio driver names whichever errno the loop passed on. The outcome is RESET
# either way.
RESET_ERRORS: frozenset[str] = frozenset({"ECONNRESET", "ENOTCONN", "EPIPE"})


def has_ipv6_loopback() -> bool:
    """True when ``::1`` can be bound (skip IPv6 cases otherwise)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def wait_until(
    predicate: Callable[[], T | None],
    timeout: float = 5.0,
    interval: float = 0.005,
    message: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns a truthy value; return that value.

    Raises AssertionError naming ``message`` when ``timeout`` passes first.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


class Peer:
    """Runs a peer behaviour on a thread; ``result()`` joins with a bound and re-raises
    what the behaviour raised."""

    def __init__(self, target: Callable[[], Any], name: str = "peer") -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(target,), name=name, daemon=True)
        self._thread.start()

    def _run(self, target: Callable[[], Any]) -> None:
        try:
            self._value = target()
        except BaseException as exc:
            self._error = exc

    def result(self, timeout: float = 10.0) -> Any:
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "peer thread did not finish"
        if self._error is not None:
            raise self._error
        return self._value


def recv_exactly(sock: socket.socket, size: int, timeout: float = 10.0) -> bytes:
    """Read exactly ``size`` bytes, failing after ``timeout`` seconds or at EOF."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    got = 0
    while got < size:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"got {got} of {size} bytes in {timeout}s")
        sock.settimeout(left)
        chunk = sock.recv(min(size - got, 256 * 1024))
        if not chunk:
            raise AssertionError(f"EOF after {got} of {size} bytes")
        chunks.append(chunk)
        got += len(chunk)
    sock.settimeout(None)
    return b"".join(chunks)


def open_fd_count() -> int:
    """Number of file descriptors this process has open."""
    return len(os.listdir("/proc/self/fd"))


def listener(family: int, host: str | None = None, backlog: int = 128) -> socket.socket:
    """A listening TCP socket on an ephemeral loopback port."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host or LOOPBACK[family], 0))
    sock.listen(backlog)
    return sock


def tcp_pair(
    family: int = socket.AF_INET, lst: socket.socket | None = None
) -> tuple[socket.socket, socket.socket]:
    """A connected ``(client, server)`` pair over loopback, both blocking.

    When ``lst`` is given the server side is accepted from it (and it stays open);
    otherwise a temporary listener is made and closed.
    """
    own = lst is None
    srv = lst if lst is not None else listener(family)
    try:
        client = socket.socket(family, socket.SOCK_STREAM)
        client.connect(srv.getsockname()[:2])
        server, _ = srv.accept()
    finally:
        if own:
            srv.close()
    return client, server


def addr(sock: socket.socket, peer: bool = False) -> tuple[str, int]:
    """``(host, port)`` of a socket's local (or peer) end."""
    raw = sock.getpeername() if peer else sock.getsockname()
    return raw[0], raw[1]


@dataclass(frozen=True)
class SsEntry:
    """One line of ``ss -tanoi`` for a 4-tuple."""

    state: str  # as ss prints it: ESTAB, TIME-WAIT, FIN-WAIT-2, ...
    recv_q: int
    send_q: int
    timer: str | None  # e.g. "timewait"
    timer_seconds: float | None  # seconds left as ss shows them (truncated)
    raw: str


_SS_TIMER = re.compile(r"timer:\((\w+),([^,]+),(\d+)\)")


def _ss_seconds(text: str) -> float:
    # ss prints "59sec", "1min2sec"; below 10 s "7.892ms" means 7.892 *seconds*, while
    # "004ms" (no decimal point) means 4 milliseconds.
    total = 0.0
    for number, unit in re.findall(r"([0-9.]+)(min|sec|ms)", text):
        if unit == "min":
            total += float(number) * 60
        elif unit == "ms" and "." not in number:
            total += float(number) / 1000
        else:
            total += float(number)
    return total


def _ss_host(host: str) -> str:
    return host.strip("[]")


def ss_lookup(local: tuple[str, int], peer: tuple[str, int]) -> SsEntry | None:
    """The ``ss -tanoi`` entry for the 4-tuple, or None when ss shows none.

    ss is the independent reference: it is a separate program reading the kernel.
    """
    exe = shutil.which("ss")
    if exe is None:
        raise RuntimeError("ss (iproute2) is not installed")
    out = subprocess.run(
        [exe, "-tanoi", "-H", "sport", "=", f":{local[1]}", "and", "dport", "=", f":{peer[1]}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    for line in out.splitlines():
        if not line or line[0].isspace():
            continue
        fields = line.split()
        if len(fields) < 5:
            continue
        state, recv_q, send_q, local_text, peer_text = fields[:5]
        lhost, _, lport = local_text.rpartition(":")
        phost, _, pport = peer_text.rpartition(":")
        if int(lport) != local[1] or int(pport) != peer[1]:
            continue
        if not _same_host(_ss_host(lhost), local[0]) or not _same_host(_ss_host(phost), peer[0]):
            continue
        m = _SS_TIMER.search(line)
        return SsEntry(
            state=state,
            recv_q=int(recv_q),
            send_q=int(send_q),
            timer=m.group(1) if m else None,
            timer_seconds=_ss_seconds(m.group(2)) if m else None,
            raw=line,
        )
    return None


def _same_host(a: str, b: str) -> bool:
    def norm(h: str) -> str:
        h = h.split("%")[0].lower()
        return h[7:] if h.startswith("::ffff:") else h

    return norm(a) == norm(b)


def is_root() -> bool:
    return os.geteuid() == 0


def run_script_json(script: Path, out: Path, *args: str, timeout: float) -> Any:
    """Run a benchmark script (``--json out`` and ``args``) with this interpreter; it
    must exit 0. Returns what it wrote to ``out``."""
    proc = subprocess.run(
        [sys.executable, str(script), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, f"{script.name} failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(out.read_text())


def fill_send_queue(sock: socket.socket) -> int:
    """Send until the kernel refuses more (the peer is not reading); return bytes sent."""
    sock.setblocking(False)
    chunk = b"x" * 65536
    sent = 0
    for _ in range(10_000):
        try:
            sent += sock.send(chunk)
        except BlockingIOError:
            return sent
    raise AssertionError("the send queue never filled")


def in_order(summary: Summary) -> tuple[Any, ...]:
    """Everything a summary says, its mappings' order included (``==`` on the mappings
    ignores order)."""
    return (
        summary.source,
        summary.total,
        list(summary.by_state.items()),
        list(summary.time_wait_by_local_port.items()),
        list(summary.time_wait_by_destination.items()),
    )


@contextmanager
def quiet_listener() -> Iterator[socket.socket]:
    """An IPv4 loopback listener on a port no other socket uses.

    TIME_WAIT entries left by earlier tests may hold any ephemeral port (``SO_REUSEADDR``
    lets ``bind`` pick one), and a count by port would include them.
    """
    rejected: list[socket.socket] = []
    try:
        for _ in range(50):
            lst = listener(socket.AF_INET)
            if sum(1 for _ in tcpclose.kernel.dump(port=addr(lst)[1])) == 1:
                with lst:
                    yield lst
                return
            rejected.append(lst)
        raise AssertionError("no quiet loopback port in 50 tries")
    finally:
        for sock in rejected:
            sock.close()


@contextmanager
def port_with_time_wait(server_first: int = 3, client_first: int = 2) -> Iterator[int]:
    """A quiet listening port with ``server_first`` TIME_WAIT entries of its own (the
    server closed first) and ``client_first`` of its clients'. Yields the port."""
    with quiet_listener() as lst:
        port = addr(lst)[1]
        for i in range(server_first + client_first):
            client, server = tcp_pair(socket.AF_INET, lst)
            first, second = (server, client) if i < server_first else (client, server)
            first.close()
            wait_until(lambda s=second: s.recv(1) == b"", message="FIN")  # type: ignore[misc]
            second.close()
        total = server_first + client_first
        wait_until(
            lambda: sum(1 for _ in tcpclose.kernel.dump(TcpState.TIME_WAIT, port=port)) == total,
            message=f"{total} TIME_WAIT",
        )
        yield port
