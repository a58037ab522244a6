"""What asyncio's and uvloop's transports look like to the driver, and the ways into
them that neither documents.

* :class:`_TransportLike`: the transport surface the driver uses (uvloop's transports
  do not subclass ``asyncio.Transport``).
* :func:`socket_view`: what socket options go through, one per connection (a view
  of uvloop's pseudo-socket, which makes a socket object per call).
* The TCP transport under a TLS transport (:func:`_tcp_transport_under`) and under TLS
  handshakes (:func:`_transports_in_handshake`): CPython names it, uvloop keeps it in
  C-level fields that only ``gc.get_referents`` reaches.

Nothing here knows the close plan or the wrapper protocol.
"""

from __future__ import annotations

import _socket
import asyncio
import contextlib
import gc
import socket
from collections.abc import Sequence
from typing import Any, Final, Protocol, cast


class _TransportLike(Protocol):
    """The transport surface the driver uses (asyncio's and uvloop's transports;
    uvloop's do not subclass ``asyncio.Transport``)."""

    def get_extra_info(self, name: str, default: Any = None) -> Any: ...
    def is_closing(self) -> bool: ...
    def close(self) -> None: ...
    def abort(self) -> None: ...
    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None: ...
    def get_protocol(self) -> asyncio.BaseProtocol: ...
    def get_write_buffer_size(self) -> int: ...
    def write(self, data: bytes | bytearray | memoryview) -> None: ...
    def write_eof(self) -> None: ...
    def can_write_eof(self) -> bool: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...
    def is_reading(self) -> bool: ...


def _tcp_transport_under(tls: _TransportLike) -> _TransportLike | None:
    """The TCP transport a TLS transport writes to, or None.

    CPython's TLS transport names it (``_ssl_protocol._transport``). uvloop's keeps it
    in C-level fields of its TLS protocol object, which the garbage collector's
    ``get_referents`` reaches: it is the referent that can write an EOF (the TLS
    transport itself cannot) over the same socket (not, say, the application's
    protocol, which is a referent too).
    """
    raw = getattr(getattr(tls, "_ssl_protocol", None), "_transport", None)
    if raw is not None:
        return cast(_TransportLike, raw) if hasattr(raw, "write_eof") else None
    try:
        fd = tls.get_extra_info("socket").fileno()
    except Exception:  # no socket (closed): nothing to find
        return None
    for tls_protocol in gc.get_referents(tls):
        if type(tls_protocol).__name__ != "SSLProtocol":
            continue
        for candidate in gc.get_referents(tls_protocol):
            if candidate is tls or not callable(getattr(candidate, "write_eof", None)):
                continue
            with contextlib.suppress(Exception):
                if candidate.can_write_eof() and candidate.get_extra_info("socket").fileno() == fd:
                    return cast(_TransportLike, candidate)
    return None


def _transports_in_handshake(conns: Sequence[object]) -> list[asyncio.Transport]:
    """The TCP transports under TLS handshakes whose application protocols are
    ``conns``. Neither CPython's nor uvloop's TLS layer lets a protocol reach it before
    the handshake is over; the TLS protocol object that holds ours also holds the TCP
    transport (CPython names it ``_transport``; uvloop keeps it in a C-level field,
    which ``gc.get_referents`` reaches). One ``gc.get_referrers`` pass, at shutdown only.
    """
    if not conns:
        return []
    found: list[asyncio.Transport] = []
    ours = {id(conn) for conn in conns}
    holders = gc.get_referrers(*conns)
    # (CPython's SSLProtocol keeps ours in its instance dict: the dict refers to ours.)
    dicts = [h for h in holders if type(h) is dict]
    if dicts:
        holders += gc.get_referrers(*dicts)
    for holder in holders:
        if type(holder).__name__ != "SSLProtocol":
            continue
        raw = getattr(holder, "_transport", None)
        candidates = [raw] if raw is not None else gc.get_referents(holder)
        for candidate in candidates:
            if (
                candidate is not None
                and id(candidate) not in ours  # (the application protocol)
                and callable(getattr(candidate, "abort", None))
                and callable(getattr(candidate, "get_extra_info", None))
            ):
                found.append(cast(asyncio.Transport, candidate))
                break
    return found


_AF_INET: Final = int(socket.AF_INET)
_SOCK_STREAM: Final = int(socket.SOCK_STREAM)


class _DetachingSocket(_socket.socket):
    """A ``socket`` object over a descriptor it does not own: never closes it (its
    finalizer detaches instead)."""

    __slots__ = ()

    def __del__(self) -> None:
        self.detach()


class _SocketView:
    """One connection's view of a uvloop transport's socket, for socket options.

    uvloop's pseudo-socket makes a ``socket`` object for each ``getsockopt`` or
    ``setsockopt`` (about 5 us a call, against 1 us on a socket object): this view
    makes one when first asked and keeps it. Each call first asks the pseudo-socket
    for the descriptor, which it answers -1 once the transport has closed it; the view
    then raises ``ValueError`` as the pseudo-socket does, never touching a descriptor
    number that may already belong to another connection.
    """

    __slots__ = ("_pseudo", "_sock")

    def __init__(self, pseudo: Any) -> None:
        self._pseudo = pseudo
        self._sock: _DetachingSocket | None = None

    def _live(self) -> _DetachingSocket:
        """The socket object over the pseudo-socket's descriptor (made now if there is
        none, or if the descriptor changed); ``ValueError`` once it is closed."""
        fd = self._pseudo.fileno()
        sock = self._sock
        if sock is not None and sock.fileno() == fd:
            return sock
        if fd < 0:
            raise ValueError("negative file descriptor")
        # Family, type and protocol given: the socket object asks the kernel nothing.
        # Always AF_INET/SOCK_STREAM: only getsockopt and setsockopt go through it,
        # which take the descriptor alone (never an address: getsockname and
        # getpeername are the pseudo-socket's). Reading the pseudo-socket's own
        # ``family`` and ``type`` made two enum members, 5,000 instructions on Python
        # 3.11 per connection (callgrind).
        sock = self._sock = _DetachingSocket(_AF_INET, _SOCK_STREAM, 0, fd)
        return sock

    def fileno(self) -> int:
        return int(self._pseudo.fileno())

    # (getsockopt and setsockopt make _live's check themselves, calling it only when
    # the socket object is missing or stale: a Python call less per option, about 850
    # instructions on Python 3.11.)

    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes:
        sock = self._sock
        if sock is None or sock.fileno() != self._pseudo.fileno():
            sock = self._live()
        return sock.getsockopt(level, option, buflen)

    def setsockopt(self, level: int, option: int, value: bytes, /) -> None:
        sock = self._sock
        if sock is None or sock.fileno() != self._pseudo.fileno():
            sock = self._live()
        sock.setsockopt(level, option, value)

    def getsockname(self) -> object:
        return self._pseudo.getsockname()

    def getpeername(self) -> object:
        return self._pseudo.getpeername()


def socket_view(sock: Any) -> Any:
    """What socket options and ioctls of a transport's socket go through: the socket
    object inside asyncio's ``TransportSocket`` (whose methods are Python wrappers
    around it), a :class:`_SocketView` of uvloop's pseudo-socket, else ``sock``."""
    inner = getattr(sock, "_sock", None)
    if isinstance(inner, socket.socket):
        return inner
    if type(sock).__name__ == "PseudoSocket":
        return _SocketView(sock)
    return sock
