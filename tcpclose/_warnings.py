"""Warning classes and the catalogue of stable warning codes.

Every warning tcpclose emits is a :class:`TcpCloseWarning` subclass carrying a stable
``code`` (``TC101``...), the ``evidence`` it saw and one line of ``advice``; its text
starts with the code so that ``-W`` filters and log searches can match it. Each code
has a section in the docs' warnings reference (``docs/warnings.md#tc101``).

The checks that decide whether a warning applies live in ``_checks.py`` (pure
functions over facts); this module only defines the classes and how to emit one.

The text of a warning is fixed per code (code, title, advice, link); the numbers it saw
are in its ``evidence`` attribute. The :mod:`warnings` module's once-per-location
registry keys on that text, so a close in a hot loop warns once per call site however
the numbers vary, and ``-W``/``filterwarnings`` work as usual.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from ._checks import Finding

__all__ = (
    "DOCS_URL",
    "BlockingCloseWarning",
    "DataLossWarning",
    "TcpCloseWarning",
    "UnsafeReuseWarning",
    "emit",
    "warn",
)

#: Where the warnings reference lives; each code is an anchor on that page.
DOCS_URL = "https://tcpclose.readthedocs.io/en/latest/warnings/"


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
        return f"{DOCS_URL}#{self.code.lower()}"


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


def emit(warning: TcpCloseWarning, *, stacklevel: int) -> None:
    """Issue ``warning`` through the :mod:`warnings` module.

    ``stacklevel`` counts from the caller of ``emit`` (1 = the function calling emit),
    so public functions pass the depth of their caller's line. The standard
    once-per-location filter then keeps a hot loop from repeating it.
    """
    warnings.warn(warning, stacklevel=stacklevel + 1)


def warn(finding: Finding, *, stacklevel: int) -> None:
    """Issue ``finding`` as a warning of its category (``finding.category``).

    The warning carries ``code``, ``evidence`` and ``advice``; its text is fixed per
    code, so the standard once-per-location filter shows it once per call site even
    when each connection's numbers differ.

    Args:
        finding: what a check in ``_checks`` returned.
        stacklevel: as for :func:`warnings.warn`, counted from the caller of ``warn``:
            1 points at the line calling ``warn``, 2 at that function's caller, and so
            on. Public functions pass the depth of their user's line.

    Example::

        finding = _checks.abort_discards(discarded)
        if finding is not None and not allow_data_loss:
            warn(finding, stacklevel=3)
    """
    warning = finding.category(
        finding.title, code=finding.code, evidence=finding.evidence, advice=finding.advice
    )
    emit(warning, stacklevel=stacklevel + 1)
