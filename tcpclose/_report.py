"""What a close did: :class:`CloseReport`, built from the plan's result and what the
driver saw of the kernel. Pure data; no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, cast

from ._kernel._address import format_address as format_address  # (tests import it here)
from ._kernel._tcpinfo import decode_tcp_info
from ._kernel._types import Address, KernelState, TcpState
from ._plan import Outcome, PlanResult, _twin
from ._policy import CloseMode, ClosePolicy, Fallback

if TYPE_CHECKING:
    from ._kernel._tcpinfo import TcpInfo

__all__ = (
    "CloseReport",
    "Observed",
    "build_report",
    "format_address",
    "format_report",
    "new_observed",
    "report_fields",
)


@dataclass(frozen=True, slots=True)
class Observed:
    """What a driver saw around the close, for the report (all optional).

    Attributes:
        local: our address, read before the close.
        peer: the peer's address, read before the close.
        tcp_info_bytes: TCP_INFO just before the fd was closed, as the kernel gave it.
        unread_bytes: received bytes nobody read, when the fd was closed (SIOCINQ).
        discarded_bytes: bytes of ours thrown away: queued in the kernel when
            SO_LINGER {1, 0} was set (SIOCOUTQ), plus a transport's own buffer.
        kernel_state: the 4-tuple's state just after the close.
        warnings: codes of the warnings this close issued.
        error: what ended the close early, e.g. ``"ECONNRESET"``.
        trigger: what started the close (``"close"``, ``"abort"``, ``"handler-return"``,
            ``"server-shutdown"``, ...).
    """

    local: Address | None = None
    peer: Address | None = None
    tcp_info_bytes: bytes | None = None
    unread_bytes: int | None = None
    discarded_bytes: int = 0
    kernel_state: KernelState | None = None
    warnings: tuple[str, ...] = ()
    error: str | None = None
    trigger: str = "close"


class _UnfrozenObserved:
    """:class:`Observed`'s slots without its frozen ``__setattr__``; ``__init__`` (its
    parameters are ``Observed``'s fields, in order) fills them and then makes the
    instance an ``Observed``, as :class:`_UnfrozenReport` does for a report
    (callgrind, Python 3.11: 3,700 instructions against 14,400 for ``Observed``'s own
    ``__init__``)."""

    __slots__ = Observed.__slots__

    def __init__(
        self,
        local: Address | None,
        peer: Address | None,
        tcp_info_bytes: bytes | None,
        unread_bytes: int | None,
        discarded_bytes: int,
        kernel_state: KernelState | None,
        warnings: tuple[str, ...],
        error: str | None,
        trigger: str,
    ) -> None:
        self.local = local
        self.peer = peer
        self.tcp_info_bytes = tcp_info_bytes
        self.unread_bytes = unread_bytes
        self.discarded_bytes = discarded_bytes
        self.kernel_state = kernel_state
        self.warnings = warnings
        self.error = error
        self.trigger = trigger
        self.__class__ = Observed  # type: ignore[assignment]


#: ``new_observed(local, peer, tcp_info_bytes, unread_bytes, discarded_bytes,
#: kernel_state, warnings, error, trigger)``: an :class:`Observed`, positional arguments
#: only, built faster than the dataclass's own ``__init__`` (a driver makes one per
#: reported close).
new_observed: Final = cast(
    "Callable[[Address | None, Address | None, bytes | None, int | None, int, "
    "KernelState | None, tuple[str, ...], str | None, str], Observed]",
    _UnfrozenObserved,
)


@dataclass(frozen=True, slots=True)
class CloseReport:
    """What one close did, and what the kernel holds for the 4-tuple after it.

    Attributes:
        policy: the policy asked for.
        mode: the mode actually applied; differs from ``policy.mode`` when a
            ``peer-first`` fallback ran (``fallback`` then says which).
        fallback: the fallback taken, or None.
        outcome: how the close ended: ``peer-eof``, ``idle-timeout``, ``linger-time``,
            ``byte-cap``, ``reset``, ``aborted``, ``closed`` or ``error``.
        local: our address (None when unknown).
        peer: the peer's address (None when unknown).
        drained_bytes: bytes read and discarded while waiting for the peer's FIN.
        discarded_bytes: bytes of ours thrown away by an abort (queued in the kernel
            or in a transport's buffer).
        unread_bytes: bytes received and never read when the fd was closed (a plain
            close with unread bytes makes Linux send RST); None when not measured.
        peer_closed_first: the peer's FIN came before ours: TIME_WAIT is at the peer.
        peer_eof: the peer's FIN was received at all.
        fin_sent: we sent a FIN before closing.
        rst_sent: the close sent RST (abort, or unread bytes at close). False when
            the lookup after the close found the socket still held by another fd
            (e.g. a forked child): the RST waits for the last holder's close.
        tcp_info_bytes: ``TCP_INFO`` just before the close, as the kernel returned it
            (None when not measured); :attr:`tcp_info` decodes it.
        kernel_state: the 4-tuple's kernel state just after the close, or None when
            reports were off or this close was not sampled (``kernel_state_mode``).
            Under ``kernel_state_mode="lazy"`` it is looked up when first read, and
            says what the kernel held then.
        duration: seconds the close took.
        warnings: codes of the warnings issued.
        error: the error that ended the close early (errno name), or None. After a
            peer's reset this is the errno the close met: ``"ECONNRESET"`` from the
            first call to meet it, ``"ENOTCONN"`` or ``"EPIPE"`` when an event loop
            met it first; ``outcome`` is ``reset`` in every case.
        trigger: what started the close.
        time_wait_skipped: TIME_WAIT was due here (we closed first and the peer's FIN
            came back) but the kernel shows the 4-tuple CLOSED while its TIME_WAIT
            table is full (``net.ipv4.tcp_max_tw_buckets`` reached, or its
            ``TCPTimeWaitOverflow`` counter rose since the last look): the kernel
            skipped TIME_WAIT, and the 4-tuple is unprotected against late segments.
        kernel_state_mode: when ``kernel_state`` was looked up: ``"eager"`` (just after
            the close), ``"lazy"`` (when first read), ``"sampled:F"`` (just after the
            close, for a fraction F of the closes) or ``"off"`` (reports off).
    """

    policy: ClosePolicy
    mode: CloseMode
    fallback: Fallback | None
    outcome: Outcome
    local: Address | None
    peer: Address | None
    drained_bytes: int
    discarded_bytes: int
    unread_bytes: int | None
    peer_closed_first: bool
    peer_eof: bool
    fin_sent: bool
    rst_sent: bool
    tcp_info_bytes: bytes | None
    kernel_state: KernelState | None
    duration: float
    warnings: tuple[str, ...] = ()
    error: str | None = None
    trigger: str = "close"
    time_wait_skipped: bool = False
    kernel_state_mode: str = "eager"

    @property
    def tcp_info(self) -> TcpInfo | None:
        """``TCP_INFO`` just before the close (``rtt``, ``retransmits``,
        ``bytes_acked``, ...), or None when not measured.

        Decoded from :attr:`tcp_info_bytes` on each access (about 7 us for its 69
        fields): most reports are logged or counted and never read it, so a busy
        server does not pay for it per close. Keep the value when reading it often.
        """
        raw = self.tcp_info_bytes
        return None if raw is None else decode_tcp_info(raw)

    @property
    def state(self) -> TcpState:
        """The 4-tuple's state after the close (``UNKNOWN`` when not looked up)."""
        return self.kernel_state.state if self.kernel_state else TcpState.UNKNOWN

    @property
    def time_wait_here(self) -> bool:
        """True when the kernel showed our side of the 4-tuple in TIME_WAIT."""
        return self.state is TcpState.TIME_WAIT

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready mapping (enums as their values, addresses as lists)."""
        out: dict[str, Any] = {}
        for field in dataclasses.fields(self):
            name = field.name
            value = getattr(self, name)
            if name == "tcp_info_bytes":  # JSON gets the decoded fields
                name, value = "tcp_info", self.tcp_info
            if isinstance(value, ClosePolicy):
                value = str(value)
            elif isinstance(value, enum.Enum):
                value = value.value
            elif isinstance(value, KernelState):
                value = value.as_dict()
            elif dataclasses.is_dataclass(value) and not isinstance(value, type):
                value = {k: _jsonable(v) for k, v in dataclasses.asdict(value).items()}
            elif isinstance(value, tuple):
                value = list(value)
            out[name] = value
        return out

    def __str__(self) -> str:
        return format_report(self)


def build_report(
    policy: ClosePolicy,
    result: PlanResult,
    seen: Observed,
    *,
    kernel_state_mode: str = "eager",
    lookup: Callable[[], KernelState | None] | None = None,
) -> CloseReport:
    """Combine the plan's result and what the driver saw into a report.

    ``lookup``: the kernel state is looked up by this when the report's
    ``kernel_state`` is first read (``kernel_state_mode="lazy"``); ``rst_sent`` then
    assumes no other process still holds the socket, and ``time_wait_skipped`` is
    False (both would need the state now).
    """
    # SO_LINGER {1, 0} or unread bytes make the *last* close of a socket send RST. When
    # another process still holds it (a fork), the lookup after our close finds the
    # same socket still owned by a file (inode != 0): nothing was sent yet.
    state = seen.kernel_state
    resets = result.linger_zero or bool(seen.unread_bytes)
    still_open = state is not None and state.exists and bool(state.inode)
    rst_sent = resets and not still_open
    skipped = False
    if (
        state is not None
        and state.state is TcpState.CLOSED
        and result.outcome is Outcome.PEER_EOF
        and result.fin_sent
        and not result.peer_closed_first
        and not resets
    ):
        # TIME_WAIT was due here and is missing: ask whether the kernel's table is
        # full (file reads, on this rare path only).
        from ._audit import time_wait_table_overflowed

        skipped = time_wait_table_overflowed()
    # (Built as an _UnfrozenReport, which then takes its class: see there.)
    report: Any = _object_new(_UnfrozenReport)
    report.policy = policy
    report.mode = result.mode_applied
    report.fallback = result.fallback
    report.outcome = result.outcome
    report.local = seen.local
    report.peer = seen.peer
    report.drained_bytes = result.drained_bytes
    report.discarded_bytes = seen.discarded_bytes
    report.unread_bytes = seen.unread_bytes
    report.peer_closed_first = result.peer_closed_first
    report.peer_eof = result.peer_eof
    report.fin_sent = result.fin_sent
    report.rst_sent = rst_sent
    report.tcp_info_bytes = seen.tcp_info_bytes
    report.duration = result.finished - result.started
    report.warnings = seen.warnings
    report.error = seen.error
    report.trigger = seen.trigger
    report.time_wait_skipped = skipped
    report.kernel_state_mode = kernel_state_mode
    if lookup is None:
        report.kernel_state = seen.kernel_state
        report.__class__ = CloseReport
    else:
        report.kernel_state = lookup  # (looked up on first read: see _LazyKernelStateReport)
        report.__class__ = _LazyKernelStateReport
    built: CloseReport = report  # (typed by annotation: cast() would be a call per report)
    return built


_object_new: Final = object.__new__


#: :class:`CloseReport`'s slots without its frozen ``__setattr__`` (``_plan._twin``, as
#: the plan's results are made): a report is built as one and then takes its class
#: (allowed between classes of identical slots). The frozen ``__init__`` calls
#: ``object.__setattr__`` once per field (21), and setting each slot through its
#: descriptor costs about as much; plain slot stores cost a fifth (callgrind, Python
#: 3.11: 4,400 instructions per report against 23,200 through the descriptors).
_UnfrozenReport: Final = _twin(CloseReport)


_log = logging.getLogger("tcpclose")
#: The slot holding CloseReport.kernel_state (its member descriptor).
_KERNEL_STATE_SLOT: Final = CloseReport.__dict__["kernel_state"]


class _LazyKernelStateReport(CloseReport):
    """A :class:`CloseReport` whose ``kernel_state`` is looked up when first read
    (``kernel_state_mode="lazy"``): until then its slot holds the lookup (a callable,
    which a ``KernelState`` is not). Otherwise the same frozen value, with the same
    slots; it pickles and copies as a plain :class:`CloseReport` (looked up then)."""

    __slots__ = ()

    @property
    def kernel_state(self) -> KernelState | None:
        state = _KERNEL_STATE_SLOT.__get__(self, CloseReport)
        if callable(state):  # the lookup, still due
            _KERNEL_STATE_SLOT.__set__(self, None)  # (once, even if it fails)
            try:
                state = state()
            except Exception:  # reading a report must not fail
                _log.exception("close: kernel lookup for a report failed")
                state = None
            _KERNEL_STATE_SLOT.__set__(self, state)
        return cast("KernelState | None", state)

    @kernel_state.setter
    def kernel_state(self, value: KernelState | None) -> None:
        # (Only the dataclass machinery gets here: the frozen __setattr__ refuses users.)
        _KERNEL_STATE_SLOT.__set__(self, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (CloseReport, tuple(getattr(self, f.name) for f in dataclasses.fields(self)))


def format_report(report: CloseReport) -> str:
    """One line for a report: what ``str(report)``, the log sink and the command line
    print.

    The mode (``peer-first->graceful`` when a fallback ran) and outcome, the 4-tuple,
    the kernel state after the close, the facts worth knowing, and the duration::

        graceful peer-eof 127.0.0.1:8080->127.0.0.1:51234 now TIME_WAIT (60.0s left) in 0.3 ms
    """
    mode = report.mode.value
    if report.fallback is not None:
        mode = f"{report.policy.mode.value}->{report.fallback.value}"
    parts = [f"{mode} {report.outcome.value}"]
    if report.local and report.peer:
        parts.append(f"{format_address(report.local)}->{format_address(report.peer)}")
    if report.kernel_state is not None:
        parts.append(f"now {report.kernel_state}")
        if report.time_wait_skipped:
            parts.append("(TIME_WAIT skipped: kernel table full, tcp_max_tw_buckets)")
    facts = []
    if report.peer_closed_first:
        facts.append("peer closed first")
    if report.rst_sent:
        facts.append("RST sent")
    if report.drained_bytes:
        facts.append(f"drained {report.drained_bytes} B")
    if report.discarded_bytes:
        facts.append(f"discarded {report.discarded_bytes} B")
    if report.unread_bytes:
        facts.append(f"{report.unread_bytes} B unread")
    if report.error:
        facts.append(f"error {report.error}")
    if report.warnings:
        facts.append("warned " + ",".join(report.warnings))
    if facts:
        parts.append(", ".join(facts))
    parts.append(f"in {report.duration * 1000:.1f} ms")
    return " ".join(parts)


def report_fields(report: CloseReport) -> dict[str, object]:
    """The report as a few flat fields for a structured log record (``extra=``):
    names prefixed ``close_`` so that they never collide with a ``LogRecord``'s own;
    fields that hold nothing of note are left out.

    ``close_mode``, ``close_outcome``, ``close_state`` and ``close_duration_s`` are
    always there; ``close_local``/``close_peer`` (``host:port``), ``close_fallback``,
    ``close_rst_sent``, ``close_peer_closed_first``, ``close_drained_bytes``,
    ``close_discarded_bytes``, ``close_unread_bytes``, ``close_error``,
    ``close_warnings`` (codes, comma-separated), ``close_time_wait_skipped`` and
    ``close_trigger`` (when not ``close``) only when set.
    """
    fields: dict[str, object] = {
        "close_mode": report.policy.mode.value,
        "close_outcome": report.outcome.value,
        "close_state": report.state.name,
        "close_duration_s": round(report.duration, 6),
    }
    if report.local is not None:
        fields["close_local"] = format_address(report.local)
    if report.peer is not None:
        fields["close_peer"] = format_address(report.peer)
    if report.fallback is not None:
        fields["close_fallback"] = report.fallback.value
    if report.rst_sent:
        fields["close_rst_sent"] = True
    if report.peer_closed_first:
        fields["close_peer_closed_first"] = True
    if report.drained_bytes:
        fields["close_drained_bytes"] = report.drained_bytes
    if report.discarded_bytes:
        fields["close_discarded_bytes"] = report.discarded_bytes
    if report.unread_bytes:
        fields["close_unread_bytes"] = report.unread_bytes
    if report.error:
        fields["close_error"] = report.error
    if report.warnings:
        fields["close_warnings"] = ",".join(report.warnings)
    if report.time_wait_skipped:
        fields["close_time_wait_skipped"] = True
    if report.trigger != "close":
        fields["close_trigger"] = report.trigger
    return fields


def _jsonable(value: object) -> object:
    if isinstance(value, enum.Enum):
        return value.value if isinstance(value, enum.StrEnum) else value.name
    return value
