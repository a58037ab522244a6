"""What both drivers measure around a close, for the report and the warnings.

The socket has been verified as TCP by the driver before a watch is made, so the
watch uses the kernel view's unchecked ``read_*`` primitives. A :class:`Watch` is
made when a close starts and asked at fixed points: before an
abort (what will be discarded), before the fd is closed (TCP_INFO, unread bytes),
after (the 4-tuple's kernel state, looked up by cookie so that a listener or a
reused 4-tuple is never mistaken for our connection). With ``report=False`` it
measures only what a warning or the plan needs.

Warnings found here are collected, not issued: the public entry point issues them
once the close is over, so that they point at the caller's line and a warnings
filter set to "error" cannot interrupt a close half way.
"""

from __future__ import annotations

import errno
import logging
import socket
import ssl
import struct
from collections.abc import Callable
from typing import Final, Protocol

from . import _checks, _findings, _kernel
from ._findings import warn
from ._kernel._address import format_address
from ._kernel._sockopt import (
    read_cookie,
    read_outgoing,
    read_tcp_info_bytes,
    read_tcp_state,
    read_unread,
)
from ._kernel._types import Address, KernelState, TcpState
from ._policy import CloseMode
from ._report import Observed, new_observed

__all__ = ("SocketLike", "Watch", "emit_findings")

_log = logging.getLogger("tcpclose")

_LINGER = struct.Struct("ii")  # struct linger {int l_onoff; int l_linger;}
#: (Bound once: on Python 3.11 an enum member read from its class costs about 960
#: instructions, a module global 50; callgrind.)
_MODE_DEFAULT: Final = CloseMode.DEFAULT
#: From ``struct tcp_info`` (linux/tcp.h), read without decoding the rest:
#: tcpi_last_data_sent (ms, offset 44), tcpi_last_data_recv (ms, 52), tcpi_rtt (us,
#: 68), and tcpi_min_rtt (us, offset 148, Linux 4.10 and later).
_SENT_VIEW = struct.Struct("=I4xI12xI")
_SENT_VIEW_OFFSET = 44
_MIN_RTT = struct.Struct("=I")
_MIN_RTT_OFFSET = 148


class SocketLike(Protocol):
    """The part of a socket the watch needs (``socket.socket``, ``TransportSocket``,
    uvloop's pseudo-socket)."""

    def fileno(self) -> int: ...
    def getsockname(self) -> object: ...
    def getpeername(self) -> object: ...
    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...


class Watch:
    """Measurements around one close. See the module docstring."""

    __slots__ = (
        "_cookie",
        "_report",
        "_sock",
        "discarded_bytes",
        "error",
        "findings",
        "local",
        "peer",
        "peer_fin_first",
        "tcp_info_bytes",
        "unread_bytes",
    )

    def __init__(
        self,
        sock: SocketLike,
        *,
        report: bool,
        peer_fin: bool | None = None,
        extra_info: Callable[[str], object] | None = None,
    ) -> None:
        """``extra_info``: an event loop transport's ``get_extra_info``, asked for the
        two addresses first (asyncio's transport recorded them: no system call); the
        socket is asked for either it has not."""
        self._sock = sock
        self._report = report
        self.local: Address | None = None
        self.peer: Address | None = None
        self._cookie: int | None = None
        #: TCP_INFO as read before the close (the report decodes it when asked).
        self.tcp_info_bytes: bytes | None = None
        self.unread_bytes: int | None = None
        self.discarded_bytes = 0
        self.error: str | None = None
        self.findings: list[_findings.Finding] = []
        #: The peer's FIN had arrived before the close began (the socket was in
        #: CLOSE_WAIT): we are the passive closer. Only measured with reports on.
        self.peer_fin_first = False
        if report:
            self.local, self.peer = _addresses(sock, extra_info)
            self._cookie = read_cookie(sock)
            # An event loop's protocol knows whether the peer's FIN has arrived
            # (``peer_fin``); otherwise the kernel says: CLOSE_WAIT.
            if peer_fin is None:
                peer_fin = read_tcp_state(sock) is TcpState.CLOSE_WAIT
            self.peer_fin_first = peer_fin

    @property
    def label(self) -> str:
        """``local->peer`` for the debug log; empty when the log does not show it (not
        formatted on every close otherwise) or the addresses are unknown. Made when
        read: a close that keeps to its expected course never reads it."""
        if self.local and self.peer and _log.isEnabledFor(logging.DEBUG):
            return f"{format_address(self.local)}->{format_address(self.peer)}"
        return ""

    def check_linger(self, *, nonblocking: bool, event_loop: bool = False) -> bool:
        """Whether ``SO_LINGER`` is on with a non-zero time (``close()`` may then wait up
        to that time, whatever ``O_NONBLOCK`` says); the caller may turn it off. Records
        TC201 when the socket must not block (non-blocking, or an event loop's)."""
        try:
            raw = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER.size)
            on, seconds = _LINGER.unpack(raw)
        except (OSError, ValueError, TypeError, struct.error):
            # (uvloop's pseudo-socket and closed sockets: nothing to check)
            return False
        if not on or not seconds:
            return False  # the usual case, decided here: this runs on every close
        finding = _checks.blocking_linger(
            linger_on=bool(on), linger_time=seconds, nonblocking=nonblocking, event_loop=event_loop
        )
        if finding is not None:
            self.findings.append(finding)
        return True

    def outgoing(self) -> int | None:
        """Bytes of ours not yet acknowledged (SIOCOUTQ), or None if unknown."""
        try:
            return read_outgoing(self._sock.fileno())
        except (OSError, ValueError):
            return None

    def acked(self) -> tuple[int, float, float, float] | None:
        """See :func:`read_acked`."""
        return read_acked(self._sock)

    def unread(self) -> int:
        """Bytes received and not yet read (SIOCINQ); 0 when that cannot be asked."""
        try:
            return read_unread(self._sock.fileno())
        except (OSError, ValueError):
            return 0

    def before_abort(self, *, allow_data_loss: bool, buffered: int = 0) -> None:
        """Measure what an abort will discard: the kernel's send queue plus
        ``buffered`` bytes still in a transport's buffer."""
        outgoing = self.outgoing() or 0
        self.discarded_bytes = outgoing + buffered
        if not allow_data_loss:
            finding = _checks.abort_discards(self.discarded_bytes)
            if finding is not None:
                self.findings.append(finding)

    def reset_received(self) -> bool:
        """The kernel's TCP state is CLOSE: the peer's RST arrived (a FIN leaves
        CLOSE_WAIT, LAST_ACK, CLOSING or TIME_WAIT). From TCP_INFO as read before the
        close when there is one, else asked now; False when it cannot be known."""
        info = self.tcp_info_bytes
        if not info:
            try:
                info = read_tcp_info_bytes(self._sock)
            except (OSError, ValueError, TypeError):
                return False
        return info is not None and len(info) > 0 and info[0] == TcpState.CLOSE

    def before_close(self, mode: CloseMode, *, unread: int | None = None) -> None:
        """Measure just before the fd goes: unread bytes (always: a plain close with
        unread bytes sends RST, which ``rst_sent`` reports even with reports off) and
        TCP_INFO (reports only). ``unread``: the driver knows it already (0 once the
        peer's FIN was read), so the kernel need not be asked."""
        if unread is None:
            try:
                unread = read_unread(self._sock.fileno())
            except (OSError, ValueError):
                unread = None
        self.unread_bytes = unread
        if mode is _MODE_DEFAULT and self.unread_bytes:
            finding = _checks.close_with_unread(self.unread_bytes)
            if finding is not None:
                self.findings.append(finding)
        if self._report:
            try:
                self.tcp_info_bytes = read_tcp_info_bytes(self._sock)
            except (OSError, ValueError):
                self.tcp_info_bytes = None

    def after_close(self) -> KernelState | None:
        """The 4-tuple's kernel state now (None with reports off or no addresses)."""
        if not self._report or self.local is None or self.peer is None:
            return None
        return _kernel.lookup(self.local, self.peer, cookie=self._cookie)

    def observed(self, *, trigger: str, kernel_state: KernelState | None) -> Observed:
        return new_observed(
            self.local,
            self.peer,
            self.tcp_info_bytes,
            self.unread_bytes,
            self.discarded_bytes,
            kernel_state,
            tuple(f.code for f in self.findings) if self.findings else (),
            self.error,
            trigger,
        )


def read_acked(sock: SocketLike) -> tuple[int, float, float, float] | None:
    """For ``peer-first``: our bytes not yet acknowledged (SIOCOUTQ), the round
    trip (TCP_INFO's lowest RTT seen, which a peer's delayed ACKs do not inflate;
    the smoothed RTT on kernels without it), the seconds since our last data
    segment left and since the peer's last data arrived; None when the kernel
    cannot tell."""
    try:
        outgoing = read_outgoing(sock.fileno())
        raw = read_tcp_info_bytes(sock)
    except (OSError, ValueError, TypeError):
        return None
    if raw is None:
        return None
    since_sent_ms, since_recv_ms, rtt_us = _SENT_VIEW.unpack_from(raw, _SENT_VIEW_OFFSET)
    if len(raw) >= _MIN_RTT_OFFSET + _MIN_RTT.size:
        (min_rtt_us,) = _MIN_RTT.unpack_from(raw, _MIN_RTT_OFFSET)
        if 0 < min_rtt_us < 0xFFFFFFFF:  # (~0U: no sample yet)
            rtt_us = min_rtt_us
    return outgoing, rtt_us / 1e6, since_sent_ms / 1e3, since_recv_ms / 1e3


def emit_findings(findings: list[_findings.Finding], *, stacklevel: int) -> None:
    """Issue the collected warnings; ``stacklevel`` as for :func:`warnings.warn`
    counted from the caller of this function."""
    for finding in findings:
        warn(finding, stacklevel=stacklevel + 1)


def errno_name(exc: OSError) -> str:
    """``"ECONNRESET"`` for an OSError, or its text when it has no errno. A TLS error's
    errno is an OpenSSL code, not the system's: its reason, e.g.
    ``"SSLError: APPLICATION_DATA_AFTER_CLOSE_NOTIFY"``."""
    if isinstance(exc, ssl.SSLError):
        return f"{type(exc).__name__}: {exc.reason or exc}"
    return errno.errorcode.get(exc.errno or 0, str(exc))


def _addresses(
    sock: SocketLike, extra_info: Callable[[str], object] | None
) -> tuple[Address | None, Address | None]:
    """Our address and the peer's as ``(host, port)``: from ``extra_info`` when it has
    them, else as the socket answers now (None when it cannot)."""
    try:
        local = (extra_info and extra_info("sockname")) or sock.getsockname()
    except OSError:
        local = None
    try:
        peer = (extra_info and extra_info("peername")) or sock.getpeername()
    except OSError:
        peer = None
    # (host, port) of an IPv4 pair or an IPv6 quadruple; written out twice rather than
    # called twice: a Python call costs about 850 instructions (Python 3.11).
    ours = (str(local[0]), int(local[1])) if isinstance(local, tuple) and len(local) >= 2 else None
    theirs = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else None
    return ours, theirs
