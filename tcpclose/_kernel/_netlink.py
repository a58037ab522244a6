"""TCP sockets over ``NETLINK_SOCK_DIAG``: the I/O and the backend. The bytes are built
and read by the codec, ``_diag``.

Two pieces of I/O: :class:`NetlinkChannel` (one socket reused for exact lookups; one
per thread, see :func:`channel`) and :func:`dump_chunks` (a fresh socket per dump,
closed before the results are decoded, so an abandoned iterator holds no file
descriptor).

Facts the I/O relies on, checked on Linux 6.18 (tests keep checking them):

* An exact request is answered by one datagram (see ``_diag``).
* A request the kernel cannot parse gets no answer at all, so the socket has
  ``SO_RCVTIMEO`` set; a late or stray reply is recognised by its sequence number.
* The kernel fills a dump datagram up to 32 KiB.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Final

from tcpclose._errors import KernelViewError

from ._address import RawFourTuple
from ._diag import (
    INET_DIAG_REQUEST,
    INFO_EXTENSION,
    NETLINK_SOCK_DIAG,
    NLMSG_DONE,
    NLMSG_HDRLEN,
    NLMSG_LEN_AND_TYPE,
    NLMSG_SEQ,
    SOCK_DIAG_BY_FAMILY,
    KernelErrorReply,
    count_dump,
    decode_dump,
    decode_dump_info,
    decode_reply,
    encode_dump_request,
    lookup_answer,
    lookup_request,
    port_filter_bytecode,
    reply_seq,
    scan_dump_chunk,
    states_mask,
)
from ._summary import Summary
from ._types import KernelState, TcpState

__all__ = (
    "NetlinkBackend",
    "NetlinkChannel",
    "channel",
    "dump_chunks",
    "probe",
    "reset_channel",
)

log = logging.getLogger("tcpclose.kernel")

_AF_INET: Final = int(socket.AF_INET)
_UNKNOWN: Final = KernelState(TcpState.UNKNOWN, "netlink")


# -- I/O ------------------------------------------------------------------------------------

#: How long one receive may wait for the kernel (``SO_RCVTIMEO``), seconds.
RECEIVE_TIMEOUT: Final = 1.0
#: Stale replies (from earlier timed-out requests) skipped before giving up.
_MAX_STALE_REPLIES: Final = 16
#: Receive buffer of a lookup: a reply is ~100-200 bytes.
_LOOKUP_BUFFER: Final = 8192
#: Receive size for dump datagrams (the kernel fills at most 32 KiB per datagram).
_DUMP_BUFFER: Final = 65536


def _open_socket(timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG)
    try:
        seconds = int(timeout)
        micros = int((timeout - seconds) * 1_000_000)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", seconds, micros))
    except BaseException:
        sock.close()
        raise
    return sock


class NetlinkChannel:
    """One ``NETLINK_SOCK_DIAG`` socket and its reusable buffers, for exact lookups.

    Not thread-safe: use one per thread (:func:`channel`). The socket is blocking with
    ``SO_RCVTIMEO`` (no ``poll`` per receive); it is closed by :meth:`close` or when
    the channel is garbage-collected.
    """

    __slots__ = ("_seq", "_sock", "buffer", "pid", "request_bytes")

    def __init__(self, timeout: float = RECEIVE_TIMEOUT) -> None:
        self._sock: socket.socket | None = _open_socket(timeout)
        #: The last exact request sent.
        self.request_bytes = bytes(INET_DIAG_REQUEST.size)
        #: Where the last reply was received.
        self.buffer = bytearray(_LOOKUP_BUFFER)
        self._seq = 0
        #: The process that opened the socket (a forked child must not share it).
        self.pid = os.getpid()

    @property
    def closed(self) -> bool:
        return self._sock is None

    def fileno(self) -> int:
        return -1 if self._sock is None else self._sock.fileno()

    def state(self, four: RawFourTuple, cookie: int | None = None) -> KernelState:
        """One exact lookup: the request sent, its reply decoded by
        :func:`~._diag.lookup_answer` (``CLOSED`` for no socket and for another
        socket's reply); replies to earlier requests are skipped.

        Raises:
            TimeoutError: no reply within the receive timeout.
            KernelViewError: only stale or malformed replies.
            OSError: the socket failed.
        """
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        request, sockid = lookup_request(four, cookie, seq)
        sock = self._sock
        if sock is None:
            raise ValueError("netlink channel is closed")
        sock.send(request)
        self.request_bytes = request
        buffer = self.buffer
        try:
            size = sock.recv_into(buffer)
        except BlockingIOError:
            raise TimeoutError("no answer from sock_diag within the receive timeout") from None
        answer = lookup_answer(buffer, size, four, seq, sockid)
        if answer is None:  # a reply to an earlier request: ours follows
            answer = lookup_answer(buffer, self._receive(seq), four, seq, sockid)
            if answer is None:  # pragma: no cover - _receive returned our seq
                raise KernelViewError(f"no sock_diag reply with seq {seq}")
        return answer

    def request(self, four: RawFourTuple, cookie: int | None = None) -> int:
        """Send one exact request; return the size of its reply, which is left in
        :attr:`buffer` (stale replies to earlier requests are skipped). The request
        stays in :attr:`request_bytes`.

        Raises:
            TimeoutError: no reply within the receive timeout.
            KernelViewError: only stale or malformed replies.
            OSError: the socket failed.
        """
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        self.request_bytes = lookup_request(four, cookie, seq)[0]
        return self._exchange(self.request_bytes, seq)

    def exchange(self, request: bytes) -> int:
        """Send ``request`` (its ``nlmsg_seq`` is replaced by the channel's next one)
        and return the size of the first reply datagram, left in :attr:`buffer`."""
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        message = bytearray(request)
        NLMSG_SEQ.pack_into(message, 8, seq)
        return self._exchange(message, seq)

    def _exchange(self, message: bytes | bytearray, seq: int) -> int:
        sock = self._sock
        if sock is None:
            raise ValueError("netlink channel is closed")
        sock.send(message)
        return self._receive(seq)

    def _receive(self, seq: int, size: int | None = None) -> int:
        """Receive until the reply with ``seq`` (``size``: a datagram already received
        into :attr:`buffer` that is not it)."""
        sock = self._sock
        if sock is None:
            raise ValueError("netlink channel is closed")
        buffer = self.buffer
        for _ in range(_MAX_STALE_REPLIES):
            if size is None:
                try:
                    size = sock.recv_into(buffer)
                except BlockingIOError:
                    raise TimeoutError(
                        "no answer from sock_diag within the receive timeout"
                    ) from None
            if size < NLMSG_HDRLEN:
                reply_seq(buffer, size)  # raises, describing the runt
            if NLMSG_SEQ.unpack_from(buffer, 8)[0] == seq:
                return size
            size = None
        raise KernelViewError(f"no sock_diag reply with seq {seq} among stale replies")

    def lookup(self, four: RawFourTuple, cookie: int | None = None) -> KernelState | None:
        """:meth:`request`, then :func:`~._diag.decode_reply`: the socket the kernel
        answered with, or None for ENOENT.

        Does not check the reply's 4-tuple (see :func:`~._diag.reply_matches`).
        """
        size = self.request(four, cookie)
        return decode_reply(self.buffer, size)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __del__(self) -> None:
        self.close()


class _PerThread(threading.local):
    channel: NetlinkChannel | None = None


_per_thread = _PerThread()


def _forget_inherited_channel() -> None:
    """In a forked child: close the channel inherited from the parent (the child's copy
    of the descriptor), so that the two never read each other's replies. The forking
    thread is the child's only thread, and the only one whose channel survives. (Done
    at fork, not checked with ``os.getpid()`` on every lookup: that asks the kernel
    each time.)"""
    reset_channel()


if hasattr(os, "register_at_fork"):  # (POSIX)
    os.register_at_fork(after_in_child=_forget_inherited_channel)


def channel() -> NetlinkChannel:
    """This thread's lookup channel, opened on first use.

    A channel inherited through ``fork()`` was closed (in the child) at the fork, and
    is replaced here.
    """
    chan = _per_thread.channel
    if chan is not None and chan._sock is not None:
        return chan
    chan = _per_thread.channel = NetlinkChannel()
    return chan


def reset_channel() -> None:
    """Close this thread's channel (the next lookup opens a new one)."""
    chan, _per_thread.channel = _per_thread.channel, None
    if chan is not None:
        chan.close()


def _may_end_dump(data: bytes) -> bool:
    """False when ``data`` certainly neither ends the dump nor reports an error: it
    starts with a socket message and its last 20 bytes are not an ``NLMSG_DONE``
    (which the kernel puts last, 20 bytes long without extended acks). Lets
    :func:`dump_chunks` skip walking every header of the bulk of a large dump; the
    full walk still happens for the last datagram and in :func:`decode_dump`."""
    size = len(data)
    if size < NLMSG_HDRLEN or NLMSG_LEN_AND_TYPE.unpack_from(data)[1] != SOCK_DIAG_BY_FAMILY:
        return True
    return size >= 20 and NLMSG_LEN_AND_TYPE.unpack_from(data, size - 20) == (20, NLMSG_DONE)


def dump_chunks(
    requests: Sequence[bytes], *, timeout: float = RECEIVE_TIMEOUT, time_limit: float = 60.0
) -> list[list[bytes]]:
    """Run each dump request on a fresh socket and return its datagrams.

    The socket is closed before returning, so the caller can decode at leisure.
    Each request's ``nlmsg_seq`` must be distinct.

    Raises:
        TimeoutError: the kernel stopped answering, or ``time_limit`` passed.
        KernelErrorReply: the kernel rejected a request.
        KernelViewError: malformed framing.
    """
    deadline = time.monotonic() + time_limit
    results: list[list[bytes]] = []
    with _open_socket(timeout) as sock:
        for request in requests:
            seq = reply_seq(request)
            sock.send(request)
            chunks: list[bytes] = []
            while True:
                try:
                    data = sock.recv(_DUMP_BUFFER)
                except BlockingIOError:
                    raise TimeoutError("sock_diag dump stalled") from None
                chunks.append(data)
                if _may_end_dump(data) and scan_dump_chunk(data, seq):
                    break
                if time.monotonic() > deadline:
                    raise TimeoutError(f"sock_diag dump took longer than {time_limit}s")
            results.append(chunks)
    return results


# -- the backend ----------------------------------------------------------------------------


class NetlinkBackend:
    """The kernel view over sock_diag: exact lookups and kernel-filtered dumps."""

    name: Final = "netlink"

    def lookup(self, four: RawFourTuple, cookie: int | None = None) -> KernelState:
        """The socket for ``four``; ``CLOSED`` when the kernel has none.

        A reply describing another socket (the listener trap) is ``CLOSED`` too.
        Kernel-view failures (timeout, malformed reply, socket errors) are logged at
        debug level and answered ``UNKNOWN``: this runs on the close path.
        """
        try:
            chan = _per_thread.channel
            if chan is None or chan._sock is None:
                chan = channel()
            return chan.state(four, cookie)
        except (OSError, KernelViewError) as exc:
            log.debug("sock_diag lookup failed: %s", exc, exc_info=True)
            reset_channel()
            return _UNKNOWN

    @staticmethod
    def _requests(
        state_sets: Iterable[Collection[TcpState]], port: int | None, families: Collection[int]
    ) -> list[bytes]:
        """One request per family and per set of states (empty sets skipped)."""
        masks = [mask for mask in map(states_mask, state_sets) if mask]
        bytecode = port_filter_bytecode(port) if port is not None else b""
        return [
            encode_dump_request(family, mask, bytecode=bytecode, seq=seq)
            for seq, (mask, family) in enumerate(itertools.product(masks, families), start=1)
        ]

    def dump(
        self, states: Collection[TcpState], port: int | None, families: Collection[int]
    ) -> Iterator[KernelState]:
        """All sockets of ``families`` in ``states`` (and on ``port``, either end),
        filtered by the kernel. The I/O happens now; decoding as the result is
        iterated.

        Raises:
            TimeoutError: the kernel stopped answering.
            KernelViewError: the kernel rejected the request or answered garbage.
        """
        results = dump_chunks(self._requests([states], port, families))
        return itertools.chain.from_iterable(decode_dump(chunks) for chunks in results)

    def summary(
        self, states: Collection[TcpState], port: int | None, families: Collection[int]
    ) -> Summary:
        """:meth:`dump`'s sockets counted, without a :class:`KernelState` for each.

        Raises:
            TimeoutError, KernelViewError: as :meth:`dump`.
        """
        # One request per family, as for dump(): asking for TIME_WAIT apart (so that
        # every datagram is a run count_dump counts without a Python loop) costs a
        # second walk of the kernel's hash table, more than it saves (10 ms at 50,000).
        return count_dump(dump_chunks(self._requests([states], port, families)))


def dump_with_info(
    states: Collection[TcpState], port: int | None, families: Collection[int]
) -> Iterator[tuple[KernelState, bytes | None]]:
    """As :meth:`NetlinkBackend.dump`, each socket with its ``struct tcp_info`` bytes
    (None when the kernel sent none). The kernel adds about 280 bytes per socket: ask
    for the few sockets of a state or two, not the whole table.

    Raises:
        TimeoutError, KernelViewError: as :meth:`NetlinkBackend.dump`.
    """
    mask = states_mask(states)
    bytecode = port_filter_bytecode(port) if port is not None else b""
    requests = [
        encode_dump_request(family, mask, bytecode=bytecode, seq=seq, extensions=INFO_EXTENSION)
        for seq, family in enumerate(families, start=1)
    ]
    results = dump_chunks(requests) if mask else []
    return itertools.chain.from_iterable(decode_dump_info(chunks) for chunks in results)


def probe() -> bool:
    """True when sock_diag answers for TCP here.

    Sends, on this thread's lookup channel (which later lookups reuse), a TCP dump
    request whose state mask is empty: the kernel walks no table and answers one
    ``NLMSG_DONE``. Its payload is 0 when the ``tcp_diag`` handler exists and
    ``-ENOENT`` when it does not (a kernel without it answers every exact lookup with
    ENOENT, which must not be taken for "no socket"); without ``inet_diag`` at all the
    answer is ``NLMSG_ERROR``. No TCP socket is made.
    """
    return probe_protocol(socket.IPPROTO_TCP)


def probe_protocol(protocol: int) -> bool:
    """:func:`probe` for another ``IPPROTO_*`` (tests use one no kernel handles)."""
    request = bytearray(encode_dump_request(_AF_INET, 0))
    request[17] = protocol  # inet_diag_req_v2.sdiag_protocol
    try:
        chan = channel()
        size = chan.exchange(bytes(request))
        return scan_dump_chunk(bytes(chan.buffer[:size]), reply_seq(chan.buffer, size))
    except KernelErrorReply as exc:  # an answer: the channel itself is fine
        log.debug("sock_diag probe: %s", exc)
        return False
    except (OSError, KernelViewError, ValueError) as exc:
        log.debug("sock_diag probe failed: %s", exc)
        reset_channel()
        return False
