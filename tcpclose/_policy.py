"""Close policies: what to do when a TCP connection ends, as a frozen value.

A policy is written in configuration as one line or as a mapping::

    peer-first timeout=5s grace=50ms fallback=graceful
    graceful linger_time=30s idle_timeout=5s max_drain_bytes=1MiB
    abort

    {"mode": "peer-first", "timeout": 5, "grace": "50ms", "fallback": "graceful"}

Everything here is pure: no sockets, no clocks. The close plan (``_plan.py``) turns a
policy into steps; the drivers carry them out.

Parameters and the modes they belong to (a parameter set on a mode it does not
belong to is an error, never silently ignored):

================  ==========================  =======================================
parameter         modes                       meaning (units)
================  ==========================  =======================================
idle_timeout      graceful, peer-first        drain ends when the peer is silent this
                                              long (seconds)
linger_time       graceful, peer-first        a graceful close (flush, FIN, drain)
                                              ends this long after it starts, whatever
                                              the peer does; for peer-first, after its
                                              graceful fallback starts (seconds)
max_drain_bytes   graceful, peer-first        drain ends after discarding this many
                                              bytes (in all, across a fallback)
timeout           peer-first                  bound on the whole wait: our data sent
                                              and acknowledged, then the grace
                                              (seconds)
grace             peer-first                  how long, once our last byte has
                                              reached the peer, it may take to send
                                              its FIN (seconds)
fallback          peer-first                  ``graceful``, ``abort`` or ``auto``
================  ==========================  =======================================

Every default is defined once, below (``DEFAULT_IDLE_TIMEOUT``...), and
:attr:`ClosePolicy.DEFAULTS` maps each parameter to it; ``docs/configuration.md``
shows them (a test keeps the page in step). Durations are float seconds, with no unit
suffix on the name, here and everywhere in tcpclose: a name carries a unit only when
it counts in another one (``rtt_us``) or leaves Python (JSON and log fields such as
``close_duration_s``, Prometheus metric names).
"""

from __future__ import annotations

import dataclasses
import enum
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, Final, Self

from ._errors import PolicyError
from ._units import UnitError, format_duration, format_size, parse_duration, parse_size, shown

__all__ = (
    "DEFAULT_FALLBACK",
    "DEFAULT_GRACE",
    "DEFAULT_IDLE_TIMEOUT",
    "DEFAULT_LINGER_TIME",
    "DEFAULT_MAX_DRAIN_BYTES",
    "DEFAULT_POLICY",
    "DEFAULT_TIMEOUT",
    "CloseMode",
    "ClosePolicy",
    "Fallback",
    "PolicyLike",
    "as_policy",
)

# -- the default bounds: defined here once ------------------------------------------------

#: Seconds the peer may stay silent during a drain: nginx's ``lingering_timeout``.
DEFAULT_IDLE_TIMEOUT: Final = 5.0
#: Seconds a graceful close may take from its start: nginx's ``lingering_time``.
DEFAULT_LINGER_TIME: Final = 30.0
#: Bytes a close may read and discard (1 MiB).
DEFAULT_MAX_DRAIN_BYTES: Final = 1 << 20
#: ``peer-first``: seconds the whole wait for the peer may last (a slow reader).
DEFAULT_TIMEOUT: Final = 5.0
#: ``peer-first``'s ``grace``: how long, once our last byte has reached it, a prompt
#: peer's FIN may take. Measured (docs/policies.md): curl, h2load and a Python client
#: sent theirs within 1 ms on an idle machine, nearly all within 50 ms on an overloaded
#: one; a peer that waits for our FIN pays this much latency instead.
DEFAULT_GRACE: Final = 0.05


class CloseMode(enum.StrEnum):
    """How a connection is closed. The value is the configuration name.

    ``CloseMode("client-first")`` and ``CloseMode("client-initiated")`` are accepted
    as aliases of :attr:`PEER_FIRST`; names are case-insensitive.
    """

    #: FIN, then read and discard until the peer's FIN (bounded), then close.
    #: TIME_WAIT stays here; the peer gets every byte and no RST.
    GRACEFUL = "graceful"
    #: Send no FIN while the peer may still close first: once our data is out and
    #: acknowledged, give the peer ``grace`` to send its FIN (none on an idle
    #: connection), then apply :class:`Fallback`. TIME_WAIT lands on a prompt peer.
    PEER_FIRST = "peer-first"
    #: ``SO_LINGER {1, 0}`` and close: RST, no TIME_WAIT anywhere, queued data lost.
    ABORT = "abort"
    #: Plain ``close()``, whatever the kernel makes of it; reported for comparison.
    DEFAULT = "default"

    @classmethod
    def _missing_(cls, value: object) -> CloseMode | None:
        if isinstance(value, str):
            name = value.strip().lower()
            name = _MODE_ALIASES.get(name, name)
            for member in cls:
                if member.value == name:
                    return member
        return None


_MODE_ALIASES: Final = {"client-first": "peer-first", "client-initiated": "peer-first"}
_MODE_WORDS: Final = (
    "graceful",
    "peer-first",
    "client-first",
    "client-initiated",
    "abort",
    "default",
)


class Fallback(enum.StrEnum):
    """What ``peer-first`` does when the peer has not closed within its grace (or
    ``timeout``)."""

    #: Close gracefully from our side (TIME_WAIT lands here). The default: a peer
    #: waiting for our FIN (HTTP/1.0, close-delimited bodies, RFC 6455 clients, idle
    #: keep-alive) gets a normal end of stream.
    GRACEFUL = "graceful"
    #: Reset the connection (no TIME_WAIT; anything unacknowledged is lost). A peer
    #: still reading until our FIN sees "connection reset" instead of an end of stream.
    ABORT = "abort"
    #: Abort when the kernel shows nothing of ours unacknowledged (SIOCOUTQ = 0),
    #: otherwise graceful: never lose data to save a TIME_WAIT entry. A peer that
    #: has every byte but waits for our FIN still sees a reset.
    AUTO = "auto"


#: ``peer-first``: what to do when the peer has not closed in time: our FIN, so that a
#: client waiting for the server to close gets a normal end of stream.
DEFAULT_FALLBACK: Final = Fallback.GRACEFUL


_DURATION_PARAMS: Final = ("idle_timeout", "linger_time", "timeout", "grace")
_SIZE_PARAMS: Final = ("max_drain_bytes",)
_PARAM_ORDER: Final = (
    "timeout",
    "grace",
    "fallback",
    "idle_timeout",
    "linger_time",
    "max_drain_bytes",
)
_DRAIN_PARAMS: Final = ("idle_timeout", "linger_time", "max_drain_bytes")
_PARAMS_BY_MODE: Final[Mapping[CloseMode, tuple[str, ...]]] = {
    CloseMode.GRACEFUL: _DRAIN_PARAMS,
    CloseMode.PEER_FIRST: ("timeout", "grace", "fallback", *_DRAIN_PARAMS),
    CloseMode.ABORT: (),
    CloseMode.DEFAULT: (),
}
_TOKEN = re.compile(r"\S+")


@dataclass(frozen=True, slots=True, kw_only=True)
class ClosePolicy:
    """A close policy: a mode and its bounds. Frozen, hashable, comparable.

    Build one from configuration text with :meth:`parse`, from a config mapping with
    :meth:`from_mapping`, from an environment variable with :meth:`from_env`, or
    directly::

        >>> ClosePolicy(mode=CloseMode.PEER_FIRST, timeout=2.0, fallback=Fallback.ABORT)
        ClosePolicy('peer-first timeout=2s fallback=abort')
        >>> str(ClosePolicy.parse("client-first timeout=2000ms"))
        'peer-first timeout=2s'

    Every duration is float seconds and every size int bytes. Parameters that do not
    belong to the mode keep their defaults and are not used; setting one to anything
    else raises :class:`PolicyError`.

    Raises:
        PolicyError: a value out of range, of the wrong type, or a parameter that does
            not belong to the mode.
    """

    mode: CloseMode = CloseMode.GRACEFUL
    #: Seconds the peer may stay silent during a drain before we stop waiting.
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    #: Seconds a graceful close (flush, FIN, drain) may take, counted from its start
    #: (for ``peer-first``, from the start of its graceful fallback), whatever the peer
    #: does.
    linger_time: float = DEFAULT_LINGER_TIME
    #: Bytes a close may read and discard before it stops (across a fallback too).
    max_drain_bytes: int = DEFAULT_MAX_DRAIN_BYTES
    #: ``peer-first``: seconds the whole wait may last (our data flushed and
    #: acknowledged, then the grace) before the fallback; bounds a slow reader.
    timeout: float = DEFAULT_TIMEOUT
    #: ``peer-first``: seconds the peer may take to send its FIN once our last byte
    #: has reached it: the wait ends ``grace`` after one round trip past our last
    #: segment (the kernel's view), so a connection idle for longer is not waited on.
    grace: float = DEFAULT_GRACE
    #: ``peer-first``: what to do when the peer has not closed in time.
    fallback: Fallback = DEFAULT_FALLBACK

    DEFAULTS: ClassVar[Mapping[str, object]]

    def __post_init__(self) -> None:
        mode = _coerce_mode(self.mode)
        object.__setattr__(self, "mode", mode)
        for name in _DURATION_PARAMS:
            object.__setattr__(self, name, _coerce_param(name, getattr(self, name)))
        for name in _SIZE_PARAMS:
            object.__setattr__(self, name, _coerce_param(name, getattr(self, name)))
        object.__setattr__(self, "fallback", _coerce_param("fallback", self.fallback))
        allowed = _PARAMS_BY_MODE[mode]
        for name in _PARAM_ORDER:
            if name not in allowed and getattr(self, name) != ClosePolicy.DEFAULTS[name]:
                raise _not_for_mode(name, mode)

    # -- constructors -------------------------------------------------------------

    @classmethod
    def parse(cls, text: str) -> Self:
        """Parse one line of configuration: a mode, then ``key=value`` words.

        Modes: ``graceful``, ``peer-first`` (or ``client-first``,
        ``client-initiated``), ``abort``, ``default``. Durations take ``us``, ``ms``,
        ``s``, ``m``, ``h`` (bare numbers are seconds); sizes take ``B``, ``KiB``,
        ``MiB``, ``GiB``, ``KB``, ``MB``, ``GB`` (bare numbers are bytes).

        Example::

            >>> ClosePolicy.parse("peer-first timeout=5s fallback=auto").timeout
            5.0

        Raises:
            PolicyError: naming the offending word, its position and what is accepted;
                for empty text, an unknown mode or parameter, a repeated parameter, a
                parameter of another mode, a malformed or out-of-range value.
        """
        if not isinstance(text, str):
            raise PolicyError(
                f"expected a policy string, got {type(text).__qualname__}",
                accepted=_MODE_WORDS,
            )
        tokens = [(m.group(), m.start()) for m in _TOKEN.finditer(text)]
        if not tokens:
            raise PolicyError("empty close policy", accepted=_MODE_WORDS)
        mode_word, mode_pos = tokens[0]
        mode = _mode_from_word(mode_word, mode_pos)
        allowed = _PARAMS_BY_MODE[mode]
        values: dict[str, object] = {}
        for word, pos in tokens[1:]:
            key, sep, raw = word.partition("=")
            if not sep:
                if key.lower() in _MODE_WORDS:
                    raise PolicyError(
                        f"a second mode {shown(word)}: a policy has one mode, then key=value words",
                        word=word,
                        position=pos,
                    )
                raise PolicyError(
                    f"expected key=value after the mode, got {shown(word)}",
                    word=word,
                    position=pos,
                    accepted=tuple(f"{name}=..." for name in allowed),
                )
            _check_key(key, mode, pos)
            if key in values:
                raise PolicyError(f"parameter {shown(key)} given twice", word=key, position=pos)
            try:
                values[key] = _parse_value(key, raw)
            except UnitError as exc:
                raise PolicyError(
                    f"bad value {shown(raw)} for {shown(key)}: {exc}",
                    word=raw,
                    position=pos + len(key) + 1,
                    accepted=exc.accepted,
                ) from None
        return cls._build(mode, values)

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, object]) -> Self:
        """Build a policy from the mapping a TOML, JSON or YAML config gives.

        ``mode`` is required; other keys are the parameters. Durations may be numbers
        of seconds or text (``"250ms"``); sizes ints or text (``"1MiB"``).

        Example::

            >>> ClosePolicy.from_mapping({"mode": "graceful", "linger_time": 10})
            ClosePolicy('graceful linger_time=10s')

        Raises:
            PolicyError: a missing or unknown mode, an unknown key, a parameter of
                another mode, a value of the wrong type or out of range.
        """
        if not isinstance(mapping, Mapping):
            raise PolicyError(
                f"expected a mapping with a 'mode' key, got {type(mapping).__qualname__}",
                accepted=("mode", *_PARAM_ORDER),
            )
        for key in mapping:
            if not isinstance(key, str):
                raise PolicyError(
                    f"keys must be strings, got {type(key).__qualname__}",
                    word=repr(key),
                    accepted=("mode", *_PARAM_ORDER),
                )
        if "mode" not in mapping:
            raise PolicyError("missing key 'mode'", word="mode", accepted=_MODE_WORDS)
        raw_mode = mapping["mode"]
        if isinstance(raw_mode, CloseMode):
            mode = raw_mode
        elif isinstance(raw_mode, str):
            mode = _mode_from_word(raw_mode.strip(), None)
        else:
            raise PolicyError(
                f"'mode' must be a string, got {type(raw_mode).__qualname__}",
                word="mode",
                accepted=_MODE_WORDS,
            )
        values: dict[str, object] = {}
        for key, raw in mapping.items():
            if key == "mode":
                continue
            _check_key(key, mode, None)
            try:
                values[key] = _parse_value(key, raw)
            except UnitError as exc:
                raise PolicyError(
                    f"bad value {shown(raw)} for {shown(key)}: {exc}",
                    word=key,
                    accepted=exc.accepted,
                ) from None
        return cls._build(mode, values)

    @classmethod
    def from_env(
        cls,
        name: str,
        default: ClosePolicy | str | Mapping[str, object] | None = None,
        *,
        environ: Mapping[str, str] | None = None,
    ) -> ClosePolicy:
        """Read a policy from the environment variable ``name``.

        An unset or blank variable gives ``default`` (itself parsed when it is text or
        a mapping). ``environ`` replaces ``os.environ``, for tests.

        Example::

            >>> ClosePolicy.from_env("APP_CLOSE_POLICY", "graceful", environ={})
            ClosePolicy('graceful')

        Raises:
            PolicyError: the variable holds an invalid policy (the message names the
                variable), or it is unset and no default was given.
        """
        env = os.environ if environ is None else environ
        text = env.get(name, "")
        if not text.strip():
            if default is None:
                raise PolicyError(
                    f"environment variable {name} is not set and no default was given",
                    word=name,
                    accepted=_MODE_WORDS,
                )
            return as_policy(default)
        try:
            return cls.parse(text)
        except PolicyError as exc:
            raise PolicyError(
                f"environment variable {name}: {exc.reason}",
                word=exc.word,
                position=exc.position,
                accepted=exc.accepted,
            ) from exc

    @classmethod
    def _build(cls, mode: CloseMode, values: Mapping[str, object]) -> Self:
        return cls(mode=mode, **values)  # type: ignore[arg-type]

    @classmethod
    def graceful(
        cls,
        *,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        linger_time: float = DEFAULT_LINGER_TIME,
        max_drain_bytes: int = DEFAULT_MAX_DRAIN_BYTES,
    ) -> Self:
        """A ``graceful`` policy with the given bounds."""
        return cls(
            mode=CloseMode.GRACEFUL,
            idle_timeout=idle_timeout,
            linger_time=linger_time,
            max_drain_bytes=max_drain_bytes,
        )

    @classmethod
    def peer_first(
        cls,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        grace: float = DEFAULT_GRACE,
        fallback: Fallback | str = DEFAULT_FALLBACK,
        idle_timeout: float = DEFAULT_IDLE_TIMEOUT,
        linger_time: float = DEFAULT_LINGER_TIME,
        max_drain_bytes: int = DEFAULT_MAX_DRAIN_BYTES,
    ) -> Self:
        """A ``peer-first`` policy with the given timeout, grace, fallback and drain
        bounds."""
        return cls(
            mode=CloseMode.PEER_FIRST,
            timeout=timeout,
            grace=grace,
            # (a string is checked with the others, so that a bad one is a PolicyError)
            fallback=fallback,  # type: ignore[arg-type]
            idle_timeout=idle_timeout,
            linger_time=linger_time,
            max_drain_bytes=max_drain_bytes,
        )

    @classmethod
    def abort(cls) -> Self:
        """The ``abort`` policy: RST now, queued data discarded."""
        return cls(mode=CloseMode.ABORT)

    # -- derivation and text ----------------------------------------------------------

    def replace(self, **changes: Any) -> ClosePolicy:
        """A copy with ``changes`` applied and validated like the constructor.

        Example::

            >>> ClosePolicy.parse("peer-first").replace(timeout=1.5)
            ClosePolicy('peer-first timeout=1500ms')
        """
        for key in changes:
            if key not in ClosePolicy.DEFAULTS and key != "mode":
                raise PolicyError(
                    f"unknown parameter {shown(key)}", word=key, accepted=("mode", *_PARAM_ORDER)
                )
        return dataclasses.replace(self, **changes)

    @property
    def parameters(self) -> tuple[str, ...]:
        """Names of the parameters this policy's mode uses."""
        return _PARAMS_BY_MODE[self.mode]

    def as_dict(self) -> dict[str, object]:
        """The mapping :meth:`from_mapping` accepts: mode and every parameter it uses,
        durations in seconds, sizes in bytes (JSON-ready)."""
        out: dict[str, object] = {"mode": self.mode.value}
        for name in _PARAM_ORDER:
            if name in self.parameters:
                value = getattr(self, name)
                out[name] = value.value if isinstance(value, enum.Enum) else value
        return out

    def __str__(self) -> str:
        words = [self.mode.value]
        for name in _PARAM_ORDER:
            if name not in self.parameters:
                continue
            value = getattr(self, name)
            if value == ClosePolicy.DEFAULTS[name]:
                continue
            words.append(f"{name}={_format_value(name, value)}")
        return " ".join(words)

    def __repr__(self) -> str:
        return f"ClosePolicy({str(self)!r})"


ClosePolicy.DEFAULTS = {
    field.name: field.default for field in dataclasses.fields(ClosePolicy) if field.name != "mode"
}

#: What API functions accept wherever a policy is expected.
PolicyLike = ClosePolicy | CloseMode | str | Mapping[str, object]


def as_policy(policy: PolicyLike) -> ClosePolicy:
    """Turn what a caller passed as ``policy`` into a :class:`ClosePolicy`.

    Raises:
        PolicyError: invalid text or mapping, or an object of another type.
    """
    if isinstance(policy, ClosePolicy):
        return policy
    if isinstance(policy, CloseMode):
        return ClosePolicy(mode=policy)
    if isinstance(policy, str):
        return ClosePolicy.parse(policy)
    if isinstance(policy, Mapping):
        return ClosePolicy.from_mapping(policy)
    raise PolicyError(
        f"expected a ClosePolicy, a policy string or a mapping, got {type(policy).__qualname__}",
        accepted=_MODE_WORDS,
    )


# -- helpers ------------------------------------------------------------------------


def _mode_from_word(word: str, position: int | None) -> CloseMode:
    try:
        return CloseMode(word)
    except ValueError:
        raise PolicyError(
            f"unknown close mode {shown(word)}", word=word, position=position, accepted=_MODE_WORDS
        ) from None


def _coerce_mode(value: object) -> CloseMode:
    if isinstance(value, CloseMode):
        return value
    if isinstance(value, str):
        return _mode_from_word(value, None)
    raise PolicyError(
        f"mode must be a CloseMode or a string, got {type(value).__qualname__}",
        accepted=_MODE_WORDS,
    )


def _not_for_mode(name: str, mode: CloseMode, position: int | None = None) -> PolicyError:
    allowed = _PARAMS_BY_MODE[mode]
    owners = [m.value for m, params in _PARAMS_BY_MODE.items() if name in params]
    takes = ", ".join(allowed) if allowed else "no parameters"
    return PolicyError(
        f"parameter {name!r} does not apply to mode {mode.value!r} "
        f"(it belongs to {' and '.join(owners)}; {mode.value} takes {takes})",
        word=name,
        position=position,
        accepted=allowed,
    )


def _check_key(key: str, mode: CloseMode, position: int | None) -> None:
    if key in _PARAMS_BY_MODE[mode]:
        return
    if key in _PARAM_ORDER:
        raise _not_for_mode(key, mode, position)
    raise PolicyError(
        f"unknown parameter {shown(key)} for mode {mode.value!r}",
        word=key,
        position=position,
        accepted=_PARAMS_BY_MODE[mode],
    )


def _parse_value(key: str, raw: object) -> object:
    if key in _DURATION_PARAMS:
        return parse_duration(raw)
    if key in _SIZE_PARAMS:
        return parse_size(raw)
    # fallback
    accepted = tuple(f.value for f in Fallback)
    if isinstance(raw, Fallback):
        return raw
    if not isinstance(raw, str):
        raise UnitError(f"expected one of the words, got {type(raw).__qualname__}", accepted)
    try:
        return Fallback(raw.strip().lower())
    except ValueError:
        raise UnitError(f"unknown fallback {shown(raw)}", accepted) from None


def _coerce_param(name: str, value: object) -> object:
    try:
        return _parse_value(name, value)
    except UnitError as exc:
        raise PolicyError(
            f"bad value {shown(value)} for {name!r}: {exc}", word=name, accepted=exc.accepted
        ) from None


def _format_value(name: str, value: object) -> str:
    if name in _DURATION_PARAMS:
        assert isinstance(value, float)
        return format_duration(value)
    if name in _SIZE_PARAMS:
        assert isinstance(value, int)
        return format_size(value)
    assert isinstance(value, Fallback)
    return value.value


#: The policy used when none is given.
DEFAULT_POLICY: Final = ClosePolicy()
