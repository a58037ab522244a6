"""Decoders of the small text files under ``/proc`` that the audit and the host view
read: ``/proc/net/sockstat``, ``/proc/net/netstat`` (and ``snmp``), and the values of
the ``net.ipv4`` sysctls (``/proc/sys/net/ipv4/*``). Pure functions over ``str``: the
reading (size limits, regular files only) is ``_audit.py``'s; ``/proc/net/tcp`` is
decoded by ``_procfs.py``.

Formats: ``net/ipv4/proc.c`` (sockstat, netstat, snmp) and
``Documentation/networking/ip-sysctl.rst`` in the kernel tree. Numbers longer than 20
digits are malformed, never passed to ``int()``.
"""

from __future__ import annotations

__all__ = (
    "netstat_field",
    "parse_int",
    "parse_netstat",
    "parse_port_list",
    "parse_port_range",
    "parse_sockstat",
)

#: The longest number read from a file: 2**64 has 20 digits. Longer is malformed (and
#: ``int()`` of 4,300 digits or more raises).
_MAX_DIGITS = 20


def _number(word: str) -> int | None:
    """A non-negative decimal number of at most 20 digits, else ``None``."""
    if not (word.isascii() and word.isdigit()) or len(word) > _MAX_DIGITS:
        return None
    return int(word)


def parse_int(text: str | None) -> int | None:
    """A sysctl's integer value: ``"1\\n"`` -> 1, ``"-1"`` -> -1; ``None`` when
    malformed.

    >>> parse_int("1\\n"), parse_int("-1"), parse_int("1e3")
    (1, -1, None)
    """
    if text is None:
        return None
    word = text.strip()
    number = _number(word.removeprefix("-"))
    if number is None:
        return None
    return -number if word.startswith("-") else number


def parse_port_range(text: str | None) -> tuple[int, int] | None:
    """``net.ipv4.ip_local_port_range``: ``(first, last)``; ``None`` when malformed.

    >>> parse_port_range("32768\\t60999\\n")
    (32768, 60999)
    """
    if text is None:
        return None
    parts = text.split()
    if len(parts) != 2:
        return None
    low, high = _number(parts[0]), _number(parts[1])
    if low is None or high is None:
        return None
    return low, high


def parse_port_list(text: str | None) -> tuple[tuple[int, int], ...] | None:
    """``net.ipv4.ip_local_reserved_ports``: inclusive ranges; empty -> ``()``;
    ``None`` when malformed.

    >>> parse_port_list("8080,9000-9010\\n")
    ((8080, 8080), (9000, 9010))
    """
    if text is None:
        return None
    ranges: list[tuple[int, int]] = []
    for item in text.strip().split(","):
        item = item.strip()
        if not item:
            continue
        first_text, _, last_text = item.partition("-")
        first = _number(first_text)
        last = _number(last_text) if last_text else first
        if first is None or last is None:
            return None
        ranges.append((first, last))
    return tuple(ranges)


def parse_sockstat(text: str) -> dict[str, dict[str, int]]:
    """Decode ``/proc/net/sockstat``: protocol -> field -> number.

    >>> parse_sockstat("sockets: used 13\\nTCP: inuse 1 orphan 0 tw 7 alloc 1 mem 0\\n")["TCP"]
    {'inuse': 1, 'orphan': 0, 'tw': 7, 'alloc': 1, 'mem': 0}

    Pairs that are not ``name number`` are skipped.
    """
    table: dict[str, dict[str, int]] = {}
    for line in text.splitlines():
        proto, sep, rest = line.partition(":")
        if not sep:
            continue
        words = rest.split()
        fields: dict[str, int] = {}
        for name, value in zip(words[::2], words[1::2], strict=False):
            number = _number(value)
            if number is not None:
                fields[name] = number
        table[proto.strip()] = fields
    return table


def netstat_field(text: str, group: str, name: str) -> int | None:
    """One counter of ``/proc/net/netstat`` (or ``snmp``), without decoding the rest
    (the close path asks for one; the whole file decodes in ~140 us).

    >>> netstat_field("TcpExt: TW TCPTimeWaitOverflow\\nTcpExt: 9 3\\n", "TcpExt",
    ...               "TCPTimeWaitOverflow")
    3

    None when the group, the name or its number is missing, or the group's two lines do
    not match in length.
    """
    prefix = group + ":"
    start = text.find(prefix)
    while start > 0 and text[start - 1] != "\n":  # (a line's start only)
        start = text.find(prefix, start + 1)
    if start < 0:
        return None
    header_end = text.find("\n", start)
    if header_end < 0:
        return None
    values_end = text.find("\n", header_end + 1)
    names = text[start:header_end].split()
    values = text[header_end + 1 : values_end if values_end >= 0 else len(text)].split()
    if len(names) != len(values) or not values or values[0] != prefix or name not in names:
        return None
    return parse_int(values[names.index(name)])


def parse_netstat(text: str) -> dict[str, dict[str, int]]:
    """Decode ``/proc/net/netstat`` (or ``snmp``): header/value line pairs per group.

    >>> parse_netstat("TcpExt: TW TCPTimeWaitOverflow\\nTcpExt: 9 3\\n")
    {'TcpExt': {'TW': 9, 'TCPTimeWaitOverflow': 3}}

    A group whose two lines do not match in length is skipped.
    """
    table: dict[str, dict[str, int]] = {}
    lines = [line.split() for line in text.splitlines() if line.strip()]
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if not names or names[0] != values[0] or len(names) != len(values):
            continue
        group = names[0].rstrip(":")
        fields: dict[str, int] = {}
        for name, value in zip(names[1:], values[1:], strict=True):
            number = parse_int(value)
            if number is not None:
                fields[name] = number
        table[group] = fields
    return table
