"""``/proc/net/tcp`` and ``/proc/net/tcp6``: the kernel view when netlink is unavailable.

The table is printed by ``get_tcp4_sock``/``get_timewait4_sock``/``get_openreq4`` in
``net/ipv4/tcp_ipv4.c`` (and the ``tcp6`` twins in ``net/ipv6/tcp_ipv6.c``), one
socket per line after a header::

      sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout ...
       0: 0100007F:1F90 0100007F:C738 01 00000000:00000000 00:00000000 00000000  1000        0 ...

Columns: addresses as ``%08X`` of each 32-bit word *in host byte order* (so 127.0.0.1
prints as ``0100007F`` on little-endian machines) and ``%04X`` ports; state (hex, the
``TCP_*`` numbers of ``include/net/tcp_states.h``); ``tx_queue:rx_queue`` (hex; for a
listener rx is the accept backlog); ``tr:tm->when`` (timer kind as in
``inet_diag_msg.idiag_timer``, and clock ticks until it fires, hex, ``USER_HZ`` = 100
per second); ``retrnsmt`` (hex); ``uid`` (decimal); ``timeout`` (decimal, the probe
count); ``inode`` (decimal). TIME_WAIT lines report uid and inode 0.

Differences from the netlink view: no socket cookie (a cookie passed to
:meth:`ProcfsBackend.lookup` cannot be checked and is ignored), no listener trap (a
line matches a 4-tuple exactly), times in 10 ms steps, and the cost grows with the
number of sockets (the whole table is read).

Parsers take text and a path (for messages); :class:`ProcfsBackend` takes the procfs
root, so tests can feed captured tables.
"""

from __future__ import annotations

import os
import re
import socket
import sys
from collections.abc import Collection, Iterator
from typing import Final, Literal

from tcpclose._errors import KernelViewError

from ._address import MAPPED_PREFIX, RawFourTuple
from ._summary import Summary
from ._types import KernelState, TcpState, TimerKind

__all__ = ("ProcfsBackend", "address_hex", "parse_tcp_line", "parse_tcp_table")

ByteOrder = Literal["little", "big"]

#: Clock ticks per second of ``tm->when`` (``USER_HZ``; 100 on every Linux port).
CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

_AF_INET: Final = int(socket.AF_INET)
_AF_INET6: Final = int(socket.AF_INET6)
_FILES: Final = {_AF_INET: "net/tcp", _AF_INET6: "net/tcp6"}
_ADDRESS_DIGITS: Final = {_AF_INET: 8, _AF_INET6: 32}
_STATES: Final = {int(s): s for s in TcpState if s > 0}
_TIMERS: Final = {int(t): t for t in TimerKind}
_PROBE_TIMERS: Final = (int(TimerKind.KEEPALIVE), int(TimerKind.PROBE))


def address_hex(raw: bytes, port: int, byteorder: ByteOrder = sys.byteorder) -> str:
    """An address and port as the table prints them.

    >>> address_hex(socket.inet_aton("127.0.0.1"), 8080, "little")
    '0100007F:1F90'
    >>> address_hex(socket.inet_pton(socket.AF_INET6, "::1"), 80, "little")
    '00000000000000000000000001000000:0050'
    """
    words = "".join(
        f"{int.from_bytes(raw[i : i + 4], byteorder):08X}" for i in range(0, len(raw), 4)
    )
    return f"{words}:{port:04X}"


#: One socket line, up to the inode (later columns vary between kernels and kinds).
_LINE: Final = re.compile(
    r"\s*(?P<sl>[0-9]+):"
    r"\s+(?P<local>[0-9A-Fa-f]{8}|[0-9A-Fa-f]{32}):(?P<lport>[0-9A-Fa-f]{4})"
    r"\s+(?P<peer>[0-9A-Fa-f]{8}|[0-9A-Fa-f]{32}):(?P<pport>[0-9A-Fa-f]{4})"
    r"\s+(?P<state>[0-9A-Fa-f]{2})"
    r"\s+(?P<tx>[0-9A-Fa-f]+):(?P<rx>[0-9A-Fa-f]+)"
    r"\s+(?P<timer>[0-9A-Fa-f]{2}):(?P<when>[0-9A-Fa-f]+)"
    r"\s+(?P<retrnsmt>[0-9A-Fa-f]+)"
    r"\s+(?P<uid>[0-9]+)"
    r"\s+(?P<probes>-?[0-9]+)"
    r"\s+(?P<inode>[0-9]+)"
    r"(?:\s|$)",
    re.ASCII,
)


def _host(text: str, family: int, byteorder: ByteOrder, cache: dict[tuple[int, str], str]) -> str:
    key = (family, text)
    host = cache.get(key)
    if host is None:
        raw = b"".join(
            int(text[i : i + 8], 16).to_bytes(4, byteorder) for i in range(0, len(text), 8)
        )
        host = cache[key] = socket.inet_ntop(family, raw)
    return host


def parse_tcp_line(
    line: str,
    *,
    path: str,
    lineno: int,
    family: int,
    byteorder: ByteOrder = sys.byteorder,
    clock_ticks: int = CLOCK_TICKS,
    _cache: dict[tuple[int, str], str] | None = None,
) -> KernelState:
    """Decode one socket line of ``/proc/net/tcp{,6}``.

    Raises:
        KernelViewError: naming ``path`` and ``lineno``, when the line is malformed.

    >>> parse_tcp_line(
    ...     "   3: 0100007F:1F90 0100007F:C738 06 00000000:00000000 03:00001725 00000000"
    ...     "     0        0 0 3 0000000000000000",
    ...     path="/proc/net/tcp", lineno=4, family=socket.AF_INET, byteorder="little")
    ... # doctest: +NORMALIZE_WHITESPACE
    KernelState(state=<TcpState.TIME_WAIT: 6>, source='procfs', local=('127.0.0.1', 8080),
        peer=('127.0.0.1', 51000), timer=<TimerKind.TIMEWAIT: 3>, seconds_left=59.25,
        retransmits=0, recv_queue=0, send_queue=0, uid=0, inode=0, cookie=None)
    """
    match = _LINE.match(line)
    digits = _ADDRESS_DIGITS.get(family)
    if match is None or len(match["local"]) != digits or len(match["peer"]) != digits:
        what = "socket line" if digits is None else f"socket line with {digits}-digit addresses"
        raise KernelViewError(f"{path}:{lineno}: expected a {what}, got {line.strip()[:120]!r}")
    cache = {} if _cache is None else _cache
    timer = int(match["timer"], 16)
    return KernelState(
        _STATES.get(int(match["state"], 16), TcpState.UNKNOWN),
        "procfs",
        (_host(match["local"], family, byteorder, cache), int(match["lport"], 16)),
        (_host(match["peer"], family, byteorder, cache), int(match["pport"], 16)),
        _TIMERS.get(timer),
        int(match["when"], 16) / clock_ticks if timer else None,
        int(match["probes"]) if timer in _PROBE_TIMERS else int(match["retrnsmt"], 16),
        int(match["rx"], 16),
        int(match["tx"], 16),
        int(match["uid"]),
        int(match["inode"]),
        None,
    )


def _check_header(line: str, path: str) -> None:
    if line.split()[:2] != ["sl", "local_address"]:
        raise KernelViewError(
            f"{path}:1: expected the header 'sl local_address ...', got {line.strip()[:60]!r}"
        )


def parse_tcp_table(
    text: str,
    *,
    path: str,
    family: int,
    byteorder: ByteOrder = sys.byteorder,
    clock_ticks: int = CLOCK_TICKS,
) -> Iterator[KernelState]:
    """Decode a whole ``/proc/net/tcp`` (``family=AF_INET``) or ``tcp6`` table, lazily.

    Raises:
        KernelViewError: naming ``path`` and the line, for a missing header or a
            malformed line.
    """
    if family not in _FILES:
        raise ValueError(f"family: expected AF_INET or AF_INET6, got {family!r}")
    lines = text.splitlines()
    if not lines:
        raise KernelViewError(f"{path}: empty table (no header line)")
    _check_header(lines[0], path)
    cache: dict[tuple[int, str], str] = {}
    for index in range(1, len(lines)):
        line = lines[index]
        if not line.strip():
            continue
        yield parse_tcp_line(
            line,
            path=path,
            lineno=index + 1,
            family=family,
            byteorder=byteorder,
            clock_ticks=clock_ticks,
            _cache=cache,
        )


class ProcfsBackend:
    """The kernel view read from ``<root>/net/tcp`` and ``<root>/net/tcp6``.

    Args:
        root: the procfs mount point (tests pass a directory of captured tables).
        byteorder: the byte order of the machine that wrote the tables.
        clock_ticks: ``USER_HZ`` of that machine.
    """

    name: Final = "procfs"

    def __init__(
        self,
        root: str = "/proc",
        *,
        byteorder: ByteOrder = sys.byteorder,
        clock_ticks: int = CLOCK_TICKS,
    ) -> None:
        self.root = root
        self.byteorder: ByteOrder = byteorder
        self.clock_ticks = clock_ticks

    def path(self, family: int) -> str:
        return os.path.join(self.root, _FILES[family])

    def _read(self, family: int) -> str | None:
        try:
            with open(self.path(family), "rb") as f:
                return f.read().decode("ascii", "replace")
        except FileNotFoundError:
            return None  # e.g. tcp6 on a kernel without IPv6

    def available(self) -> bool:
        """True when the IPv4 table can be read."""
        return os.access(self.path(_AF_INET), os.R_OK)

    def lookup(self, four: RawFourTuple, cookie: int | None = None) -> KernelState:
        """The line for ``four`` (``CLOSED`` when there is none).

        An IPv4 4-tuple is looked for in ``tcp``, then with mapped addresses in
        ``tcp6`` (a dual-stack socket's IPv4 connection). ``cookie`` is ignored.

        Raises:
            KernelViewError: the matching line is malformed.
        """
        family, local, local_port, peer, peer_port, _scope_id = four
        candidates: list[tuple[int, str]] = []
        if family == _AF_INET:
            candidates.append(
                (
                    _AF_INET,
                    f"{address_hex(local, local_port, self.byteorder)} "
                    f"{address_hex(peer, peer_port, self.byteorder)}",
                )
            )
            local6, peer6 = MAPPED_PREFIX + local, MAPPED_PREFIX + peer
        else:
            local6, peer6 = local, peer
        candidates.append(
            (
                _AF_INET6,
                f"{address_hex(local6, local_port, self.byteorder)} "
                f"{address_hex(peer6, peer_port, self.byteorder)}",
            )
        )
        for family, needle in candidates:
            text = self._read(family)
            if text is None:
                continue
            found = self._find(text, needle, family)
            if found is not None:
                return found
        return KernelState(TcpState.CLOSED, "procfs")

    def _find(self, text: str, needle: str, family: int) -> KernelState | None:
        start = text.find(" " + needle + " ")
        if start < 0:
            return None
        line_start = text.rfind("\n", 0, start) + 1
        line_end = text.find("\n", start)
        if line_end < 0:
            line_end = len(text)
        lineno = text.count("\n", 0, line_start) + 1
        return parse_tcp_line(
            text[line_start:line_end],
            path=self.path(family),
            lineno=lineno,
            family=family,
            byteorder=self.byteorder,
            clock_ticks=self.clock_ticks,
        )

    def dump(
        self, states: Collection[TcpState], port: int | None, families: Collection[int]
    ) -> Iterator[KernelState]:
        """Every socket in the tables of ``families`` whose state is in ``states`` and,
        when ``port`` is given, whose local or peer port is ``port``."""
        tables = []
        for family in families:
            text = self._read(family)
            if text is not None:
                tables.append((family, text))
        return self._filter(tables, states, port)

    def summary(
        self, states: Collection[TcpState], port: int | None, families: Collection[int]
    ) -> Summary:
        """:meth:`dump`'s sockets counted."""
        return Summary.from_states(self.dump(states, port, families), "procfs")

    def _filter(
        self,
        tables: list[tuple[int, str]],
        states: Collection[TcpState],
        port: int | None,
    ) -> Iterator[KernelState]:
        for family, text in tables:
            for entry in parse_tcp_table(
                text,
                path=self.path(family),
                family=family,
                byteorder=self.byteorder,
                clock_ticks=self.clock_ticks,
            ):
                if entry.state not in states:
                    continue
                if port is not None and not (
                    (entry.local is not None and entry.local[1] == port)
                    or (entry.peer is not None and entry.peer[1] == port)
                ):
                    continue
                yield entry
