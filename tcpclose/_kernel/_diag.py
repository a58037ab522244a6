"""The sock_diag codec for TCP: requests built, replies decoded. Pure: bytes in, values out.

Layouts follow ``include/uapi/linux/netlink.h`` (``nlmsghdr``, ``nlmsgerr``,
``nlattr``), ``include/uapi/linux/sock_diag.h`` (``SOCK_DIAG_BY_FAMILY``) and
``include/uapi/linux/inet_diag.h`` (``inet_diag_req_v2``, ``inet_diag_sockid``,
``inet_diag_msg``, ``inet_diag_bc_op``); the kernel side is ``net/ipv4/inet_diag.c``.
Every multi-byte field is in host order except ``idiag_sport``/``idiag_dport``
(network order) and the addresses (raw bytes, IPv4 in the first 4 of 16, the other 12
zero: ``inet_diag_msg_common_fill`` clears them).

One ``inet_diag_msg`` becomes a :class:`KernelState` in exactly one place,
:func:`decode_message`; the exact lookup (:func:`decode_lookup_state`), the reference
decoding of a reply (:func:`decode_reply`) and the dump (:func:`decode_dump`) all call
it. :func:`count_dump` reads only the state, ports and peer of each message and builds no
per-socket object. The I/O (sockets, buffers, retries) is in ``_netlink``.

Facts the code relies on, checked on Linux 6.18 (tests keep checking them):

* An exact request (flags ``NLM_F_REQUEST`` only) is answered by one datagram: the
  socket's ``inet_diag_msg``, or ``NLMSG_ERROR`` with ``-ENOENT`` for a miss. No
  ``NLM_F_ACK``: with it a hit would be followed by a second datagram.
* The exact lookup ignores ``idiag_states``. It finds TIME_WAIT and request sockets too.
* **The listener trap**: when the connection is gone but its listener is not, the
  kernel's hash lookup for the 4-tuple falls through to the listener and the reply
  describes the LISTEN socket (``dport`` 0, ``dst`` zero). Callers must compare the
  reply's 4-tuple with the request (:func:`reply_matches`). With a socket cookie in
  the request the kernel checks it, and the listener answers ``ENOENT`` instead.
* A dump ends with ``NLMSG_DONE`` whose payload is an ``int``: 0, or a negative errno
  when the dump failed, e.g. ``-ENOENT`` when no ``tcp_diag`` handler is loaded. A dump
  whose state mask is 0 walks no table and answers that ``NLMSG_DONE`` at once.
"""

from __future__ import annotations

import errno
import operator
import os
import socket
import struct
import sys
from array import array
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import islice, starmap
from types import MappingProxyType
from typing import Final, TypeVar

from tcpclose._errors import KernelViewError

from ._address import MAPPED_PREFIX, RawFourTuple, format_host
from ._summary import Summary
from ._types import TCP_STATE_OF, Address, KernelState, TcpState, TimerKind

__all__ = (
    "INET_DIAG_MSG",
    "INET_DIAG_REQUEST",
    "NLMSGHDR",
    "KernelErrorReply",
    "count_dump",
    "decode_attributes",
    "decode_dump",
    "decode_dump_info",
    "decode_lookup_state",
    "decode_message",
    "decode_reply",
    "encode_dump_request",
    "encode_lookup_request",
    "lookup_answer",
    "lookup_request",
    "port_filter_bytecode",
    "reply_attributes",
    "reply_matches",
    "reply_seq",
    "scan_dump_chunk",
    "states_mask",
)

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
#: Reply attribute carrying ``struct tcp_info`` (``enum { INET_DIAG_NONE, INET_DIAG_MEMINFO,
#: INET_DIAG_INFO, ...}`` in ``linux/inet_diag.h``), and the ``idiag_ext`` bit asking for it.
INET_DIAG_INFO: Final = 2
INFO_EXTENSION: Final = 1 << (INET_DIAG_INFO - 1)
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
#: ``struct nlmsgerr``'s leading ``int error`` (negative errno), after the nlmsghdr; also
#: the ``int`` that ``NLMSG_DONE`` carries.
NLMSGERR: Final = struct.Struct("=i")
#: ``struct nlattr``: len, type (4 bytes); payload padded to 4.
NLATTR: Final = struct.Struct("=HH")
#: ``struct inet_diag_bc_op``: code, yes, no (4 bytes).
BC_OP: Final = struct.Struct("=BBH")
#: A whole request, 72 bytes: ``nlmsghdr`` + ``inet_diag_req_v2`` (family, protocol,
#: ext, pad, states) + ``inet_diag_sockid`` (sport, dport, src[16], dst[16], if,
#: cookie[2]). The ports are packed as native ``H`` of values already in network order
#: (see ``_SWAP``); the exact lookup packs them with :data:`SOCKID` instead.
INET_DIAG_REQUEST: Final = struct.Struct("=IHHIIBBBBIHH16s16sIII")
#: The part of ``inet_diag_sockid`` that names a socket, 36 bytes: sport, dport
#: (network order, hence ``!``: no byte swapping in Python), src[16], dst[16] (an IPv4
#: address is padded to 16 bytes by ``16s``). A reply about that very socket echoes
#: these bytes.
SOCKID: Final = struct.Struct("!HH16s16s")
#: :data:`INET_DIAG_REQUEST` with the first 36 bytes of the sockid as one field.
_LOOKUP_REQUEST: Final = struct.Struct("=IHHIIBBBBI36sIII")
#: What an exact lookup's reply is checked by, in one unpack: ``nlmsg_len``,
#: ``nlmsg_type``, ``nlmsg_seq``, ``idiag_family`` and the 36 bytes of :data:`SOCKID`.
_LOOKUP_REPLY: Final = struct.Struct("=IH2xI4xB3x36s")
#: An ``NLMSG_ERROR`` reply's ``nlmsghdr`` (len, type, seq) and ``nlmsgerr.error``, and
#: how long such a message is at least.
_ERROR_REPLY: Final = struct.Struct("=IH2xI4xi")
_ERROR_END: Final = _ERROR_REPLY.size
#: ``nlmsgerr.error`` when the exact lookup finds no socket.
_NO_SOCKET: Final = -errno.ENOENT
#: ``struct inet_diag_msg``, 72 bytes: family, state, timer, retrans, sockid (sport,
#: dport, src, dst, if, cookie[2]), expires (ms), rqueue, wqueue, uid, inode. Ports are
#: network order: swapped back when decoded (see ``_SWAP``).
INET_DIAG_MSG: Final = struct.Struct("=BBBBHH16s16sIIIIIIII")
_unpack_msg: Final = INET_DIAG_MSG.unpack_from
#: The first two fields of ``nlmsghdr`` (len, type): all a message walk needs.
_LEN_AND_TYPE: Final = struct.Struct("=IH")
#: ``nlmsg_seq`` alone (offset 8).
_SEQ: Final = struct.Struct("=I")

_HDR_LEN: Final = NLMSGHDR.size
#: For the I/O: the header's size, its (len, type) and its seq (at offset 8).
NLMSG_HDRLEN: Final = _HDR_LEN
NLMSG_LEN_AND_TYPE: Final = _LEN_AND_TYPE
NLMSG_SEQ: Final = _SEQ
#: Where the ``inet_diag_msg`` of a message ends (its attributes start).
_MSG_END: Final = _HDR_LEN + INET_DIAG_MSG.size
# Offsets in a message: the family byte, the state byte, the ports, the addresses.
_FAMILY_AT: Final = _HDR_LEN
_STATE_AT: Final = _HDR_LEN + 1
_SPORT_AT: Final = _HDR_LEN + 4
_DPORT_AT: Final = _HDR_LEN + 6
_SRC_AT: Final = _HDR_LEN + 8
_DST_AT: Final = _HDR_LEN + 24
_AF_INET: Final = int(socket.AF_INET)
_AF_INET6: Final = int(socket.AF_INET6)
_TIMERS: Final = {int(t): t for t in TimerKind}
#: ``idiag_state`` and ``idiag_timer`` (one byte each) to our enums, by indexing.
_STATE_OF: Final = TCP_STATE_OF
_TIMER_OF: Final = tuple(_TIMERS.get(n) for n in range(256))
#: ``idiag_sport``/``idiag_dport`` are big-endian and unpacked as native ``H``: on a
#: little-endian host the two bytes are swapped back with arithmetic, a tenth of the
#: cost of ``socket.ntohs`` (Python 3.11 parses its arguments the slow way), which
#: counts twice per lookup and twice per dumped socket.
_SWAP: Final = sys.byteorder == "little"
_ALL_STATES_MASK: Final = 0xFFFFFFFF
_TIME_WAIT: Final = int(TcpState.TIME_WAIT)


class KernelErrorReply(KernelViewError):
    """The kernel answered a sock_diag request with an error (``NLMSG_ERROR``, or an
    ``NLMSG_DONE`` carrying one).

    Attributes:
        errno: the positive errno value, e.g. ``errno.EINVAL``.
    """

    def __init__(self, code: int, context: str) -> None:
        self.errno = code
        name = errno.errorcode.get(code, str(code))
        super().__init__(f"{context}: kernel answered {name} ({os.strerror(code)})")


# -- encoders -------------------------------------------------------------------------------


def lookup_request(four: RawFourTuple, cookie: int | None, seq: int) -> tuple[bytes, bytes]:
    """The 72-byte exact-lookup request for ``four`` and its 36 bytes of
    :data:`SOCKID` (what a reply about that very socket echoes).

    See :func:`encode_lookup_request` for the layout.

    Raises:
        ValueError: ``cookie`` is not an int in 0..2**64-1 or None.
    """
    family, local, sport, peer, dport, scope_id = four
    sockid = SOCKID.pack(sport, dport, local, peer)
    if cookie is None:
        c0 = c1 = INET_DIAG_NOCOOKIE
    elif isinstance(cookie, bool) or not isinstance(cookie, int) or not 0 <= cookie < 1 << 64:
        raise ValueError(f"cookie: expected an int in 0..2**64-1 or None, got {cookie!r}")
    else:
        c0, c1 = cookie & 0xFFFFFFFF, cookie >> 32
    request = _LOOKUP_REQUEST.pack(
        72,
        SOCK_DIAG_BY_FAMILY,
        NLM_F_REQUEST,
        seq,
        0,
        family,
        IPPROTO_TCP,
        0,
        0,
        _ALL_STATES_MASK,
        sockid,
        scope_id,
        c0,
        c1,
    )
    return request, sockid


def encode_lookup_request(four: RawFourTuple, *, cookie: int | None = None, seq: int = 0) -> bytes:
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

    Raises:
        ValueError: a bad ``cookie``.
    """
    return lookup_request(four, cookie, seq)[0]


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


def encode_dump_request(
    family: int, states: int, *, bytecode: bytes = b"", seq: int = 0, extensions: int = 0
) -> bytes:
    """A dump request: every TCP socket of ``family`` whose state bit is in ``states``,
    optionally filtered in the kernel by ``bytecode`` (an ``INET_DIAG_REQ_BYTECODE``
    attribute after the request). ``extensions`` is ``idiag_ext``: bit ``n - 1`` asks
    for attribute ``n`` in each reply (:data:`INFO_EXTENSION`: ``struct tcp_info``).

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
        extensions,
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


# -- framing --------------------------------------------------------------------------------


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
    """The positive errno of an ``NLMSG_ERROR`` or ``NLMSG_DONE`` (0: none)."""
    if length < _HDR_LEN + NLMSGERR.size:
        raise KernelViewError(f"truncated netlink error code: nlmsg_len {length}")
    (code,) = NLMSGERR.unpack_from(data, offset + _HDR_LEN)
    return -int(code)


def _done_error(data: bytes | bytearray | memoryview, offset: int, length: int) -> int:
    """The errno an ``NLMSG_DONE`` reports (0 when the dump went through). A bare
    16-byte ``NLMSG_DONE`` (old kernels) reports none."""
    return 0 if length < _HDR_LEN + NLMSGERR.size else _error_code(data, offset, length)


def reply_seq(data: bytes | bytearray | memoryview, size: int | None = None) -> int:
    """Sequence number of the first netlink message in ``data``."""
    _length, _kind, seq = _header(data, 0, len(data) if size is None else size)
    return seq


# -- inet_diag_msg --------------------------------------------------------------------------


#: The ``(host, port)`` tuples already made, per family, per raw address (16 bytes, as
#: ``inet_diag_sockid`` carries it) and per port as unpacked (network order read as
#: native); the address's text under the key ``None``. One endpoint is made once, so
#: that a dump of 50,000 TIME_WAIT on eight listening ports shares eight local tuples
#: (fewer objects for the garbage collector) and a lookup finds both of its own.
#: Bounded: past :data:`_MAX_ADDRESSES` addresses, or :data:`_MAX_PORTS` ports of one
#: address, that level is cleared first.
_V4_ENDPOINTS: Final[dict[bytes, dict[int | None, object]]] = {}
_V6_ENDPOINTS: Final[dict[bytes, dict[int | None, object]]] = {}
_MAX_ADDRESSES: Final = 64
_MAX_PORTS: Final = 16384


def _ports_of(family: int, raw: bytes) -> dict[int | None, object]:
    """The endpoints made for one address (a new, empty set the first time)."""
    if family == _AF_INET:
        addresses = _V4_ENDPOINTS
    elif family == _AF_INET6:
        addresses = _V6_ENDPOINTS
    else:
        raise KernelViewError(f"inet_diag_msg with unknown family {family}")
    ports = addresses.get(raw)
    if ports is None:
        if len(addresses) >= _MAX_ADDRESSES:
            addresses.clear()
        ports = addresses[raw] = {None: format_host(family, raw)}
    return ports


def _forget_ports(ports: dict[int | None, object]) -> None:
    """Clear the endpoints of one address that has too many, keeping its text."""
    host = ports[None]
    ports.clear()
    ports[None] = host


class _Decoded:
    """The one decoder of ``inet_diag_msg``: built from the struct's fields as
    :data:`INET_DIAG_MSG` unpacks them (``_Decoded(*fields)``, or straight from
    ``struct.iter_unpack`` rows in a dump), it *becomes* the :class:`KernelState` they
    describe (``source="netlink"``).

    It has ``KernelState``'s own slots and ends by taking its class, as
    ``_types._Unfrozen`` does (no frozen ``__setattr__`` per field): decoding in the constructor
    saves a Python call per socket, and with ``iter_unpack`` a dump's messages are
    decoded with no other Python code per socket: 11,000 instructions each, the
    garbage collector's share included, against 13,800 for a function around
    ``unpack_from`` (callgrind, 50,000 TIME_WAIT).

    ``seconds_left`` is ``idiag_expires`` in seconds when a timer runs, else None; an
    unknown state number is ``UNKNOWN``; ``local`` and ``peer`` are shared tuples (see
    :data:`_V4_ENDPOINTS`).

    Raises:
        KernelViewError: a family other than ``AF_INET``/``AF_INET6``.
    """

    __slots__ = KernelState.__slots__

    def __init__(
        self,
        family: int,
        state: int,
        timer: int,
        retrans: int,
        sport: int,
        dport: int,
        src: bytes,
        dst: bytes,
        _if: int,
        cookie0: int,
        cookie1: int,
        expires: int,
        rqueue: int,
        wqueue: int,
        uid: int,
        inode: int,
    ) -> None:
        addresses = _V4_ENDPOINTS if family == _AF_INET else _V6_ENDPOINTS
        ports = addresses.get(src) or _ports_of(family, src)  # (raises for other families)
        local = ports.get(sport)
        if local is None:  # made here, not in a function: a call per socket cost 15%
            if len(ports) > _MAX_PORTS:
                _forget_ports(ports)
            local = ports[sport] = (
                ports[None],
                (sport & 0xFF) << 8 | sport >> 8 if _SWAP else sport,
            )
        ports = addresses.get(dst) or _ports_of(family, dst)
        peer = ports.get(dport)
        if peer is None:
            if len(ports) > _MAX_PORTS:
                _forget_ports(ports)
            peer = ports[dport] = (
                ports[None],
                (dport & 0xFF) << 8 | dport >> 8 if _SWAP else dport,
            )
        self.state = _STATE_OF[state]
        self.source = "netlink"
        self.local = local
        self.peer = peer
        self.timer = _TIMER_OF[timer]
        self.seconds_left = expires / 1000 if timer else None
        self.retransmits = retrans
        self.recv_queue = rqueue
        self.send_queue = wqueue
        self.uid = uid
        self.inode = inode
        self.cookie = cookie0 | cookie1 << 32
        self.__class__ = KernelState  # type: ignore[assignment]


def decode_message(data: bytes | bytearray | memoryview, offset: int) -> KernelState:
    """The :class:`KernelState` the ``inet_diag_msg`` of the message at ``offset``
    describes (``source="netlink"``), decoded by :class:`_Decoded`.

    The caller has checked the framing: a ``SOCK_DIAG_BY_FAMILY`` message at least
    ``16 + 72`` bytes long.

    Worked example, an ESTABLISHED IPv4 socket (124 bytes; attributes after byte 88)::

        7c000000 1400 0000 07000000 2e160000     nlmsghdr: len 124, type 20, seq 7
        02 01 00 00                              AF_INET, ESTABLISHED, timer off, 0
        ddeda9ac                                 sport 56813, dport 43436
        7f000001 00..  7f000001 00..             src, dst
        00000000 01000000 00000000               if 0, cookie 1
        00000000 00000000 00000000 00000000      expires 0 ms, rqueue 0, wqueue 0, uid 0
        c9250000                                 inode 9673
        05000800 00000000  ...                   attributes (INET_DIAG_SHUTDOWN, ...)

    Raises:
        KernelViewError: a family other than ``AF_INET``/``AF_INET6``.
    """
    return _Decoded(*_unpack_msg(data, offset + _HDR_LEN))  # type: ignore[return-value]


def _first_socket_message(data: bytes | bytearray | memoryview, size: int, context: str) -> bool:
    """Check the reply to an exact lookup: True for a socket message, False for ENOENT.

    Raises:
        KernelErrorReply: the kernel answered another error (EINVAL, EPERM, ...).
        KernelViewError: the bytes are not a well-formed reply.
    """
    length, kind, _seq = _header(data, 0, size)
    if kind == NLMSG_ERROR:
        code = _error_code(data, 0, length)
        if code == errno.ENOENT:
            return False
        if code == 0:
            raise KernelViewError(f"unexpected acknowledgement (NLMSG_ERROR 0) to a {context}")
        raise KernelErrorReply(code, f"sock_diag {context}")
    if kind != SOCK_DIAG_BY_FAMILY:
        raise KernelViewError(f"unexpected netlink message type {kind} in a {context} reply")
    if length < _MSG_END:
        raise KernelViewError(f"truncated inet_diag_msg: nlmsg_len {length}, need {_MSG_END}")
    return True


def decode_reply(
    data: bytes | bytearray | memoryview, size: int | None = None
) -> KernelState | None:
    """The socket an exact-lookup reply describes, as the kernel gave it (no check
    that it is the 4-tuple asked for: see :func:`decode_lookup_state`); ``None`` for
    ENOENT. ``size`` is how many bytes of ``data`` were received (default: all).

    A miss is ``NLMSG_ERROR`` (type 2) whose ``error`` is ``-ENOENT``::

        5c000000 0200 0000 07000000 2e160000  feffffff  <the request echoed>

    Raises:
        KernelErrorReply: the kernel answered another error (EINVAL, EPERM, ...).
        KernelViewError: the bytes are not a well-formed reply.

    >>> decode_reply(bytes.fromhex("2400000002000000070000000000000" "0feffffff") +
    ...              bytes(16)) is None
    True
    """
    size = len(data) if size is None else size
    if not _first_socket_message(data, size, "lookup"):
        return None
    return decode_message(data, 0)


def reply_attributes(
    data: bytes | bytearray | memoryview, size: int | None = None
) -> tuple[tuple[int, bytes], ...]:
    """The ``nlattr`` list after the ``inet_diag_msg`` of a lookup reply (empty for
    ENOENT), as ``(type, payload)`` pairs.

    Raises:
        KernelErrorReply, KernelViewError: as :func:`decode_reply`.
    """
    size = len(data) if size is None else size
    if not _first_socket_message(data, size, "lookup"):
        return ()
    length, _kind, _seq = _header(data, 0, size)
    return decode_attributes(data, _MSG_END, length)


def reply_matches(
    data: bytes | bytearray | memoryview, four: RawFourTuple, offset: int = 0
) -> bool:
    """True when the socket message at ``offset`` describes the 4-tuple asked for
    (after removing IPv4 mapping on either side): the guard against the listener trap.

    The caller has checked the framing, as for :func:`decode_message`.
    """
    asked, local, local_port, peer, peer_port, _scope_id = four
    family = data[offset + _FAMILY_AT]
    sport = data[offset + _SPORT_AT] << 8 | data[offset + _SPORT_AT + 1]
    dport = data[offset + _DPORT_AT] << 8 | data[offset + _DPORT_AT + 1]
    if sport != local_port or dport != peer_port:
        return False
    src = bytes(data[offset + _SRC_AT : offset + _SRC_AT + 16])
    dst = bytes(data[offset + _DST_AT : offset + _DST_AT + 16])
    if family == _AF_INET:
        return asked == _AF_INET and src[:4] == local and dst[:4] == peer
    if family != _AF_INET6:
        return False
    if asked == _AF_INET6:
        return src == local and dst == peer
    return (
        src[:12] == MAPPED_PREFIX
        and dst[:12] == MAPPED_PREFIX
        and src[12:] == local
        and dst[12:] == peer
    )


_CLOSED: Final = KernelState(TcpState.CLOSED, "netlink")


def decode_lookup_state(
    data: bytes | bytearray,
    size: int,
    four: RawFourTuple,
    request: bytes | bytearray | None = None,
) -> KernelState:
    """The answer to an exact lookup of ``four``: the socket, or ``CLOSED`` for ENOENT
    and for a reply describing another socket (the listener trap).

    ``request``, the 72 bytes sent, lets the usual case be checked with one comparison:
    the reply's ``inet_diag_sockid`` ports and addresses are then byte for byte the
    request's. Anything else (a mapped reply, another socket) goes through
    :func:`reply_matches`.

    Raises:
        KernelErrorReply: the kernel answered another error.
        KernelViewError: the bytes are not a well-formed reply.
    """
    if request is not None and size >= _MSG_END:
        length, kind, _seq, family, sockid = _LOOKUP_REPLY.unpack_from(data)
        if (
            kind == SOCK_DIAG_BY_FAMILY
            and _MSG_END <= length <= size
            and family == four[0]
            and sockid == request[24:60]
        ):
            return decode_message(data, 0)
    if not _first_socket_message(data, size, "lookup"):
        return _CLOSED
    return decode_message(data, 0) if reply_matches(data, four) else _CLOSED


def lookup_answer(
    data: bytes | bytearray, size: int, four: RawFourTuple, seq: int, sockid: bytes
) -> KernelState | None:
    """:func:`decode_lookup_state` for the reply to the request :func:`lookup_request`
    made (``seq``, ``sockid``); None when ``data`` answers another request (a stale
    reply: the caller receives again).

    The usual reply, about the socket asked for in the family asked in, is recognised
    with one unpack and one comparison of its :data:`SOCKID` with the request's; a miss
    (``NLMSG_ERROR`` carrying ``-ENOENT``) with one unpack too.

    Raises:
        KernelErrorReply, KernelViewError: as :func:`decode_lookup_state`.
    """
    if size >= _MSG_END:
        length, kind, reply_seq, family, reply_sockid = _LOOKUP_REPLY.unpack_from(data)
        if (
            kind == SOCK_DIAG_BY_FAMILY
            and reply_seq == seq
            and _MSG_END <= length <= size
            and family == four[0]
            and reply_sockid == sockid
        ):
            return decode_message(data, 0)
    if size >= _ERROR_END:
        # The other usual reply: no such socket (NLMSG_ERROR with -ENOENT), recognised
        # with one unpack too: five Python calls of the walk below saved, 3,600
        # instructions per lookup that finds nothing (callgrind, bench_aio.py).
        length, kind, reply_seq, code = _ERROR_REPLY.unpack_from(data)
        if (
            kind == NLMSG_ERROR
            and reply_seq == seq
            and code == _NO_SOCKET
            and _ERROR_END <= length <= size
        ):
            return _CLOSED
    if _header(data, 0, size)[2] != seq:
        return None
    return decode_lookup_state(data, size, four)


# -- dumps ----------------------------------------------------------------------------------


def scan_dump_chunk(data: bytes | bytearray | memoryview, seq: int) -> bool:
    """Check the framing of one received dump datagram; True when it ends the dump.

    Raises:
        KernelErrorReply: the kernel answered the dump with an error (``NLMSG_ERROR``,
            or an ``NLMSG_DONE`` carrying one).
        KernelViewError: malformed framing.
    """
    size = len(data)
    offset = 0
    while offset < size:
        length, kind, msg_seq = _header(data, offset, size)
        if msg_seq != seq:
            raise KernelViewError(f"dump message with seq {msg_seq}, expected {seq}")
        if kind == NLMSG_DONE:
            code = _done_error(data, offset, length)
            if code:
                raise KernelErrorReply(code, "sock_diag dump")
            return True
        if kind == NLMSG_ERROR:
            raise KernelErrorReply(_error_code(data, offset, length), "sock_diag dump")
        offset += (length + 3) & ~3
    return False


def _not_a_socket(data: bytes | bytearray | memoryview, offset: int, size: int) -> int:
    """Deal with a dump message that is not a complete socket message: 0 for
    ``NLMSG_DONE``, else its length for ``NLMSG_NOOP``.

    Raises:
        KernelErrorReply: ``NLMSG_ERROR``, or ``NLMSG_DONE`` with an error.
        KernelViewError: malformed framing, another type, a truncated ``inet_diag_msg``.
    """
    length, kind, _seq = _header(data, offset, size)
    if kind == NLMSG_DONE:
        code = _done_error(data, offset, length)
        if code:
            raise KernelErrorReply(code, "sock_diag dump")
        return 0
    if kind == NLMSG_ERROR:
        raise KernelErrorReply(_error_code(data, offset, length), "sock_diag dump")
    if kind == SOCK_DIAG_BY_FAMILY:
        raise KernelViewError(f"truncated inet_diag_msg at offset {offset}: nlmsg_len {length}")
    if kind != NLMSG_NOOP:
        raise KernelViewError(f"unexpected netlink message type {kind} in a dump")
    return length


def _run_length(data: bytes | bytearray | memoryview) -> int:
    """``length`` when ``data`` is nothing but socket messages of that one length (a
    multiple of 4, so they follow each other unpadded), else 0.

    Checked without a Python loop: ``data[k::length]`` holds byte ``k`` of every
    message, so six extended slices compare every ``nlmsg_len`` and ``nlmsg_type``.
    """
    size = len(data)
    if size < _MSG_END or not isinstance(data, bytes):
        return 0
    length, kind = _LEN_AND_TYPE.unpack_from(data)
    if kind != SOCK_DIAG_BY_FAMILY or length < _MSG_END or length % 4:
        return 0
    messages, rest = divmod(size, length)
    if rest or any(
        data[k::length] != data[k : k + 1] * messages for k in range(_LEN_AND_TYPE.size)
    ):
        return 0
    return int(length)


#: :data:`INET_DIAG_MSG` after a 16-byte header, padded to one message's length, per
#: length seen: ``iter_unpack`` then yields one row of fields per message of a run.
_MESSAGE_RUNS: Final[dict[int, struct.Struct]] = {}


def decode_dump(chunks: Iterable[bytes | bytearray | memoryview]) -> Iterator[KernelState]:
    """Decode the datagrams of one dump into :class:`KernelState` values, lazily.

    Stops at ``NLMSG_DONE``. Addresses are formatted once per distinct address, and
    each ``(host, port)`` made once (see :data:`_V4_ENDPOINTS`).

    Raises:
        KernelErrorReply: an error in the stream (``NLMSG_ERROR``, or ``NLMSG_DONE``
            carrying one).
        KernelViewError: malformed framing or a truncated ``inet_diag_msg``.
    """
    unpack_header = _LEN_AND_TYPE.unpack_from
    for data in chunks:
        size = len(data)
        length = _run_length(data)
        if length:  # the usual datagram: its messages decoded with no Python loop around
            layout = _MESSAGE_RUNS.get(length)
            if layout is None:
                layout = _MESSAGE_RUNS.setdefault(
                    length,
                    struct.Struct(f"={_HDR_LEN}x{INET_DIAG_MSG.format[1:]}{length - _MSG_END}x"),
                )
            yield from starmap(_Decoded, layout.iter_unpack(data))
            continue
        offset = 0
        while offset < size:
            if size - offset >= _MSG_END:
                length, kind = unpack_header(data, offset)
                if kind == SOCK_DIAG_BY_FAMILY and _MSG_END <= length <= size - offset:
                    yield decode_message(data, offset)
                    offset += (length + 3) & ~3
                    continue
            length = _not_a_socket(data, offset, size)
            if not length:
                return
            offset += (length + 3) & ~3


def decode_dump_info(
    chunks: Iterable[bytes | bytearray | memoryview],
) -> Iterator[tuple[KernelState, bytes | None]]:
    """Decode a dump asked with :data:`INFO_EXTENSION`: each socket with the bytes of
    its ``INET_DIAG_INFO`` attribute (``struct tcp_info``, for
    :func:`~tcpclose._kernel._tcpinfo.decode_tcp_info`), or None when the kernel sent
    none (sockets without a full TCP state, e.g. TIME_WAIT). A plain walk: meant for
    the few sockets of one state (CLOSE_WAIT), not the 50,000 of :func:`decode_dump`.

    Raises:
        KernelErrorReply, KernelViewError: as :func:`decode_dump`.
    """
    for data in chunks:
        size = len(data)
        offset = 0
        while offset < size:
            if size - offset >= _MSG_END:
                length, kind = _LEN_AND_TYPE.unpack_from(data, offset)
                if kind == SOCK_DIAG_BY_FAMILY and _MSG_END <= length <= size - offset:
                    info = None
                    for attr, payload in decode_attributes(
                        data, offset + _MSG_END, offset + length
                    ):
                        if attr == INET_DIAG_INFO:
                            info = payload
                    yield decode_message(data, offset), info
                    offset += (length + 3) & ~3
                    continue
            length = _not_a_socket(data, offset, size)
            if not length:
                return
            offset += (length + 3) & ~3


#: What counting needs of a socket message, in one unpack: ``nlmsg_len``, ``nlmsg_type``,
#: then ``idiag_family``, ``idiag_state``, ``idiag_sport``, ``idiag_dport`` (network
#: order, read as native: see ``_SWAP``) and ``idiag_dst``.
_COUNTED: Final = struct.Struct("=IH10xBB2xHH16x16s")
_LITTLE: Final = sys.byteorder == "little"
#: Counting keys made of bytes of a message: for each byte of the key in memory order,
#: the offset in the message it is copied from (None: a zero byte). A TIME_WAIT's local
#: port as one UTF-32 code unit in native order (:meth:`_Counts.add_ports`), ...
_LOCAL_PORT_KEY: Final = (
    (_SPORT_AT + 1, _SPORT_AT, None, None) if _LITTLE else (None, None, _SPORT_AT, _SPORT_AT + 1)
)
_UTF32: Final = "utf-32-le" if _LITTLE else "utf-32-be"
_DST_V4: Final = tuple(range(_DST_AT, _DST_AT + 4))
#: ... and an IPv4 TIME_WAIT's peer as one native ``Q``: ``idiag_dport | address << 32``,
#: the address being the 4 bytes of ``idiag_dst`` read as a native ``I``
#: (:func:`_v4_peer_key`); read back as ``H`` number ``_PEER_PORT_AT`` and ``I`` number
#: ``_PEER_ADDRESS_AT`` of the key.
_V4_PEER_KEY: Final = (
    (_DPORT_AT + 1, _DPORT_AT, None, None, *_DST_V4)
    if _LITTLE
    else (*_DST_V4, None, None, _DPORT_AT, _DPORT_AT + 1)
)
_PEER_PORT_AT, _PEER_ADDRESS_AT = (0, 1) if _LITTLE else (3, 0)
#: An IPv6 TIME_WAIT's ``(idiag_dport, idiag_dst)`` (too long for one int), padded to
#: one message's length, per length seen: ``iter_unpack`` yields one key per message.
_V6_PEER_FIELDS: Final = "!22xH16x16s"
_V6_PEER_RUNS: Final[dict[int, struct.Struct]] = {}
_FIRST: Final = operator.itemgetter(0)
_SECOND: Final = operator.itemgetter(1)
_TIME_WAIT_BYTE: Final = bytes([_TIME_WAIT])
_Key = TypeVar("_Key", int, tuple[int, bytes])


def _v4_peer_key(port: int, dst: bytes) -> int:
    """The key :data:`_V4_PEER_KEY` makes, from the decoded fields."""
    return port | int.from_bytes(dst[:4], sys.byteorder) << 32


def _most_first(counts: Counter[_Key]) -> list[_Key]:
    """The keys of ``counts``, largest count first, ties in first-seen order."""
    return sorted(counts, key=counts.__getitem__, reverse=True)


def _v4_peers(keys: list[int]) -> Iterator[Address]:
    """The ``(host, port)`` of IPv4 peer keys (:data:`_V4_PEER_KEY`), in C: the keys'
    bytes are read back as their port and address; each address formatted once."""
    data = memoryview(array("Q", keys)).cast("B")
    addresses = data.cast("I")[_PEER_ADDRESS_AT::2]
    hosts = {a: socket.inet_ntop(_AF_INET, a.to_bytes(4, sys.byteorder)) for a in set(addresses)}
    return zip(map(hosts.__getitem__, addresses), data.cast("H")[_PEER_PORT_AT::4], strict=True)


def _v6_peers(keys: list[tuple[int, bytes]]) -> Iterator[Address]:
    """The ``(host, port)`` of IPv6 peer keys ``(port, raw address)``; each address
    formatted once."""
    hosts = {raw: format_host(_AF_INET6, raw) for raw in set(map(_SECOND, keys))}
    return zip(map(hosts.__getitem__, map(_SECOND, keys)), map(_FIRST, keys), strict=True)


def _keys(data: bytes, length: int, layout: tuple[int | None, ...]) -> bytearray:
    """The key of every message of a run (:func:`_run_length`) of ``length``-byte
    messages, made as ``layout`` says, one after the other. Extended slices copy one
    byte of every message at a time: no Python code runs per message."""
    width = len(layout)
    keys = bytearray(len(data) // length * width)
    for i, at in enumerate(layout):
        if at is not None:
            keys[i::width] = data[at::length]
    return keys


class _Counts:
    """What :func:`count_dump` counts: sockets per state number, and for TIME_WAIT per
    local port and per peer, by key (IPv4: :func:`_v4_peer_key`, IPv6: ``(port,
    raw address)``), formatted once per distinct peer in :meth:`destinations`.

    Each family's peers are counted apart, each ``Counter`` in its first-seen order; so
    that ties can keep their first-seen order across families too, ``switches`` notes,
    whenever a TIME_WAIT of the other family comes, how many peers the family left had
    (a dump asks one family at a time: one switch at most).
    """

    __slots__ = ("family", "per_state", "ports", "switches", "v4_peers", "v6_peers")

    def __init__(self) -> None:
        self.per_state: Counter[int] = Counter()
        self.ports: Counter[int] = Counter()
        self.v4_peers: Counter[int] = Counter()
        self.v6_peers: Counter[tuple[int, bytes]] = Counter()
        self.family = 0  # of the last TIME_WAIT counted
        self.switches: list[tuple[int, int]] = []  # (family left, its peers by then)

    def switch_to(self, family: int) -> None:
        """Note that TIME_WAIT of ``family`` (``AF_INET``/``AF_INET6``) come next."""
        if self.family:
            left = self.v4_peers if self.family == _AF_INET else self.v6_peers
            self.switches.append((self.family, len(left)))
        self.family = family

    def add_time_wait_run(self, data: bytes | bytearray | memoryview) -> bool:
        """Count ``data`` if it is a run (:func:`_run_length`) of TIME_WAIT messages of
        one family; False, with nothing counted, otherwise. Checked with extended
        slices and counted by ``Counter`` over one int per message (IPv6 peers: one
        ``struct.iter_unpack`` row): no Python code runs per message."""
        length = _run_length(data)
        if not length or not isinstance(data, bytes):
            return False
        messages = len(data) // length
        family = data[_FAMILY_AT]
        if family not in (_AF_INET, _AF_INET6) or data[_STATE_AT] != _TIME_WAIT:
            return False
        if (
            data[_FAMILY_AT::length] != data[_FAMILY_AT : _FAMILY_AT + 1] * messages
            or data[_STATE_AT::length] != _TIME_WAIT_BYTE * messages
        ):
            return False
        if family != self.family:
            self.switch_to(family)
        self.per_state[_TIME_WAIT] += messages
        self.add_ports(_keys(data, length, _LOCAL_PORT_KEY).decode(_UTF32, "surrogatepass"))
        if family == _AF_INET:
            # One int per socket, not a struct row (a tuple and a bytes object): 990
            # instructions per socket, the ints made, against 1,970 (50,000 TIME_WAIT).
            self.v4_peers.update(memoryview(_keys(data, length, _V4_PEER_KEY)).cast("Q"))
        else:
            layout = _V6_PEER_RUNS.get(length)
            if layout is None:
                layout = _V6_PEER_RUNS.setdefault(
                    length, struct.Struct(f"{_V6_PEER_FIELDS}{length - _DST_AT - 16}x")
                )
            self.v6_peers.update(layout.iter_unpack(data))  # the rows are the keys
        return True

    def add_ports(self, ports: str) -> None:
        """Count local ports given as the characters of ``ports`` (one per socket).

        A server's TIME_WAIT sit on its few listening ports: each port is counted with
        ``str.count`` and taken out with ``str.replace``, two loops in C over the
        remaining characters, instead of an update of a ``Counter`` per socket (460
        instructions per socket, the string made, against 1,000: callgrind, 50,000
        TIME_WAIT on 8 ports). Ports rarer than a tenth of what remains (a client's
        ephemeral ports, each seen once) go to the ``Counter``.
        """
        counts = self.ports
        while ports:
            port = ports[0]  # the first seen: the ports keep their first-seen order
            n = ports.count(port)
            if n * 10 < len(ports):  # the rest as ints (not one-character strings)
                counts.update(memoryview(ports.encode(_UTF32, "surrogatepass")).cast("I"))
                return
            counts[ord(port)] += n
            ports = ports.replace(port, "")

    def add_time_wait(self, family: int, sport: int, dport: int, dst: bytes) -> None:
        """Count one TIME_WAIT message's local port and peer (ports in host order)."""
        if family != self.family:
            if family not in (_AF_INET, _AF_INET6):
                raise KernelViewError(f"inet_diag_msg with unknown family {family}")
            self.switch_to(family)
        self.ports[sport] += 1
        if family == _AF_INET:
            self.v4_peers[_v4_peer_key(dport, dst)] += 1
        else:
            self.v6_peers[dport, dst] += 1

    def destinations(self) -> dict[Address, int]:
        """TIME_WAIT per peer ``(host, port)``: largest count first, ties in first-seen
        order."""
        v4, v6 = self.v4_peers, self.v6_peers
        # One family (a dump's TIME_WAIT, mostly): ordered while the keys are still ints
        # (or tuples), then each distinct key made into its (host, port) once.
        if not v6:
            order = _most_first(v4)
            return dict(zip(_v4_peers(order), map(v4.__getitem__, order), strict=True))
        if not v4:
            order6 = _most_first(v6)
            return dict(zip(_v6_peers(order6), map(v6.__getitem__, order6), strict=True))
        # Both: each family's peers in their first-seen order, interleaved back as they
        # were first seen (see switches), then a stable sort by count.
        firsts = {
            _AF_INET: zip(_v4_peers(list(v4)), v4.values(), strict=True),
            _AF_INET6: zip(_v6_peers(list(v6)), v6.values(), strict=True),
        }
        taken = {_AF_INET: 0, _AF_INET6: 0}
        seen: list[tuple[Address, int]] = []
        for family, until in (
            *self.switches,
            (self.family, len(v4 if self.family == _AF_INET else v6)),
        ):
            seen.extend(islice(firsts[family], until - taken[family]))
            taken[family] = until
        return dict(sorted(seen, key=_SECOND, reverse=True))

    def summary(self) -> Summary:
        """The :class:`Summary` of what was counted."""
        by_state: Counter[TcpState] = Counter()
        for number, n in self.per_state.items():  # numbers the kernel does not define add up
            by_state[_STATE_OF[number]] += n
        # Made here, not by Summary.from_counts: it would sort the mappings again.
        return Summary(
            "netlink",
            by_state.total(),
            MappingProxyType(dict(by_state.most_common())),
            MappingProxyType(dict(self.ports.most_common())),
            MappingProxyType(self.destinations()),
        )


def count_dump(streams: Iterable[Iterable[bytes | bytearray | memoryview]]) -> Summary:
    """Count the sockets of one or more dumps (each the datagrams of one request)
    without decoding them: of each message only the state, and for TIME_WAIT the local
    port and the peer's raw address and port are read (formatted once per distinct
    peer at the end). The result equals ``Summary.from_states`` of :func:`decode_dump`
    over the same streams.

    A datagram made only of TIME_WAIT messages of one length (what a TIME_WAIT dump
    returns) is counted without a Python loop (:meth:`_Counts.add_time_wait_run`); any other
    datagram is walked message by message.

    Raises:
        KernelErrorReply, KernelViewError: as :func:`decode_dump`.
    """
    counts = _Counts()
    unpack = _COUNTED.unpack_from
    for chunks in streams:
        for data in chunks:
            if counts.add_time_wait_run(data):
                continue
            size = len(data)
            offset = 0
            while offset < size:
                if size - offset >= _MSG_END:
                    length, kind, family, state, sport, dport, dst = unpack(data, offset)
                    if kind == SOCK_DIAG_BY_FAMILY and _MSG_END <= length <= size - offset:
                        counts.per_state[state] += 1
                        if state == _TIME_WAIT:
                            if _SWAP:
                                sport = (sport & 0xFF) << 8 | sport >> 8
                                dport = (dport & 0xFF) << 8 | dport >> 8
                            counts.add_time_wait(family, sport, dport, dst)
                        offset += (length + 3) & ~3
                        continue
                length = _not_a_socket(data, offset, size)
                if not length:
                    break
                offset += (length + 3) & ~3
            else:
                continue
            break  # NLMSG_DONE: this stream is over
    return counts.summary()
