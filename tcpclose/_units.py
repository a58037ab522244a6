"""Durations and byte sizes as people write them in configuration.

Durations are float seconds everywhere in tcpclose; sizes are int bytes. The text
forms are the ones nginx and systemd users expect::

    >>> parse_duration("250ms"), parse_duration("5s"), parse_duration("2m")
    (0.25, 5.0, 120.0)
    >>> parse_size("64KiB"), parse_size("1MiB"), parse_size("1500")
    (65536, 1048576, 1500)
    >>> format_duration(0.25), format_duration(120.0), format_size(1048576)
    ('250ms', '2m', '1MiB')

``format_*`` always produce text that parses back to exactly the same value.
"""

from __future__ import annotations

import math
import re

__all__ = (
    "MAX_DURATION",
    "MAX_SIZE",
    "UnitError",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_size",
    "shown",
)

#: Longest accepted duration: an hour. A close bounded by more is not bounded.
MAX_DURATION = 3600.0
#: Largest accepted byte cap: 1 TiB.
MAX_SIZE = 1 << 40

_DURATION_UNITS: dict[str, float] = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
}
_CANONICAL_SIZE_UNITS = (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10))
_NUMBER_UNIT = re.compile(r"([0-9]+(?:\.[0-9]*)?(?:[eE][-+]?[0-9]+)?|\.[0-9]+)\s*([A-Za-z]*)")


class UnitError(ValueError):
    """A duration or size is malformed or out of range; the caller adds context."""

    accepted: tuple[str, ...]

    def __init__(self, message: str, accepted: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.accepted = accepted


def shown(value: object, limit: int = 40) -> str:
    """``repr(value)`` for an error message, cut to about ``limit`` characters.

    A configuration value can be any size: a 5000-digit number must not make a
    5000-character message, and ``repr()`` of an int over 4300 digits raises.

    >>> shown("9" * 100, limit=10)
    "'9999999999'... (100 characters)"
    >>> shown(10**5000)
    'an integer of 5001 digits'
    """
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 128:
        return f"{'a negative' if value < 0 else 'an'} integer of {_digits(value)} digits"
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _digits(value: int) -> int:
    # Decimal digits of a huge int without str(), which is limited to 4300 digits.
    estimate = int(abs(value).bit_length() * math.log10(2)) + 1
    return estimate if abs(value) >= 10 ** (estimate - 1) else estimate - 1


def _too_long(limit: str, value: object) -> UnitError:
    return UnitError(f"must be at most {limit}, got {shown(value)}")


def _check_duration(seconds: float, value: object) -> float:
    """``seconds`` when in range; ``value`` is what the user wrote, for messages."""
    if math.isnan(seconds) or (math.isinf(seconds) and not isinstance(value, str)):
        raise UnitError(f"must be a finite number of seconds, got {shown(value)}")
    if seconds < 0:
        raise UnitError(f"must not be negative, got {shown(value)}")
    if seconds > MAX_DURATION:  # (text too large for a float reads as inf: also here)
        raise _too_long(format_duration(MAX_DURATION), value)
    return float(seconds)


def parse_duration(value: object) -> float:
    """Return seconds for ``value``: a number of seconds, or text such as ``250ms``.

    Units: ``us``, ``ms``, ``s``, ``m``, ``h``; a bare number means seconds.

    Raises:
        UnitError: malformed text, an unknown unit, a negative, NaN, infinite or
            over-an-hour value (however large: never OverflowError), or a type that
            is neither a number nor text.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise UnitError(
            f"expected a number of seconds or text like '5s', got {type(value).__qualname__}",
            ("250ms", "5s", "2m"),
        )
    if isinstance(value, int):
        # Compared as an int first: float() of an int past 1e308 raises OverflowError.
        if value < 0:
            raise UnitError(f"must not be negative, got {shown(value)}")
        if value > MAX_DURATION:
            raise _too_long(format_duration(MAX_DURATION), value)
        return float(value)
    if isinstance(value, float):
        return _check_duration(value, value)
    text = value.strip()
    match = _NUMBER_UNIT.fullmatch(text)
    if match is None:
        if text.lower() in {"nan", "inf", "-inf", "infinity"}:
            raise UnitError(f"must be a finite number of seconds, got {shown(value)}")
        if text.startswith("-"):
            raise UnitError(f"must not be negative, got {shown(value)}")
        raise UnitError(f"expected a duration like '250ms', '5s' or '2m', got {shown(value)}")
    number, unit = match.groups()
    scale = _DURATION_UNITS.get(unit.lower() if unit else "s")
    if scale is None:
        raise UnitError(f"unknown duration unit {shown(unit)}", tuple(_DURATION_UNITS))
    magnitude = float(number)  # (never raises on digits: too many read as inf)
    if scale == 1.0:
        return _check_duration(magnitude, value)
    # Divide by the inverse for sub-second units: 250 / 1000 == 0.25 exactly,
    # whereas 250 * 0.001 is 0.25000000000000006.
    if scale < 1.0:
        return _check_duration(magnitude / round(1.0 / scale), value)
    return _check_duration(magnitude * scale, value)


def format_duration(seconds: float) -> str:
    """Shortest text for ``seconds`` that :func:`parse_duration` turns back into it."""
    candidates: list[str] = []
    if seconds >= 60 and seconds == int(seconds):
        if seconds % 3600 == 0:
            candidates.append(f"{int(seconds) // 3600}h")
        if seconds % 60 == 0:
            candidates.append(f"{int(seconds) // 60}m")
    if seconds == int(seconds):
        candidates.append(f"{int(seconds)}s")
    millis = round(seconds * 1000)
    candidates.append(f"{millis}ms")
    micros = round(seconds * 1_000_000)
    candidates.append(f"{micros}us")
    for text in candidates:
        try:
            if parse_duration(text) == seconds:
                return text
        except UnitError:
            continue
    return f"{seconds!r}s"


def parse_size(value: object) -> int:
    """Return bytes for ``value``: an int, or text such as ``64KiB``, ``1MB``, ``1500``.

    Units (case-insensitive): ``B``, ``KB``/``MB``/``GB`` (powers of 1000),
    ``KiB``/``MiB``/``GiB`` (powers of 1024). The result must be a whole number of
    bytes between 0 and 1 TiB.

    Raises:
        UnitError: malformed text, an unknown unit, a fraction of a byte, a negative
            or too large value (however large), or a type that is neither a number
            nor text.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise UnitError(
            f"expected a number of bytes or text like '64KiB', got {type(value).__qualname__}",
            ("65536", "64KiB", "1MiB"),
        )
    if isinstance(value, int):
        result = value
    elif isinstance(value, float):
        if math.isnan(value):
            raise UnitError(f"must be a whole number of bytes, got {shown(value)}")
        if value > MAX_SIZE:  # (inf included)
            raise UnitError(f"must be at most 1TiB ({MAX_SIZE} bytes), got {shown(value)}")
        if not value.is_integer():
            raise UnitError(f"must be a whole number of bytes, got {shown(value)}")
        result = int(value)
    else:
        result = _parse_size_text(value)
    if result < 0:
        raise UnitError(f"must not be negative, got {shown(value)}")
    if result > MAX_SIZE:
        raise UnitError(f"must be at most 1TiB ({MAX_SIZE} bytes), got {shown(value)}")
    return result


def _parse_size_text(value: str) -> int:
    text = value.strip()
    match = _NUMBER_UNIT.fullmatch(text)
    if match is None:
        if text.startswith("-"):
            raise UnitError(f"must not be negative, got {shown(value)}")
        raise UnitError(f"expected a size like '65536', '64KiB' or '1MiB', got {shown(value)}")
    number, unit = match.groups()
    scale = _SIZE_UNITS.get(unit.lower())
    if scale is None:
        raise UnitError(
            f"unknown size unit {shown(unit)}", ("B", "KB", "MB", "GB", "KiB", "MiB", "GiB")
        )
    # The float decides the range (too many digits read as inf, never an error); an
    # in-range whole number is then taken exactly from its digits.
    magnitude = float(number) * scale
    if magnitude > MAX_SIZE:
        raise UnitError(f"must be at most 1TiB ({MAX_SIZE} bytes), got {shown(value)}")
    if number.isdigit():  # (zeros stripped: int() refuses over 4300 digits)
        return int(number.lstrip("0") or "0") * scale
    if not magnitude.is_integer():
        raise UnitError(f"must be a whole number of bytes, got {shown(value)}")
    return int(magnitude)


def format_size(size: int) -> str:
    """Canonical text for ``size`` bytes: the largest binary unit that divides it."""
    for name, scale in _CANONICAL_SIZE_UNITS:
        if size >= scale and size % scale == 0:
            return f"{size // scale}{name}"
    return str(size)
