"""The report and its observations are built without their frozen ``__init__`` (issue 16):
what comes out is exactly what the dataclasses' own constructors make. Pure data, no
sockets."""

from __future__ import annotations

import copy
import dataclasses
import logging
import pickle

import pytest

from tcpclose import ClosePolicy, CloseReport, KernelState, TcpState
from tcpclose._plan import Outcome, PlanResult
from tcpclose._policy import CloseMode
from tcpclose._report import Observed, build_report, new_observed

TIME_WAIT = KernelState(TcpState.TIME_WAIT, "netlink", ("127.0.0.1", 80), ("127.0.0.1", 5000))
SEEN = {
    "local": ("127.0.0.1", 80),
    "peer": ("127.0.0.1", 5000),
    "tcp_info_bytes": b"\x01" * 104,
    "unread_bytes": 0,
    "discarded_bytes": 3,
    "kernel_state": TIME_WAIT,
    "warnings": ("TC201",),
    "error": None,
    "trigger": "handler-return",
}
RESULT = PlanResult(
    mode_requested=CloseMode.GRACEFUL,
    mode_applied=CloseMode.GRACEFUL,
    outcome=Outcome.PEER_EOF,
    fallback=None,
    drained_bytes=7,
    peer_eof=True,
    peer_closed_first=False,
    fin_sent=True,
    linger_zero=False,
    started=1.0,
    finished=1.25,
    trace=(),
)


def expected_report(**changes: object) -> CloseReport:
    """The report ``build_report`` should give for ``RESULT`` and ``SEEN``, made with
    the dataclass's own constructor."""
    fields: dict[str, object] = {
        "policy": ClosePolicy.parse("graceful"),
        "mode": CloseMode.GRACEFUL,
        "fallback": None,
        "outcome": Outcome.PEER_EOF,
        "drained_bytes": 7,
        "peer_closed_first": False,
        "peer_eof": True,
        "fin_sent": True,
        "rst_sent": False,
        "duration": 0.25,
        "time_wait_skipped": False,
        "kernel_state_mode": "eager",
    }
    fields.update((k, v) for k, v in SEEN.items() if k in CloseReport.__dataclass_fields__)
    fields.update(changes)
    return CloseReport(**fields)  # type: ignore[arg-type]


def test_new_observed_is_an_observed() -> None:
    made = new_observed(*SEEN.values())  # type: ignore[arg-type]
    assert type(made) is Observed
    assert made == Observed(**SEEN)  # type: ignore[arg-type]
    with pytest.raises(dataclasses.FrozenInstanceError):
        made.error = "x"  # type: ignore[misc]


def test_report_is_what_the_constructor_makes() -> None:
    report = build_report(ClosePolicy.parse("graceful"), RESULT, Observed(**SEEN))  # type: ignore[arg-type]
    assert type(report) is CloseReport
    assert report == expected_report()
    assert hash(report) == hash(expected_report())
    assert repr(report) == repr(expected_report())
    with pytest.raises(dataclasses.FrozenInstanceError):
        report.outcome = Outcome.RESET  # type: ignore[misc]


def test_lazy_report_looks_up_once_when_first_read() -> None:
    calls: list[int] = []

    def lookup() -> KernelState:
        calls.append(1)
        return TIME_WAIT

    seen = Observed(**{**SEEN, "kernel_state": None})  # type: ignore[arg-type]
    report = build_report(
        ClosePolicy.parse("graceful"), RESULT, seen, kernel_state_mode="lazy", lookup=lookup
    )
    assert isinstance(report, CloseReport)
    assert not calls
    assert report.kernel_state is TIME_WAIT
    assert report.kernel_state is TIME_WAIT
    assert calls == [1]
    expected = expected_report(kernel_state_mode="lazy")
    assert report.as_dict() == expected.as_dict()
    for twin in (pickle.loads(pickle.dumps(report)), copy.copy(report)):
        assert type(twin) is CloseReport
        assert twin == expected
    assert dataclasses.replace(report, error="x").kernel_state is TIME_WAIT


def test_lazy_report_whose_lookup_fails_says_none(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []

    def lookup() -> KernelState:
        calls.append(1)
        raise OSError("gone")

    report = build_report(
        ClosePolicy.parse("graceful"),
        RESULT,
        Observed(),
        kernel_state_mode="lazy",
        lookup=lookup,
    )
    with caplog.at_level(logging.ERROR, logger="tcpclose"):
        assert report.kernel_state is None
        assert report.kernel_state is None
    assert calls == [1]
    assert report.state is TcpState.UNKNOWN
    assert "kernel lookup for a report failed" in caplog.text
