"""What the kernel view returns: TCP states, timers, queue sizes. Pure data.

State numbers follow the kernel's ``include/net/tcp_states.h``; timer kinds follow
``/proc/net/tcp``'s ``tr`` column and ``inet_diag_msg.idiag_timer``
(``net/ipv4/inet_diag.c``). Every duration is float seconds.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, cast

__all__ = (
    "TCP_STATE_OF",
    "Address",
    "KernelState",
    "Queues",
    "Source",
    "TcpState",
    "TimerKind",
    "new_kernel_state",
)

#: ``(host, port)``. Hosts are textual IPv4 or IPv6 addresses as the kernel reports
#: them (an IPv4-mapped IPv6 address stays ``::ffff:a.b.c.d``).
Address = tuple[str, int]


class TcpState(enum.IntEnum):
    """A TCP socket's state: the kernel's numbers, plus two of ours.

    ``CLOSED`` (0) means no socket exists for the 4-tuple any more; ``UNKNOWN`` (-1)
    means the platform cannot tell. ``CLOSE`` (7) is the kernel's ``TCP_CLOSE``: a
    socket that still exists (its fd is open) but is closed, e.g. after a reset.

    Every state is true, ``CLOSED`` too, although it equals 0: ``if report.state:``
    would otherwise be false exactly when the connection is gone. Ask what you mean:
    ``state is TcpState.CLOSED``, or ``KernelState.exists``.

    >>> bool(TcpState.CLOSED), TcpState.CLOSED == 0
    (True, True)
    """

    UNKNOWN = -1
    CLOSED = 0
    ESTABLISHED = 1
    SYN_SENT = 2
    SYN_RECV = 3
    FIN_WAIT1 = 4
    FIN_WAIT2 = 5
    TIME_WAIT = 6
    CLOSE = 7
    CLOSE_WAIT = 8
    LAST_ACK = 9
    LISTEN = 10
    CLOSING = 11
    NEW_SYN_RECV = 12
    BOUND_INACTIVE = 13

    def __bool__(self) -> bool:
        return True

    @property
    def label(self) -> str:
        """The name ``ss`` prints (``TIME-WAIT``, ``FIN-WAIT-2``, ...)."""
        return _SS_LABELS.get(self, self.name.replace("_", "-"))


#: A state's number (``tcpi_state``, ``idiag_state``: one byte) to its member, by
#: indexing: ``TcpState(n)`` goes through the enum's metaclass, about 2,500 instructions
#: on Python 3.11 (callgrind), and a report reads one state before every close.
TCP_STATE_OF: Final = tuple(
    {int(s): s for s in TcpState if s > 0}.get(n, TcpState.UNKNOWN) for n in range(256)
)

_SS_LABELS = {
    TcpState.ESTABLISHED: "ESTAB",
    TcpState.FIN_WAIT1: "FIN-WAIT-1",
    TcpState.FIN_WAIT2: "FIN-WAIT-2",
    TcpState.CLOSE: "UNCONN",
    TcpState.SYN_RECV: "SYN-RECV",
    TcpState.NEW_SYN_RECV: "SYN-RECV",
}


class TimerKind(enum.IntEnum):
    """Which timer runs on a socket (``idiag_timer``; ``ss`` shows the name in
    ``timer:(...)``). Kind 3 is also used by orphaned FIN_WAIT2 sockets, so it does not
    by itself mean TIME_WAIT."""

    OFF = 0
    RETRANSMIT = 1  # ss: "on"
    KEEPALIVE = 2
    TIMEWAIT = 3
    PROBE = 4  # zero-window probe; ss: "persist"


#: Which part of the kernel view answered.
Source = str  # "netlink" | "procfs" | "unsupported"


@dataclass(frozen=True, slots=True)
class KernelState:
    """The kernel's view of one TCP socket (or of its absence).

    Fields the answering source cannot give are ``None``.

    Attributes:
        state: the TCP state; ``CLOSED`` when no socket exists for the 4-tuple.
        source: ``"netlink"``, ``"procfs"`` or ``"unsupported"``.
        local: the socket's own address as the kernel reports it.
        peer: the remote address as the kernel reports it.
        timer: the running timer, if any.
        seconds_left: seconds until that timer fires (TIME_WAIT: until it is gone).
        retransmits: the timer's retransmit/probe count.
        recv_queue: ``idiag_rqueue``: bytes received and unread (for a listener: the
            accept backlog).
        send_queue: ``idiag_wqueue``: bytes not yet acknowledged (for a listener: the
            backlog's limit).
        uid: the owner's user id (0 for TIME_WAIT and orphans).
        inode: the socket's inode (0 for TIME_WAIT and orphans).
        cookie: the kernel's socket cookie, stable for the socket's lifetime
            (TIME_WAIT keeps the cookie of the connection it came from).
    """

    state: TcpState
    source: Source
    local: Address | None = None
    peer: Address | None = None
    timer: TimerKind | None = None
    seconds_left: float | None = None
    retransmits: int | None = None
    recv_queue: int | None = None
    send_queue: int | None = None
    uid: int | None = None
    inode: int | None = None
    cookie: int | None = None

    @property
    def exists(self) -> bool:
        """True when a kernel socket exists for the 4-tuple (any state but CLOSED/UNKNOWN)."""
        return self.state not in (TcpState.CLOSED, TcpState.UNKNOWN)

    def as_dict(self) -> dict[str, object]:
        """JSON-ready mapping; enums become their names."""
        return {
            "state": self.state.name,
            "source": self.source,
            "local": list(self.local) if self.local else None,
            "peer": list(self.peer) if self.peer else None,
            "timer": self.timer.name if self.timer is not None else None,
            "seconds_left": self.seconds_left,
            "retransmits": self.retransmits,
            "recv_queue": self.recv_queue,
            "send_queue": self.send_queue,
            "uid": self.uid,
            "inode": self.inode,
            "cookie": self.cookie,
        }

    def __str__(self) -> str:
        text = self.state.name
        if self.seconds_left is not None and self.timer not in (None, TimerKind.OFF):
            text += f" ({self.seconds_left:.1f}s left)"
        return text


class _Unfrozen:
    """:class:`KernelState`'s slots without its frozen ``__setattr__``; ``__init__``
    fills them and then makes the instance a ``KernelState`` (its parameters are
    ``KernelState``'s fields, in order).

    A frozen dataclass's ``__init__`` goes through ``object.__setattr__`` once per field
    (2.2 us for twelve on the 2-vCPU benchmark machine); plain slot stores and one
    ``__class__`` assignment (allowed between classes of identical slots) take 0.3 us,
    which is most of a lookup's decoding and of a dump's per-socket cost.
    """

    __slots__ = (
        "cookie",
        "inode",
        "local",
        "peer",
        "recv_queue",
        "retransmits",
        "seconds_left",
        "send_queue",
        "source",
        "state",
        "timer",
        "uid",
    )

    def __init__(
        self,
        state: TcpState,
        source: Source,
        local: Address | None,
        peer: Address | None,
        timer: TimerKind | None,
        seconds_left: float | None,
        retransmits: int | None,
        recv_queue: int | None,
        send_queue: int | None,
        uid: int | None,
        inode: int | None,
        cookie: int | None,
    ) -> None:
        self.state = state
        self.source = source
        self.local = local
        self.peer = peer
        self.timer = timer
        self.seconds_left = seconds_left
        self.retransmits = retransmits
        self.recv_queue = recv_queue
        self.send_queue = send_queue
        self.uid = uid
        self.inode = inode
        self.cookie = cookie
        self.__class__ = KernelState  # type: ignore[assignment]


def _fast_constructor() -> Callable[..., KernelState]:
    """``_Unfrozen`` when it builds exactly what ``KernelState(...)`` builds (same
    fields in the same order, no ``__post_init__``); otherwise ``KernelState``."""
    names = tuple(f.name for f in dataclasses.fields(KernelState))
    sample = (
        TcpState.TIME_WAIT, "netlink", ("127.0.0.1", 1), ("127.0.0.1", 2), TimerKind.TIMEWAIT,
        59.5, 0, 1, 2, 3, 4, 5,
    )  # fmt: skip
    try:
        if sorted(names) != sorted(_Unfrozen.__slots__) or hasattr(KernelState, "__post_init__"):
            raise TypeError("KernelState changed shape")
        made = cast(KernelState, _Unfrozen(*sample))
        if type(made) is not KernelState or made != KernelState(*sample):
            raise TypeError("KernelState changed shape")  # pragma: no cover
    except TypeError:  # pragma: no cover - only if KernelState changes shape
        return KernelState
    return cast(Callable[..., KernelState], _Unfrozen)


#: ``new_kernel_state(state, source, local, peer, timer, seconds_left, retransmits,
#: recv_queue, send_queue, uid, inode, cookie)``: a :class:`KernelState`, positional
#: arguments only, built faster than the dataclass's own ``__init__`` (the decoders
#: make one per socket).
new_kernel_state: Final = _fast_constructor()


@dataclass(frozen=True, slots=True)
class Queues:
    """Bytes waiting in one socket's kernel queues.

    Attributes:
        unread: received and not yet read by the program (``SIOCINQ``).
        unsent: written by the program, not yet sent (``SIOCOUTQNSD``).
        unacked: sent, not yet acknowledged by the peer (``SIOCOUTQ - SIOCOUTQNSD``).
    """

    unread: int
    unsent: int
    unacked: int

    @property
    def outgoing(self) -> int:
        """Everything of ours the peer has not acknowledged (``SIOCOUTQ``): what an
        abort would discard."""
        return self.unsent + self.unacked

    def as_dict(self) -> dict[str, int]:
        return {"unread": self.unread, "unsent": self.unsent, "unacked": self.unacked}
