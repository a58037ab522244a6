"""An application's ``SO_LINGER`` must not stretch a close past its policy's bounds.

Linux's ``close()`` under ``SO_LINGER {1, N}`` waits up to N seconds for the peer to
acknowledge what is queued, on blocking and non-blocking sockets alike. A policy's
bounds hold "whatever the socket's own setting", so before a close both drivers turn
such a linger off (``abort`` sets its own ``{1, 0}`` later and is left alone): the
queued bytes still go out after ``close()``, as an orphan socket sends them, within
the kernel's own retransmission limits.
"""

from __future__ import annotations

import logging
import socket
import struct
from typing import Final, Protocol

from ._observe import Watch
from ._policy import CloseMode

__all__ = ("LINGER_OFF", "disarm_linger")

logger = logging.getLogger("tcpclose")

#: ``struct linger {l_onoff = 0, l_linger = 0}``.
LINGER_OFF: Final = struct.pack("ii", 0, 0)


class _SetsOptions(Protocol):
    def setsockopt(self, level: int, option: int, value: bytes, /) -> None: ...


def disarm_linger(
    watch: Watch,
    sock: _SetsOptions,
    mode: CloseMode,
    *,
    nonblocking: bool,
    event_loop: bool = False,
) -> bool:
    """Turn off an ``SO_LINGER`` with a non-zero time before a close in ``mode``.

    ``watch`` reads the option and records TC201 where the socket must not block
    (``nonblocking``, ``event_loop``); ``sock`` is what ``setsockopt`` goes through.

    Returns:
        True when a linger was found and turned off.
    """
    if not watch.check_linger(nonblocking=nonblocking, event_loop=event_loop):
        return False
    if mode is CloseMode.ABORT:
        return False
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_OFF)
    except OSError as exc:
        logger.debug("close: could not turn SO_LINGER off: %s", exc)
        return False
    return True
