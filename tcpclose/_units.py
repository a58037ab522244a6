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


def _check_duration(seconds: float) -> float:
    if math.isnan(seconds) or math.isinf(seconds):
        raise UnitError(f"must be a finite number of seconds, got {seconds!r}")
    if seconds < 0:
        raise UnitError(f"must not be negative, got {seconds!r}")
    if seconds > MAX_DURATION:
        raise UnitError(f"must be at most {format_duration(MAX_DURATION)}, got {seconds!r}s")
    return float(seconds)


def parse_duration(value: object) -> float:
    """Return seconds for ``value``: a number of seconds, or text such as ``250ms``.

    Units: ``us``, ``ms``, ``s``, ``m``, ``h``; a bare number means seconds.

    Raises:
        UnitError: malformed text, an unknown unit, a negative, NaN, infinite or
            over-an-hour value, or a type that is neither a number nor text.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise UnitError(
            f"expected a number of seconds or text like '5s', got {type(value).__qualname__}",
            ("250ms", "5s", "2m"),
        )
    if isinstance(value, int | float):
        return _check_duration(float(value))
    text = value.strip()
    match = _NUMBER_UNIT.fullmatch(text)
    if match is None:
        if text.lower() in {"nan", "inf", "-inf", "infinity"}:
            raise UnitError(f"must be a finite number of seconds, got {value!r}")
        if text.startswith("-"):
            raise UnitError(f"must not be negative, got {value!r}")
        raise UnitError(f"expected a duration like '250ms', '5s' or '2m', got {value!r}")
    number, unit = match.groups()
    scale = _DURATION_UNITS.get(unit.lower() if unit else "s")
    if scale is None:
        raise UnitError(f"unknown duration unit {unit!r}", tuple(_DURATION_UNITS))
    magnitude = float(number)
    if scale == 1.0:
        return _check_duration(magnitude)
    # Divide by the inverse for sub-second units: 250 / 1000 == 0.25 exactly,
    # whereas 250 * 0.001 is 0.25000000000000006.
    if scale < 1.0:
        return _check_duration(magnitude / round(1.0 / scale))
    return _check_duration(magnitude * scale)


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
            or too large value, or a type that is neither an int nor text.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise UnitError(
            f"expected a number of bytes or text like '64KiB', got {type(value).__qualname__}",
            ("65536", "64KiB", "1MiB"),
        )
    if isinstance(value, float):
        if not value.is_integer():
            raise UnitError(f"must be a whole number of bytes, got {value!r}")
        value = int(value)
    if isinstance(value, int):
        result = value
    else:
        text = value.strip()
        match = _NUMBER_UNIT.fullmatch(text)
        if match is None:
            if text.startswith("-"):
                raise UnitError(f"must not be negative, got {value!r}")
            raise UnitError(f"expected a size like '65536', '64KiB' or '1MiB', got {value!r}")
        number, unit = match.groups()
        scale = _SIZE_UNITS.get(unit.lower())
        if scale is None:
            raise UnitError(
                f"unknown size unit {unit!r}", ("B", "KB", "MB", "GB", "KiB", "MiB", "GiB")
            )
        try:
            exact = int(number) * scale
        except ValueError:
            magnitude = float(number) * scale
            if math.isinf(magnitude) or not magnitude.is_integer():
                raise UnitError(f"must be a whole number of bytes, got {value!r}") from None
            exact = int(magnitude)
        result = exact
    if result < 0:
        raise UnitError(f"must not be negative, got {value!r}")
    if result > MAX_SIZE:
        raise UnitError(f"must be at most 1TiB ({MAX_SIZE} bytes), got {value!r}")
    return result


def format_size(size: int) -> str:
    """Canonical text for ``size`` bytes: the largest binary unit that divides it."""
    for name, scale in _CANONICAL_SIZE_UNITS:
        if size >= scale and size % scale == 0:
            return f"{size // scale}{name}"
    return str(size)
