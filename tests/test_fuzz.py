"""Fuzzing beyond what ``test_policy.py`` and ``test_kernel_decoders.py`` cover (issue 9).

Those feed random and mutated bytes/text to each parser and check that only the
library's own errors come out. Here, inputs are *generated well-formed* from random
field values, which reaches the paths random bytes rarely do, and decoders that read
the same facts are checked against each other:

* policies: any object through ``as_policy``, ``from_env`` with any variable and
  default, the constructor with any value per field, and generated ``key=value``
  text (what parses must be in range and round-trip);
* sock_diag replies built from random fields: the one codec gives back those fields,
  the same for an exact lookup (with and without the request shortcut), the reference
  decoding and a dump of the same message, and counting the dump agrees;
* ``/proc/net/tcp`` lines built from the same random fields decode to the same state
  as the netlink reply (the two backends must not disagree about a socket);
* tcp_info blobs of every length: no error at or above the minimum size, and a
  truncated blob decodes to a prefix of the whole one;
* addresses: any object given as a 4-tuple end raises only ``ValueError``;
* the close plan: any sequence of events at any times ends in ``PlanStateError`` or
  goes on; it never raises anything else, and never loops on its own.

Only the library's documented errors may come out, and nothing may hang.
"""

from __future__ import annotations

import dataclasses
import math
import socket
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tcpclose import CloseMode, ClosePolicy, Fallback, PolicyError, TcpState, TimerKind
from tcpclose._errors import KernelViewError
from tcpclose._kernel._address import MAPPED_PREFIX, parse_four_tuple
from tcpclose._kernel._diag import (
    INET_DIAG_MSG,
    NLMSG_DONE,
    NLMSGHDR,
    SOCK_DIAG_BY_FAMILY,
    count_dump,
    decode_dump,
    decode_lookup_state,
    decode_reply,
    encode_lookup_request,
    reply_matches,
)
from tcpclose._kernel._procfs import address_hex, parse_tcp_line
from tcpclose._kernel._summary import Summary
from tcpclose._kernel._tcpinfo import TCP_INFO_MIN_SIZE, TCP_INFO_SIZE, decode_tcp_info
from tcpclose._plan import ClosePlan, Event, Finished, PlanStateError
from tcpclose._policy import as_policy
from tcpclose._units import MAX_DURATION, MAX_SIZE, UnitError, parse_duration, parse_size
from tests._support import in_order

fuzz = settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])

# -- policies ---------------------------------------------------------------------------------

_ANY = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.integers(-(10**600), 10**600),  # past float's range (issue 20)
        st.floats(),
        st.text(max_size=20),
        st.binary(max_size=8),
        st.sampled_from(list(CloseMode)),
        st.sampled_from(list(Fallback)),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(st.text(max_size=16), inner, max_size=4),
        st.frozensets(st.integers(), max_size=3),
    ),
    max_leaves=8,
)
_KEYS = ["idle_timeout", "linger_time", "max_drain_bytes", "timeout", "fallback"]
_NUMBER = st.one_of(
    st.integers(-10, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["", "1e400", "-0", "0x10", "1_000", "½", "٣", "1.5.5", " 5"]),
)
_UNIT = st.sampled_from(["", "us", "ms", "s", "m", "h", "B", "KiB", "MiB", "GiB", "KB", "x"])


_MODE_KEYS = {
    "graceful": ["idle_timeout", "linger_time", "max_drain_bytes"],
    "peer-first": _KEYS,
    "client-first": _KEYS,
    "abort": [],
    "default": [],
}
_GOOD_NUMBER = st.one_of(
    st.integers(0, 10**6).map(str),
    st.floats(min_value=0, max_value=1e6).map(lambda f: f"{f:.6g}"),
)


@st.composite
def policy_text(draw: st.DrawFn) -> str:
    """A mode word and ``key=value`` words: mostly the mode's own keys with sane
    values (so that many parse), sometimes anything."""
    mode = draw(st.sampled_from(list(_MODE_KEYS)))
    words = [mode]
    keys = _MODE_KEYS[mode] or (_KEYS if draw(st.integers(0, 4)) == 0 else [])
    for key in draw(st.lists(st.sampled_from(keys), unique=True)) if keys else []:
        if draw(st.integers(0, 9)) == 0:
            key = draw(st.one_of(st.sampled_from(_KEYS), st.text(min_size=1, max_size=6)))
        if key == "fallback" and draw(st.integers(0, 4)):
            value = draw(st.sampled_from(["graceful", "abort", "auto"]))
        elif draw(st.integers(0, 4)):
            unit = "B KiB MiB" if key == "max_drain_bytes" else "us ms s m h"
            value = draw(_GOOD_NUMBER) + draw(st.sampled_from(["", *unit.split()]))
        else:
            value = draw(st.builds(lambda n, u: n + u, _NUMBER, _UNIT))
        words.append(f"{key}={value}")
    separator = draw(st.sampled_from([" ", "  ", "\t", " \n ", ","]))
    return separator.join(words)


def _in_range(policy: ClosePolicy) -> None:
    for name in ("idle_timeout", "linger_time", "timeout"):
        value = getattr(policy, name)
        assert isinstance(value, float)
        assert math.isfinite(value), (name, value)
        assert value >= 0, (name, value)
    assert isinstance(policy.max_drain_bytes, int)
    assert policy.max_drain_bytes >= 0
    assert isinstance(policy.mode, CloseMode)
    assert isinstance(policy.fallback, Fallback)


@fuzz
@given(policy_text())
def test_generated_policy_text_parses_in_range_or_raises_policy_error(text: str) -> None:
    try:
        policy = ClosePolicy.parse(text)
    except PolicyError as exc:
        message = str(exc)
    else:
        _in_range(policy)
        assert ClosePolicy.parse(str(policy)) == policy
        assert ClosePolicy.from_mapping(policy.as_dict()) == policy
        return
    assert issubclass(PolicyError, ValueError)
    assert message


@fuzz
@given(_ANY)
def test_as_policy_takes_anything_and_raises_only_policy_error(value: object) -> None:
    try:
        policy = as_policy(value)  # type: ignore[arg-type]  # the point: anything
    except PolicyError:
        return
    _in_range(policy)


@fuzz
@given(
    st.one_of(st.none(), st.text(max_size=60), policy_text()),
    st.one_of(st.none(), _ANY, policy_text()),
)
def test_from_env_raises_only_policy_error(variable: str | None, default: Any) -> None:
    environ = {} if variable is None else {"APP_POLICY": variable}
    try:
        policy = ClosePolicy.from_env("APP_POLICY", default, environ=environ)
    except PolicyError as exc:
        message = str(exc)
    else:
        _in_range(policy)
        return
    if variable is not None and variable.strip():
        assert "APP_POLICY" in message  # the message names the variable


@fuzz
@given(
    st.sampled_from(list(CloseMode)),
    st.dictionaries(st.sampled_from(_KEYS), _ANY, max_size=5),
)
def test_constructor_raises_only_policy_error(mode: CloseMode, values: dict[str, Any]) -> None:
    try:
        policy = ClosePolicy(mode=mode, **values)
    except PolicyError:
        return
    _in_range(policy)


# Numbers at and past every limit (issue 20, item 7): ints past float's range and past
# str()'s 4300 digits, non-finite floats, digit strings of any length with any unit.
_EDGE_INT = st.one_of(
    st.integers(),
    st.integers(-(10**600), 10**600),
    st.builds(lambda sign, k: sign * 10**k + sign, st.sampled_from([1, -1]), st.integers(0, 6000)),
    st.sampled_from([2**40, 2**40 + 1, 3600, 3601, 2**63, 2**1024]),
)
_EDGE_FLOAT = st.one_of(
    st.floats(),
    st.sampled_from([math.inf, -math.inf, math.nan, 1e308, -0.0, 5e-324, 3600.0000001]),
)
_EDGE_TEXT = st.builds(
    lambda sign, digits, frac, exp, unit, pad: f"{pad}{sign}{digits}{frac}{exp}{unit}{pad}",
    st.sampled_from(["", "", "-", "+"]),
    st.one_of(
        st.integers(0, 10**6).map(str),
        st.integers(1, 6000).map(lambda n: "9" * n),
        st.integers(1, 6000).map(lambda n: "0" * n + "1"),
    ),
    st.sampled_from(["", "", ".5", ".", ".000001"]),
    st.sampled_from(["", "", "e400", "e-400", "E3", "e+308", "e"]),
    _UNIT,
    st.sampled_from(["", " "]),
)
_EDGE_VALUE = st.one_of(_EDGE_INT, _EDGE_FLOAT, _EDGE_TEXT)
_POLICY_ENTRIES = ["from_mapping", "constructor", "graceful", "peer_first", "replace", "parse"]


def _make_policy(entry: str, key: str, value: object) -> ClosePolicy:
    if entry == "from_mapping":
        return ClosePolicy.from_mapping({"mode": "peer-first", key: value})
    if entry == "constructor":
        return ClosePolicy(mode=CloseMode.PEER_FIRST, **_kw(key, value))
    if entry == "graceful":
        return ClosePolicy.graceful(**_kw(key, value))
    if entry == "peer_first":
        return ClosePolicy.peer_first(**_kw(key, value))
    if entry == "replace":
        return ClosePolicy.parse("peer-first").replace(**_kw(key, value))
    return ClosePolicy.parse(f"peer-first {key}={value}")


@fuzz
@given(
    st.sampled_from(_POLICY_ENTRIES),
    st.sampled_from(["idle_timeout", "linger_time", "max_drain_bytes", "timeout"]),
    _EDGE_VALUE,
)
def test_numbers_at_any_size_raise_only_policy_error(entry: str, key: str, value: object) -> None:
    """Issue 20 (7): huge ints, inf/nan and long digit strings through every way a
    policy is made give a policy in range or a PolicyError naming the field in a
    message of bounded length: never OverflowError, nor ValueError from int limits."""
    if entry == "graceful" and key == "timeout":
        key = "linger_time"  # (graceful() takes no timeout)
    if entry == "parse" and not isinstance(value, str):
        value = str(value) if not isinstance(value, int) or abs(value) < 10**4000 else "9" * 4001
    try:
        policy = _make_policy(entry, key, value)
    except PolicyError as exc:
        error = exc
    else:
        _in_range(policy)
        assert ClosePolicy.parse(str(policy)) == policy
        return
    message = str(error)
    assert key in message or (error.word is not None and error.word in str(value)), message
    assert len(message) < 400, message


@fuzz
@given(st.one_of(_EDGE_VALUE, _ANY))
def test_unit_parsers_raise_only_unit_error(value: object) -> None:
    """The parsers under every policy entry point: a value in range, or UnitError
    (which the policy turns into PolicyError) with a message of bounded length."""
    for parse in (parse_duration, parse_size):
        message = ""
        try:
            result = parse(value)
        except UnitError as exc:
            message = str(exc)
        else:
            assert 0 <= result <= (MAX_DURATION if parse is parse_duration else MAX_SIZE)
        assert len(message) < 300


# -- sock_diag replies and /proc/net/tcp lines from the same random socket ---------------------


@dataclasses.dataclass(frozen=True)
class SocketFacts:
    """What the kernel would report about one socket, in both tables' terms."""

    family: int
    state: int
    timer: int
    retrans: int
    probes: int
    sport: int
    dport: int
    src: bytes  # 4 or 16 bytes
    dst: bytes
    expires_ticks: int  # 1/100 s, so that both tables can say the same time
    rqueue: int
    wqueue: int
    uid: int
    inode: int
    cookie: int

    @property
    def diag_retrans(self) -> int:
        # inet_diag reports the probe count for the keepalive and zero-window timers
        return self.probes if self.timer in (TimerKind.KEEPALIVE, TimerKind.PROBE) else self.retrans


_u32 = st.integers(0, 2**32 - 1)


@st.composite
def socket_facts(draw: st.DrawFn) -> SocketFacts:
    family = draw(st.sampled_from([socket.AF_INET, socket.AF_INET6]))
    size = 4 if family == socket.AF_INET else 16

    mapped = size == 16 and draw(st.booleans())  # a dual-stack socket: both ends mapped

    def address() -> bytes:
        if mapped:
            return MAPPED_PREFIX + draw(st.binary(min_size=4, max_size=4))
        raw = draw(st.binary(min_size=size, max_size=size))
        assume(size == 4 or raw[:12] != MAPPED_PREFIX)
        return raw

    return SocketFacts(
        family=int(family),
        state=draw(st.one_of(st.integers(1, 13), st.integers(0, 255))),
        timer=draw(st.one_of(st.integers(0, 4), st.integers(0, 255))),
        retrans=draw(st.integers(0, 255)),
        probes=draw(st.integers(0, 255)),
        sport=draw(st.integers(0, 65535)),
        dport=draw(st.integers(0, 65535)),
        src=address(),
        dst=address(),
        expires_ticks=draw(st.integers(0, 2**32 // 10 - 1)),
        rqueue=draw(_u32),
        wqueue=draw(_u32),
        uid=draw(st.integers(0, 2**31 - 1)),
        inode=draw(st.integers(0, 2**31 - 1)),
        cookie=draw(st.integers(0, 2**64 - 1)),
    )


_ATTRS = st.lists(st.tuples(st.integers(0, 0x3FFF), st.binary(max_size=12)), max_size=4).map(
    lambda attrs: b"".join(
        struct.pack("=HH", 4 + len(p), kind) + p + bytes(-len(p) % 4) for kind, p in attrs
    )
)


def diag_reply(facts: SocketFacts, attributes: bytes = b"", seq: int = 7) -> bytes:
    """A ``SOCK_DIAG_BY_FAMILY`` message for ``facts``, as the kernel lays it out."""
    body = INET_DIAG_MSG.pack(
        facts.family,
        facts.state,
        facts.timer,
        facts.diag_retrans,
        socket.htons(facts.sport),
        socket.htons(facts.dport),
        facts.src.ljust(16, b"\0"),
        facts.dst.ljust(16, b"\0"),
        0,
        facts.cookie & 0xFFFFFFFF,
        facts.cookie >> 32,
        facts.expires_ticks * 10,
        facts.rqueue,
        facts.wqueue,
        facts.uid,
        facts.inode,
    )
    length = NLMSGHDR.size + len(body) + len(attributes)
    return NLMSGHDR.pack(length, SOCK_DIAG_BY_FAMILY, 0, seq, 0) + body + attributes


def proc_line(facts: SocketFacts) -> str:
    """The same socket as a ``/proc/net/tcp{,6}`` line (little-endian words)."""
    local = address_hex(facts.src, facts.sport, "little")
    peer = address_hex(facts.dst, facts.dport, "little")
    return (
        f"   0: {local} {peer} {facts.state:02X} {facts.wqueue:08X}:{facts.rqueue:08X} "
        f"{facts.timer:02X}:{facts.expires_ticks:08X} {facts.retrans:08X} "
        f"{facts.uid:5d} {facts.probes:8d} {facts.inode} 1 0000000000000000 20 4 30 10 -1"
    )


def _host(family: int, raw: bytes) -> str:
    return socket.inet_ntop(family, raw)


@fuzz
@given(socket_facts(), _ATTRS)
def test_netlink_codec_gives_back_the_fields(facts: SocketFacts, attributes: bytes) -> None:
    data = diag_reply(facts, attributes)
    state = decode_reply(data)
    assert state is not None
    expected_state = TcpState(facts.state) if 1 <= facts.state <= 13 else TcpState.UNKNOWN
    assert state.state is expected_state
    assert state.timer == (TimerKind(facts.timer) if facts.timer <= 4 else None)
    assert state.seconds_left == (facts.expires_ticks * 10 / 1000 if facts.timer else None)
    assert state.retransmits == facts.diag_retrans
    local = (_host(facts.family, facts.src), facts.sport)
    peer = (_host(facts.family, facts.dst), facts.dport)
    assert (state.local, state.peer, state.cookie) == (local, peer, facts.cookie)
    assert (state.recv_queue, state.send_queue, state.uid, state.inode) == (
        facts.rqueue,
        facts.wqueue,
        facts.uid,
        facts.inode,
    )
    # Asked for exactly this socket, the lookup gives the same answer, with or
    # without the request to compare bytes against ...
    four = parse_four_tuple(local, peer)
    assert reply_matches(data, four)
    request = encode_lookup_request(four)
    assert decode_lookup_state(data, len(data), four) == state
    assert decode_lookup_state(data, len(data), four, request) == state
    # ... and for another port, it sees another socket (the listener trap): CLOSED.
    other = parse_four_tuple(local, (peer[0], (facts.dport + 1) % 65536))
    assert not reply_matches(data, other)
    other_request = encode_lookup_request(other)
    assert decode_lookup_state(data, len(data), other).state is TcpState.CLOSED
    assert decode_lookup_state(data, len(data), other, other_request).state is TcpState.CLOSED
    # A dump of the same message says the same, and counting it agrees.
    done = NLMSGHDR.pack(NLMSGHDR.size + 4, NLMSG_DONE, 2, 7, 0) + bytes(4)
    assert list(decode_dump([data, done])) == [state]
    assert count_dump([[data, done]]) == Summary.from_states([state], "netlink")


@fuzz
@given(
    st.lists(socket_facts(), min_size=1, max_size=12),
    st.sampled_from([socket.AF_INET, socket.AF_INET6, None]),
    st.booleans(),
    st.sampled_from([b"", bytes(8)]),
)
def test_counting_a_dump_equals_counting_its_decoded_states(
    sockets: list[SocketFacts], family: int | None, all_time_wait: bool, attributes: bytes
) -> None:
    """Datagrams of TIME_WAIT messages of one family and one length are counted without a
    Python loop; any other datagram message by message. Both must count what decoding
    the same datagrams gives."""
    if all_time_wait:
        sockets = [dataclasses.replace(f, state=int(TcpState.TIME_WAIT)) for f in sockets]
    if family is not None:
        sockets = [f for f in sockets if f.family == family]
    datagram = b"".join(diag_reply(f, attributes) for f in sockets)
    done = NLMSGHDR.pack(NLMSGHDR.size + 4, NLMSG_DONE, 2, 7, 0) + bytes(4)
    decoded = in_order(Summary.from_states(decode_dump([datagram, datagram, done]), "netlink"))
    assert in_order(count_dump([[datagram, datagram, done]])) == decoded
    assert in_order(count_dump([[datagram, done], [datagram, done]])) == decoded


#: Ports whose character (the counting reads a port as one UTF-32 code unit) could trip
#: it: UTF-16 surrogates, the byte-order marks, 0 and the largest; and any other.
_PORTS = st.one_of(
    st.sampled_from([0, 1, 80, 0xD800, 0xDBFF, 0xDC00, 0xDFFF, 0xFEFF, 0xFFFE, 0xFFFF]),
    st.integers(0, 65535),
)


@st.composite
def repeating_time_wait_streams(draw: st.DrawFn) -> list[list[bytes]]:
    """One stream of datagrams per family (IPv4, IPv6 or both, in that order), mostly
    TIME_WAIT whose local ports and peers repeat, so that counts and ties occur: runs of
    TIME_WAIT (counted without a Python loop) and mixed datagrams (walked message by
    message) in any order, sharing ports and peers."""
    done = NLMSGHDR.pack(NLMSGHDR.size + 4, NLMSG_DONE, 2, 7, 0) + bytes(4)
    streams = []
    for family in draw(st.sampled_from([[socket.AF_INET], [socket.AF_INET6], list(_FAMILIES)])):
        size = 4 if family == socket.AF_INET else 16
        ports = draw(st.lists(_PORTS, min_size=1, max_size=3))
        peers = draw(
            st.lists(
                st.tuples(_PORTS, st.binary(min_size=size, max_size=size)), min_size=1, max_size=4
            )
        )
        datagrams = []
        for _ in range(draw(st.integers(1, 4))):
            src = draw(st.binary(min_size=size, max_size=size))
            base = dataclasses.replace(draw(socket_facts()), family=int(family), src=src)
            run = draw(st.booleans())
            messages = []
            for _ in range(draw(st.integers(1, 25))):
                dport, dst = draw(st.sampled_from(peers))
                facts = dataclasses.replace(
                    base,
                    state=draw(st.sampled_from([6, 6, 1] if not run else [6])),
                    sport=draw(st.one_of(st.sampled_from(ports), _PORTS)),
                    dport=dport,
                    dst=dst,
                )
                messages.append(diag_reply(facts))
            datagrams.append(b"".join(messages))
        streams.append([*datagrams, done])
    return streams


_FAMILIES = (socket.AF_INET, socket.AF_INET6)


@fuzz
@given(repeating_time_wait_streams())
def test_counting_repeated_ports_and_peers_equals_counting_decoded_states_in_order(
    streams: list[list[bytes]],
) -> None:
    """Issue 17: TIME_WAIT runs are counted by local port as characters of a string and
    by IPv4 peer as one int each, the other datagrams message by message; the counts
    and their order (largest first, ties in first-seen order) are those of counting the
    decoded states."""
    decoded = Summary.from_states(
        (state for stream in streams for state in decode_dump(stream)), "netlink"
    )
    assert in_order(count_dump(streams)) == in_order(decoded)


@fuzz
@given(socket_facts())
def test_procfs_and_netlink_describe_a_socket_alike(facts: SocketFacts) -> None:
    line = proc_line(facts)
    from_proc = parse_tcp_line(
        line, path="tcp", lineno=2, family=facts.family, byteorder="little", clock_ticks=100
    )
    from_diag = decode_reply(diag_reply(facts))
    assert from_diag is not None
    same = dataclasses.replace(from_diag, source="procfs", cookie=None)
    assert from_proc == same, (line, from_proc, same)


@fuzz
@given(socket_facts(), st.integers(0, 200), st.text(max_size=3))
def test_procfs_line_cut_or_spoiled_raises_only_kernel_view_error(
    facts: SocketFacts, cut: int, junk: str
) -> None:
    line = proc_line(facts)
    line = line[:cut] + junk + line[cut:]
    message = "tcp:2: "
    try:
        parse_tcp_line(line, path="tcp", lineno=2, family=facts.family, byteorder="little")
    except KernelViewError as exc:
        message = str(exc)
    assert message.startswith("tcp:2: ")  # an error names the file and the line
    for other in (socket.AF_INET, socket.AF_INET6):
        try:
            parse_tcp_line(line, path="tcp", lineno=2, family=other)
        except KernelViewError:
            pass


# -- tcp_info -----------------------------------------------------------------------------------


@fuzz
@given(
    st.binary(min_size=TCP_INFO_SIZE + 8, max_size=TCP_INFO_SIZE + 8),
    st.integers(0, TCP_INFO_SIZE + 8),
    st.sampled_from(["little", "big"]),
)
def test_tcp_info_of_any_length_decodes_to_a_prefix(blob: bytes, size: int, byteorder: Any) -> None:
    whole = decode_tcp_info(blob, byteorder)
    if size < TCP_INFO_MIN_SIZE:
        with pytest.raises(KernelViewError, match="too short"):
            decode_tcp_info(blob[:size], byteorder)
        return
    part = decode_tcp_info(blob[:size], byteorder)
    assert part.size == size
    for field in dataclasses.fields(part):
        if field.name == "size":
            continue
        value = getattr(part, field.name)
        if value is not None:
            assert value == getattr(whole, field.name), field.name
    # the first 104 bytes are always there: nothing of them is None
    assert part.state is not None
    assert part.total_retrans is not None
    str(part)  # formatting never fails


# -- addresses ----------------------------------------------------------------------------------

_HOSTS = st.one_of(
    st.sampled_from(
        ["127.0.0.1", "::1", "::ffff:10.0.0.1", "[::1]", "fe80::1%1", "fe80::1%nope", "1.2.3"]
    ),
    st.ip_addresses().map(str),
    st.text(max_size=20),
)
_SCOPES = st.one_of(st.integers(-1, 3), st.integers(2**32 - 2, 2**65))
_ENDPOINTS = st.one_of(
    st.tuples(_HOSTS, st.integers(-5, 70000)),
    st.tuples(_HOSTS.map(lambda h: h + "%99999999999"), st.integers(-5, 70000)),
    st.tuples(_HOSTS, st.integers(-5, 70000), st.integers(-1, 3), _SCOPES),
    _ANY,
)


@fuzz
@given(_ENDPOINTS, _ENDPOINTS)
def test_four_tuples_of_anything_raise_only_value_error(local: object, peer: object) -> None:
    try:
        four = parse_four_tuple(local, peer)
    except ValueError:
        return
    assert len(four.local) == len(four.peer) == (4 if four.family == socket.AF_INET else 16)
    assert 0 <= four.local_port <= 65535
    assert 0 <= four.peer_port <= 65535
    assert len(encode_lookup_request(four)) == 72  # what parses fits the request (issue 20)


# -- the close plan -----------------------------------------------------------------------------

_POLICY_CHOICES = st.sampled_from(
    [
        "graceful idle_timeout=1s linger_time=3s max_drain_bytes=10KiB",
        "graceful idle_timeout=0s linger_time=0s max_drain_bytes=0",
        "peer-first timeout=2s fallback=graceful linger_time=3s max_drain_bytes=10KiB",
        "peer-first timeout=0s fallback=abort max_drain_bytes=0",
        "peer-first timeout=2s fallback=auto",
        "abort",
        "default",
    ]
)
_STEPS = st.lists(
    st.tuples(
        st.sampled_from(list(Event)),
        st.one_of(
            st.floats(min_value=-5, max_value=100, allow_nan=False),
            st.sampled_from([math.nan, math.inf, -math.inf]),
        ),
        st.integers(-3, 1 << 20),
    ),
    max_size=60,
)


@fuzz
@given(_POLICY_CHOICES, st.booleans(), _STEPS)
def test_plan_fed_anything_raises_only_plan_state_error(
    text: str, peer_eof: bool, steps: list[tuple[Event, float, int]]
) -> None:
    plan = ClosePlan(ClosePolicy.parse(text), 0.0, peer_eof=peer_eof)
    for event, now, nbytes in steps:
        action = plan.next_action()
        if isinstance(action, Finished):
            assert action.result.outcome is not None
            return
        try:
            plan.feed(event, now, nbytes=nbytes)
        except PlanStateError:
            continue
    plan.next_action()


def _kw(key: str, value: object) -> dict[str, Any]:
    return {key: value}
