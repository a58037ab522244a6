"""The findings model: the catalogue of stable codes and :class:`Finding`, the data
every check returns. Pure, apart from :func:`warn`, which issues a finding through the
:mod:`warnings` module.

What must live here, and only here:

* :data:`CATALOGUE`, the one table of stable codes (code, warning class, severity,
  title, advice) that ``docs/warnings.md`` is written from and tested against: to add
  or change a warning, add or change its :class:`CatalogueEntry` here, its rule in
  ``_checks.py`` and its section in ``docs/warnings.md``;
* :class:`Finding` and :class:`Severity`, and :func:`new_finding`, the one way a rule
  makes a finding (title and advice from the catalogue, numbers as evidence);
* :func:`warn`, which turns a finding into its warning class from ``_warnings.py``.

Code ranges follow the warning class: ``TC1xx`` data loss (:class:`DataLossWarning`),
``TC2xx`` a blocking close (:class:`BlockingCloseWarning`), ``TC3xx`` port/4-tuple reuse
and the sysctls around it (:class:`UnsafeReuseWarning`). A code, once published, keeps
its meaning; a retired check leaves its code unused.

Titles and advice are fixed per code (no numbers in them): the numbers go in
``evidence``. That keeps a warning's text stable, so the standard once-per-location
filter of :mod:`warnings` shows it once per call site however the numbers vary.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ._warnings import (
    BlockingCloseWarning,
    DataLossWarning,
    TcpCloseWarning,
    UnsafeReuseWarning,
    docs_url,
)

__all__ = (
    "CATALOGUE",
    "CatalogueEntry",
    "Finding",
    "Severity",
    "count_by_severity",
    "new_finding",
    "sort_findings",
    "warn",
)


class Severity(enum.StrEnum):
    """How bad a finding is. ``error`` makes ``tcpclose audit`` exit with status 1."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        """0 for info, 1 for warning, 2 for error (for sorting and thresholds)."""
        return _SEVERITY_RANK[self]


_SEVERITY_RANK = {Severity.INFO: 0, Severity.WARNING: 1, Severity.ERROR: 2}


# -- the catalogue -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CatalogueEntry:
    """One stable warning code.

    Attributes:
        code: ``"TC101"``...; the docs anchor is its lower-case form.
        category: the :class:`TcpCloseWarning` subclass a finding is issued as.
        severity: the usual severity of a finding with this code.
        max_severity: the highest severity the check can reach (e.g. a percentage
            crossing a second threshold); equal to ``severity`` for most codes.
        title: one line, fixed per code, without numbers.
        advice: one line on what to do, fixed per code.
    """

    code: str
    category: type[TcpCloseWarning]
    severity: Severity
    title: str
    advice: str
    max_severity: Severity | None = None

    @property
    def anchor(self) -> str:
        """The docs section anchor: the code in lower case (``tc101``)."""
        return self.code.lower()

    @property
    def docs_url(self) -> str:
        """Link to this code's section of the warnings reference."""
        return docs_url(self.code)

    @property
    def severities(self) -> tuple[Severity, ...]:
        """Every severity a finding with this code can have, lowest first."""
        top = self.max_severity or self.severity
        return tuple(s for s in Severity if self.severity.rank <= s.rank <= top.rank)


_I, _W, _E = Severity.INFO, Severity.WARNING, Severity.ERROR

_ENTRIES = (
    # -- TC1xx: data loss ------------------------------------------------------------------
    CatalogueEntry(
        "TC101",
        DataLossWarning,
        _W,
        "abort discarded data the peer had not acknowledged",
        "close gracefully when the peer must get the data; "
        "pass allow_data_loss=True when discarding it is intended",
    ),
    CatalogueEntry(
        "TC102",
        DataLossWarning,
        _W,
        "close with unread input sends RST instead of FIN",
        "read what the peer sent before closing, or use the graceful policy, which drains it",
    ),
    CatalogueEntry(
        "TC103",
        DataLossWarning,
        _W,
        "orphaned sockets near tcp_max_orphans: closes turn into RST",
        "find why closed connections do not finish (peers not reading, stuck FIN_WAIT), "
        "or raise net.ipv4.tcp_max_orphans",
        max_severity=_E,
    ),
    # -- TC2xx: a blocking close -----------------------------------------------------------
    CatalogueEntry(
        "TC201",
        BlockingCloseWarning,
        _W,
        "SO_LINGER with a non-zero time makes close() block on a non-blocking socket",
        "turn SO_LINGER off and use a graceful close policy; "
        "use SO_LINGER {1, 0} only for an intended abort",
    ),
    # -- TC3xx: port and 4-tuple reuse, and the sysctls around it --------------------------
    CatalogueEntry(
        "TC301",
        UnsafeReuseWarning,
        _W,
        "active close on a client bound to a fixed local port blocks that 4-tuple for 60 s",
        "let the kernel choose the client's local port, or let the server close first "
        "(peer-first policy)",
    ),
    CatalogueEntry(
        "TC302",
        UnsafeReuseWarning,
        _W,
        "SO_REUSEADDR with an explicit bind before connect takes over TIME_WAIT 4-tuples",
        "do not set SO_REUSEADDR on client sockets; let the kernel choose the local port "
        "(IP_BIND_ADDRESS_NO_PORT when only the address is fixed)",
    ),
    CatalogueEntry(
        "TC303",
        UnsafeReuseWarning,
        _W,
        "TIME_WAIT towards one destination is using up the ephemeral port range",
        "reuse connections (keep-alive, pooling) or let the server close first; "
        "widen net.ipv4.ip_local_port_range; tcp_tw_reuse=1 helps outgoing connections",
        max_severity=_E,
    ),
    CatalogueEntry(
        "TC304",
        UnsafeReuseWarning,
        _W,
        "tcp_tw_reuse is on but TIME_WAIT is on accepted connections, where it never applies",
        "tcp_tw_reuse only affects outgoing connect(); on a server let clients close first "
        "(peer-first policy) or keep connections alive",
    ),
    CatalogueEntry(
        "TC305",
        UnsafeReuseWarning,
        _W,
        "tcp_tw_reuse is on but tcp_timestamps is off, so it never applies",
        "set net.ipv4.tcp_timestamps=1, or stop relying on tcp_tw_reuse",
    ),
    CatalogueEntry(
        "TC306",
        UnsafeReuseWarning,
        _I,
        "tcp_tw_reuse=2 applies to loopback only, and outgoing TIME_WAIT goes to other hosts",
        "set net.ipv4.tcp_tw_reuse=1 if outgoing connections to other hosts must reuse "
        "TIME_WAIT ports",
    ),
    CatalogueEntry(
        "TC307",
        UnsafeReuseWarning,
        _E,
        "tcp_tw_recycle is on: connections from clients behind NAT are dropped",
        "set net.ipv4.tcp_tw_recycle=0 (Linux 4.12 removed it); "
        "use tcp_tw_reuse for outgoing connections instead",
    ),
    CatalogueEntry(
        "TC308",
        UnsafeReuseWarning,
        _W,
        "TIME_WAIT is near tcp_max_tw_buckets now, or overflowed it since boot: "
        "closes skip TIME_WAIT",
        "reduce TIME_WAIT (connection reuse, let the peer close first) or raise "
        "net.ipv4.tcp_max_tw_buckets; do not lower it to get rid of TIME_WAIT",
        max_severity=_E,
    ),
    CatalogueEntry(
        "TC309",
        UnsafeReuseWarning,
        _I,
        "tcp_rfc1337 is off: a stray RST can end TIME_WAIT early",
        "set net.ipv4.tcp_rfc1337=1 so TIME_WAIT ignores RST and lasts its full time",
    ),
    CatalogueEntry(
        "TC310",
        UnsafeReuseWarning,
        _W,
        "SO_REUSEPORT on a listener lets another process of the same user take connections",
        "set SO_REUSEPORT only for deliberately sharded listeners, "
        "under a user no other program runs as",
    ),
    CatalogueEntry(
        "TC311",
        UnsafeReuseWarning,
        _W,
        "SO_REUSEADDR on Windows lets another socket bind the same port",
        "on Windows use SO_EXCLUSIVEADDRUSE instead of SO_REUSEADDR",
    ),
    CatalogueEntry(
        "TC312",
        UnsafeReuseWarning,
        _I,
        "tcp_fin_timeout far from its default: it limits orphaned FIN_WAIT2, not TIME_WAIT",
        "TIME_WAIT is fixed at 60 s; keep tcp_fin_timeout near 60 s unless orphaned "
        "FIN_WAIT2 sockets are the problem you measured",
        max_severity=_W,
    ),
    CatalogueEntry(
        "TC313",
        UnsafeReuseWarning,
        _W,
        "a file the audit reads could not be used, so the checks over it did not run",
        "give audit the real /proc, or a snapshot of regular files copied from it; "
        "the evidence names the file and the reason",
    ),
)

#: Every code, in order: the table ``docs/warnings.md`` follows.
CATALOGUE: Mapping[str, CatalogueEntry] = MappingProxyType({e.code: e for e in _ENTRIES})


# -- findings ----------------------------------------------------------------------------


def _json_ready(value: object) -> object:
    if isinstance(value, tuple | list | frozenset | set):
        return [_json_ready(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, enum.Enum):
        return value.value
    return value


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple | list):
        return ",".join(_format_value(v) for v in value)
    return str(value)


@dataclass(frozen=True, slots=True)
class Finding:
    """One thing a check found: what it is, how bad, the numbers seen, what to do.

    ``title`` and ``advice`` come from the :data:`CATALOGUE` entry of ``code``; the
    numbers are in ``evidence`` (a read-only mapping of JSON-ready values).

    >>> f = new_finding("TC101", discarded_bytes=4096)
    >>> str(f)  # doctest: +ELLIPSIS
    'TC101 warning: abort discarded data ... (discarded_bytes=4096) — close gracefully ...'
    >>> f.as_dict()["evidence"]
    {'discarded_bytes': 4096}
    """

    code: str
    severity: Severity
    title: str
    evidence: Mapping[str, object]
    advice: str
    category: type[TcpCloseWarning]

    def __post_init__(self) -> None:
        object.__setattr__(self, "evidence", MappingProxyType(dict(self.evidence)))

    def __hash__(self) -> int:
        return hash((self.code, self.severity, self.title, self.advice))

    @property
    def docs_url(self) -> str:
        """Link to this code's section of the warnings reference."""
        return docs_url(self.code)

    @property
    def evidence_text(self) -> str:
        """The evidence as ``name=value`` pairs (``""`` when there is none).

        >>> new_finding("TC303", destination="10.0.0.5:443", percent=95.0).evidence_text
        'destination=10.0.0.5:443, percent=95'
        """
        return ", ".join(f"{k}={_format_value(v)}" for k, v in self.evidence.items())

    def as_dict(self) -> dict[str, object]:
        """JSON-ready mapping: the fields, the category's name and the docs link."""
        return {
            "code": self.code,
            "severity": self.severity.value,
            "title": self.title,
            "evidence": _json_ready(self.evidence),
            "advice": self.advice,
            "category": self.category.__name__,
            "docs": self.docs_url,
        }

    def __str__(self) -> str:
        text = f"{self.code} {self.severity.value}: {self.title}"
        if self.evidence:
            text += f" ({self.evidence_text})"
        return f"{text} — {self.advice}"

    def as_warning(self) -> TcpCloseWarning:
        """This finding as an instance of its warning class (``category``)."""
        return self.category(self.title, code=self.code, evidence=self.evidence, advice=self.advice)


def new_finding(code: str, severity: Severity | None = None, **evidence: object) -> Finding:
    """A finding of ``code``: title, advice and warning class from its catalogue entry,
    ``severity`` (default: the entry's), and ``evidence``.

    Raises:
        KeyError: ``code`` is not in the catalogue.
    """
    entry = CATALOGUE[code]
    chosen = severity or entry.severity
    if chosen not in entry.severities:  # pragma: no cover - a bug in a check, not input
        raise AssertionError(f"{code} cannot have severity {chosen}")
    return Finding(
        code=code,
        severity=chosen,
        title=entry.title,
        evidence=evidence,
        advice=entry.advice,
        category=entry.category,
    )


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Most severe first, then by code (stable for equal keys)."""
    return sorted(findings, key=lambda f: (-f.severity.rank, f.code))


def count_by_severity(findings: Iterable[Finding]) -> dict[Severity, int]:
    """How many findings of each severity, every severity present, most severe first.

    >>> count_by_severity([new_finding("TC307"), new_finding("TC309")])
    {<Severity.ERROR: 'error'>: 1, <Severity.WARNING: 'warning'>: 0, <Severity.INFO: 'info'>: 1}
    """
    counts = dict.fromkeys(sorted(Severity, key=lambda s: -s.rank), 0)
    for finding in findings:
        counts[finding.severity] += 1
    return counts


def warn(finding: Finding, *, stacklevel: int) -> None:
    """Issue ``finding`` through the :mod:`warnings` module, as its warning class.

    The warning carries ``code``, ``evidence`` and ``advice``; its text is fixed per
    code, so the standard once-per-location filter shows it once per call site even
    when each connection's numbers differ.

    Args:
        finding: what a rule in ``_checks`` returned.
        stacklevel: as for :func:`warnings.warn`, counted from the caller of ``warn``:
            1 points at the line calling ``warn``, 2 at that function's caller, and so
            on. Public functions pass the depth of their user's line.

    Example::

        finding = _checks.abort_discards(discarded)
        if finding is not None and not allow_data_loss:
            warn(finding, stacklevel=3)
    """
    warnings.warn(finding.as_warning(), stacklevel=stacklevel + 1)
