"""Linux ``struct tcp_info`` (``getsockopt(IPPROTO_TCP, TCP_INFO)``) as a typed value.

Layout: ``include/uapi/linux/tcp.h``. The struct only ever grows at its end, and the
kernel copies ``min(len, sizeof)`` bytes, so the decoder reads exactly as far as the
returned length reaches: fields past it are ``None`` (older kernel), bytes past the
last known field are ignored (newer kernel). The first 104 bytes (through
``tcpi_total_retrans``) exist on every kernel since 2.6; anything shorter is rejected.

Units: every duration is converted to **float seconds** (the kernel gives ``rto``,
``ato``, ``rtt``, ``rttvar``, ``rcv_rtt``, ``min_rtt``, ``busy_time``,
``rwnd_limited``, ``sndbuf_limited`` in microseconds and ``last_*`` and
``total_rto_time`` in milliseconds). Rates are bytes per second, sizes bytes, windows
bytes, the rest counts.

Not decoded: the word at bytes 276..279 (AccECN mode and failure bits), whose layout
changed while it was merged (two ``__u16`` in one version, bitfields in another).
"""

from __future__ import annotations

import struct
import sys
from dataclasses import astuple, dataclass, fields
from typing import Any, Final, Literal

from tcpclose._errors import KernelViewError

from ._types import TcpState

__all__ = ("TCP_INFO_MIN_SIZE", "TCP_INFO_SIZE", "TcpInfo", "decode_tcp_info")

_US: Final = 1_000_000.0  # divisor: microseconds -> seconds
_MS: Final = 1_000.0  # divisor: milliseconds -> seconds

#: ``(name, offset, struct code, scale)``: every decoded field of ``struct tcp_info``
#: in order. Bytes 6 and 7 are bitfields, decoded separately. ``scale`` divides the
#: value into seconds (None: keep the integer).
_LAYOUT: Final[tuple[tuple[str, int, str, float | None], ...]] = (
    ("state", 0, "B", None),
    ("ca_state", 1, "B", None),
    ("retransmits", 2, "B", None),
    ("probes", 3, "B", None),
    ("backoff", 4, "B", None),
    ("options", 5, "B", None),
    ("_wscale", 6, "B", None),
    ("_flags", 7, "B", None),
    ("rto", 8, "I", _US),
    ("ato", 12, "I", _US),
    ("snd_mss", 16, "I", None),
    ("rcv_mss", 20, "I", None),
    ("unacked", 24, "I", None),
    ("sacked", 28, "I", None),
    ("lost", 32, "I", None),
    ("retrans", 36, "I", None),
    ("fackets", 40, "I", None),
    ("last_data_sent", 44, "I", _MS),
    ("last_ack_sent", 48, "I", _MS),
    ("last_data_recv", 52, "I", _MS),
    ("last_ack_recv", 56, "I", _MS),
    ("pmtu", 60, "I", None),
    ("rcv_ssthresh", 64, "I", None),
    ("rtt", 68, "I", _US),
    ("rttvar", 72, "I", _US),
    ("snd_ssthresh", 76, "I", None),
    ("snd_cwnd", 80, "I", None),
    ("advmss", 84, "I", None),
    ("reordering", 88, "I", None),
    ("rcv_rtt", 92, "I", _US),
    ("rcv_space", 96, "I", None),
    ("total_retrans", 100, "I", None),
    # -- optional from here: None when the kernel's struct is shorter ------------------
    ("pacing_rate", 104, "Q", None),
    ("max_pacing_rate", 112, "Q", None),
    ("bytes_acked", 120, "Q", None),
    ("bytes_received", 128, "Q", None),
    ("segs_out", 136, "I", None),
    ("segs_in", 140, "I", None),
    ("notsent_bytes", 144, "I", None),
    ("min_rtt", 148, "I", _US),
    ("data_segs_in", 152, "I", None),
    ("data_segs_out", 156, "I", None),
    ("delivery_rate", 160, "Q", None),
    ("busy_time", 168, "Q", _US),
    ("rwnd_limited", 176, "Q", _US),
    ("sndbuf_limited", 184, "Q", _US),
    ("delivered", 192, "I", None),
    ("delivered_ce", 196, "I", None),
    ("bytes_sent", 200, "Q", None),
    ("bytes_retrans", 208, "Q", None),
    ("dsack_dups", 216, "I", None),
    ("reord_seen", 220, "I", None),
    ("rcv_ooopack", 224, "I", None),
    ("snd_wnd", 228, "I", None),
    ("rcv_wnd", 232, "I", None),
    ("rehash", 236, "I", None),
    ("total_rto", 240, "H", None),
    ("total_rto_recoveries", 242, "H", None),
    ("total_rto_time", 244, "I", _MS),
    ("received_ce", 248, "I", None),
    ("delivered_e1_bytes", 252, "I", None),
    ("delivered_e0_bytes", 256, "I", None),
    ("delivered_ce_bytes", 260, "I", None),
    ("received_e1_bytes", 264, "I", None),
    ("received_e0_bytes", 268, "I", None),
    ("received_ce_bytes", 272, "I", None),
)

#: The whole known layout as one native-order struct (the offsets above are contiguous).
TCP_INFO_STRUCT: Final = struct.Struct("=" + "".join(code for _, _, code, _ in _LAYOUT))
#: Bytes decoded when the kernel returns the full struct.
TCP_INFO_SIZE: Final = TCP_INFO_STRUCT.size
#: Bytes every kernel returns (through ``tcpi_total_retrans``).
TCP_INFO_MIN_SIZE: Final = 104
#: Size to ask ``getsockopt`` for: room for fields newer kernels add.
TCP_INFO_REQUEST_SIZE: Final = 512

_ENDS: Final = tuple(offset + struct.calcsize("=" + code) for _, offset, code, _ in _LAYOUT)
_SCALES: Final = tuple(scale for _, _, _, scale in _LAYOUT)
#: ``(index, scale)`` of the fields kept in microseconds by the kernel, for the fast path.
_SCALED: Final[tuple[tuple[int, float], ...]] = tuple(
    (i, scale) for i, scale in enumerate(_SCALES) if scale is not None
)
_STATES: Final = {int(s): s for s in TcpState if s > 0}


def _check_layout() -> None:
    position = 0
    for name, offset, code, _ in _LAYOUT:
        if offset != position:
            raise AssertionError(f"tcp_info layout gap before {name}")
        position += struct.calcsize("=" + code)


_check_layout()


@dataclass(frozen=True, slots=True)
class TcpInfo:
    """One socket's ``struct tcp_info``, decoded (Linux).

    Field names are the kernel's without ``tcpi_``. Durations are float seconds;
    fields the running kernel does not provide are ``None``. See the module docstring
    for units and ``include/uapi/linux/tcp.h`` for meanings.

    Attributes:
        size: how many bytes the kernel returned.
        state: the TCP state (``TcpState``; never CLOSED/UNKNOWN, which are ours).
        ca_state: congestion-avoidance state (0 open, 1 disorder, 2 CWR, 3 recovery,
            4 loss).
        options: ``TCPI_OPT_*`` bits; see :attr:`timestamps`, :attr:`sack`,
            :attr:`window_scaling`, :attr:`ecn`.
        snd_wscale: the peer's window scale shift.
        rcv_wscale: our window scale shift.
        rto: retransmission timeout, seconds.
        ato: delayed-ACK timeout, seconds.
        rtt: smoothed round-trip time, seconds.
        rttvar: round-trip time variation, seconds.
        rcv_rtt: receiver-side round-trip estimate, seconds.
        min_rtt: lowest round-trip time seen, seconds.
        last_data_sent: seconds since data was last sent.
        last_ack_sent: seconds since an ACK was last sent (not tracked by Linux: 0).
        last_data_recv: seconds since data was last received.
        last_ack_recv: seconds since an ACK was last received.
        notsent_bytes: written, not yet sent (``SIOCOUTQNSD`` as seen by TCP_INFO).
        unacked: segments sent and not yet acknowledged.
        bytes_sent: bytes sent, retransmissions included.
        bytes_acked: bytes the peer acknowledged.
        bytes_received: bytes received.
        bytes_retrans: bytes retransmitted.
        busy_time: seconds spent with data in flight.
        rwnd_limited: seconds limited by the peer's receive window.
        sndbuf_limited: seconds limited by our send buffer.
        total_rto_time: seconds.

    Example::

        info = tcpclose.tcp_info(sock)
        if info is not None and info.rtt is not None:
            print(f"rtt {info.rtt * 1000:.2f} ms, {info.total_retrans} retransmits")
    """

    state: TcpState
    ca_state: int
    retransmits: int
    probes: int
    backoff: int
    options: int
    snd_wscale: int
    rcv_wscale: int
    delivery_rate_app_limited: bool
    fastopen_client_fail: int
    rto: float
    ato: float
    snd_mss: int
    rcv_mss: int
    unacked: int
    sacked: int
    lost: int
    retrans: int
    fackets: int
    last_data_sent: float
    last_ack_sent: float
    last_data_recv: float
    last_ack_recv: float
    pmtu: int
    rcv_ssthresh: int
    rtt: float
    rttvar: float
    snd_ssthresh: int
    snd_cwnd: int
    advmss: int
    reordering: int
    rcv_rtt: float
    rcv_space: int
    total_retrans: int
    pacing_rate: int | None
    max_pacing_rate: int | None
    bytes_acked: int | None
    bytes_received: int | None
    segs_out: int | None
    segs_in: int | None
    notsent_bytes: int | None
    min_rtt: float | None
    data_segs_in: int | None
    data_segs_out: int | None
    delivery_rate: int | None
    busy_time: float | None
    rwnd_limited: float | None
    sndbuf_limited: float | None
    delivered: int | None
    delivered_ce: int | None
    bytes_sent: int | None
    bytes_retrans: int | None
    dsack_dups: int | None
    reord_seen: int | None
    rcv_ooopack: int | None
    snd_wnd: int | None
    rcv_wnd: int | None
    rehash: int | None
    total_rto: int | None
    total_rto_recoveries: int | None
    total_rto_time: float | None
    received_ce: int | None
    delivered_e1_bytes: int | None
    delivered_e0_bytes: int | None
    delivered_ce_bytes: int | None
    received_e1_bytes: int | None
    received_e0_bytes: int | None
    received_ce_bytes: int | None
    size: int

    @property
    def timestamps(self) -> bool:
        """TCP timestamps negotiated (``TCPI_OPT_TIMESTAMPS``); ``tcp_tw_reuse`` needs them."""
        return bool(self.options & 0x01)

    @property
    def sack(self) -> bool:
        """Selective acknowledgements negotiated (``TCPI_OPT_SACK``)."""
        return bool(self.options & 0x02)

    @property
    def window_scaling(self) -> bool:
        """Window scaling negotiated (``TCPI_OPT_WSCALE``)."""
        return bool(self.options & 0x04)

    @property
    def ecn(self) -> bool:
        """ECN negotiated (``TCPI_OPT_ECN``)."""
        return bool(self.options & 0x08)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready mapping; the state becomes its name."""
        data = dict(zip((f.name for f in fields(self)), astuple(self), strict=True))
        data["state"] = self.state.name
        return data


_FIELD_NAMES: Final = tuple(f.name for f in fields(TcpInfo))
if _FIELD_NAMES[:6] + _FIELD_NAMES[10:-1] != tuple(
    name for name, *_ in _LAYOUT if not name.startswith("_")
):  # pragma: no cover - a programming error caught at import
    raise AssertionError("TcpInfo fields out of step with the tcp_info layout")


def decode_tcp_info(
    data: bytes | bytearray | memoryview, byteorder: Literal["little", "big"] = sys.byteorder
) -> TcpInfo:
    """Decode the bytes ``getsockopt(IPPROTO_TCP, TCP_INFO, n)`` returned.

    ``byteorder`` is the machine's: it decides the order of the bitfields in bytes 6
    (``snd_wscale:4, rcv_wscale:4``) and 7 (``delivery_rate_app_limited:1,
    fastopen_client_fail:2``); the C compiler allocates them from the low bits on
    little-endian machines and from the high bits on big-endian ones.

    Worked example, the first 12 bytes of an ESTABLISHED loopback socket on x86-64::

        01 00 00 00 00 07 a7 00  e0 1c 03 00
        |  |  |  |  |  |  |  |   rto = 0x00031ce0 us = 0.204 s
        |  |  |  |  |  |  |  flags: not app-limited, no fastopen failure
        |  |  |  |  |  |  0xa7: snd_wscale 7 (low nibble), rcv_wscale 10 (high)
        |  |  |  |  |  options 7: timestamps, sack, window scaling
        state 1 (ESTABLISHED), ca_state 0, retransmits 0, probes 0, backoff 0

    Raises:
        KernelViewError: fewer than 104 bytes.

    >>> info = decode_tcp_info(bytes.fromhex("01000000 0007a700 e01c0300") + bytes(92),
    ...                        "little")
    >>> info.state.name, info.snd_wscale, info.rcv_wscale, info.rto, info.pacing_rate
    ('ESTABLISHED', 7, 10, 0.204, None)
    """
    size = len(data)
    if size < TCP_INFO_MIN_SIZE:
        raise KernelViewError(
            f"tcp_info too short: {size} bytes, expected at least {TCP_INFO_MIN_SIZE}"
        )
    values: list[Any]  # (each field's type, in field order)
    if size >= TCP_INFO_SIZE:  # the usual case: every field present
        raw = TCP_INFO_STRUCT.unpack_from(data)
        values = list(raw)
        for index, divisor in _SCALED:
            values[index] = raw[index] / divisor
    else:
        raw = TCP_INFO_STRUCT.unpack(bytes(data) + bytes(TCP_INFO_SIZE - size))
        values = []
        for value, end, scale in zip(raw, _ENDS, _SCALES, strict=True):
            if end > size:
                values.append(None)
            elif scale is not None:
                values.append(value / scale)
            else:
                values.append(value)
    wscale = raw[6]
    flags = raw[7]
    if byteorder == "little":
        snd_wscale, rcv_wscale = wscale & 0x0F, wscale >> 4
        app_limited, fastopen_fail = bool(flags & 0x01), (flags >> 1) & 0x03
    else:
        snd_wscale, rcv_wscale = wscale >> 4, wscale & 0x0F
        app_limited, fastopen_fail = bool(flags & 0x80), (flags >> 5) & 0x03
    values[0] = _STATES.get(raw[0], TcpState.UNKNOWN)
    values[6:8] = [snd_wscale, rcv_wscale, app_limited, fastopen_fail]
    values.append(size)
    return TcpInfo(*values)
