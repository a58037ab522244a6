"""The kernel view, public: what the kernel holds for a TCP socket or 4-tuple.

    >>> import tcpclose.kernel
    >>> tcpclose.kernel.backend() in ("netlink", "procfs", "unsupported")
    True

* :func:`lookup` -- one 4-tuple's state now (TIME_WAIT with seconds left, CLOSED...)
* :func:`dump`, :func:`summary` -- every TCP socket, filtered by state/port/family
* :func:`tcp_info`, :func:`queues`, :func:`socket_cookie` -- one socket's details
* :func:`backend` -- which view answers: ``netlink``, ``procfs`` or ``unsupported``
"""

from __future__ import annotations

from ._kernel import AddressLike as AddressLike
from ._kernel import KernelState as KernelState
from ._kernel import Queues as Queues
from ._kernel import SocketLike as SocketLike
from ._kernel import Summary as Summary
from ._kernel import TcpInfo as TcpInfo
from ._kernel import TcpState as TcpState
from ._kernel import TimerKind as TimerKind
from ._kernel import backend as backend
from ._kernel import dump as dump
from ._kernel import lookup as lookup
from ._kernel import queues as queues
from ._kernel import socket_cookie as socket_cookie
from ._kernel import summary as summary
from ._kernel import tcp_info as tcp_info

__all__ = (
    "AddressLike",
    "KernelState",
    "Queues",
    "SocketLike",
    "Summary",
    "TcpInfo",
    "TcpState",
    "TimerKind",
    "backend",
    "dump",
    "lookup",
    "queues",
    "socket_cookie",
    "summary",
    "tcp_info",
)
