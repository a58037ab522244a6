"""The library's exceptions.

One base class, :class:`TcpCloseError`; each subclass also inherits the standard
exception that callers already catch for the same kind of mistake, so
``except ValueError`` keeps working around a bad policy string.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ("KernelViewError", "NotTcpSocketError", "PolicyError", "TcpCloseError")


class TcpCloseError(Exception):
    """Base class of every exception raised by tcpclose."""


class PolicyError(TcpCloseError, ValueError):
    """A close policy could not be parsed or is inconsistent.

    Attributes:
        reason: what is wrong, without the position and the accepted values.
        word: the offending word, key or value, as the user wrote it (``None`` when the
            whole input is at fault, e.g. an empty string).
        position: character offset of ``word`` in the parsed text, or ``None`` for
            mappings and keyword arguments.
        accepted: what would have been accepted in that place.
    """

    reason: str
    word: str | None
    position: int | None
    accepted: tuple[str, ...]

    def __init__(
        self,
        message: str,
        *,
        word: str | None = None,
        position: int | None = None,
        accepted: Sequence[str] = (),
    ) -> None:
        self.reason = message
        self.word = word
        self.position = position
        self.accepted = tuple(accepted)
        parts = [message]
        if position is not None:
            parts.append(f"at position {position}")
        text = " ".join(parts)
        if self.accepted:
            text += f"; accepted: {', '.join(self.accepted)}"
        super().__init__(text)


class NotTcpSocketError(TcpCloseError, TypeError):
    """The object given is not a TCP socket (UDP, UNIX, raw, or not a socket at all)."""


class KernelViewError(TcpCloseError):
    """The kernel answered something the decoder cannot make sense of.

    Raised by the pure decoders on malformed bytes or text (truncated netlink
    messages, a garbled ``/proc/net/tcp`` line). The public lookup functions
    translate it into ``TcpState.UNKNOWN`` where a platform cannot tell.
    """
