"""The close-policy model: parsing, canonical text, mappings, env, validation."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import tcpclose
from tcpclose import CloseMode, ClosePolicy, Fallback, PolicyError
from tcpclose._units import format_duration, format_size, parse_duration, parse_size

# -- examples for every mode and parameter -------------------------------------------------


@pytest.mark.parametrize(
    ("text", "mode"),
    [
        ("graceful", CloseMode.GRACEFUL),
        ("peer-first", CloseMode.PEER_FIRST),
        ("client-first", CloseMode.PEER_FIRST),
        ("client-initiated", CloseMode.PEER_FIRST),
        ("abort", CloseMode.ABORT),
        ("default", CloseMode.DEFAULT),
        ("  Graceful  ", CloseMode.GRACEFUL),
        ("PEER-FIRST", CloseMode.PEER_FIRST),
    ],
)
def test_modes_and_aliases(text: str, mode: CloseMode) -> None:
    policy = ClosePolicy.parse(text)
    assert policy.mode is mode
    assert str(policy) == mode.value


def test_defaults_are_documented_values() -> None:
    policy = ClosePolicy.parse("peer-first")
    assert policy.idle_timeout == 5.0
    assert policy.linger_time == 30.0
    assert policy.max_drain_bytes == 1 << 20
    assert policy.timeout == 5.0
    assert policy.grace == 0.05
    assert policy.fallback is Fallback.GRACEFUL


@pytest.mark.parametrize(
    ("old", "canonical"),
    [
        ("peer-first timeout=5s fallback=auto", "peer-first fallback=auto"),
        ("peer-first timeout=2s fallback=abort", "peer-first timeout=2s fallback=abort"),
        ("client-first fallback=graceful", "peer-first"),
        ("peer-first timeout=200ms", "peer-first timeout=200ms"),
        ("peer-first timeout=10ms", "peer-first timeout=10ms"),
    ],
)
def test_issue_14_old_strings_keep_their_words(old: str, canonical: str) -> None:
    """Issue 14: strings written before ``grace`` existed still parse, every word they
    say keeps its value, and the canonical text round-trips. (A ``timeout`` below
    ``grace`` is fine: the wait ends at whichever bound comes first.)"""
    policy = ClosePolicy.parse(old)
    assert str(policy) == canonical
    assert ClosePolicy.parse(canonical) == policy
    for word in old.split()[1:]:
        key, _, _ = word.partition("=")
        assert getattr(policy, key) == getattr(ClosePolicy.parse(f"peer-first {word}"), key)


def test_grace_belongs_to_peer_first() -> None:
    with pytest.raises(PolicyError, match="'grace' does not apply to mode 'graceful'") as info:
        ClosePolicy.parse("graceful grace=10ms")
    assert "peer-first" in str(info.value)
    assert ClosePolicy.peer_first(grace=0.2) == ClosePolicy.parse("peer-first grace=200ms")
    assert ClosePolicy.peer_first().fallback is Fallback.GRACEFUL


def test_issue_example_prints_canonical_form() -> None:
    policy = ClosePolicy.parse("client-initiated timeout=2s fallback=abort")
    assert str(policy) == "peer-first timeout=2s fallback=abort"
    assert repr(policy) == "ClosePolicy('peer-first timeout=2s fallback=abort')"


@pytest.mark.parametrize(
    ("text", "attr", "value"),
    [
        ("graceful idle_timeout=250ms", "idle_timeout", 0.25),
        ("graceful idle_timeout=1.5", "idle_timeout", 1.5),
        ("graceful linger_time=2m", "linger_time", 120.0),
        ("graceful linger_time=1h", "linger_time", 3600.0),
        ("graceful linger_time=500us", "linger_time", 0.0005),
        ("graceful max_drain_bytes=64KiB", "max_drain_bytes", 65536),
        ("graceful max_drain_bytes=1MiB", "max_drain_bytes", 1 << 20),
        ("graceful max_drain_bytes=1MB", "max_drain_bytes", 1_000_000),
        ("graceful max_drain_bytes=1500", "max_drain_bytes", 1500),
        ("graceful max_drain_bytes=0", "max_drain_bytes", 0),
        ("peer-first timeout=0", "timeout", 0.0),
        ("peer-first timeout=5s", "timeout", 5.0),
        ("peer-first grace=20ms", "grace", 0.02),
        ("peer-first grace=0", "grace", 0.0),
        ("peer-first fallback=graceful", "fallback", Fallback.GRACEFUL),
        ("peer-first fallback=abort", "fallback", Fallback.ABORT),
        ("peer-first fallback=auto", "fallback", Fallback.AUTO),
        ("peer-first idle_timeout=1s", "idle_timeout", 1.0),
        ("peer-first linger_time=10s", "linger_time", 10.0),
        ("peer-first max_drain_bytes=2GiB", "max_drain_bytes", 2 << 30),
    ],
)
def test_every_parameter(text: str, attr: str, value: object) -> None:
    policy = ClosePolicy.parse(text)
    assert getattr(policy, attr) == value
    assert ClosePolicy.parse(str(policy)) == policy


def test_canonical_text_orders_parameters_and_omits_defaults() -> None:
    policy = ClosePolicy.parse("graceful max_drain_bytes=64KiB idle_timeout=5s linger_time=10000ms")
    assert str(policy) == "graceful linger_time=10s max_drain_bytes=64KiB"


# -- errors name the word, the position and what is accepted --------------------------------


def _error(text: str) -> PolicyError:
    with pytest.raises(PolicyError) as info:
        ClosePolicy.parse(text)
    return info.value


def test_parameter_of_another_mode_is_named() -> None:
    exc = _error("graceful timeout=2s")
    assert exc.word == "timeout"
    assert exc.position == 9
    assert "timeout" in str(exc)
    assert exc.accepted == ("idle_timeout", "linger_time", "max_drain_bytes")
    assert isinstance(exc, ValueError)


@pytest.mark.parametrize(
    ("text", "word", "position"),
    [
        ("bogus", "bogus", 0),
        ("graceful foo=1", "foo", 9),
        ("graceful linger_time=1s linger_time=2s", "linger_time", 24),
        ("abort idle_timeout=1s", "idle_timeout", 6),
        ("default linger_time=1s", "linger_time", 8),
        ("peer-first fallback=never", "never", 20),
        ("graceful idle_timeout=-1s", "-1s", 22),
        ("graceful idle_timeout=nan", "nan", 22),
        ("graceful idle_timeout=inf", "inf", 22),
        ("graceful idle_timeout=5 s", "s", 24),
        ("graceful idle_timeout=5x", "5x", 22),
        ("graceful idle_timeout=2h", "2h", 22),
        ("graceful max_drain_bytes=1.5", "1.5", 25),
        ("graceful max_drain_bytes=-1", "-1", 25),
        ("graceful max_drain_bytes=2TiB", "2TiB", 25),
        ("graceful peer-first", "peer-first", 9),
        ("graceful, linger_time=1s", "graceful,", 0),
    ],
)
def test_bad_text_names_word_and_position(text: str, word: str, position: int) -> None:
    exc = _error(text)
    assert exc.word == word
    assert exc.position == position
    assert repr(word) in str(exc) or word in str(exc)


@pytest.mark.parametrize("text", ["", "   ", "\n\t"])
def test_empty_text_is_rejected_with_accepted_modes(text: str) -> None:
    exc = _error(text)
    assert "graceful" in exc.accepted
    assert "peer-first" in exc.accepted


def test_parse_rejects_non_text() -> None:
    with pytest.raises(PolicyError, match="expected a policy string, got int"):
        ClosePolicy.parse(5)  # type: ignore[arg-type]


# -- mappings, env, construction, replace -------------------------------------------------------


def test_from_mapping_numbers_and_strings() -> None:
    policy = ClosePolicy.from_mapping(
        {"mode": "peer-first", "timeout": 2, "fallback": "abort", "max_drain_bytes": "64KiB"}
    )
    assert policy == ClosePolicy.parse("peer-first timeout=2s fallback=abort max_drain_bytes=64KiB")
    assert ClosePolicy.from_mapping(policy.as_dict()) == policy


@pytest.mark.parametrize(
    ("mapping", "word"),
    [
        ({}, "mode"),
        ({"mode": 3}, "mode"),
        ({"mode": "nope"}, "nope"),
        ({"mode": "graceful", "timeout": 1}, "timeout"),
        ({"mode": "graceful", "colour": 1}, "colour"),
        ({"mode": "graceful", "idle_timeout": True}, "idle_timeout"),
        ({"mode": "graceful", "idle_timeout": float("nan")}, "idle_timeout"),
        ({"mode": "graceful", "idle_timeout": -0.5}, "idle_timeout"),
        ({"mode": "graceful", "idle_timeout": None}, "idle_timeout"),
        ({"mode": "graceful", "max_drain_bytes": 1.25}, "max_drain_bytes"),
        ({"mode": "peer-first", "fallback": 1}, "fallback"),
        ({"mode": "graceful", 1: 2}, "1"),
    ],
)
def test_from_mapping_errors_name_the_key(mapping: dict[Any, Any], word: str) -> None:
    with pytest.raises(PolicyError) as info:
        ClosePolicy.from_mapping(mapping)
    assert info.value.word == word


def test_from_env() -> None:
    env = {"POLICY": "abort", "BLANK": "  ", "BAD": "graceful timeout=1s"}
    assert ClosePolicy.from_env("POLICY", environ=env) == ClosePolicy.abort()
    assert ClosePolicy.from_env("MISSING", "peer-first", environ=env).mode is CloseMode.PEER_FIRST
    assert ClosePolicy.from_env("BLANK", ClosePolicy.abort(), environ=env) == ClosePolicy.abort()
    with pytest.raises(PolicyError, match="MISSING is not set"):
        ClosePolicy.from_env("MISSING", environ=env)
    with pytest.raises(PolicyError, match=r"environment variable BAD: .*'timeout'") as info:
        ClosePolicy.from_env("BAD", environ=env)
    assert info.value.position == 9
    assert info.value.accepted == ("idle_timeout", "linger_time", "max_drain_bytes")
    assert str(info.value).count("position") == 1


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TCPCLOSE_TEST_POLICY", "client-first timeout=250ms")
    assert ClosePolicy.from_env("TCPCLOSE_TEST_POLICY").timeout == 0.25


def test_frozen_hashable_and_replace() -> None:
    policy = ClosePolicy.peer_first(timeout=2.0, fallback="abort")
    with pytest.raises(AttributeError):
        policy.timeout = 3.0  # type: ignore[misc]
    assert {policy, ClosePolicy.parse(str(policy))} == {policy}
    derived = policy.replace(timeout=3)
    assert derived.timeout == 3.0
    assert policy.timeout == 2.0
    with pytest.raises(PolicyError, match="'bogus'"):
        policy.replace(bogus=1)
    with pytest.raises(PolicyError, match="must not be negative"):
        policy.replace(timeout=-1)
    with pytest.raises(PolicyError, match="does not apply"):
        ClosePolicy.graceful().replace(timeout=1)


def test_constructor_validates_like_parse() -> None:
    assert ClosePolicy(mode="client-first") == ClosePolicy.parse("peer-first")  # type: ignore[arg-type]
    assert ClosePolicy(idle_timeout=1).idle_timeout == 1.0
    with pytest.raises(PolicyError):
        ClosePolicy(mode=CloseMode.ABORT, linger_time=1.0)
    with pytest.raises(PolicyError):
        ClosePolicy(mode=object())  # type: ignore[arg-type]


def test_closemode_aliases_via_constructor() -> None:
    assert CloseMode("client-initiated") is CloseMode.PEER_FIRST
    with pytest.raises(ValueError, match="nope"):
        CloseMode("nope")


def test_public_names() -> None:
    assert tcpclose.ClosePolicy is ClosePolicy
    assert issubclass(tcpclose.PolicyError, ValueError)
    assert issubclass(tcpclose.PolicyError, tcpclose.TcpCloseError)


# -- units -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (5.0, "5s"), (120.0, "2m"), (3600.0, "1h"), (0.0, "0s"), (90.0, "90s")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
    assert parse_duration(text) == seconds


def test_format_size() -> None:
    assert format_size(65536) == "64KiB"
    assert format_size(1500) == "1500"
    assert format_size(3 << 30) == "3GiB"
    assert parse_size("1.5KiB") == 1536


# -- properties: round trip and fuzzing --------------------------------------------------------

durations = st.floats(min_value=0.0, max_value=3600.0, allow_nan=False, allow_infinity=False)
sizes = st.integers(min_value=0, max_value=1 << 40)


@st.composite
def policies(draw: st.DrawFn) -> ClosePolicy:
    mode = draw(st.sampled_from(list(CloseMode)))
    kwargs: dict[str, Any] = {"mode": mode}
    if mode in (CloseMode.GRACEFUL, CloseMode.PEER_FIRST):
        kwargs["idle_timeout"] = draw(durations)
        kwargs["linger_time"] = draw(durations)
        kwargs["max_drain_bytes"] = draw(sizes)
    if mode is CloseMode.PEER_FIRST:
        kwargs["timeout"] = draw(durations)
        kwargs["grace"] = draw(durations)
        kwargs["fallback"] = draw(st.sampled_from(list(Fallback)))
    return ClosePolicy(**kwargs)


@given(policies())
def test_round_trip_text(policy: ClosePolicy) -> None:
    assert ClosePolicy.parse(str(policy)) == policy


@given(policies())
def test_round_trip_mapping(policy: ClosePolicy) -> None:
    assert ClosePolicy.from_mapping(policy.as_dict()) == policy


@given(durations)
def test_duration_text_round_trip(seconds: float) -> None:
    text = format_duration(seconds)
    assert parse_duration(text) == seconds
    assert not math.isnan(parse_duration(text))


_WORDS = st.sampled_from(
    [
        "graceful",
        "peer-first",
        "abort",
        "default",
        "client-first",
        "timeout=",
        "fallback=",
        "idle_timeout=",
        "linger_time=",
        "max_drain_bytes=",
        "5s",
        "1MiB",
        "auto",
        "=",
        "-1",
        "nan",
    ]
)


@settings(max_examples=300)
@given(st.one_of(st.text(), st.lists(_WORDS).map(" ".join), st.lists(_WORDS).map("".join)))
def test_parse_raises_only_policy_error(text: str) -> None:
    try:
        policy = ClosePolicy.parse(text)
    except PolicyError:
        return
    assert ClosePolicy.parse(str(policy)) == policy


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.text(max_size=12),
    st.binary(max_size=4),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=300)
@given(
    st.one_of(
        st.dictionaries(
            st.one_of(st.sampled_from(["mode", *ClosePolicy.DEFAULTS]), st.text(max_size=8)),
            st.one_of(_VALUES, st.sampled_from(["graceful", "peer-first", "abort", "5s"])),
            max_size=6,
        ),
        _VALUES,
    )
)
def test_from_mapping_raises_only_policy_error(mapping: Any) -> None:
    try:
        policy = ClosePolicy.from_mapping(mapping)
    except PolicyError:
        return
    assert ClosePolicy.from_mapping(policy.as_dict()) == policy


# -- out-of-range numbers (issue 20, item 7) ----------------------------------------------------

_HUGE_INT = 10**400  # beyond float: float(_HUGE_INT) raises OverflowError
_HUGER_INT = 10**5000  # beyond str(): its repr raises ValueError (4300-digit limit)


@pytest.mark.parametrize(
    ("key", "value", "says"),
    [
        ("linger_time", _HUGE_INT, "at most 1h"),
        ("linger_time", -_HUGE_INT, "negative"),
        ("linger_time", _HUGER_INT, "at most 1h"),
        ("linger_time", float("inf"), "finite"),
        ("linger_time", float("nan"), "finite"),
        ("linger_time", "1e400s", "at most 1h"),
        ("linger_time", "9" * 5000 + "h", "at most 1h"),
        ("idle_timeout", _HUGE_INT, "at most 1h"),
        ("max_drain_bytes", _HUGE_INT, "at most 1TiB"),
        ("max_drain_bytes", _HUGER_INT, "at most 1TiB"),
        ("max_drain_bytes", -_HUGER_INT, "negative"),
        ("max_drain_bytes", "1e400KiB", "at most 1TiB"),
        ("max_drain_bytes", "9" * 5000, "at most 1TiB"),
        ("max_drain_bytes", "9" * 5000 + ".5MiB", "at most 1TiB"),
        ("max_drain_bytes", float("inf"), "at most 1TiB"),
        ("max_drain_bytes", float("nan"), "whole number"),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 20 else type(v).__name__,
)
def test_huge_and_non_finite_numbers_raise_policy_error_naming_the_field(
    key: str, value: object, says: str
) -> None:
    """Issue 20 (7): ``from_mapping({"mode": "graceful", "linger_time": 10**400})`` and
    the constructors raised OverflowError (or ValueError from an int too long to print);
    every way in must give the documented PolicyError naming the field and the range."""
    entries: list[Any] = [
        lambda: ClosePolicy.from_mapping({"mode": "graceful", key: value}),
        lambda: ClosePolicy(mode=CloseMode.GRACEFUL, **_kw(key, value)),
        lambda: ClosePolicy.graceful(**_kw(key, value)),
        lambda: ClosePolicy.peer_first(**_kw(key, value)),
        lambda: ClosePolicy.parse("peer-first").replace(**_kw(key, value)),
        lambda: tcpclose.ClosePolicy.from_mapping({"mode": "peer-first", key: value}),
    ]
    if isinstance(value, str):
        entries.append(lambda: ClosePolicy.parse(f"graceful {key}={value}"))
    for make in entries:
        with pytest.raises(PolicyError) as caught:
            make()
        message = str(caught.value)
        assert key in message
        assert says in message
        assert len(message) < 300  # a 5000-digit value is not echoed whole


def test_peer_first_constructor_bad_fallback_is_a_policy_error() -> None:
    """``ClosePolicy.peer_first(fallback="bogus")`` raised a bare ValueError from the
    enum; it names the field and the accepted words like every other bad value."""
    with pytest.raises(PolicyError, match="fallback") as caught:
        ClosePolicy.peer_first(fallback="bogus")
    assert caught.value.accepted == ("graceful", "abort", "auto")
    assert ClosePolicy.peer_first(fallback="ABORT").fallback is Fallback.ABORT


def test_largest_values_still_parse() -> None:
    assert ClosePolicy.from_mapping({"mode": "graceful", "linger_time": 3600}).linger_time == 3600
    assert ClosePolicy.parse("graceful max_drain_bytes=1024GiB").max_drain_bytes == 1 << 40
    assert ClosePolicy.parse("graceful max_drain_bytes=0.5KiB").max_drain_bytes == 512
    assert ClosePolicy.graceful(max_drain_bytes=1 << 40).max_drain_bytes == 1 << 40


def _kw(key: str, value: object) -> dict[str, Any]:
    return {key: value}


def test_defaults_are_defined_once_and_the_docs_show_them() -> None:
    """Issue 21: the constructors and the configuration page use the one definition of
    each default (``_policy.DEFAULT_*``, mapped by ``ClosePolicy.DEFAULTS``)."""
    import inspect
    import re
    from pathlib import Path

    from tcpclose import _policy

    assert dict(ClosePolicy.DEFAULTS) == {
        "idle_timeout": _policy.DEFAULT_IDLE_TIMEOUT,
        "linger_time": _policy.DEFAULT_LINGER_TIME,
        "max_drain_bytes": _policy.DEFAULT_MAX_DRAIN_BYTES,
        "timeout": _policy.DEFAULT_TIMEOUT,
        "grace": _policy.DEFAULT_GRACE,
        "fallback": _policy.DEFAULT_FALLBACK,
    }
    for constructor in (ClosePolicy.graceful, ClosePolicy.peer_first):
        for name, parameter in inspect.signature(constructor).parameters.items():
            assert parameter.default == ClosePolicy.DEFAULTS[name], (constructor, name)
    page = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
    row = re.compile(r"^\| `(\w+)` \| [^|]+ \| [^|]+ \| `([^`]+)` \|", re.M)
    shown: dict[str, str] = {}
    for name, value in ClosePolicy.DEFAULTS.items():
        if isinstance(value, Fallback):
            shown[name] = value.value
        elif name == "max_drain_bytes":
            shown[name] = format_size(int(value))  # type: ignore[call-overload]
        else:
            shown[name] = format_duration(float(value))  # type: ignore[arg-type]
    assert dict(row.findall(page.read_text(encoding="utf-8"))) == shown
