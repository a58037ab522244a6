"""Gathering the facts the checks need: sysctls, kernel counters, the socket table,
one socket's options, the TIME_WAIT table's fill for a report. All the I/O of warnings
and audit lives here; the fact records are in ``_facts.py``, the rules in ``_checks.py``.

Every reader takes a ``root`` directory (default ``/``) and reads ``proc/...`` below it,
so tests and captured snapshots stand in for a live kernel. Whatever does not exist
(a sysctl another kernel lacks, ``/proc`` hidden in a container) or cannot be read or
parsed is *unknown* (``None``), never an exception: the checks over it stay silent.
Files are read as regular files only, without blocking and up to a size limit, and
decoded by the kernel view's decoders (``_kernel/_proctext.py`` for sockstat, netstat
and sysctl values); :func:`audit` reports each file that exists but could not be used
as a TC313 finding.

The live socket table comes from the kernel view's ``dump()`` when ``root`` is ``/``
and the dump succeeds; otherwise from ``proc/net/tcp`` and ``tcp6`` under ``root``,
decoded by the kernel view's procfs parser. One socket is read through the kernel
view's ``borrow()``, which checks that it is TCP without taking ownership.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import struct
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

from ._checks import check_socket_facts, check_system, unreadable_input
from ._errors import KernelViewError, NotTcpSocketError, TcpCloseError
from ._facts import Counters, LingerUnit, SocketFacts, Sysctls, summarize_time_wait
from ._findings import Finding, sort_findings
from ._kernel import dump
from ._kernel._procfs import parse_tcp_table
from ._kernel._proctext import (
    netstat_field,
    parse_int,
    parse_netstat,
    parse_port_list,
    parse_port_range,
    parse_sockstat,
)
from ._kernel._sockopt import SupportsFileno, borrow
from ._kernel._types import Address, KernelState, TcpState

__all__ = (
    "audit",
    "check_socket",
    "read_counters",
    "read_socket_table",
    "read_sysctls",
    "socket_facts",
    "time_wait_table_overflowed",
)

Root = str | os.PathLike[str]

_T = TypeVar("_T")

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


#: Largest file read: a sysctl or counter file is a line or two, a socket table about
#: 150 bytes per socket (32 MiB is some 200,000 sockets). Past it a file is a problem.
_SMALL_FILE_LIMIT = 64 * 1024
_TABLE_FILE_LIMIT = 32 * 1024 * 1024


class _Reader:
    """Reads files below ``root`` with a size limit, regular files only, never blocking.

    A file that does not exist is unknown (``None``), silently: another kernel lacks
    that sysctl, a container hides ``/proc``. A file that exists but cannot be used --
    not a regular file (a FIFO, ``/dev/zero`` behind a symlink), too large, unreadable,
    not ASCII, malformed -- is also ``None``, and is noted in :attr:`problems` as
    ``(path, reason)`` so that :func:`audit` can report it (TC313).
    """

    def __init__(self, root: Root) -> None:
        self.root = Path(root)
        self.problems: list[tuple[str, str]] = []

    def note(self, relative: str | Path, reason: str) -> None:
        self.problems.append((str(self.root / relative), reason))

    def text(self, relative: str | Path, limit: int = _SMALL_FILE_LIMIT) -> str | None:
        path = self.root / relative
        try:
            # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            self.note(relative, f"cannot open: {exc.strerror or exc}")
            return None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                self.note(relative, "not a regular file")
                return None
            chunks: list[bytes] = []
            size = 0
            while size <= limit:  # procfs files say size 0: read until EOF or the limit
                chunk = os.read(fd, min(1 << 20, limit + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
            if size > limit:
                self.note(relative, f"larger than {limit} bytes, not read")
                return None
            return b"".join(chunks).decode("ascii")
        except UnicodeError:
            self.note(relative, "not ASCII text")
            return None
        except OSError as exc:
            self.note(relative, f"cannot read: {exc.strerror or exc}")
            return None
        finally:
            os.close(fd)

    def sysctl(self, name: str, parse: Callable[[str], _T | None]) -> _T | None:
        """The sysctl ``name`` parsed, ``None`` when missing or malformed (noted)."""
        relative = _SYSCTL_DIR / name
        text = self.text(relative)
        if text is None:
            return None
        value = parse(text)
        if value is None:
            self.note(relative, f"malformed value {_excerpt(text)}")
        return value


def _excerpt(text: str, width: int = 24) -> str:
    """``text`` stripped, cut to ``width`` characters, quoted."""
    text = text.strip()
    return repr(text if len(text) <= width else text[:width] + "...")


def _read_text(root: Root, relative: str | Path) -> str | None:
    """The file's text, or ``None`` when it is missing, unusable or too large."""
    return _Reader(root).text(relative)


# -- sysctls -----------------------------------------------------------------------------


def read_sysctls(root: Root = "/") -> Sysctls:
    """Read the ``net.ipv4`` sysctls the checks use from ``root/proc/sys/net/ipv4``.

    A sysctl that is missing, unreadable or malformed is ``None`` (unknown).

    >>> read_sysctls("/nonexistent").tcp_tw_reuse is None
    True
    """

    return _read_sysctls(_Reader(root))


def _read_sysctls(reader: _Reader) -> Sysctls:
    return Sysctls(
        ip_local_port_range=reader.sysctl("ip_local_port_range", parse_port_range),
        ip_local_reserved_ports=reader.sysctl("ip_local_reserved_ports", parse_port_list),
        tcp_tw_reuse=reader.sysctl("tcp_tw_reuse", parse_int),
        tcp_timestamps=reader.sysctl("tcp_timestamps", parse_int),
        tcp_tw_recycle=reader.sysctl("tcp_tw_recycle", parse_int),
        tcp_max_tw_buckets=reader.sysctl("tcp_max_tw_buckets", parse_int),
        tcp_max_orphans=reader.sysctl("tcp_max_orphans", parse_int),
        tcp_rfc1337=reader.sysctl("tcp_rfc1337", parse_int),
        tcp_fin_timeout=reader.sysctl("tcp_fin_timeout", parse_int),
    )


# -- counters ----------------------------------------------------------------------------


def read_counters(root: Root = "/") -> Counters:
    """TIME_WAIT and orphan counts (``proc/net/sockstat``) and ``TCPTimeWaitOverflow``
    (``proc/net/netstat``) under ``root``; ``None`` where unknown."""
    return _read_counters(_Reader(root))


def _read_counters(reader: _Reader) -> Counters:
    sockstat_text = reader.text("proc/net/sockstat")
    netstat_text = reader.text("proc/net/netstat")
    tcp = parse_sockstat(sockstat_text).get("TCP", {}) if sockstat_text else {}
    ext = parse_netstat(netstat_text).get("TcpExt", {}) if netstat_text else {}
    return Counters(
        time_wait=tcp.get("tw"),
        orphans=tcp.get("orphan"),
        time_wait_overflows=ext.get("TCPTimeWaitOverflow"),
    )


# -- the TIME_WAIT table, for one close ------------------------------------------------

#: ``TCPTimeWaitOverflow`` at the last look (:func:`time_wait_table_overflowed`).
_last_overflows: list[int | None] = [None]


def time_wait_table_overflowed(root: Root = "/") -> bool:
    """Whether the kernel's TIME_WAIT table is full or has just overflowed, for a close
    whose TIME_WAIT is missing: ``TCPTimeWaitOverflow`` (``proc/net/netstat``) rose
    since the last call, or the TIME_WAIT count (``proc/net/sockstat``) has reached
    ``net.ipv4.tcp_max_tw_buckets``. Both are per network namespace: ``/proc/net`` is
    the calling thread's. False when they cannot be read.

    Reads three small files (tens of microseconds): the report asks only when it finds
    CLOSED where TIME_WAIT was due.
    """
    reader = _Reader(root)
    # (one counter of each file, not the whole of netstat: this runs on the close path,
    # 208 -> 92 us measured)
    netstat_text = reader.text("proc/net/netstat")
    overflows = (
        netstat_field(netstat_text, "TcpExt", "TCPTimeWaitOverflow") if netstat_text else None
    )
    previous, _last_overflows[0] = _last_overflows[0], overflows
    if overflows is not None and previous is not None and overflows > previous:
        return True
    sockstat_text = reader.text("proc/net/sockstat")
    time_wait = parse_sockstat(sockstat_text).get("TCP", {}).get("tw") if sockstat_text else None
    limit = reader.sysctl("tcp_max_tw_buckets", parse_int)
    return time_wait is not None and limit is not None and time_wait >= limit


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
    return _read_socket_table(_Reader(root), states=states, port=port)


def _read_socket_table(
    reader: _Reader,
    *,
    states: Iterable[TcpState] | None = None,
    port: int | None = None,
) -> list[KernelState] | None:
    wanted = frozenset(states) if states is not None else None

    def keep(s: KernelState) -> bool:
        if wanted is not None and s.state not in wanted:
            return False
        if port is None:
            return True
        return (s.local is not None and s.local[1] == port) or (
            s.peer is not None and s.peer[1] == port
        )

    if reader.root == Path("/"):
        try:
            return [s for s in dump(states=wanted, port=port) if keep(s)]
        except (OSError, ValueError, TcpCloseError, NotImplementedError):
            pass
    table: list[KernelState] = []
    found = False
    for name, family in _PROC_TABLES:
        text = reader.text(name, _TABLE_FILE_LIMIT)
        if text is None:
            continue
        found = True
        try:  # parse_tcp_table is lazy: errors surface while extending
            table.extend(
                s
                for s in parse_tcp_table(text, path=str(reader.root / name), family=family)
                if keep(s)
            )
        except KernelViewError as exc:
            reader.note(name, f"malformed table: {exc}")
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

    Missing facts are unknown and their checks stay silent. A file that exists but
    cannot be used (not a regular file, larger than its limit, unreadable, malformed)
    is one TC313 finding and its checks stay silent too; no check raises. Example::

        >>> import tcpclose
        >>> [f.code for f in tcpclose.audit(root="/nonexistent")]
        []
    """
    _check_port(port)
    reader = _Reader(root)
    sysctls = _read_sysctls(reader)
    counters = _read_counters(reader)
    time_wait = _read_socket_table(reader, states=(TcpState.TIME_WAIT,), port=port)
    listeners = _read_socket_table(reader, states=(TcpState.LISTEN,))
    summary = None
    if time_wait is not None:
        listening = {s.local[1] for s in listeners or () if s.local is not None}
        summary = summarize_time_wait(time_wait, listening_ports=listening, sysctls=sysctls)
        if counters.time_wait is None and port is None:
            counters = Counters(
                time_wait=summary.total,
                orphans=counters.orphans,
                time_wait_overflows=counters.time_wait_overflows,
            )
    problems = dict(reader.problems)  # a table read twice is one finding
    found = check_system(sysctls, counters, summary)
    return sort_findings([*found, *(unreadable_input(p, r) for p, r in problems.items())])


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
