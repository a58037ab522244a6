"""Gathering the facts the checks need: sysctls, kernel counters, the socket table,
one socket's options. All the I/O of warnings and audit lives here; the rules are in
``_checks.py``.

Every reader takes a ``root`` directory (default ``/``) and reads ``proc/...`` below it,
so tests and captured snapshots stand in for a live kernel. Whatever does not exist
(a sysctl another kernel lacks, ``/proc`` hidden in a container) or cannot be read or
parsed is *unknown* (``None``), never an exception: the checks over it stay silent.

The live socket table comes from the kernel view's ``dump()`` when ``root`` is ``/``
and the dump succeeds; otherwise from ``proc/net/tcp`` and ``tcp6`` under ``root``,
decoded by the kernel view's procfs parser. One socket is read through the kernel
view's ``borrow()``, which checks that it is TCP without taking ownership.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import sys
from collections.abc import Iterable
from pathlib import Path

from ._checks import (
    Counters,
    Finding,
    LingerUnit,
    SocketFacts,
    Sysctls,
    check_socket_facts,
    check_system,
    sort_findings,
    summarize_time_wait,
)
from ._errors import KernelViewError, NotTcpSocketError, TcpCloseError
from ._kernel import dump
from ._kernel._procfs import parse_tcp_table
from ._kernel._sockopt import SupportsFileno, borrow
from ._kernel._types import Address, KernelState, TcpState

__all__ = (
    "audit",
    "check_socket",
    "parse_netstat",
    "parse_sockstat",
    "read_counters",
    "read_socket_table",
    "read_sysctls",
    "socket_facts",
)

Root = str | os.PathLike[str]

_SYSCTL_DIR = Path("proc/sys/net/ipv4")

#: The procfs socket tables under ``root`` and the address family of each.
_PROC_TABLES = (("proc/net/tcp", socket.AF_INET), ("proc/net/tcp6", socket.AF_INET6))

#: macOS ``SO_LINGER_SEC`` (``sys/socket.h``): ``SO_LINGER`` counting seconds, not ticks.
_SO_LINGER_SEC_DARWIN = 0x1080

#: Ephemeral ranges of platforms without ``/proc/sys`` (their documented defaults),
#: used only to tell a port the program chose from one the kernel picked.
_DEFAULT_EPHEMERAL: dict[str, tuple[int, int]] = {
    "darwin": (49152, 65535),
    "win32": (49152, 65535),
}


def _read_text(root: Root, relative: str | Path) -> str | None:
    """The file's text, or ``None`` when it is missing or unreadable."""
    try:
        return (Path(root) / relative).read_text(encoding="ascii")
    except (OSError, UnicodeError):
        return None


# -- sysctls -----------------------------------------------------------------------------


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.strip())
    except ValueError:
        return None


def _port_range(text: str | None) -> tuple[int, int] | None:
    """``"32768\\t60999\\n"`` -> ``(32768, 60999)``."""
    if text is None:
        return None
    parts = text.split()
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1])


def _port_list(text: str | None) -> tuple[tuple[int, int], ...] | None:
    """``"8080,9000-9010\\n"`` -> ``((8080, 8080), (9000, 9010))``; empty -> ``()``."""
    if text is None:
        return None
    ranges: list[tuple[int, int]] = []
    for item in text.strip().split(","):
        item = item.strip()
        if not item:
            continue
        first, _, last = item.partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            return None
        ranges.append((int(first), int(last or first)))
    return tuple(ranges)


def read_sysctls(root: Root = "/") -> Sysctls:
    """Read the ``net.ipv4`` sysctls the checks use from ``root/proc/sys/net/ipv4``.

    A sysctl that is missing, unreadable or malformed is ``None`` (unknown).

    >>> read_sysctls("/nonexistent").tcp_tw_reuse is None
    True
    """

    def text(name: str) -> str | None:
        return _read_text(root, _SYSCTL_DIR / name)

    return Sysctls(
        ip_local_port_range=_port_range(text("ip_local_port_range")),
        ip_local_reserved_ports=_port_list(text("ip_local_reserved_ports")),
        tcp_tw_reuse=_int(text("tcp_tw_reuse")),
        tcp_timestamps=_int(text("tcp_timestamps")),
        tcp_tw_recycle=_int(text("tcp_tw_recycle")),
        tcp_max_tw_buckets=_int(text("tcp_max_tw_buckets")),
        tcp_max_orphans=_int(text("tcp_max_orphans")),
        tcp_rfc1337=_int(text("tcp_rfc1337")),
        tcp_fin_timeout=_int(text("tcp_fin_timeout")),
    )


# -- counters ----------------------------------------------------------------------------


def parse_sockstat(text: str) -> dict[str, dict[str, int]]:
    """Decode ``/proc/net/sockstat``: protocol -> field -> number.

    >>> parse_sockstat("sockets: used 13\\nTCP: inuse 1 orphan 0 tw 7 alloc 1 mem 0\\n")["TCP"]
    {'inuse': 1, 'orphan': 0, 'tw': 7, 'alloc': 1, 'mem': 0}

    Pairs that are not ``name number`` are skipped.
    """
    table: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        proto, sep, rest = line.partition(":")
        if not sep:
            continue
        words = rest.split()
        fields: dict[str, int] = {}
        for name, value in zip(words[::2], words[1::2], strict=False):
            if value.isdigit():
                fields[name] = int(value)
        table[proto.strip()] = fields
    return table


def parse_netstat(text: str) -> dict[str, dict[str, int]]:
    """Decode ``/proc/net/netstat`` (or ``snmp``): header/value line pairs per group.

    >>> parse_netstat("TcpExt: TW TCPTimeWaitOverflow\\nTcpExt: 9 3\\n")
    {'TcpExt': {'TW': 9, 'TCPTimeWaitOverflow': 3}}

    A group whose two lines do not match in length is skipped.
    """
    table: dict[str, dict[str, int]] = {}
    lines = [line.split() for line in text.splitlines() if line.strip()]
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if not names or names[0] != values[0] or len(names) != len(values):
            continue
        group = names[0].rstrip(":")
        fields: dict[str, int] = {}
        for name, value in zip(names[1:], values[1:], strict=True):
            with contextlib.suppress(ValueError):
                fields[name] = int(value)
        table[group] = fields
    return table


def read_counters(root: Root = "/") -> Counters:
    """TIME_WAIT and orphan counts (``proc/net/sockstat``) and ``TCPTimeWaitOverflow``
    (``proc/net/netstat``) under ``root``; ``None`` where unknown."""
    sockstat_text = _read_text(root, "proc/net/sockstat")
    netstat_text = _read_text(root, "proc/net/netstat")
    tcp = parse_sockstat(sockstat_text).get("TCP", {}) if sockstat_text else {}
    ext = parse_netstat(netstat_text).get("TcpExt", {}) if netstat_text else {}
    return Counters(
        time_wait=tcp.get("tw"),
        orphans=tcp.get("orphan"),
        time_wait_overflows=ext.get("TCPTimeWaitOverflow"),
    )


# -- the socket table --------------------------------------------------------------------


def read_socket_table(
    root: Root = "/",
    *,
    states: Iterable[TcpState] | None = None,
    port: int | None = None,
) -> list[KernelState] | None:
    """TCP sockets in ``states`` (all when ``None``) whose local or peer port is
    ``port`` (any when ``None``), or ``None`` when the table is unknown.

    With ``root="/"`` the kernel view's ``dump()`` answers (filtering in the kernel);
    otherwise, or when it fails, ``proc/net/tcp`` (IPv4) and ``proc/net/tcp6`` (IPv6)
    under ``root`` do. A table that does not decode makes the whole answer ``None``.
    """
    wanted = frozenset(states) if states is not None else None

    def keep(s: KernelState) -> bool:
        if wanted is not None and s.state not in wanted:
            return False
        if port is None:
            return True
        return (s.local is not None and s.local[1] == port) or (
            s.peer is not None and s.peer[1] == port
        )

    if Path(root) == Path("/"):
        try:
            return [s for s in dump(states=wanted, port=port) if keep(s)]
        except (OSError, ValueError, TcpCloseError, NotImplementedError):
            pass
    table: list[KernelState] = []
    found = False
    for name, family in _PROC_TABLES:
        text = _read_text(root, name)
        if text is None:
            continue
        found = True
        try:  # parse_tcp_table is lazy: errors surface while extending
            table.extend(
                s
                for s in parse_tcp_table(text, path=str(Path(root) / name), family=family)
                if keep(s)
            )
        except KernelViewError:
            return None
    return table if found else None


# -- audit -------------------------------------------------------------------------------


def _check_port(port: int | None) -> None:
    if port is None:
        return
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ValueError(f"expected a port from 1 to 65535, got {port!r}")


def audit(port: int | None = None, *, root: Root = "/") -> list[Finding]:
    """Check this host's sysctls, counters and live socket table for risky close and
    reuse settings; return the findings, most severe first.

    Args:
        port: look only at sockets with this local or remote port (a server's port,
            or a destination's). Host-wide sysctl and counter checks always run.
        root: read ``proc/...`` below this directory instead of ``/`` (tests,
            captured snapshots).

    Raises:
        ValueError: ``port`` is not a port number.

    Missing or unreadable facts are unknown and their checks stay silent; no check
    raises. Example::

        >>> import tcpclose
        >>> [f.code for f in tcpclose.audit(root="/nonexistent")]
        []
    """
    _check_port(port)
    sysctls = read_sysctls(root)
    counters = read_counters(root)
    time_wait = read_socket_table(root, states=(TcpState.TIME_WAIT,), port=port)
    listeners = read_socket_table(root, states=(TcpState.LISTEN,))
    summary = None
    if time_wait is not None:
        listening = {s.local[1] for s in listeners or () if s.local is not None}
        pairs = [(s.local, s.peer) for s in time_wait if s.local is not None and s.peer is not None]
        summary = summarize_time_wait(pairs, listening_ports=listening, sysctls=sysctls)
        if counters.time_wait is None and port is None:
            counters = Counters(
                time_wait=summary.total,
                orphans=counters.orphans,
                time_wait_overflows=counters.time_wait_overflows,
            )
    return check_system(sysctls, counters, summary)


# -- one socket --------------------------------------------------------------------------


def _unwrap(obj: object) -> tuple[SupportsFileno, bool]:
    """``obj`` as something to :func:`borrow`, and whether an event loop owns it.

    An asyncio transport or ``StreamWriter`` stands for its socket (event-loop
    owned); so does an object from asyncio's or uvloop's modules (``TransportSocket``).
    """
    event_loop = False
    get_extra_info = getattr(obj, "get_extra_info", None)
    if callable(get_extra_info):  # an asyncio transport or StreamWriter
        inner = get_extra_info("socket")
        if inner is None:
            raise NotTcpSocketError(
                f"expected a TCP socket, got {type(obj).__qualname__} without a socket"
            )
        obj, event_loop = inner, True
    # borrow() would also take a bare int fd; check_socket() keeps refusing one.
    if not isinstance(obj, SupportsFileno):
        raise NotTcpSocketError(
            f"expected a socket or an object with fileno(), got {type(obj).__qualname__} instead"
        )
    if not isinstance(obj, socket.socket):
        event_loop = event_loop or type(obj).__module__.startswith(("asyncio", "uvloop"))
    return obj, event_loop


def _nonblocking(obj: SupportsFileno, view: socket.socket, event_loop: bool) -> bool:
    """Whether ``obj`` is in non-blocking mode: always under an event loop; for a
    ``socket.socket`` its own mode (a timeout counts as blocking); otherwise
    ``O_NONBLOCK`` on the descriptor (``view`` is the borrowed socket)."""
    if event_loop:
        return True
    if isinstance(obj, socket.socket):
        return obj.gettimeout() == 0.0
    try:
        return not os.get_blocking(view.fileno())
    except (OSError, AttributeError):
        return False


def _flag(sock: socket.socket, name: str) -> bool | None:
    option = getattr(socket, name, None)
    if option is None:
        return None
    try:
        return sock.getsockopt(socket.SOL_SOCKET, option) != 0
    except OSError:
        return None


def _linger(sock: socket.socket, platform: str) -> tuple[bool, int, LingerUnit]:
    """``SO_LINGER`` as ``(on, time, unit)``; macOS is read in seconds through
    ``SO_LINGER_SEC`` when it can be, else in ticks."""
    fmt = "HH" if platform == "win32" else "ii"
    size = struct.calcsize(fmt)
    if platform == "darwin":
        with contextlib.suppress(OSError):
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_LINGER_SEC_DARWIN, size)
            on, time = struct.unpack(fmt, raw)
            return bool(on), int(time), "seconds"
    unit: LingerUnit = "ticks" if platform == "darwin" else "seconds"
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, size)
    except OSError:
        return False, 0, unit
    on, time = struct.unpack(fmt, raw)
    return bool(on), int(time), unit


def _address(raw: object) -> Address | None:
    if isinstance(raw, tuple) and len(raw) >= 2:
        host, port = raw[0], raw[1]
        if isinstance(host, str) and isinstance(port, int):
            return host, port
    return None


def socket_facts(sock: object, *, root: Root = "/") -> SocketFacts:
    """Gather what :func:`_checks.check_socket_facts` needs about one socket.

    ``sock`` may be a ``socket.socket``, an asyncio ``TransportSocket``, an asyncio
    transport or ``StreamWriter`` (its socket; counted as event-loop owned), or
    anything with ``fileno()`` that is a TCP socket. ``root`` is where the ephemeral
    port range and the socket table (to tell accepted sockets) are read.

    Raises:
        NotTcpSocketError: not a TCP socket (a ``TypeError``).
        ValueError: the socket is closed.
    """
    platform = sys.platform
    target, event_loop = _unwrap(sock)
    with borrow(target) as s:
        nonblocking = _nonblocking(target, s, event_loop)
        on, time, unit = _linger(s, platform)
        local = None
        with contextlib.suppress(OSError):
            local = _address(s.getsockname())
        peer = None
        with contextlib.suppress(OSError):
            peer = _address(s.getpeername())
        listening = bool(_flag(s, "SO_ACCEPTCONN"))
        reuseaddr = _flag(s, "SO_REUSEADDR")
        reuseport = _flag(s, "SO_REUSEPORT")
        exclusive = _flag(s, "SO_EXCLUSIVEADDRUSE")
    local_port = local[1] if local else 0
    port_chosen: bool | None = None
    listener_on_port: bool | None = None
    if local_port and peer is not None and not listening:
        sysctls = read_sysctls(root)
        if sysctls.ip_local_port_range is None and platform in _DEFAULT_EPHEMERAL:
            sysctls = Sysctls(ip_local_port_range=_DEFAULT_EPHEMERAL[platform])
        ephemeral = sysctls.is_ephemeral(local_port)
        port_chosen = None if ephemeral is None else not ephemeral
        if port_chosen:
            table = read_socket_table(root, states=(TcpState.LISTEN,))
            if table is not None:
                listener_on_port = any(
                    st.local is not None and st.local[1] == local_port for st in table
                )
    return SocketFacts(
        platform=platform,
        listening=listening,
        local_port=local_port,
        peer=peer,
        nonblocking=nonblocking,
        event_loop=event_loop,
        linger_on=on,
        linger_time=time,
        linger_unit=unit,
        reuseaddr=reuseaddr,
        reuseport=reuseport,
        exclusiveaddruse=exclusive,
        port_chosen=port_chosen,
        listener_on_port=listener_on_port,
    )


def check_socket(sock: object, *, root: Root = "/") -> list[Finding]:
    """Check one socket's options for a blocking close or unsafe reuse; return the
    findings, most severe first.

    Looks at ``SO_LINGER`` with the blocking mode (TC201), a client bound to a port it
    chose with or without ``SO_REUSEADDR`` (TC301, TC302), ``SO_REUSEPORT`` on a
    listener (TC310) and Windows ``SO_REUSEADDR`` (TC311). The socket is not changed.

    Args:
        sock: a ``socket.socket``, an asyncio ``TransportSocket``, transport or
            ``StreamWriter``, or anything with ``fileno()`` that is a TCP socket.
        root: where ``proc/...`` is read (the ephemeral range, the listener table).

    Raises:
        NotTcpSocketError: not a TCP socket (a ``TypeError``).
        ValueError: the socket is closed.

    Example::

        >>> import socket, struct, tcpclose
        >>> s = socket.socket()
        >>> s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 5))
        >>> s.setblocking(False)
        >>> [f.code for f in tcpclose.check_socket(s)]
        ['TC201']
        >>> s.close()
    """
    return sort_findings(check_socket_facts(socket_facts(sock, root=root)))
