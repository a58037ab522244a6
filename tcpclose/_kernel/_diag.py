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
from collections import Counter
from collections.abc import Iterable, Iterator
from itertools import repeat
from typing import Final

from tcpclose._errors import KernelViewError

from ._address import MAPPED_PREFIX, FourTuple, format_host
from ._summary import Summary
from ._types import Address, KernelState, TcpState, TimerKind, new_kernel_state

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
    "pack_lookup_request",
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
#: (see ``_SWAP``), which keeps one native-order struct for the whole request.
INET_DIAG_REQUEST: Final = struct.Struct("=IHHIIBBBBIHH16s16sIII")
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
_STATES: Final = {int(s): s for s in TcpState if s > 0}
_TIMERS: Final = {int(t): t for t in TimerKind}
#: ``idiag_state`` and ``idiag_timer`` (one byte each) to our enums, by indexing.
_STATE_OF: Final = tuple(_STATES.get(n, TcpState.UNKNOWN) for n in range(256))
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


def pack_lookup_request(buffer: bytearray, four: FourTuple, cookie: int | None, seq: int) -> None:
    """Write the 72-byte exact-lookup request for ``four`` into ``buffer``.

    See :func:`encode_lookup_request` for the layout.
    """
    if cookie is None:
        c0 = c1 = INET_DIAG_NOCOOKIE
    elif isinstance(cookie, bool) or not isinstance(cookie, int) or not 0 <= cookie < 1 << 64:
        raise ValueError(f"cookie: expected an int in 0..2**64-1 or None, got {cookie!r}")
    else:
        c0, c1 = cookie & 0xFFFFFFFF, cookie >> 32
    family, local, sport, peer, dport, scope_id = four
    if _SWAP:  # to network order (see _SWAP)
        sport = (sport & 0xFF) << 8 | sport >> 8
        dport = (dport & 0xFF) << 8 | dport >> 8
    INET_DIAG_REQUEST.pack_into(
        buffer,
        0,
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
        sport,
        dport,
        local,
        peer,
        scope_id,
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


class _Ports(dict[int, Address]):
    """The ``(host, port)`` tuples made for one address, by port as unpacked (network
    order); ``host`` is the address as text."""

    __slots__ = ("host",)

    def __init__(self, host: str) -> None:
        super().__init__()
        self.host = host


class Endpoints:
    """``(host, port)`` tuples already made, per family and raw address, so that each
    distinct endpoint is formatted and allocated once: a dump of 50,000 TIME_WAIT
    sockets on eight listening ports then shares eight local tuples, which also spares
    the garbage collector (15% of a dump's time, measured at 50,000).

    Bounded: an address past ``max_addresses``, or a port past ``max_ports`` for one
    address, clears that level first.
    """

    __slots__ = ("max_addresses", "max_ports", "v4", "v6")

    def __init__(self, max_addresses: int, max_ports: int) -> None:
        self.v4: dict[bytes, _Ports] = {}
        self.v6: dict[bytes, _Ports] = {}
        self.max_addresses = max_addresses
        self.max_ports = max_ports

    def address(self, addresses: dict[bytes, _Ports], family: int, raw: bytes) -> _Ports:
        if len(addresses) >= self.max_addresses:
            addresses.clear()
        ports = addresses[raw] = _Ports(format_host(family, raw))
        return ports

    def endpoint(self, ports: _Ports, port: int) -> Address:
        if len(ports) >= self.max_ports:
            ports.clear()
        endpoint = ports[port] = (ports.host, (port & 0xFF) << 8 | port >> 8 if _SWAP else port)
        return endpoint


#: The lookups' cache: the close path asks about one 4-tuple several times.
_LOOKUP_ENDPOINTS: Final = Endpoints(max_addresses=256, max_ports=64)
#: A dump's cache lives as long as the dump: no bound needed.
_UNBOUNDED: Final = 1 << 62


def decode_message(
    data: bytes | bytearray | memoryview,
    offset: int,
    endpoints: Endpoints = _LOOKUP_ENDPOINTS,
) -> KernelState:
    """The :class:`KernelState` the ``inet_diag_msg`` of the message at ``offset``
    describes (``source="netlink"``). The one decoder of the struct.

    The caller has checked the framing: a ``SOCK_DIAG_BY_FAMILY`` message at least
    ``16 + 72`` bytes long. ``seconds_left`` is ``idiag_expires`` in seconds when a
    timer runs, else None; an unknown state number is ``UNKNOWN``. ``endpoints``
    caches the ``local`` and ``peer`` tuples.

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
    ) = _unpack_msg(data, offset + _HDR_LEN)
    if family == _AF_INET:
        addresses = endpoints.v4
    elif family == _AF_INET6:
        addresses = endpoints.v6
    else:
        raise KernelViewError(f"inet_diag_msg with unknown family {family}")
    ports = addresses.get(src)
    if ports is None:
        ports = endpoints.address(addresses, family, src)
    local = ports.get(sport)
    if local is None:
        local = endpoints.endpoint(ports, sport)
    ports = addresses.get(dst)
    if ports is None:
        ports = endpoints.address(addresses, family, dst)
    peer = ports.get(dport)
    if peer is None:
        peer = endpoints.endpoint(ports, dport)
    return new_kernel_state(
        _STATE_OF[state],
        "netlink",
        local,
        peer,
        _TIMER_OF[timer],
        expires / 1000 if timer else None,
        retrans,
        rqueue,
        wqueue,
        uid,
        inode,
        cookie0 | cookie1 << 32,
    )


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


def reply_matches(data: bytes | bytearray | memoryview, four: FourTuple, offset: int = 0) -> bool:
    """True when the socket message at ``offset`` describes the 4-tuple asked for
    (after removing IPv4 mapping on either side): the guard against the listener trap.

    The caller has checked the framing, as for :func:`decode_message`.
    """
    family = data[offset + _FAMILY_AT]
    sport = data[offset + _SPORT_AT] << 8 | data[offset + _SPORT_AT + 1]
    dport = data[offset + _DPORT_AT] << 8 | data[offset + _DPORT_AT + 1]
    if sport != four.local_port or dport != four.peer_port:
        return False
    src = bytes(data[offset + _SRC_AT : offset + _SRC_AT + 16])
    dst = bytes(data[offset + _DST_AT : offset + _DST_AT + 16])
    if family == _AF_INET:
        return four.family == _AF_INET and src[:4] == four.local and dst[:4] == four.peer
    if family != _AF_INET6:
        return False
    if four.family == _AF_INET6:
        return src == four.local and dst == four.peer
    return (
        src[:12] == MAPPED_PREFIX
        and dst[:12] == MAPPED_PREFIX
        and src[12:] == four.local
        and dst[12:] == four.peer
    )


_CLOSED: Final = KernelState(TcpState.CLOSED, "netlink")
#: ``nlmsg_len``, ``nlmsg_type`` and ``idiag_family`` of a reply, in one unpack.
_REPLY_HEAD: Final = struct.Struct("=IH10xB")


def decode_lookup_state(
    data: bytes | bytearray,
    size: int,
    four: FourTuple,
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
    if size >= _MSG_END:
        length, kind, family = _REPLY_HEAD.unpack_from(data)
        if kind == SOCK_DIAG_BY_FAMILY and _MSG_END <= length <= size:
            if (
                request is not None
                and family == four.family
                and data.startswith(request[24:60], _SPORT_AT)
            ) or reply_matches(data, four):
                return decode_message(data, 0)
            return _CLOSED
    if not _first_socket_message(data, size, "lookup"):
        return _CLOSED
    return decode_message(data, 0) if reply_matches(data, four) else _CLOSED


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


def decode_dump(chunks: Iterable[bytes | bytearray | memoryview]) -> Iterator[KernelState]:
    """Decode the datagrams of one dump into :class:`KernelState` values, lazily.

    Stops at ``NLMSG_DONE``. Addresses are formatted once per distinct address, and
    each ``(host, port)`` made once (see :class:`Endpoints`).

    Raises:
        KernelErrorReply: an error in the stream (``NLMSG_ERROR``, or ``NLMSG_DONE``
            carrying one).
        KernelViewError: malformed framing or a truncated ``inet_diag_msg``.
    """
    unpack_header = _LEN_AND_TYPE.unpack_from
    decode = decode_message
    endpoints = Endpoints(_UNBOUNDED, _UNBOUNDED)
    for data in chunks:
        size = len(data)
        length = _run_length(data)
        if length:  # the usual datagram: its messages decoded with no Python loop around
            yield from map(decode, repeat(data), range(0, size, length), repeat(endpoints))
            continue
        offset = 0
        while offset < size:
            if size - offset >= _MSG_END:
                length, kind = unpack_header(data, offset)
                if kind == SOCK_DIAG_BY_FAMILY and _MSG_END <= length <= size - offset:
                    yield decode(data, offset, endpoints)
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
    endpoints = Endpoints(_UNBOUNDED, _UNBOUNDED)
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
                    yield decode_message(data, offset, endpoints), info
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
#: A TIME_WAIT message's ``idiag_sport``, and its ``(idiag_dport, idiag_dst)`` (ports in
#: network order, so read right): one message's length is added as padding, so that
#: ``iter_unpack`` yields one row per message of a run.
_LOCAL_PORT_FIELD: Final = "!20xH"
_PEER_FIELDS: Final = "!22xH16x16s"
#: The two layouts padded to one message's length, per length seen.
_RUN_LAYOUTS: Final[dict[int, tuple[struct.Struct, struct.Struct]]] = {}
_FIRST: Final = operator.itemgetter(0)
_SECOND: Final = operator.itemgetter(1)
_TIME_WAIT_BYTE: Final = bytes([_TIME_WAIT])

#: Per family, TIME_WAIT counts per (peer port, raw peer address).
_PeerCounts = dict[int, Counter[tuple[int, bytes]]]


def _count_time_wait_run(
    data: bytes | bytearray | memoryview,
    per_state: Counter[int],
    ports: Counter[int],
    peers: _PeerCounts,
) -> bool:
    """Count ``data`` if it is a run (:func:`_run_length`) of TIME_WAIT messages of one
    family; False, with nothing counted, otherwise. Checked with extended slices and
    counted with ``struct.iter_unpack`` and ``Counter``: no Python code runs per
    message."""
    length = _run_length(data)
    if not length or not isinstance(data, bytes):
        return False
    messages = len(data) // length
    family = data[_FAMILY_AT]
    if family not in peers or data[_STATE_AT] != _TIME_WAIT:
        return False
    if (
        data[_FAMILY_AT::length] != data[_FAMILY_AT : _FAMILY_AT + 1] * messages
        or data[_STATE_AT::length] != _TIME_WAIT_BYTE * messages
    ):
        return False
    layouts = _RUN_LAYOUTS.get(length)
    if layouts is None:
        layouts = _RUN_LAYOUTS.setdefault(
            length,
            (
                struct.Struct(f"{_LOCAL_PORT_FIELD}{length - _DPORT_AT}x"),
                struct.Struct(f"{_PEER_FIELDS}{length - _DST_AT - 16}x"),
            ),
        )
    per_state[_TIME_WAIT] += messages
    ports.update(map(_FIRST, layouts[0].iter_unpack(data)))
    peers[family].update(layouts[1].iter_unpack(data))  # the rows are the keys
    return True


def count_dump(streams: Iterable[Iterable[bytes | bytearray | memoryview]]) -> Summary:
    """Count the sockets of one or more dumps (each the datagrams of one request)
    without decoding them: of each message only the state, and for TIME_WAIT the local
    port and the peer's raw address and port are read (formatted once per distinct
    peer at the end). The result equals ``Summary.from_states`` of :func:`decode_dump`
    over the same streams.

    A datagram made only of TIME_WAIT messages of one length (what a TIME_WAIT dump
    returns) is counted without a Python loop (:func:`_count_time_wait_run`); any other
    datagram is walked message by message.

    Raises:
        KernelErrorReply, KernelViewError: as :func:`decode_dump`.
    """
    per_state: Counter[int] = Counter()
    ports: Counter[int] = Counter()
    peers: _PeerCounts = {_AF_INET: Counter(), _AF_INET6: Counter()}
    unpack = _COUNTED.unpack_from
    for chunks in streams:
        for data in chunks:
            if _count_time_wait_run(data, per_state, ports, peers):
                continue
            size = len(data)
            offset = 0
            while offset < size:
                if size - offset >= _MSG_END:
                    length, kind, family, state, sport, dport, dst = unpack(data, offset)
                    if kind == SOCK_DIAG_BY_FAMILY and _MSG_END <= length <= size - offset:
                        per_state[state] += 1
                        if state == _TIME_WAIT:
                            if family not in peers:
                                raise KernelViewError(f"inet_diag_msg with unknown family {family}")
                            if _SWAP:
                                sport = (sport & 0xFF) << 8 | sport >> 8
                                dport = (dport & 0xFF) << 8 | dport >> 8
                            ports[sport] += 1
                            peers[family][dport, dst] += 1
                        offset += (length + 3) & ~3
                        continue
                length = _not_a_socket(data, offset, size)
                if not length:
                    break
                offset += (length + 3) & ~3
            else:
                continue
            break  # NLMSG_DONE: this stream is over
    by_state: Counter[TcpState] = Counter()
    for number, n in per_state.items():  # numbers the kernel does not define add up
        by_state[_STATE_OF[number]] += n
    by_destination: dict[Address, int] = {}
    for family, counts in peers.items():
        # (port, raw) -> (host, port) for every peer, in C (a server's TIME_WAIT have
        # one peer per client port: 50,000 of them). The two families' hosts differ
        # (a mapped address keeps its ::ffff: prefix), so keys cannot collide.
        hosts = {raw: format_host(family, raw) for raw in set(map(_SECOND, counts))}
        peer_addresses = zip(
            map(hosts.__getitem__, map(_SECOND, counts)), map(_FIRST, counts), strict=True
        )
        by_destination.update(zip(peer_addresses, counts.values(), strict=True))
    return Summary.from_counts("netlink", by_state, ports, by_destination)
