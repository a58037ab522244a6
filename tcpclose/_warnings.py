"""The warning classes, and where each code's documentation lives. A leaf: it imports
nothing of tcpclose.

Every warning tcpclose emits is a :class:`TcpCloseWarning` subclass carrying a stable
``code`` (``TC101``...), the ``evidence`` it saw and one line of ``advice``; its text
starts with the code so that ``-W`` filters and log searches can match it. Each code
has a section in the docs' warnings reference: :func:`docs_url` is the one place that
link is built.

The catalogue of codes and :class:`~tcpclose._findings.Finding` are in
``_findings.py``; the rules that decide whether a warning applies are in
``_checks.py``; ``_findings.warn`` issues a finding as one of these warnings.

The text of a warning is fixed per code (code, title, advice, link); the numbers it saw
are in its ``evidence`` attribute. The :mod:`warnings` module's once-per-location
registry keys on that text, so a close in a hot loop warns once per call site however
the numbers vary, and ``-W``/``filterwarnings`` work as usual.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import ClassVar

__all__ = (
    "DOCS_ROOT",
    "DOCS_URL",
    "BlockingCloseWarning",
    "DataLossWarning",
    "TcpCloseWarning",
    "UnsafeReuseWarning",
    "docs_url",
)

#: The documentation's root (``mkdocs.yml``'s ``site_url``).
DOCS_ROOT = "https://tcpclose.readthedocs.io/en/latest/"
#: Where the warnings reference lives; each code is an anchor on that page.
DOCS_URL = f"{DOCS_ROOT}warnings/"


def docs_url(code: str) -> str:
    """Link to ``code``'s section of the warnings reference (its anchor is the code in
    lower case).

    >>> docs_url("TC101")
    'https://tcpclose.readthedocs.io/en/latest/warnings/#tc101'
    """
    return f"{DOCS_URL}#{code.lower()}"


class TcpCloseWarning(UserWarning):
    """Base class of tcpclose's warnings.

    Attributes:
        code: stable identifier, e.g. ``"TC101"``.
        evidence: the numbers the check saw (read-only mapping).
        advice: one line on what to do about it.
    """

    category_code: ClassVar[str] = "TC000"

    code: str
    evidence: Mapping[str, object]
    advice: str

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        evidence: Mapping[str, object] | None = None,
        advice: str = "",
    ) -> None:
        self.code = code or self.category_code
        self.evidence = MappingProxyType(dict(evidence or {}))
        self.advice = advice
        self.message = message
        text = f"{self.code} {message}"
        if advice:
            text += f" — {advice}"
        text += f" [{self.docs_url}]"
        super().__init__(text)

    @property
    def docs_url(self) -> str:
        """Link to this code's section of the warnings reference."""
        return docs_url(self.code)


class DataLossWarning(TcpCloseWarning):
    """A close discards data: an abort with bytes still queued, or a plain close with
    unread input (the kernel then sends RST and the peer may lose our response)."""

    category_code = "TC100"


class BlockingCloseWarning(TcpCloseWarning):
    """``close()`` will block: ``SO_LINGER`` with a non-zero time on a non-blocking
    socket or an event-loop transport (Linux blocks up to that time even then)."""

    category_code = "TC200"


class UnsafeReuseWarning(TcpCloseWarning):
    """A port or 4-tuple is reused in a way that fails, or that lets old segments or
    another process in (fixed client ports, ``SO_REUSEADDR`` takeover, ``SO_REUSEPORT``,
    TIME_WAIT exhausting the ephemeral range, misunderstood sysctls)."""

    category_code = "TC300"
