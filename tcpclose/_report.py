"""What a close did: :class:`CloseReport`, built from the plan's result and what the
driver saw of the kernel. Pure data; no I/O.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from ._frozen import positional_constructor
from ._kernel._tcpinfo import decode_tcp_info
from ._kernel._types import Address, KernelState, TcpState
from ._plan import Outcome, PlanResult
from ._policy import CloseMode, ClosePolicy, Fallback

if TYPE_CHECKING:
    from ._kernel._tcpinfo import TcpInfo

__all__ = ("CloseReport", "Observed", "build_report", "format_address")


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
            reports were off.
        duration: seconds the close took.
        warnings: codes of the warnings issued.
        error: the error that ended the close early (errno name), or None. After a
            peer's reset this is the errno the close met: ``"ECONNRESET"`` from the
            first call to meet it, ``"ENOTCONN"`` or ``"EPIPE"`` when an event loop
            met it first; ``outcome`` is ``reset`` in every case.
        trigger: what started the close.
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
        mode = self.mode.value
        if self.fallback is not None:
            mode = f"{self.policy.mode.value}->{self.fallback.value}"
        parts = [f"{mode} {self.outcome.value}"]
        if self.local and self.peer:
            parts.append(f"{format_address(self.local)}->{format_address(self.peer)}")
        if self.kernel_state is not None:
            parts.append(f"now {self.kernel_state}")
        facts = []
        if self.peer_closed_first:
            facts.append("peer closed first")
        if self.rst_sent:
            facts.append("RST sent")
        if self.drained_bytes:
            facts.append(f"drained {self.drained_bytes} B")
        if self.discarded_bytes:
            facts.append(f"discarded {self.discarded_bytes} B")
        if self.unread_bytes:
            facts.append(f"{self.unread_bytes} B unread")
        if self.error:
            facts.append(f"error {self.error}")
        if self.warnings:
            facts.append("warned " + ",".join(self.warnings))
        if facts:
            parts.append(", ".join(facts))
        parts.append(f"in {self.duration * 1000:.1f} ms")
        return " ".join(parts)


def build_report(policy: ClosePolicy, result: PlanResult, seen: Observed) -> CloseReport:
    """Combine the plan's result and what the driver saw into a report."""
    # SO_LINGER {1, 0} or unread bytes make the *last* close of a socket send RST. When
    # another process still holds it (a fork), the lookup after our close finds the
    # same socket still owned by a file (inode != 0): nothing was sent yet.
    state = seen.kernel_state
    still_open = state is not None and state.exists and bool(state.inode)
    rst_sent = (result.linger_zero or bool(seen.unread_bytes)) and not still_open
    # (positionally, in field order: see _new_report)
    return _new_report(
        policy,
        result.mode_applied,
        result.fallback,
        result.outcome,
        seen.local,
        seen.peer,
        result.drained_bytes,
        seen.discarded_bytes,
        seen.unread_bytes,
        result.peer_closed_first,
        result.peer_eof,
        result.fin_sent,
        rst_sent,
        seen.tcp_info_bytes,
        seen.kernel_state,
        result.finished - result.started,
        seen.warnings,
        seen.error,
        seen.trigger,
    )


#: ``CloseReport(*fields)`` and ``Observed(*fields)`` without the frozen ``__init__``.
_new_report: Final = positional_constructor(CloseReport)
new_observed: Final = positional_constructor(Observed)


def format_address(address: Address) -> str:
    """``host:port``, with brackets around an IPv6 host."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _jsonable(value: object) -> object:
    if isinstance(value, enum.Enum):
        return value.value if isinstance(value, enum.StrEnum) else value.name
    return value
