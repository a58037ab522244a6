"""Socket addresses as the kernel wants them: validated, packed, IPv4 mapping removed.

Shared by the netlink and procfs backends so that both accept exactly the same input
and answer the same question. Pure: no sockets, no name resolution (a host name such
as ``"localhost"`` is a malformed address here; the lookup sits on the close path and
must not block on DNS).

An IPv4-mapped IPv6 address (``::ffff:127.0.0.1``) names the same kernel socket as the
plain IPv4 address: the kernel hashes the IPv4 traffic of a dual-stack socket in its
IPv4 table. :func:`parse_four_tuple` therefore unmaps both ends and asks as IPv4
whenever both ends are IPv4 or IPv4-mapped.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from typing import Final, NamedTuple

__all__ = (
    "MAPPED_PREFIX",
    "FourTuple",
    "format_address",
    "format_host",
    "parse_endpoint",
    "parse_four_tuple",
    "unmap",
)

#: The first 12 bytes of an IPv4-mapped IPv6 address (RFC 4291 section 2.5.5.2).
MAPPED_PREFIX: Final = b"\x00" * 10 + b"\xff\xff"

_AF_INET: Final = int(socket.AF_INET)
_AF_INET6: Final = int(socket.AF_INET6)
_inet_pton: Final = socket.inet_pton
#: ``sin6_scope_id`` and ``idiag_if`` are 32-bit.
_MAX_SCOPE: Final = 0xFFFFFFFF


class FourTuple(NamedTuple):
    """One TCP connection's addresses, ready to put in a kernel request.

    Attributes:
        family: ``AF_INET`` when both ends are IPv4 (or IPv4-mapped), else ``AF_INET6``.
        local, peer: raw addresses, 4 bytes for ``AF_INET``, 16 for ``AF_INET6``.
        local_port, peer_port: host byte order.
        scope_id: IPv6 interface index (0 when not given); only link-local
            addresses need it.
    """

    family: int
    local: bytes
    local_port: int
    peer: bytes
    peer_port: int
    scope_id: int = 0


#: Literal hosts already converted by :func:`_host`, to ``(family, raw)`` with IPv4
#: mapping removed (``inet_pton`` parses its arguments the slow way on Python 3.11: it
#: was a third of a lookup's address parsing).
_HOSTS: Final[dict[str, tuple[int, bytes]]] = {}
_HOSTS_MAX: Final = 1024
_NOT_A_HOST: Final = (0, b"")


def _host(host: str) -> tuple[int, bytes]:
    """``(family, raw)`` of a literal address without a scope, remembered; ``(0, b"")``
    for anything else (the caller then takes the general path)."""
    try:
        found = (_AF_INET, _inet_pton(_AF_INET, host))
    except OSError:
        try:
            raw = _inet_pton(_AF_INET6, host)
        except OSError:
            return _NOT_A_HOST
        found = (_AF_INET, raw[12:]) if raw[:12] == MAPPED_PREFIX else (_AF_INET6, raw)
    if len(_HOSTS) >= _HOSTS_MAX:
        _HOSTS.clear()
    _HOSTS[host] = found
    return found


def unmap(family: int, raw: bytes) -> tuple[int, bytes]:
    """Remove IPv4 mapping: ``(AF_INET6, ::ffff:a.b.c.d)`` becomes ``(AF_INET, a.b.c.d)``.

    ``raw`` is 4 or 16 bytes (a 16-byte buffer with an IPv4 address in its first 4
    bytes is also accepted for ``AF_INET``, as ``inet_diag_sockid`` carries it).

    >>> unmap(socket.AF_INET6, bytes(10) + b"\\xff\\xff\\x7f\\x00\\x00\\x01")
    (2, b'\\x7f\\x00\\x00\\x01')
    >>> unmap(socket.AF_INET, b"\\x7f\\x00\\x00\\x01" + bytes(12))
    (2, b'\\x7f\\x00\\x00\\x01')
    """
    if family == _AF_INET6 and raw[:12] == MAPPED_PREFIX:
        return _AF_INET, raw[12:16]
    if family == _AF_INET:
        return _AF_INET, raw[:4]
    return family, raw


def format_host(family: int, raw: bytes) -> str:
    """Text of a raw address as the kernel reports it (mapped IPv6 stays mapped).

    >>> format_host(socket.AF_INET6, bytes(10) + b"\\xff\\xff\\x7f\\x00\\x00\\x01")
    '::ffff:127.0.0.1'
    """
    if family == _AF_INET:
        return socket.inet_ntop(_AF_INET, raw[:4])
    return socket.inet_ntop(_AF_INET6, raw[:16])


def _describe(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _scope_index(name: str, where: str) -> int:
    if name.isascii() and name.isdigit():
        index = int(name) if len(name) <= 10 else _MAX_SCOPE + 1
        if index > _MAX_SCOPE:
            raise ValueError(f"{where}: IPv6 scope {name!r} is not an interface index (0..2**32-1)")
        return index
    try:
        return socket.if_nametoindex(name)
    except OSError as exc:
        raise ValueError(f"{where}: unknown IPv6 scope (interface) {name!r}") from exc


def parse_endpoint(address: object, where: str = "address") -> tuple[int, bytes, int, int]:
    """Validate one ``(host, port)`` or ``(host, port, flowinfo, scope_id)``.

    Returns ``(family, raw, port, scope_id)`` with IPv4 mapping removed. ``where``
    names the argument in error messages.

    Raises:
        ValueError: not a 2- or 4-tuple, host not a literal IP address, port not an
            int in 0..65535, bad scope.

    >>> parse_endpoint(("::ffff:10.0.0.1", 80))
    (2, b'\\n\\x00\\x00\\x01', 80, 0)
    """
    if type(address) is tuple and len(address) == 2:
        host, port = address
        if type(host) is str and type(port) is int and 0 <= port <= 0xFFFF and "%" not in host:
            try:
                return _AF_INET, _inet_pton(_AF_INET, host), port, 0
            except OSError:
                pass
            try:
                raw = _inet_pton(_AF_INET6, host)
            except OSError:
                pass
            else:
                if raw[:12] == MAPPED_PREFIX:
                    return _AF_INET, raw[12:], port, 0
                return _AF_INET6, raw, port, 0
    if not isinstance(address, Sequence) or isinstance(address, str | bytes):
        raise ValueError(f"{where}: expected a (host, port) tuple, got {_describe(address)}")
    if len(address) not in (2, 4):
        raise ValueError(
            f"{where}: expected (host, port) or (host, port, flowinfo, scope_id), "
            f"got {len(address)} items: {_describe(address)}"
        )
    host, port = address[0], address[1]
    if not isinstance(host, str):
        raise ValueError(f"{where}: expected the host as a str, got {_describe(host)}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise ValueError(f"{where}: expected a port in 0..65535, got {_describe(port)}")
    scope_id = 0
    if len(address) == 4:
        scope = address[3]
        if isinstance(scope, bool) or not isinstance(scope, int) or not 0 <= scope <= _MAX_SCOPE:
            raise ValueError(
                f"{where}: expected scope_id as an int in 0..2**32-1, got {_describe(scope)}"
            )
        scope_id = scope
    text = host
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if "%" in text:
        text, _, scope_name = text.partition("%")
        scope_id = scope_id or _scope_index(scope_name, where)
    try:
        return _AF_INET, socket.inet_pton(_AF_INET, text), port, 0
    except OSError:
        pass
    try:
        raw = socket.inet_pton(_AF_INET6, text)
    except OSError:
        raise ValueError(
            f"{where}: expected a literal IPv4 or IPv6 address, got {_describe(host)}"
        ) from None
    if raw[:12] == MAPPED_PREFIX:
        return _AF_INET, raw[12:], port, 0
    return _AF_INET6, raw, port, scope_id


def parse_four_tuple(local: object, peer: object) -> FourTuple:
    """Validate a connection's two ends and put them in the form a request needs.

    Raises:
        ValueError: either end is malformed, or one end is IPv4 and the other a
            (non-mapped) IPv6 address.

    >>> parse_four_tuple(("127.0.0.1", 8080), ("::ffff:127.0.0.1", 51000))
    FourTuple(family=2, local=b'\\x7f\\x00\\x00\\x01', local_port=8080, \
peer=b'\\x7f\\x00\\x00\\x01', peer_port=51000, scope_id=0)
    """
    if type(local) is tuple and type(peer) is tuple and len(local) == 2 == len(peer):
        # The common case, (host, port) pairs of one family, in one step.
        lhost, lport = local
        phost, pport = peer
        if (
            type(lport) is int
            and type(pport) is int
            and 0 <= lport <= 0xFFFF
            and 0 <= pport <= 0xFFFF
            and type(lhost) is str
            and type(phost) is str
        ):
            lfam, lraw = _HOSTS.get(lhost) or _host(lhost)
            pfam, praw = _HOSTS.get(phost) or _host(phost)
            if lfam == pfam != 0:
                # tuple.__new__ skips FourTuple's generated __new__: 0.4 us of a lookup.
                return tuple.__new__(FourTuple, (lfam, lraw, lport, praw, pport, 0))
    lfam, lraw, lport, lscope = parse_endpoint(local, "local_addr")
    pfam, praw, pport, pscope = parse_endpoint(peer, "peer_addr")
    if lfam != pfam:
        raise ValueError(
            "local_addr and peer_addr are of different address families "
            f"({socket.AddressFamily(lfam).name} and {socket.AddressFamily(pfam).name})"
        )
    return FourTuple(lfam, lraw, lport, praw, pport, lscope or pscope)


def format_address(address: tuple[str, int]) -> str:
    """``host:port``, with brackets around an IPv6 host: how every report, finding and
    table of tcpclose writes an address.

    >>> format_address(("10.0.0.5", 443)), format_address(("::1", 8080))
    ('10.0.0.5:443', '[::1]:8080')
    """
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
