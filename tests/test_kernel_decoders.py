"""The kernel view's pure decoders, on bytes and text captured from a real kernel
(``tests/data``, made by ``tests/data/capture_kernel.py``) and on fuzz (issue 4).

Expectations come from ``kernel_manifest.json``, recorded at capture time from
sources other than these decoders: ``getsockname()``, ``fstat()``, ``SO_COOKIE``,
the state the script drove each socket into, and ``ss``'s own decoding. Besides,
``sock_diag_decoded.json`` holds what the three decoders that preceded the one codec
(issue 17) made of every capture: the codec must give exactly that.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import pickle
import re
import socket
import struct
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tcpclose import KernelState, TcpState, TimerKind
from tcpclose._errors import KernelViewError
from tcpclose._kernel import DEFAULT_DUMP_STATES
from tcpclose._kernel._address import FourTuple, parse_four_tuple
from tcpclose._kernel._diag import (
    INET_DIAG_MSG,
    INET_DIAG_REQUEST,
    KernelErrorReply,
    _header,
    count_dump,
    decode_attributes,
    decode_dump,
    decode_dump_info,
    decode_lookup_state,
    decode_reply,
    encode_dump_request,
    encode_lookup_request,
    lookup_answer,
    lookup_request,
    port_filter_bytecode,
    reply_attributes,
    reply_matches,
    scan_dump_chunk,
    states_mask,
)
from tcpclose._kernel._procfs import ProcfsBackend, parse_tcp_line, parse_tcp_table
from tcpclose._kernel._summary import Summary
from tcpclose._kernel._tcpinfo import TCP_INFO_MIN_SIZE, TCP_INFO_SIZE, decode_tcp_info
from tcpclose._kernel._types import new_kernel_state

DATA = Path(__file__).parent / "data"
INET_DIAG_SHUTDOWN = 8
SEND_SHUTDOWN = 2


@cache
def decoded_before() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / "sock_diag_decoded.json").read_text())
    return data


def dump_port_chunks() -> list[bytes]:
    lines = (DATA / "sock_diag" / "dump_port.hex").read_text().split()
    return [bytes.fromhex(line) for line in lines]


@cache
def manifest() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DATA / "kernel_manifest.json").read_text())
    return data


def captured(name: str) -> bytes:
    return bytes.fromhex((DATA / "sock_diag" / f"{name}.hex").read_text().strip())


def case_four(name: str) -> FourTuple:
    case = manifest()["sock_diag"][name]
    return parse_four_tuple(tuple(case["request_local"]), tuple(case["request_peer"]))


SOCKET_CASES = [
    name for name, case in manifest()["sock_diag"].items() if case["expect"]["state"] != "ENOENT"
]
MISS_CASES = [
    name for name, case in manifest()["sock_diag"].items() if case["expect"]["state"] == "ENOENT"
]


def test_the_fast_constructor_makes_ordinary_frozen_kernel_states() -> None:
    fields = (
        TcpState.TIME_WAIT, "netlink", ("127.0.0.1", 8080), ("127.0.0.1", 51000),
        TimerKind.TIMEWAIT, 59.5, 0, 1, 2, 3, 4, 5,
    )  # fmt: skip
    made = new_kernel_state(*fields)
    assert type(made) is KernelState
    assert made == KernelState(*fields)
    assert hash(made) == hash(KernelState(*fields))
    assert pickle.loads(pickle.dumps(made)) == made
    assert dataclasses.replace(made, uid=7).uid == 7
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.uid = 7  # type: ignore[misc]


def test_struct_sizes_match_the_kernel_headers() -> None:
    assert INET_DIAG_REQUEST.size == 72  # nlmsghdr 16 + inet_diag_req_v2 56
    assert INET_DIAG_MSG.size == 72
    assert TCP_INFO_SIZE == 276  # decoded part of the 280-byte struct of Linux 6.18


# -- sock_diag lookup replies --------------------------------------------------------------------


def family_of(state: KernelState) -> int:
    assert state.local is not None
    return socket.AF_INET6 if ":" in state.local[0] else socket.AF_INET


@pytest.mark.parametrize("name", SOCKET_CASES)
def test_lookup_reply_decodes_to_what_was_captured(name: str) -> None:
    expect = manifest()["sock_diag"][name]["expect"]
    state = decode_reply(captured(name))
    assert state is not None
    assert state.state.name == expect["state"]
    assert family_of(state) == expect["family"]
    assert state.inode == expect["inode"]
    assert state.cookie == expect["cookie"]
    if "uid" in expect:
        assert state.uid == expect["uid"]
    if "rqueue" in expect:
        assert state.recv_queue == expect["rqueue"]
    if "timer" in expect:
        assert state.timer is not None
        assert state.timer.name == expect["timer"]
    if "local" in expect:
        assert state.local == tuple(expect["local"])
        assert state.peer == tuple(expect["peer"])
    # Every reply carries attributes after the struct; they walk cleanly to the end.
    assert all(isinstance(kind, int) for kind, _ in reply_attributes(captured(name)))


@pytest.mark.parametrize("name", [*SOCKET_CASES, *MISS_CASES])
def test_captures_decode_as_before_the_one_codec(name: str) -> None:
    """Issue 17: the codec replaced three decoders; each capture decodes to what they
    made of it (``sock_diag_decoded.json``, written by the old code)."""
    before = decoded_before()
    raw = captured(name)
    reply = decode_reply(raw)
    assert (None if reply is None else reply.as_dict()) == before["lookup_reply"][name]
    answer = decode_lookup_state(raw, len(raw), case_four(name))
    assert answer.as_dict() == before["lookup_state"][name]
    request = encode_lookup_request(case_four(name))
    assert decode_lookup_state(raw, len(raw), case_four(name), request) == answer


def test_dump_capture_decodes_as_before_the_one_codec() -> None:
    states = list(decode_dump(dump_port_chunks()))
    assert [s.as_dict() for s in states] == decoded_before()["dump_port"]


def test_dump_with_info_decodes_the_same_sockets_and_their_tcp_info() -> None:
    """The captured dump has no INET_DIAG_INFO attribute: the same sockets, no info. The
    same messages with a tcp_info attribute appended give its bytes back."""
    chunks = dump_port_chunks()
    plain = list(decode_dump(chunks))
    assert [(state, None) for state in plain] == list(decode_dump_info(chunks))
    # one message, the attribute appended and nlmsg_len grown to cover it
    (data, *_) = chunks
    length = struct.unpack_from("=I", data)[0]
    info = bytes(range(104)) + bytes(4)  # a tcp_info's first 108 bytes, 4-aligned
    attribute = struct.pack("=HH", 4 + len(info), 2) + info  # INET_DIAG_INFO
    message = struct.pack("=I", length + len(attribute)) + data[4:length] + attribute
    ((state, got),) = decode_dump_info([message])
    assert state == plain[0]
    assert got == info


def test_counting_a_dump_equals_counting_its_states() -> None:
    chunks = dump_port_chunks()
    counted = count_dump([chunks])
    assert counted == Summary.from_states(decode_dump(chunks), "netlink")
    assert counted.total == len(decoded_before()["dump_port"])
    twice = count_dump([chunks, chunks])  # two requests (AF_INET, AF_INET6) add up
    assert twice.total == 2 * counted.total


@pytest.mark.parametrize("name", MISS_CASES)
def test_a_miss_is_enoent(name: str) -> None:
    assert decode_reply(captured(name)) is None
    assert reply_attributes(captured(name)) == ()
    assert decode_lookup_state(captured(name), len(captured(name)), case_four(name)).state is (
        TcpState.CLOSED
    )


@pytest.mark.parametrize("name", MISS_CASES)
def test_a_miss_answers_closed_to_its_own_request_only(name: str) -> None:
    """lookup_answer's shortcut for ENOENT (issue 16) answers CLOSED to the request
    whose seq the reply carries, and None (a stale reply) to any other."""
    raw = bytearray(captured(name))
    four = case_four(name)
    seq = struct.unpack_from("=I", raw, 8)[0]
    sockid = lookup_request(four, None, seq)[1]
    assert lookup_answer(raw, len(raw), four, seq, sockid).state is TcpState.CLOSED  # type: ignore[union-attr]
    assert lookup_answer(raw, len(raw), four, seq + 1, sockid) is None


def test_listener_trap_reply_is_closed() -> None:
    """Regression (issue 4): the kernel answered the LISTEN socket for a gone
    connection; the lookup must say CLOSED."""
    raw, four = captured("listener_trap_v4"), case_four("listener_trap_v4")
    state = decode_reply(raw)
    assert state is not None
    assert state.state is TcpState.LISTEN
    assert state.peer == ("0.0.0.0", 0)
    assert not reply_matches(raw, four)
    assert decode_lookup_state(raw, len(raw), four).state is TcpState.CLOSED
    request = encode_lookup_request(four)
    assert decode_lookup_state(raw, len(raw), four, request).state is TcpState.CLOSED


@pytest.mark.parametrize("name", [n for n in SOCKET_CASES if n != "listener_trap_v4"])
def test_the_request_shortcut_agrees_with_the_field_comparison(name: str) -> None:
    raw, four = captured(name), case_four(name)
    assert reply_matches(raw, four)
    request = encode_lookup_request(four)
    assert decode_lookup_state(raw, len(raw), four, request) == decode_reply(raw)
    assert decode_lookup_state(raw, len(raw), four) == decode_reply(raw)


def test_mapped_reply_is_reported_as_the_kernel_holds_it() -> None:
    raw, four = captured("mapped_v6"), case_four("mapped_v6")
    assert four.family == socket.AF_INET  # asked as plain IPv4
    state = decode_lookup_state(raw, len(raw), four)
    assert state.state is TcpState.ESTABLISHED
    assert state.local is not None
    assert state.local[0] == "::ffff:127.0.0.1"


def test_time_wait_reply_has_seconds_left() -> None:
    raw = captured("time_wait_v4")
    state = decode_lookup_state(raw, len(raw), case_four("time_wait_v4"))
    assert state.state is TcpState.TIME_WAIT
    assert state.timer is TimerKind.TIMEWAIT
    assert state.seconds_left is not None
    assert 55 < state.seconds_left <= 60


def test_attributes_walk_finds_the_shutdown_flags() -> None:
    """INET_DIAG_SHUTDOWN says which directions are shut: SEND after SHUT_WR."""
    shutdown = dict(reply_attributes(captured("fin_wait2_shutdown_v6")))[INET_DIAG_SHUTDOWN]
    assert shutdown == bytes([SEND_SHUTDOWN])
    assert dict(reply_attributes(captured("estab_v4")))[INET_DIAG_SHUTDOWN] == b"\x00"


def test_kernel_error_other_than_enoent_raises() -> None:
    raw = bytearray(captured("enoent"))
    struct.pack_into("=i", raw, 16, -22)  # EINVAL
    with pytest.raises(KernelErrorReply, match="EINVAL") as info:
        decode_reply(raw)
    assert info.value.errno == 22


# -- dump ---------------------------------------------------------------------------------------


def test_port_filtered_dump_matches_ss() -> None:
    chunks = dump_port_chunks()
    assert scan_dump_chunk(chunks[-1], 9)
    states = list(decode_dump(chunks))
    port = manifest()["dump_port"]["port"]
    assert all(s.local is not None and s.peer is not None for s in states)
    assert all(port in (s.local[1], s.peer[1]) for s in states if s.local and s.peer)
    assert sorted(s.state.label for s in states) == manifest()["dump_port"]["ss_states"]


def test_a_done_carrying_an_error_fails_the_dump() -> None:
    """A dump the kernel could not run (no tcp_diag handler: ENOENT) ends with an
    NLMSG_DONE whose payload is the negative errno; it must not read as "no sockets"."""
    done = struct.pack("=IHHIIi", 20, 3, 2, 9, 0, -errno.ENOENT)
    with pytest.raises(KernelErrorReply, match="ENOENT"):
        scan_dump_chunk(done, 9)
    with pytest.raises(KernelErrorReply, match="ENOENT"):
        list(decode_dump([done]))
    with pytest.raises(KernelErrorReply, match="ENOENT"):
        count_dump([[done]])
    fine = struct.pack("=IHHIIi", 20, 3, 2, 9, 0, 0)
    assert scan_dump_chunk(fine, 9)
    assert list(decode_dump([fine])) == []


def test_dump_request_layout() -> None:
    req = encode_dump_request(socket.AF_INET6, states_mask([TcpState.TIME_WAIT]), seq=3)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", req)
    assert (length, kind, flags, seq, pid) == (72, 20, 0x301, 3, 0)
    assert req[16:24] == bytes([10, 6, 0, 0]) + struct.pack("=I", 1 << 6)
    with_filter = encode_dump_request(
        socket.AF_INET, 1 << 6, bytecode=port_filter_bytecode(80), seq=3
    )
    assert len(with_filter) == 72 + 4 + 36
    assert struct.unpack_from("=HH", with_filter, 72) == (40, 1)  # INET_DIAG_REQ_BYTECODE


def test_lookup_request_layout() -> None:
    four = parse_four_tuple(("::1", 8080), ("::1", 51000))
    req = encode_lookup_request(four, cookie=0x1122334455667788, seq=5)
    assert struct.unpack_from("=IHHII", req) == (72, 20, 1, 5, 0)
    assert req[24:28] == bytes.fromhex("1f90c738")
    assert req[28:44] == socket.inet_pton(socket.AF_INET6, "::1")
    assert struct.unpack_from("=II", req, 64) == (0x55667788, 0x11223344)
    with pytest.raises(ValueError, match="cookie"):
        encode_lookup_request(four, cookie=-1)


def test_states_mask_is_the_kernel_bit_per_state() -> None:
    assert states_mask([TcpState.ESTABLISHED]) == 0x2
    assert states_mask(DEFAULT_DUMP_STATES) == 0x1FFE


# -- tcp_info -----------------------------------------------------------------------------------


def _ss_fields(text: str) -> dict[str, str]:
    return dict(re.findall(r"(?<![\w(,])(\w+):([\d./,]+)", text))


def test_tcp_info_matches_ss() -> None:
    """ss decodes the same struct independently (from sock_diag, at the same moment)."""
    case = manifest()["tcp_info"]["established_v4"]
    info = decode_tcp_info(bytes.fromhex((DATA / "tcp_info" / "established_v4.hex").read_text()))
    ss = _ss_fields(case["ss"])
    assert info.state.name == case["state"]
    assert info.size == 280
    snd, rcv = (int(x) for x in ss["wscale"].split(","))
    assert (info.snd_wscale, info.rcv_wscale) == (snd, rcv)
    assert snd != rcv  # the capture made them differ, so a swap would show
    assert info.rto * 1000 == pytest.approx(float(ss["rto"]))
    rtt, rttvar = (float(x) for x in ss["rtt"].split("/"))
    assert info.rtt * 1000 == pytest.approx(rtt)
    assert info.rttvar * 1000 == pytest.approx(rttvar)
    assert info.min_rtt is not None
    assert info.min_rtt * 1000 == pytest.approx(float(ss["minrtt"]))
    for ours, theirs in [
        ("snd_mss", "mss"),
        ("pmtu", "pmtu"),
        ("rcv_mss", "rcvmss"),
        ("advmss", "advmss"),
        ("snd_cwnd", "cwnd"),
        ("bytes_sent", "bytes_sent"),
        ("bytes_acked", "bytes_acked"),
        ("segs_out", "segs_out"),
        ("segs_in", "segs_in"),
        ("data_segs_out", "data_segs_out"),
        ("delivered", "delivered"),
        ("rcv_space", "rcv_space"),
        ("rcv_ssthresh", "rcv_ssthresh"),
        ("snd_wnd", "snd_wnd"),
    ]:
        assert getattr(info, ours) == int(ss[theirs]), ours
    assert info.bytes_sent == case["bytes_sent"]
    assert info.delivery_rate_app_limited is ("app_limited" in case["ss"])
    assert info.window_scaling is ("wscale:" in case["ss"])
    assert info.as_dict()["state"] == "ESTABLISHED"


def test_tcp_info_shorter_and_longer_structs() -> None:
    full = bytes.fromhex((DATA / "tcp_info" / "established_v4.hex").read_text())
    reference = decode_tcp_info(full)
    oldest = decode_tcp_info(full[:TCP_INFO_MIN_SIZE])
    assert oldest.total_retrans == reference.total_retrans
    assert oldest.rtt == reference.rtt
    assert oldest.pacing_rate is None
    assert oldest.received_ce_bytes is None
    mid = decode_tcp_info(full[:150])  # a struct ending inside min_rtt
    assert mid.notsent_bytes == reference.notsent_bytes
    assert mid.min_rtt is None
    longer = decode_tcp_info(full + b"\xff" * 100)
    assert longer.received_ce_bytes == reference.received_ce_bytes
    assert longer.size == len(full) + 100
    with pytest.raises(KernelViewError, match="too short"):
        decode_tcp_info(full[: TCP_INFO_MIN_SIZE - 1])


def test_tcp_info_bitfields_follow_byte_order() -> None:
    raw = bytes([1, 0, 0, 0, 0, 7, 0xA7, 0b011]) + bytes(TCP_INFO_MIN_SIZE - 8)
    little = decode_tcp_info(raw, "little")
    assert (little.snd_wscale, little.rcv_wscale) == (7, 10)
    assert (little.delivery_rate_app_limited, little.fastopen_client_fail) == (True, 1)
    big = decode_tcp_info(raw, "big")
    assert (big.snd_wscale, big.rcv_wscale) == (10, 7)
    assert (big.delivery_rate_app_limited, big.fastopen_client_fail) == (False, 0)


# -- procfs -------------------------------------------------------------------------------------


@pytest.fixture
def captured_procfs() -> ProcfsBackend:
    return ProcfsBackend(str(DATA / "proc"), byteorder=manifest()["byteorder"], clock_ticks=100)


def test_procfs_captured_entries(captured_procfs: ProcfsBackend) -> None:
    for entry in manifest()["procfs"]:
        expect = entry["expect"]
        state = captured_procfs.lookup(
            parse_four_tuple(tuple(entry["local"]), tuple(entry["peer"]))
        )
        assert state.state.name == expect["state"], entry
        assert state.source == "procfs"
        if "inode" in expect:
            assert state.inode == expect["inode"]
        if "timer" in expect:
            assert state.timer is not None
            assert state.timer.name == expect["timer"]
            assert state.seconds_left is not None
            assert 50 < state.seconds_left <= 60


def test_procfs_captured_tables_parse_whole(captured_procfs: ProcfsBackend) -> None:
    entries = list(captured_procfs.dump(DEFAULT_DUMP_STATES, None, (2, 10)))
    assert len(entries) == sum(
        len((DATA / "proc" / "net" / name).read_text().splitlines()) - 1 for name in ("tcp", "tcp6")
    )
    assert {e.state for e in entries} >= {
        TcpState.LISTEN,
        TcpState.ESTABLISHED,
        TcpState.TIME_WAIT,
        TcpState.FIN_WAIT2,
        TcpState.CLOSE_WAIT,
    }
    assert all(isinstance(e, KernelState) for e in entries)
    port = manifest()["dump_port"]["port"]
    on_port = list(captured_procfs.dump({TcpState.LISTEN}, port, (2,)))
    assert [(e.state, e.local) for e in on_port] == [(TcpState.LISTEN, ("127.0.0.1", port))]


def test_procfs_parse_errors_name_file_and_line() -> None:
    good = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
    line = "   0: 0100007F:1F90 0100007F:C738 01 00000000:00000000 00:00000000 00000000 0 0 1\n"
    assert len(list(parse_tcp_table(good + line, path="t", family=socket.AF_INET))) == 1
    with pytest.raises(KernelViewError, match=r"^/proc/net/tcp:3: expected a socket line"):
        list(
            parse_tcp_table(
                good + line + "   1: garbage\n", path="/proc/net/tcp", family=socket.AF_INET
            )
        )
    with pytest.raises(KernelViewError, match=r"^x:1: expected the header"):
        list(parse_tcp_table(line, path="x", family=socket.AF_INET))
    with pytest.raises(KernelViewError, match="32-digit"):  # IPv4 line in the tcp6 table
        parse_tcp_line(line, path="tcp6", lineno=2, family=socket.AF_INET6)
    with pytest.raises(KernelViewError, match="empty"):
        list(parse_tcp_table("", path="x", family=socket.AF_INET))


def test_procfs_big_endian_addresses() -> None:
    line = "   0: 7F000001:1F90 7F000001:C738 01 00000000:00000000 00:00000000 00000000 0 0 1"
    state = parse_tcp_line(line, path="t", lineno=2, family=socket.AF_INET, byteorder="big")
    assert state.local == ("127.0.0.1", 8080)


# -- fuzz: malformed input raises KernelViewError, nothing else, and ends --------------------

FOUR = parse_four_tuple(("127.0.0.1", 8080), ("127.0.0.1", 51000))
REQUEST = encode_lookup_request(FOUR)
SEEDS = [captured(name) for name in (*SOCKET_CASES, *MISS_CASES)]
fuzz = settings(max_examples=300, deadline=1000, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A captured reply with some bytes overwritten and maybe truncated or extended."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    cut = draw(st.integers(0, len(data)))
    return bytes(data[:cut]) + draw(st.binary(max_size=16))


def _only_kernel_view_errors(fn: Any, *args: Any) -> None:
    try:
        fn(*args)
    except KernelViewError:
        pass


def _answer_slowly(data: bytes, four: FourTuple, seq: int) -> KernelState | None:
    """What lookup_answer gives, without its shortcuts: the header checked, then the
    full walk."""
    if _header(data, 0, len(data))[2] != seq:
        return None
    return decode_lookup_state(data, len(data), four)


def _outcome(fn: Any, *args: Any) -> object:
    try:
        return fn(*args)
    except KernelViewError as exc:
        return type(exc)


@fuzz
@given(st.one_of(st.binary(max_size=400), mutated()), st.booleans())
def test_fuzz_lookup_answer_agrees_with_the_full_walk(data: bytes, stale: bool) -> None:
    """lookup_answer's shortcuts (a socket message about the 4-tuple asked for, a miss)
    give what the full walk gives, or the same kind of error."""
    seq = (struct.unpack_from("=I", data, 8)[0] if len(data) >= 12 else 0) + stale
    for four in (FOUR, *(case_four(name) for name in (*SOCKET_CASES, *MISS_CASES))):
        sockid = lookup_request(four, None, seq & 0xFFFFFFFF)[1]
        fast = _outcome(lookup_answer, bytearray(data), len(data), four, seq, sockid)
        assert fast == _outcome(_answer_slowly, data, four, seq)


@fuzz
@given(st.one_of(st.binary(max_size=400), mutated()))
def test_fuzz_netlink_decoders(data: bytes) -> None:
    _only_kernel_view_errors(decode_reply, data)
    _only_kernel_view_errors(reply_attributes, data)
    _only_kernel_view_errors(decode_lookup_state, data, len(data), FOUR)
    _only_kernel_view_errors(decode_lookup_state, data, len(data), FOUR, REQUEST)
    _only_kernel_view_errors(lambda: list(decode_dump([data, data])))
    _only_kernel_view_errors(lambda: list(decode_dump_info([data, data])))
    _only_kernel_view_errors(count_dump, [[data, data], [data]])
    _only_kernel_view_errors(scan_dump_chunk, data, 0)
    _only_kernel_view_errors(decode_attributes, data, 0, len(data))


@fuzz
@given(st.binary(max_size=600))
def test_fuzz_tcp_info(data: bytes) -> None:
    _only_kernel_view_errors(decode_tcp_info, data)


PROC_LINE = "   0: 0100007F:1F90 0100007F:C738 06 00000000:00000000 03:00001725 00000000 0 0 0 3 0"


@st.composite
def proc_text(draw: st.DrawFn) -> str:
    header = "  sl  local_address rem_address   st tx_queue\n"
    body = list(PROC_LINE)
    for _ in range(draw(st.integers(0, 5))):
        body[draw(st.integers(0, len(body) - 1))] = draw(st.characters())
    return header + "".join(body) + draw(st.text(max_size=40))


@fuzz
@given(st.one_of(st.text(max_size=300), proc_text()))
def test_fuzz_procfs_parser(text: str) -> None:
    for family in (socket.AF_INET, socket.AF_INET6):
        _only_kernel_view_errors(lambda f=family: list(parse_tcp_table(text, path="t", family=f)))
