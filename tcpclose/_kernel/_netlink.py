"""TCP sockets over ``NETLINK_SOCK_DIAG``: the exact 4-tuple lookup and the filtered dump.

Layouts follow ``include/uapi/linux/netlink.h`` (``nlmsghdr``, ``nlmsgerr``,
``nlattr``), ``include/uapi/linux/sock_diag.h`` (``SOCK_DIAG_BY_FAMILY``) and
``include/uapi/linux/inet_diag.h`` (``inet_diag_req_v2``, ``inet_diag_sockid``,
``inet_diag_msg``, ``inet_diag_bc_op``); the kernel side is ``net/ipv4/inet_diag.c``.
Every multi-byte field is in host order except ``idiag_sport``/``idiag_dport``
(network order) and the addresses (raw bytes, IPv4 in the first 4 of 16).

The encoders and decoders are pure functions over bytes. The I/O is two small pieces:
:class:`NetlinkChannel` (one socket reused for exact lookups; one per thread, see
:func:`channel`) and :func:`dump_chunks` (a fresh socket per dump, closed before the
results are decoded, so an abandoned iterator holds no file descriptor).

Facts the code relies on, checked on Linux 6.18 (tests keep checking them):

* An exact request (flags ``NLM_F_REQUEST`` only) is answered by one datagram: the
  socket's ``inet_diag_msg``, or ``NLMSG_ERROR`` with ``-ENOENT`` for a miss. No
  ``NLM_F_ACK``: with it a hit would be followed by a second datagram.
* A request the kernel cannot parse gets no answer at all, so the socket has
  ``SO_RCVTIMEO`` set; a late or stray reply is recognised by its sequence number.
* The exact lookup ignores ``idiag_states``. It finds TIME_WAIT and request sockets too.
* **The listener trap**: when the connection is gone but its listener is not, the
  kernel's hash lookup for the 4-tuple falls through to the listener and the reply
  describes the LISTEN socket (``dport`` 0, ``dst`` zero). Callers must compare the
  reply's 4-tuple with the request (:func:`reply_matches`). With a socket cookie in
  the request the kernel checks it, and the listener answers ``ENOENT`` instead.
"""

from __future__ import annotations

import dataclasses
import errno
import itertools
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Final

from tcpclose._errors import KernelViewError

from ._address import MAPPED_PREFIX, FourTuple, format_host, unmap
from ._types import KernelState, TcpState, TimerKind

__all__ = (
    "INET_DIAG_MSG",
    "INET_DIAG_REQUEST",
    "NLMSGHDR",
    "InetDiagMsg",
    "KernelErrorReply",
    "NetlinkBackend",
    "NetlinkChannel",
    "channel",
    "decode_dump",
    "decode_lookup_reply",
    "decode_lookup_state",
    "dump_chunks",
    "encode_dump_request",
    "encode_lookup_request",
    "port_filter_bytecode",
    "probe",
    "reply_matches",
    "scan_dump_chunk",
    "states_mask",
    "to_kernel_state",
)

log = logging.getLogger("tcpclose.kernel")

# -- constants (include/uapi/linux/netlink.h, sock_diag.h, inet_diag.h) ---------------------

#: ``NETLINK_SOCK_DIAG`` protocol number (``netlink.h``).
NETLINK_SOCK_DIAG: Final = 4
#: Message type of requests and replies (``sock_diag.h``).
SOCK_DIAG_BY_FAMILY: Final = 20
NLMSG_NOOP: Final = 1
NLMSG_ERROR: Final = 2
NLMSG_DONE: Final = 3
NLMSG_OVERRUN: Final = 4
NLM_F_REQUEST: Final = 0x01
NLM_F_MULTI: Final = 0x02
NLM_F_DUMP_INTR: Final = 0x10
NLM_F_DUMP: Final = 0x100 | 0x200  # NLM_F_ROOT | NLM_F_MATCH
#: ``INET_DIAG_NOCOOKIE``: both cookie words set means "do not check the cookie".
INET_DIAG_NOCOOKIE: Final = 0xFFFFFFFF
#: Request attribute carrying a filter program (``enum { INET_DIAG_REQ_NONE, ... }``).
INET_DIAG_REQ_BYTECODE: Final = 1
# Filter opcodes (``enum { INET_DIAG_BC_NOP, ... }``).
INET_DIAG_BC_JMP: Final = 1
INET_DIAG_BC_S_GE: Final = 2
INET_DIAG_BC_S_LE: Final = 3
INET_DIAG_BC_D_GE: Final = 4
INET_DIAG_BC_D_LE: Final = 5

IPPROTO_TCP: Final = 6

# -- struct layouts -------------------------------------------------------------------------

#: ``struct nlmsghdr``: len, type, flags, seq, pid (16 bytes).
NLMSGHDR: Final = struct.Struct("=IHHII")
#: ``struct nlmsgerr``'s leading ``int error`` (negative errno), after the nlmsghdr.
NLMSGERR: Final = struct.Struct("=i")
#: ``struct nlattr``: len, type (4 bytes); payload padded to 4.
NLATTR: Final = struct.Struct("=HH")
#: ``struct inet_diag_bc_op``: code, yes, no (4 bytes).
BC_OP: Final = struct.Struct("=BBH")
#: A whole request, 72 bytes: ``nlmsghdr`` + ``inet_diag_req_v2`` (family, protocol,
#: ext, pad, states) + ``inet_diag_sockid`` (sport, dport, src[16], dst[16], if,
#: cookie[2]). The ports are packed as native ``H`` of values already converted with
#: ``socket.htons``, which keeps one native-order struct for the whole request.
INET_DIAG_REQUEST: Final = struct.Struct("=IHHIIBBBBIHH16s16sIII")
#: ``struct inet_diag_msg``, 72 bytes: family, state, timer, retrans, sockid (sport,
#: dport, src, dst, if, cookie[2]), expires (ms), rqueue, wqueue, uid, inode. Ports are
#: network order: pass them through ``socket.ntohs``.
INET_DIAG_MSG: Final = struct.Struct("=BBBBHH16s16sIIIIIIII")
#: The first two fields of ``nlmsghdr`` (len, type): all a dump walk needs.
_LEN_AND_TYPE: Final = struct.Struct("=IH")
#: ``nlmsg_seq`` alone (offset 8).
_SEQ: Final = struct.Struct("=I")
#: len, type, (flags, seq, pid skipped), then the whole ``inet_diag_msg``: one unpack
#: for the usual lookup answer.
_LOOKUP_REPLY: Final = struct.Struct("=IH10x" + INET_DIAG_MSG.format[1:])

_HDR_LEN: Final = NLMSGHDR.size
_MSG_END: Final = _HDR_LEN + INET_DIAG_MSG.size
_AF_INET: Final = int(socket.AF_INET)
_AF_INET6: Final = int(socket.AF_INET6)
_STATES: Final = {int(s): s for s in TcpState if s > 0}
_TIMERS: Final = {int(t): t for t in TimerKind}
_ALL_STATES_MASK: Final = 0xFFFFFFFF


def _state_factory() -> Callable[..., KernelState]:
    """A positional constructor for :class:`KernelState` that fills its slots directly.

    A frozen dataclass's ``__init__`` goes through ``object.__setattr__`` once per
    field (about 1.2 us for twelve fields); setting the slot descriptors is half that,
    which matters when a dump builds tens of thousands. Used only while the class is
    the plain slotted dataclass this expects (no ``__post_init__``, the fields in this
    order); otherwise the class itself is returned.
    """
    names = tuple(f.name for f in dataclasses.fields(KernelState))
    expected = (
        "state", "source", "local", "peer", "timer", "seconds_left", "retransmits",
        "recv_queue", "send_queue", "uid", "inode", "cookie",
    )  # fmt: skip
    slots = [KernelState.__dict__.get(name) for name in names]
    if (
        names != expected
        or hasattr(KernelState, "__post_init__")
        or not all(type(slot).__name__ == "member_descriptor" for slot in slots)
    ):  # pragma: no cover - only if _types changes shape
        return KernelState
    s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11 = (slot.__set__ for slot in slots)  # type: ignore[union-attr]
    new = object.__new__

    def make(
        state: TcpState,
        source: str,
        local: tuple[str, int] | None,
        peer: tuple[str, int] | None,
        timer: TimerKind | None,
        seconds_left: float | None,
        retransmits: int | None,
        recv_queue: int | None,
        send_queue: int | None,
        uid: int | None,
        inode: int | None,
        cookie: int | None,
    ) -> KernelState:
        obj: KernelState = new(KernelState)
        s0(obj, state)
        s1(obj, source)
        s2(obj, local)
        s3(obj, peer)
        s4(obj, timer)
        s5(obj, seconds_left)
        s6(obj, retransmits)
        s7(obj, recv_queue)
        s8(obj, send_queue)
        s9(obj, uid)
        s10(obj, inode)
        s11(obj, cookie)
        return obj

    return make


_new_state: Final = _state_factory()


class KernelErrorReply(KernelViewError):
    """The kernel answered a sock_diag request with an error (``NLMSG_ERROR``).

    Attributes:
        errno: the positive errno value, e.g. ``errno.EINVAL``.
    """

    def __init__(self, code: int, context: str) -> None:
        self.errno = code
        name = errno.errorcode.get(code, str(code))
        super().__init__(f"{context}: kernel answered {name} ({os.strerror(code)})")


@dataclass(frozen=True, slots=True)
class InetDiagMsg:
    """One decoded ``inet_diag_msg`` (raw values, before any interpretation).

    Attributes:
        family: ``AF_INET`` or ``AF_INET6``: the socket's own family (a dual-stack
            socket answers ``AF_INET6`` with mapped addresses even when asked as IPv4).
        state, timer, retrans: ``idiag_state``, ``idiag_timer``, ``idiag_retrans``.
        sport, dport: host byte order.
        src, dst: 16 raw bytes each, IPv4 in the first 4. ``src`` is the local end.
        interface: ``idiag_if``.
        cookie: the 64-bit socket cookie (``idiag_cookie[0] | idiag_cookie[1] << 32``).
        expires_ms: ``idiag_expires``, milliseconds until the timer fires.
        rqueue, wqueue, uid, inode: as in the kernel struct.
        attributes: the ``nlattr`` list after the struct, as ``(type, payload)``.
    """

    family: int
    state: int
    timer: int
    retrans: int
    sport: int
    dport: int
    src: bytes
    dst: bytes
    interface: int
    cookie: int
    expires_ms: int
    rqueue: int
    wqueue: int
    uid: int
    inode: int
    attributes: tuple[tuple[int, bytes], ...] = ()


# -- encoders -------------------------------------------------------------------------------


def _cookie_words(cookie: int | None) -> tuple[int, int]:
    if cookie is None:
        return INET_DIAG_NOCOOKIE, INET_DIAG_NOCOOKIE
    if isinstance(cookie, bool) or not isinstance(cookie, int) or not 0 <= cookie < 1 << 64:
        raise ValueError(f"cookie: expected an int in 0..2**64-1 or None, got {cookie!r}")
    return cookie & 0xFFFFFFFF, cookie >> 32


def pack_lookup_request(buffer: bytearray, four: FourTuple, cookie: int | None, seq: int) -> None:
    """Write the 72-byte exact-lookup request for ``four`` into ``buffer``.

    See :func:`encode_lookup_request` for the layout.
    """
    c0, c1 = _cookie_words(cookie)
    INET_DIAG_REQUEST.pack_into(
        buffer,
        0,
        INET_DIAG_REQUEST.size,
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST,
        seq,
        0,
        four.family,
        IPPROTO_TCP,
        0,
        0,
        _ALL_STATES_MASK,
        socket.htons(four.local_port),
        socket.htons(four.peer_port),
        four.local,
        four.peer,
        four.scope_id,
        c0,
        c1,
    )


def encode_lookup_request(four: FourTuple, *, cookie: int | None = None, seq: int = 0) -> bytes:
    """The exact-lookup request for one 4-tuple (72 bytes).

    ``idiag_src`` is the local end. Without a cookie both cookie words are
    ``INET_DIAG_NOCOOKIE``; with one, the kernel answers ``ENOENT`` unless the socket
    found has that cookie.

    Worked example, 127.0.0.1:8080 -> 127.0.0.1:51000, seq 7, no cookie::

        48000000 1400 0100 07000000 00000000    nlmsghdr: len 72, type 20, REQUEST, seq 7
        02 06 00 00 ffffffff                    AF_INET, IPPROTO_TCP, ext 0, pad, states
        1f90 c738                               sport 8080, dport 51000 (network order)
        7f000001 000000000000000000000000       src (local)
        7f000001 000000000000000000000000       dst (peer)
        00000000 ffffffff ffffffff              if 0, no cookie

    >>> from ._address import parse_four_tuple
    >>> req = encode_lookup_request(
    ...     parse_four_tuple(("127.0.0.1", 8080), ("127.0.0.1", 51000)), seq=7)
    >>> len(req), req[:8].hex(), req[24:28].hex()
    (72, '4800000014000100', '1f90c738')
    """
    buffer = bytearray(INET_DIAG_REQUEST.size)
    pack_lookup_request(buffer, four, cookie, seq)
    return bytes(buffer)


def states_mask(states: Iterable[TcpState]) -> int:
    """``idiag_states`` for a dump: bit ``1 << state`` per wanted state (``TCPF_*``).

    >>> hex(states_mask([TcpState.TIME_WAIT, TcpState.LISTEN]))
    '0x440'
    """
    mask = 0
    for state in states:
        if state > 0:
            mask |= 1 << state
    return mask


def port_filter_bytecode(port: int) -> bytes:
    """An ``inet_diag`` filter program: "local port == port or peer port == port".

    Built from ``S_GE``/``S_LE``/``D_GE``/``D_LE`` (``INET_DIAG_BC_S_EQ`` only exists
    since Linux 5.x) with the layout ``net/ipv4/inet_diag.c`` audits: each comparison
    op is followed by an op whose ``no`` field holds the port; ``yes``/``no`` are
    forward jumps in bytes; ending exactly at the program's end accepts, jumping 4
    bytes past it rejects, and every op must be reachable through ``yes`` jumps::

        off  op              yes  no
         0   S_GE  port       8   20    sport >= P ?  go on : try dport
         8   S_LE  port       8   12    sport <= P ?  go on : try dport
        16   JMP              4   20    matched: jump to the end (accept)
        20   D_GE  port       8   20    dport >= P ?  go on : reject
        28   D_LE  port       8   12    dport <= P ?  accept : reject

    >>> port_filter_bytecode(80).hex()
    '020814000000500003080c000000500001041400040814000000500005080c0000005000'
    """
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"port: expected an int in 0..65535, got {port!r}")
    ops = (
        (INET_DIAG_BC_S_GE, 8, 20),
        (0, 0, port),
        (INET_DIAG_BC_S_LE, 8, 12),
        (0, 0, port),
        (INET_DIAG_BC_JMP, 4, 20),
        (INET_DIAG_BC_D_GE, 8, 20),
        (0, 0, port),
        (INET_DIAG_BC_D_LE, 8, 12),
        (0, 0, port),
    )
    return b"".join(BC_OP.pack(*op) for op in ops)


def encode_dump_request(family: int, states: int, *, bytecode: bytes = b"", seq: int = 0) -> bytes:
    """A dump request: every TCP socket of ``family`` whose state bit is in ``states``,
    optionally filtered in the kernel by ``bytecode`` (an ``INET_DIAG_REQ_BYTECODE``
    attribute after the request).

    Worked example, AF_INET, TIME_WAIT only (``1 << 6``), seq 1: 72 bytes, flags
    ``NLM_F_REQUEST | NLM_F_DUMP`` (0x301), sockid all zero (ignored by a dump)::

        48000000 1400 0103 01000000 00000000  02 06 00 00 40000000  00 * 48

    >>> encode_dump_request(socket.AF_INET, 1 << 6, seq=1)[:24].hex()
    '480000001400010301000000000000000206000040000000'
    """
    attr = b""
    if bytecode:
        attr = NLATTR.pack(NLATTR.size + len(bytecode), INET_DIAG_REQ_BYTECODE) + bytecode
        attr += b"\0" * (-len(attr) % 4)
    body = INET_DIAG_REQUEST.pack(
        INET_DIAG_REQUEST.size + len(attr),
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        0,
        family,
        IPPROTO_TCP,
        0,
        0,
        states,
        0,
        0,
        b"",
        b"",
        0,
        INET_DIAG_NOCOOKIE,
        INET_DIAG_NOCOOKIE,
    )
    return body + attr


# -- decoders -------------------------------------------------------------------------------


def decode_attributes(
    data: bytes | bytearray | memoryview, start: int, end: int
) -> tuple[tuple[int, bytes], ...]:
    """Walk the ``nlattr`` list in ``data[start:end]``: ``(type, payload)`` pairs.

    Raises:
        KernelViewError: an attribute shorter than its header or running past ``end``.

    >>> decode_attributes(bytes.fromhex("05000800 01000000"), 0, 8)
    ((8, b'\\x01'),)
    """
    attrs: list[tuple[int, bytes]] = []
    offset = start
    while offset < end:
        if end - offset < NLATTR.size:
            raise KernelViewError(f"truncated nlattr at offset {offset}: {end - offset} bytes")
        length, kind = NLATTR.unpack_from(data, offset)
        if length < NLATTR.size or offset + length > end:
            raise KernelViewError(
                f"bad nlattr at offset {offset}: length {length}, {end - offset} bytes left"
            )
        attrs.append((kind & 0x3FFF, bytes(data[offset + NLATTR.size : offset + length])))
        offset += (length + 3) & ~3
    return tuple(attrs)


def _header(data: bytes | bytearray | memoryview, offset: int, size: int) -> tuple[int, int, int]:
    if size - offset < _HDR_LEN:
        raise KernelViewError(
            f"truncated netlink message at offset {offset}: {size - offset} bytes, need 16"
        )
    length, kind, _flags, seq, _pid = NLMSGHDR.unpack_from(data, offset)
    if length < _HDR_LEN or offset + length > size:
        raise KernelViewError(
            f"bad nlmsg_len {length} at offset {offset} ({size - offset} bytes left)"
        )
    return length, kind, seq


def _error_code(data: bytes | bytearray | memoryview, offset: int, length: int) -> int:
    if length < _HDR_LEN + NLMSGERR.size:
        raise KernelViewError(f"truncated NLMSG_ERROR: nlmsg_len {length}")
    (code,) = NLMSGERR.unpack_from(data, offset + _HDR_LEN)
    return -int(code)


def reply_seq(data: bytes | bytearray | memoryview, size: int | None = None) -> int:
    """Sequence number of the first netlink message in ``data``."""
    _length, _kind, seq = _header(data, 0, len(data) if size is None else size)
    return seq


def decode_lookup_reply(
    data: bytes | bytearray | memoryview, size: int | None = None
) -> InetDiagMsg | None:
    """Decode the answer to an exact lookup: the socket, or ``None`` for ENOENT.

    ``size`` is how many bytes of ``data`` were received (default: all of it).

    Worked example, an ESTABLISHED IPv4 socket (124 bytes; attributes after byte 88)::

        7c000000 1400 0000 07000000 2e160000     nlmsghdr: len 124, type 20, seq 7
        02 01 00 00                              AF_INET, ESTABLISHED, timer off, 0
        ddeda9ac                                 sport 56813, dport 43436
        7f000001 00..  7f000001 00..             src, dst
        00000000 01000000 00000000               if 0, cookie 1
        00000000 00000000 00000000 00000000      expires 0 ms, rqueue 0, wqueue 0, uid 0
        c9250000                                 inode 9673
        05000800 00000000  ...                   attributes (INET_DIAG_SHUTDOWN, ...)

    A miss is ``NLMSG_ERROR`` (type 2) whose ``error`` is ``-ENOENT``::

        5c000000 0200 0000 07000000 2e160000  feffffff  <the request echoed>

    Raises:
        KernelErrorReply: the kernel answered another error (EINVAL, EPERM, ...).
        KernelViewError: the bytes are not a well-formed reply.

    >>> decode_lookup_reply(bytes.fromhex("2400000002000000070000000000000" "0feffffff") +
    ...                     bytes(16)) is None
    True
    """
    size = len(data) if size is None else size
    length, kind, _seq = _header(data, 0, size)
    if kind == NLMSG_ERROR:
        code = _error_code(data, 0, length)
        if code == errno.ENOENT:
            return None
        if code == 0:
            raise KernelViewError("unexpected acknowledgement (NLMSG_ERROR 0) to a lookup")
        raise KernelErrorReply(code, "sock_diag lookup")
    if kind != SOCK_DIAG_BY_FAMILY:
        raise KernelViewError(f"unexpected netlink message type {kind} in a lookup reply")
    if length < _MSG_END:
        raise KernelViewError(f"truncated inet_diag_msg: nlmsg_len {length}, need {_MSG_END}")
    return _decode_msg(data, 0, length)


def _decode_msg(data: bytes | bytearray | memoryview, offset: int, length: int) -> InetDiagMsg:
    (
        family,
        state,
        timer,
        retrans,
        sport,
        dport,
        src,
        dst,
        interface,
        cookie0,
        cookie1,
        expires,
        rqueue,
        wqueue,
        uid,
        inode,
    ) = INET_DIAG_MSG.unpack_from(data, offset + _HDR_LEN)
    if family not in (_AF_INET, _AF_INET6):
        raise KernelViewError(f"inet_diag_msg with unknown family {family}")
    attrs = decode_attributes(data, offset + _MSG_END, offset + length)
    return InetDiagMsg(
        family,
        state,
        timer,
        retrans,
        socket.ntohs(sport),
        socket.ntohs(dport),
        src,
        dst,
        interface,
        cookie0 | cookie1 << 32,
        expires,
        rqueue,
        wqueue,
        uid,
        inode,
        attrs,
    )


def reply_matches(msg: InetDiagMsg, four: FourTuple) -> bool:
    """True when the reply describes the 4-tuple asked for (after removing IPv4
    mapping on both sides): the guard against the listener trap."""
    if msg.sport != four.local_port or msg.dport != four.peer_port:
        return False
    lfam, lraw = unmap(msg.family, msg.src)
    pfam, praw = unmap(msg.family, msg.dst)
    return lfam == pfam == four.family and lraw == four.local and praw == four.peer


def to_kernel_state(msg: InetDiagMsg) -> KernelState:
    """The :class:`KernelState` a decoded reply describes (``source="netlink"``).

    ``seconds_left`` is ``idiag_expires`` in seconds when a timer runs, else None.
    """
    timer = _TIMERS.get(msg.timer)
    return KernelState(
        _STATES.get(msg.state, TcpState.UNKNOWN),
        "netlink",
        (format_host(msg.family, msg.src), msg.sport),
        (format_host(msg.family, msg.dst), msg.dport),
        timer,
        msg.expires_ms / 1000 if msg.timer else None,
        msg.retrans,
        msg.rqueue,
        msg.wqueue,
        msg.uid,
        msg.inode,
        msg.cookie,
    )


_CLOSED: Final = KernelState(TcpState.CLOSED, "netlink")
_UNKNOWN: Final = KernelState(TcpState.UNKNOWN, "netlink")
#: Formatted hosts of recent replies; cleared when it grows past a bound.
_HOSTS: Final[dict[int, dict[bytes, str]]] = {_AF_INET: {}, _AF_INET6: {}}
_HOSTS_MAX: Final = 4096


def _host(family: int, raw: bytes) -> str:
    cache = _HOSTS[family]
    text = cache.get(raw)
    if text is None:
        if len(cache) >= _HOSTS_MAX:
            cache.clear()
        text = cache[raw] = format_host(family, raw)
    return text


def decode_lookup_state(
    data: bytes | bytearray | memoryview, size: int, four: FourTuple
) -> KernelState:
    """Decode an exact-lookup reply straight into the answer for ``four``.

    The close path's decoder: the same checks as :func:`decode_lookup_reply` followed
    by :func:`reply_matches`, without building the intermediate value or walking the
    attributes. ENOENT, and a reply for another socket (the listener trap), give
    ``CLOSED``.

    Raises:
        KernelErrorReply: the kernel answered another error.
        KernelViewError: the bytes are not a well-formed reply.
    """
    if size >= _MSG_END:
        (
            length,
            kind,
            family,
            state,
            timer,
            retrans,
            sport,
            dport,
            src,
            dst,
            _if,
            cookie0,
            cookie1,
            expires,
            rqueue,
            wqueue,
            uid,
            inode,
        ) = _LOOKUP_REPLY.unpack_from(data)
    else:
        length, kind = 0, -1
    if kind != SOCK_DIAG_BY_FAMILY or not _MSG_END <= length <= size:
        length, kind, _seq = _header(data, 0, size)
        if kind == NLMSG_ERROR:
            code = _error_code(data, 0, length)
            if code == errno.ENOENT:
                return _CLOSED
            if code == 0:
                raise KernelViewError("unexpected acknowledgement (NLMSG_ERROR 0) to a lookup")
            raise KernelErrorReply(code, "sock_diag lookup")
        if kind != SOCK_DIAG_BY_FAMILY:
            raise KernelViewError(f"unexpected netlink message type {kind} in a lookup reply")
        raise KernelViewError(f"truncated inet_diag_msg: nlmsg_len {length}, need {_MSG_END}")
    sport = socket.ntohs(sport)
    dport = socket.ntohs(dport)
    if sport != four.local_port or dport != four.peer_port:
        return _CLOSED
    if family == _AF_INET:
        if four.family != _AF_INET or src[:4] != four.local or dst[:4] != four.peer:
            return _CLOSED
    elif family == _AF_INET6:
        if four.family == _AF_INET6:
            if src != four.local or dst != four.peer:
                return _CLOSED
        elif (
            src[:12] != MAPPED_PREFIX
            or dst[:12] != MAPPED_PREFIX
            or src[12:] != four.local
            or dst[12:] != four.peer
        ):
            return _CLOSED
    else:
        raise KernelViewError(f"inet_diag_msg with unknown family {family}")
    return _new_state(
        _STATES.get(state, TcpState.UNKNOWN),
        "netlink",
        (_host(family, src), sport),
        (_host(family, dst), dport),
        _TIMERS.get(timer),
        expires / 1000 if timer else None,
        retrans,
        rqueue,
        wqueue,
        uid,
        inode,
        cookie0 | cookie1 << 32,
    )


def scan_dump_chunk(data: bytes | bytearray | memoryview, seq: int) -> bool:
    """Check the framing of one received dump datagram; True when it ends the dump.

    Raises:
        KernelErrorReply: the kernel answered the dump with an error.
        KernelViewError: malformed framing.
    """
    size = len(data)
    offset = 0
    while offset < size:
        length, kind, msg_seq = _header(data, offset, size)
        if msg_seq != seq:
            raise KernelViewError(f"dump message with seq {msg_seq}, expected {seq}")
        if kind == NLMSG_DONE:
            return True
        if kind == NLMSG_ERROR:
            code = _error_code(data, offset, length)
            raise KernelErrorReply(code, "sock_diag dump")
        offset += (length + 3) & ~3
    return False


def decode_dump(chunks: Iterable[bytes | bytearray | memoryview]) -> Iterator[KernelState]:
    """Decode the datagrams of one dump into :class:`KernelState` values, lazily.

    Stops at ``NLMSG_DONE``. Addresses are formatted once per distinct address.

    Raises:
        KernelErrorReply: an ``NLMSG_ERROR`` in the stream.
        KernelViewError: malformed framing or a truncated ``inet_diag_msg``.
    """
    unpack_header = _LEN_AND_TYPE.unpack_from
    unpack = INET_DIAG_MSG.unpack_from
    ntohs = socket.ntohs
    states = _STATES
    timers = _TIMERS
    hosts4: dict[bytes, str] = {}
    hosts6: dict[bytes, str] = {}
    new_state = _new_state
    unknown = TcpState.UNKNOWN
    for data in chunks:
        size = len(data)
        offset = 0
        while offset < size:
            if size - offset < _HDR_LEN:
                raise KernelViewError(
                    f"truncated netlink message at offset {offset}: {size - offset} bytes"
                )
            length, kind = unpack_header(data, offset)
            if length < _HDR_LEN or offset + length > size:
                raise KernelViewError(
                    f"bad nlmsg_len {length} at offset {offset} ({size - offset} bytes left)"
                )
            if kind != SOCK_DIAG_BY_FAMILY:
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    raise KernelErrorReply(_error_code(data, offset, length), "sock_diag dump")
                if kind != NLMSG_NOOP:
                    raise KernelViewError(f"unexpected netlink message type {kind} in a dump")
                offset += (length + 3) & ~3
                continue
            if length < _MSG_END:
                raise KernelViewError(
                    f"truncated inet_diag_msg at offset {offset}: nlmsg_len {length}"
                )
            (
                family,
                state,
                timer,
                retrans,
                sport,
                dport,
                src,
                dst,
                _if,
                cookie0,
                cookie1,
                expires,
                rqueue,
                wqueue,
                uid,
                inode,
            ) = unpack(data, offset + _HDR_LEN)
            if family == _AF_INET:
                hosts = hosts4
            elif family == _AF_INET6:
                hosts = hosts6
            else:
                raise KernelViewError(f"inet_diag_msg with unknown family {family}")
            local = hosts.get(src)
            if local is None:
                local = hosts[src] = format_host(family, src)
            peer = hosts.get(dst)
            if peer is None:
                peer = hosts[dst] = format_host(family, dst)
            yield new_state(
                states.get(state, unknown),
                "netlink",
                (local, ntohs(sport)),
                (peer, ntohs(dport)),
                timers.get(timer),
                expires / 1000 if timer else None,
                retrans,
                rqueue,
                wqueue,
                uid,
                inode,
                cookie0 | cookie1 << 32,
            )
            offset += (length + 3) & ~3


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

    __slots__ = ("_request", "_seq", "_sock", "buffer", "forks", "pid")

    def __init__(self, timeout: float = RECEIVE_TIMEOUT) -> None:
        self._sock: socket.socket | None = _open_socket(timeout)
        self._request = bytearray(INET_DIAG_REQUEST.size)
        #: Where the last reply was received.
        self.buffer = bytearray(_LOOKUP_BUFFER)
        self._seq = 0
        #: The process that opened the socket (a forked child must not share it).
        self.pid = os.getpid()
        #: :data:`_forks` when it was opened.
        self.forks = _forks[0]

    @property
    def closed(self) -> bool:
        return self._sock is None

    def fileno(self) -> int:
        return -1 if self._sock is None else self._sock.fileno()

    def request(self, four: FourTuple, cookie: int | None = None) -> int:
        """Send one exact request; return the size of its reply, which is left in
        :attr:`buffer` (stale replies to earlier requests are skipped).

        Raises:
            TimeoutError: no reply within the receive timeout.
            KernelViewError: only stale or malformed replies.
            OSError: the socket failed.
        """
        sock = self._sock
        if sock is None:
            raise ValueError("netlink channel is closed")
        self._seq = seq = (self._seq + 1) & 0xFFFFFFFF
        pack_lookup_request(self._request, four, cookie, seq)
        sock.send(self._request)
        buffer = self.buffer
        for _ in range(_MAX_STALE_REPLIES):
            try:
                size = sock.recv_into(buffer)
            except BlockingIOError:
                raise TimeoutError("no answer from sock_diag within the receive timeout") from None
            if size < _HDR_LEN:
                reply_seq(buffer, size)  # raises, describing the runt
            if _SEQ.unpack_from(buffer, 8)[0] == seq:
                return size
        raise KernelViewError(f"no sock_diag reply with seq {seq} among stale replies")

    def lookup(self, four: FourTuple, cookie: int | None = None) -> InetDiagMsg | None:
        """:meth:`request`, then :func:`decode_lookup_reply` (None for ENOENT).

        Does not check the reply's 4-tuple: see :func:`reply_matches`.
        """
        size = self.request(four, cookie)
        return decode_lookup_reply(self.buffer, size)

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()

    def __del__(self) -> None:
        self.close()


class _PerThread(threading.local):
    channel: NetlinkChannel | None = None


_per_thread = _PerThread()

#: How many times this process is a forked child of the one that imported us: a
#: channel opened under another count was inherited. (Counted at fork, not checked
#: with ``os.getpid()`` on every lookup: that asks the kernel each time.)
_forks = [0]


def _count_fork() -> None:
    _forks[0] += 1


if hasattr(os, "register_at_fork"):  # (POSIX)
    os.register_at_fork(after_in_child=_count_fork)


def channel() -> NetlinkChannel:
    """This thread's lookup channel, opened on first use.

    A channel inherited through ``fork()`` is closed (in the child) and replaced: the
    parent and the child must not read each other's replies.
    """
    chan = _per_thread.channel
    if chan is not None and chan.forks == _forks[0] and not chan.closed:
        return chan
    if chan is not None:
        chan.close()
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
    if size < _HDR_LEN or _LEN_AND_TYPE.unpack_from(data)[1] != SOCK_DIAG_BY_FAMILY:
        return True
    return size >= 20 and _LEN_AND_TYPE.unpack_from(data, size - 20) == (20, NLMSG_DONE)


def dump_chunks(
    requests: Sequence[bytes], *, timeout: float = RECEIVE_TIMEOUT, deadline_s: float = 60.0
) -> list[list[bytes]]:
    """Run each dump request on a fresh socket and return its datagrams.

    The socket is closed before returning, so the caller can decode at leisure.
    Each request's ``nlmsg_seq`` must be distinct.

    Raises:
        TimeoutError: the kernel stopped answering, or ``deadline_s`` passed.
        KernelErrorReply: the kernel rejected a request.
        KernelViewError: malformed framing.
    """
    deadline = time.monotonic() + deadline_s
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
                    raise TimeoutError(f"sock_diag dump took longer than {deadline_s}s")
            results.append(chunks)
    return results


# -- the backend ----------------------------------------------------------------------------


class NetlinkBackend:
    """The kernel view over sock_diag: exact lookups and kernel-filtered dumps."""

    name: Final = "netlink"

    def lookup(self, four: FourTuple, cookie: int | None = None) -> KernelState:
        """The socket for ``four``; ``CLOSED`` when the kernel has none.

        A reply describing another socket (the listener trap) is ``CLOSED`` too.
        Kernel-view failures (timeout, malformed reply, socket errors) are logged at
        debug level and answered ``UNKNOWN``: this runs on the close path.
        """
        try:
            chan = channel()
            return decode_lookup_state(chan.buffer, chan.request(four, cookie), four)
        except (OSError, KernelViewError) as exc:
            log.debug("sock_diag lookup failed: %s", exc, exc_info=True)
            reset_channel()
            return _UNKNOWN

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
        mask = states_mask(states)
        bytecode = port_filter_bytecode(port) if port is not None else b""
        requests = [
            encode_dump_request(family, mask, bytecode=bytecode, seq=seq)
            for seq, family in enumerate(families, start=1)
        ]
        results = dump_chunks(requests)
        return itertools.chain.from_iterable(decode_dump(chunks) for chunks in results)


def _probe_listener() -> socket.socket | None:
    try:
        lst = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    except OSError:
        return None
    try:
        lst.bind(("127.0.0.1", 0))
        lst.listen(1)
    except OSError:
        lst.close()
        return None
    return lst


def probe() -> bool:
    """True when sock_diag answers for TCP here.

    Looks up a listener made for the purpose: the answer must be that very socket.
    (A kernel without the ``inet_diag``/``tcp_diag`` handler answers every request
    with ENOENT, which a lookup of a made-up 4-tuple cannot tell from a real miss.)
    Where no listener can be made, an ENOENT for an impossible 4-tuple is accepted.
    """
    try:
        chan = NetlinkChannel()
    except OSError:
        return False
    try:
        lst = _probe_listener()
        if lst is None:
            four = FourTuple(_AF_INET, b"\x7f\0\0\1", 0, b"\x7f\0\0\1", 0)
            return chan.lookup(four) is None
        with lst:
            four = FourTuple(_AF_INET, b"\x7f\0\0\1", lst.getsockname()[1], bytes(4), 0)
            msg = chan.lookup(four)
            return (
                msg is not None
                and msg.state == TcpState.LISTEN
                and msg.inode == os.fstat(lst.fileno()).st_ino
            )
    except (OSError, KernelViewError):
        return False
    finally:
        chan.close()
