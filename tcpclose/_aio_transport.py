"""What asyncio's and uvloop's transports look like to the driver, and the ways into
them that neither documents.

* :class:`_TransportLike`: the transport surface the driver uses (uvloop's transports
  do not subclass ``asyncio.Transport``).
* :class:`_Addressed`: a transport's socket answering ``getsockname``/``getpeername``
  from what the transport recorded.
* The TCP transport under a TLS transport (:func:`_tcp_transport_under`) and under TLS
  handshakes (:func:`_transports_in_handshake`): CPython names it, uvloop keeps it in
  C-level fields that only ``gc.get_referents`` reaches.

Nothing here knows the close plan or the wrapper protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Sequence
from typing import Any, Protocol, cast


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


class _Addressed:
    """The transport's socket, answering getsockname/getpeername from what the
    transport recorded when it was made (saves two syscalls per reported close)."""

    __slots__ = ("_sock", "_transport")

    def __init__(self, transport: _TransportLike, sock: Any) -> None:
        self._transport = transport
        self._sock = sock

    def fileno(self) -> int:
        return int(self._sock.fileno())

    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes:
        return cast(bytes, self._sock.getsockopt(level, option, buflen))

    def getsockname(self) -> object:
        return self._transport.get_extra_info("sockname") or self._sock.getsockname()

    def getpeername(self) -> object:
        return self._transport.get_extra_info("peername") or self._sock.getpeername()


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
