"""Socket options and ioctls on one TCP socket, without taking ownership of it.

Accepts a ``socket.socket``, asyncio's ``TransportSocket``, uvloop's pseudo-socket, an
``int`` file descriptor, or anything else with ``fileno()``. Objects other than a
``socket.socket`` are reached through a temporary ``socket.socket`` built on the same
descriptor and *detached* again before returning, so the caller's descriptor is never
closed, duplicated or changed (the temporary object is created with
``SOCK_NONBLOCK`` in its type so that a global ``socket.setdefaulttimeout`` cannot
make Python switch the descriptor to non-blocking mode).

Every entry point first checks that the descriptor is a TCP socket (``SO_DOMAIN``,
``SO_TYPE``, ``SO_PROTOCOL``):

* not TCP → :class:`~tcpclose.NotTcpSocketError` (a ``TypeError``), e.g.
  ``expected a TCP socket, got a UDP socket (AF_INET, SOCK_DGRAM)``;
* closed (``fileno() == -1`` or ``EBADF``) → ``ValueError``.

Notes:
    ``SIOCOUTQ``/``SIOCOUTQNSD`` and ``SO_COOKIE`` are Linux-only; ``queues`` raises
    ``OSError(ENOTSUP)`` elsewhere and ``socket_cookie`` returns None.
"""

from __future__ import annotations

import errno
import fcntl
import socket
import struct
import sys
import termios
from types import TracebackType
from typing import Final, Protocol, TypeAlias, runtime_checkable

from tcpclose._errors import NotTcpSocketError

from ._tcpinfo import TCP_INFO_MIN_SIZE, TCP_INFO_REQUEST_SIZE, TcpInfo, decode_tcp_info
from ._types import TCP_STATE_OF, Queues, TcpState

__all__ = (
    "SocketLike",
    "SupportsFileno",
    "borrow",
    "queues",
    "socket_cookie",
    "tcp_info",
)


@runtime_checkable
class SupportsFileno(Protocol):
    """Anything with ``fileno() -> int`` (asyncio ``TransportSocket``, uvloop's
    pseudo-socket, ``selectors`` keys' objects, ...)."""

    def fileno(self) -> int: ...


#: What the kernel-view functions accept as "a socket".
SocketLike: TypeAlias = socket.socket | SupportsFileno | int

#: ``SIOCINQ`` (= ``FIONREAD``): bytes received and not read.
SIOCINQ: Final = termios.FIONREAD
#: ``SIOCOUTQ`` (= ``TIOCOUTQ``): bytes written and not acknowledged.
SIOCOUTQ: Final = termios.TIOCOUTQ
#: ``SIOCOUTQNSD`` (``include/uapi/linux/sockios.h``): bytes written and not yet sent.
SIOCOUTQNSD: Final = 0x894B
#: ``SO_COOKIE`` (``include/uapi/asm-generic/socket.h``), Linux >= 4.12.
SO_COOKIE: Final[int | None] = getattr(
    socket, "SO_COOKIE", 57 if sys.platform.startswith("linux") else None
)

_SO_DOMAIN: Final[int | None] = getattr(socket, "SO_DOMAIN", None)
_SO_PROTOCOL: Final[int | None] = getattr(socket, "SO_PROTOCOL", None)
_TCP_INFO: Final[int | None] = getattr(socket, "TCP_INFO", None)
_INT: Final = struct.Struct("=i")
_U64: Final = struct.Struct("=Q")
_INET_FAMILIES: Final = (int(socket.AF_INET), int(socket.AF_INET6))
_IPPROTO_MPTCP: Final = 262
_IPPROTO_SCTP: Final = 132


def _describe_type(obj: object) -> str:
    return type(obj).__qualname__


def fileno_of(sock: object) -> int:
    """The descriptor behind ``sock``.

    Raises:
        NotTcpSocketError: ``sock`` is neither an int nor has ``fileno()``.
        ValueError: the socket is closed (``fileno()`` is -1, or a negative int).
    """
    if isinstance(sock, bool):
        raise NotTcpSocketError("expected a socket, int fd or object with fileno(), got bool")
    if isinstance(sock, int):
        fd = sock
    else:
        method = getattr(sock, "fileno", None)
        if method is None or not callable(method):
            raise NotTcpSocketError(
                "expected a socket, int fd or object with fileno(), "
                f"got {_describe_type(sock)} instead"
            )
        fd = method()
        if isinstance(fd, bool) or not isinstance(fd, int):
            raise NotTcpSocketError(
                f"{_describe_type(sock)}.fileno() returned {_describe_type(fd)}, expected int"
            )
    if fd < 0:
        raise ValueError("socket is closed (fileno() is -1)")
    return fd


def _family_name(family: int) -> str:
    try:
        return socket.AddressFamily(family).name
    except ValueError:
        return f"family {family}"


def _type_name(kind: int) -> str:
    try:
        return socket.SocketKind(kind).name
    except ValueError:
        return f"type {kind}"


def _kind_label(family: int, kind: int, proto: int) -> str:
    if family == getattr(socket, "AF_UNIX", -1):
        return "a UNIX socket"
    if family not in _INET_FAMILIES:
        return "a non-IP socket"
    if kind == socket.SOCK_DGRAM:
        return "a UDP socket" if proto in (0, socket.IPPROTO_UDP) else "a datagram socket"
    if kind == socket.SOCK_RAW:
        return "a raw socket"
    if proto == _IPPROTO_MPTCP:
        return "an MPTCP socket"
    if proto == _IPPROTO_SCTP:
        return "an SCTP socket"
    return "a non-TCP socket"


def _translate(exc: OSError, fd: int) -> Exception:
    if exc.errno == errno.EBADF:
        return ValueError(f"socket is closed (fd {fd}: EBADF)")
    if exc.errno == errno.ENOTSOCK:
        return NotTcpSocketError(f"expected a TCP socket, got fd {fd}, which is not a socket")
    return exc


def _check_tcp(view: socket.socket, fd: int) -> None:
    try:
        kind = view.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        if _SO_DOMAIN is not None and _SO_PROTOCOL is not None:
            family = view.getsockopt(socket.SOL_SOCKET, _SO_DOMAIN)
            proto = view.getsockopt(socket.SOL_SOCKET, _SO_PROTOCOL)
        else:  # pragma: no cover - non-Linux: trust what Python detected
            family, proto = int(view.family), int(view.proto)
    except OSError as exc:
        raise _translate(exc, fd) from exc
    if family in _INET_FAMILIES and kind == socket.SOCK_STREAM and proto in (0, socket.IPPROTO_TCP):
        return
    raise NotTcpSocketError(
        f"expected a TCP socket, got {_kind_label(family, kind, proto)} "
        f"({_family_name(family)}, {_type_name(kind)})"
    )


class borrow:
    """Context manager giving a ``socket.socket`` for ``sock``'s descriptor, verified
    to be TCP, without taking ownership.

    A ``socket.socket`` is used as it is; anything else is reached through a
    temporary object that is detached (not closed) on exit.

    Raises (on entry):
        NotTcpSocketError: not a TCP socket, or not a socket at all.
        ValueError: the socket is closed.
    """

    __slots__ = ("_detach", "_sock", "_view", "fd")

    def __init__(self, sock: SocketLike) -> None:
        self._sock = sock
        self._view: socket.socket | None = None
        self._detach = False
        self.fd = -1

    def __enter__(self) -> socket.socket:
        sock = self._sock
        if isinstance(sock, socket.socket):
            fd = sock.fileno()
            if fd < 0:
                raise ValueError("socket is closed (fileno() is -1)")
            view = sock
        else:
            fd = fileno_of(sock)
            try:
                view = socket.socket(
                    socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, 0, fileno=fd
                )
            except OSError as exc:
                raise _translate(exc, fd) from exc
            self._detach = True
        self.fd = fd
        self._view = view
        try:
            _check_tcp(view, fd)
        except BaseException:
            self._release()
            raise
        return view

    def _release(self) -> None:
        view, self._view = self._view, None
        if view is not None and self._detach:
            view.detach()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._release()


def socket_cookie(sock: SocketLike) -> int | None:
    """``SO_COOKIE``: the kernel's 64-bit identifier of the socket, or None where the
    platform has none.

    The cookie is stable for the socket's lifetime, including its TIME_WAIT, and lets
    :func:`lookup` tell this connection from a later one on the same 4-tuple.

    Raises:
        NotTcpSocketError: not a TCP socket.
        ValueError: the socket is closed.

    >>> import socket, tcpclose.kernel
    >>> with socket.socket() as s:
    ...     isinstance(tcpclose.kernel.socket_cookie(s), int)
    True
    """
    with borrow(sock) as view:
        return read_cookie(view)


# -- unchecked reads ------------------------------------------------------------------------
#
# The ``read_*`` functions skip the TCP check: they are for a socket the caller has
# verified already (the close drivers check once, then read several times per close).


class _Options(Protocol):
    def fileno(self) -> int: ...
    def getsockopt(self, level: int, option: int, buflen: int, /) -> bytes: ...


def read_cookie(sock: _Options) -> int | None:
    """``SO_COOKIE`` of a socket already known to be TCP (see :func:`socket_cookie`)."""
    if SO_COOKIE is None:  # pragma: no cover - non-Linux
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, _U64.size)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP):
            return None
        raise
    (cookie,) = _U64.unpack(raw)
    return int(cookie)


def read_queues(fd: int) -> Queues:
    """:func:`queues` for the fd of a socket already known to be TCP."""
    if not sys.platform.startswith("linux"):  # pragma: no cover
        raise OSError(errno.ENOTSUP, "SIOCOUTQ/SIOCOUTQNSD are Linux-only")
    try:
        unread = _ioctl_int(fd, SIOCINQ)
        outgoing = _ioctl_int(fd, SIOCOUTQ)
        unsent = _ioctl_int(fd, SIOCOUTQNSD)
    except OSError as exc:
        if exc.errno == errno.EINVAL:
            raise ValueError(
                "queues of a listening socket are undefined (SIOCINQ: EINVAL)"
            ) from exc
        raise _translate(exc, fd) from exc
    unsent = min(unsent, outgoing)
    return Queues(unread=unread, unsent=unsent, unacked=outgoing - unsent)


def read_unread(fd: int) -> int:
    """``SIOCINQ`` alone: received bytes not yet read (a socket known to be TCP)."""
    try:
        return _ioctl_int(fd, SIOCINQ)
    except OSError as exc:
        raise _translate(exc, fd) from exc


def read_outgoing(fd: int) -> int:
    """``SIOCOUTQ`` alone: our bytes not yet acknowledged (a socket known to be TCP)."""
    try:
        return _ioctl_int(fd, SIOCOUTQ)
    except OSError as exc:
        raise _translate(exc, fd) from exc


def _tcp_info_raw(sock: _Options) -> bytes | None:
    """``getsockopt(TCP_INFO)``; None where the platform has no Linux-style one."""
    if _TCP_INFO is None or not sys.platform.startswith("linux"):  # pragma: no cover
        return None
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, TCP_INFO_REQUEST_SIZE)
    except OSError as exc:
        if exc.errno in (errno.ENOPROTOOPT, errno.EOPNOTSUPP):
            return None
        raise


def read_tcp_info(sock: _Options) -> TcpInfo | None:
    """:func:`tcp_info` for a socket already known to be TCP."""
    raw = _tcp_info_raw(sock)
    return None if raw is None else decode_tcp_info(raw)


def read_tcp_info_bytes(sock: _Options) -> bytes | None:
    """``TCP_INFO`` as the kernel returns it, undecoded (:func:`decode_tcp_info` reads
    it); None where the platform has no Linux-style ``TCP_INFO``, or when the kernel
    returned less than every kernel since 2.6 does."""
    raw = _tcp_info_raw(sock)
    return raw if raw is not None and len(raw) >= TCP_INFO_MIN_SIZE else None


def read_tcp_state(sock: _Options) -> TcpState:
    """The TCP state alone, from the first byte of ``TCP_INFO`` (no decoding); ``UNKNOWN``
    where the platform has no Linux-style ``TCP_INFO``."""
    if _TCP_INFO is None or not sys.platform.startswith("linux"):  # pragma: no cover
        return TcpState.UNKNOWN
    try:
        raw = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)
    except OSError:
        return TcpState.UNKNOWN
    return TCP_STATE_OF[raw[0]] if raw else TcpState.UNKNOWN


def _ioctl_int(fd: int, request: int) -> int:
    buffer = bytearray(_INT.size)
    fcntl.ioctl(fd, request, buffer, True)
    (value,) = _INT.unpack(buffer)
    return int(value)


def queues(sock: SocketLike) -> Queues:
    """Bytes in the socket's kernel queues: ``SIOCINQ``, ``SIOCOUTQ``, ``SIOCOUTQNSD``.

    ``unread`` is received data the program has not read (a ``close()`` now would
    send RST); ``unsent`` is written data not yet sent; ``unacked`` is sent data the
    peer has not acknowledged. The three ioctls are not one atomic snapshot.

    Raises:
        NotTcpSocketError: not a TCP socket.
        ValueError: the socket is closed, or listening (a listener has no queues).
        OSError: ``ENOTSUP`` on platforms without ``SIOCOUTQ``.

    >>> import tcpclose
    >>> tcpclose.queues(conn)  # doctest: +SKIP
    Queues(unread=0, unsent=0, unacked=1448)
    """
    with borrow(sock) as view:
        return read_queues(view.fileno())


def tcp_info(sock: SocketLike) -> TcpInfo | None:
    """``TCP_INFO``: the kernel's statistics for the connection, or None where the
    platform has no Linux-style ``TCP_INFO``.

    Raises:
        NotTcpSocketError: not a TCP socket.
        ValueError: the socket is closed.

    >>> info = tcpclose.tcp_info(conn)  # doctest: +SKIP
    >>> info.state, info.rtt  # doctest: +SKIP
    (<TcpState.ESTABLISHED: 1>, 2.4e-05)
    """
    with borrow(sock) as view:
        return read_tcp_info(view)
