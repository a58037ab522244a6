"""The warning rules over injected facts, the Finding type, the catalogue, and ``warn``.

Every check has a case that fires and a near miss that does not; the facts describe
kernels and platforms this machine is not (tcp_tw_recycle, macOS ticks, Windows).
"""

from __future__ import annotations

import doctest
import inspect
import json
import re
import warnings
from dataclasses import FrozenInstanceError, replace
from pathlib import Path
from typing import Any

import pytest

import tcpclose
from tcpclose import _checks, _facts, _findings, _warnings
from tcpclose._facts import Counters, SocketFacts, Sysctls, Timers, TimeWaitSummary
from tcpclose._findings import CATALOGUE, Finding, Severity, warn
from tcpclose._kernel._types import KernelState, TcpState
from tcpclose._warnings import (
    BlockingCloseWarning,
    DataLossWarning,
    TcpCloseWarning,
    UnsafeReuseWarning,
)

DOCS = Path(__file__).resolve().parent.parent / "docs" / "warnings.md"


def codes(findings: list[Finding]) -> list[str]:
    return [f.code for f in findings]


# -- catalogue ---------------------------------------------------------------------------


def test_catalogue_codes_are_stable_and_match_their_class() -> None:
    assert list(CATALOGUE) == sorted(CATALOGUE)
    for code, entry in CATALOGUE.items():
        assert re.fullmatch(r"TC[1-3]\d\d", code)
        assert entry.code == code
        assert entry.anchor == code.lower()
        assert entry.docs_url.endswith(f"#{code.lower()}")
        # The hundreds digit names the warning class (TC1xx data loss, ...).
        assert entry.category.category_code[2] == code[2]
        assert entry.title
        assert entry.advice
        assert entry.severity in entry.severities
    assert CATALOGUE["TC101"].category is DataLossWarning
    assert CATALOGUE["TC102"].category is DataLossWarning
    assert CATALOGUE["TC201"].category is BlockingCloseWarning
    assert CATALOGUE["TC307"].category is UnsafeReuseWarning


def test_catalogue_severity_ranges() -> None:
    assert CATALOGUE["TC303"].severities == (Severity.WARNING, Severity.ERROR)
    assert CATALOGUE["TC309"].severities == (Severity.INFO,)
    assert CATALOGUE["TC312"].severities == (Severity.INFO, Severity.WARNING)


def test_links_point_at_the_docs_site() -> None:
    mkdocs = (DOCS.parent.parent / "mkdocs.yml").read_text(encoding="utf-8")
    assert f"\nsite_url: {_warnings.DOCS_ROOT}\n" in mkdocs
    assert _warnings.docs_url("TC303") == f"{_warnings.DOCS_ROOT}warnings/#tc303"


def test_docs_page_has_one_section_per_code() -> None:
    """docs/warnings.md follows the catalogue: a table row and a section per code, the
    section anchored at the lower-case code and quoting the advice."""
    text = DOCS.read_text(encoding="utf-8")
    headings = re.findall(r"^## (TC\d{3}) — (.+) \{#(tc\d{3})\}$", text, flags=re.MULTILINE)
    assert [code for code, _, _ in headings] == list(CATALOGUE)
    rows = re.findall(
        r"^\| \[(TC\d{3})\]\(#(tc\d{3})\) \| `(\w+)` \| ([a-z, ]+) \| (.+) \|$", text, re.M
    )
    assert [code for code, *_ in rows] == list(CATALOGUE)
    for code, anchor, category, severities, title in rows:
        entry = CATALOGUE[code]
        assert anchor == entry.anchor
        assert category == entry.category.__name__
        assert severities == ", ".join(s.value for s in entry.severities)
        assert title == entry.title
    for code, title, anchor in headings:
        entry = CATALOGUE[code]
        assert title == entry.title
        assert anchor == entry.anchor
        section = text.split(f"## {code} — ", 1)[1].split("\n## ", 1)[0]
        flat = " ".join(section.split())
        advice = entry.advice[0].upper() + entry.advice[1:]
        assert f"**What to do.** {advice}" in flat, code
        assert f"`{entry.category.__name__}`" in section
        assert "**Evidence**" in section


# -- Finding -----------------------------------------------------------------------------


def test_finding_is_frozen_json_ready_and_readable() -> None:
    finding = _checks.abort_discards(4096)
    assert finding is not None
    assert isinstance(finding, tcpclose.Finding)
    assert finding.severity is Severity.WARNING
    assert finding.category is DataLossWarning
    with pytest.raises(FrozenInstanceError):
        finding.code = "TC999"  # type: ignore[misc]
    with pytest.raises(TypeError):
        finding.evidence["discarded_bytes"] = 1  # type: ignore[index]
    data = finding.as_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["category"] == "DataLossWarning"
    assert data["severity"] == "warning"
    assert data["docs"] == "https://tcpclose.readthedocs.io/en/latest/warnings/#tc101"
    assert str(finding).startswith("TC101 warning: abort discarded")
    assert "discarded_bytes=4096" in str(finding)
    assert hash(finding) == hash(_checks.abort_discards(4096))
    assert finding == _checks.abort_discards(4096)
    assert finding != _checks.abort_discards(1)


def test_finding_evidence_lists_become_json_lists() -> None:
    s = Sysctls(ip_local_port_range=(40000, 40009))
    (finding,) = _checks.time_wait_near_port_range({("::1", 443): 8}, s)
    data = finding.as_dict()
    assert data["evidence"] == {
        "destination": "[::1]:443",
        "time_wait": 8,
        "ephemeral_ports": 10,
        "ip_local_port_range": [40000, 40009],
        "percent": 80.0,
        "tw_reuse_applies": False,
    }
    assert "ip_local_port_range=40000,40009" in str(finding)


def test_severity_is_a_str_enum() -> None:
    assert Severity("error") is Severity.ERROR
    assert f"{Severity.INFO}" == "info"
    assert [s.rank for s in Severity] == [0, 1, 2]
    assert tcpclose.Severity is Severity


def test_sort_findings_most_severe_first() -> None:
    info = _checks.rfc1337_off(0)
    error = _checks.tw_recycle_on(1)
    warning = _checks.abort_discards(1)
    assert info is not None
    assert error is not None
    assert warning is not None
    assert codes(_findings.sort_findings([info, warning, error])) == ["TC307", "TC101", "TC309"]


# -- TC1xx -------------------------------------------------------------------------------


def test_tc101_abort_discards() -> None:
    finding = _checks.abort_discards(discarded_bytes=1)
    assert finding is not None
    assert finding.code == "TC101"
    assert finding.evidence == {"discarded_bytes": 1}
    assert _checks.abort_discards(0) is None


def test_tc102_close_with_unread() -> None:
    finding = _checks.close_with_unread(unread_bytes=200_000)
    assert finding is not None
    assert finding.code == "TC102"
    assert finding.category is DataLossWarning
    assert finding.evidence["unread_bytes"] == 200_000
    assert _checks.close_with_unread(0) is None


@pytest.mark.parametrize(
    ("orphans", "limit", "expected"),
    [
        (4097, 4096, Severity.ERROR),  # close() itself resets: orphans > limit
        (1025, 4096, Severity.WARNING),  # stalled orphans reset: orphans << 2 > limit
        (1024, 4096, None),  # near miss: exactly a quarter
        (None, 4096, None),
        (10, None, None),
    ],
)
def test_tc103_orphans_near_limit(
    orphans: int | None, limit: int | None, expected: Severity | None
) -> None:
    finding = _checks.orphans_near_limit(orphans=orphans, max_orphans=limit)
    if expected is None:
        assert finding is None
    else:
        assert finding is not None
        assert finding.code == "TC103"
        assert finding.severity is expected
        assert finding.evidence["tcp_max_orphans"] == limit


# -- TC2xx -------------------------------------------------------------------------------


def test_tc201_linger_on_nonblocking_socket() -> None:
    finding = _checks.blocking_linger(linger_on=True, linger_time=5, nonblocking=True)
    assert finding is not None
    assert finding.code == "TC201"
    assert finding.category is BlockingCloseWarning
    assert finding.evidence["linger_seconds"] == 5.0


def test_tc201_event_loop_transport_even_if_blocking_flag_unknown() -> None:
    finding = _checks.blocking_linger(
        linger_on=True, linger_time=1, nonblocking=False, event_loop=True
    )
    assert finding is not None
    assert finding.evidence["event_loop"] is True


def test_tc201_macos_linger_counts_ticks() -> None:
    finding = _checks.blocking_linger(
        linger_on=True, linger_time=500, nonblocking=True, linger_unit="ticks"
    )
    assert finding is not None
    assert finding.evidence["linger_seconds"] == 5.0
    assert finding.evidence["linger_unit"] == "ticks"


@pytest.mark.parametrize(
    ("on", "time", "nonblocking"),
    [
        (True, 0, True),  # {1, 0} is an abort, not a blocking close
        (False, 5, True),  # linger off
        (True, 5, False),  # a blocking socket is expected to block
    ],
)
def test_tc201_near_misses(on: bool, time: int, nonblocking: bool) -> None:
    assert _checks.blocking_linger(linger_on=on, linger_time=time, nonblocking=nonblocking) is None


# -- TC301 / TC302: clients on a fixed port ----------------------------------------------

CLIENT = SocketFacts(
    platform="linux",
    local_port=5000,
    peer=("10.0.0.5", 443),
    port_chosen=True,
    listener_on_port=False,
    reuseaddr=False,
)


def test_tc301_fixed_port_client() -> None:
    assert codes(_checks.check_socket_facts(CLIENT)) == ["TC301"]
    finding = _checks.fixed_port_client(CLIENT)
    assert finding is not None
    assert finding.evidence["peer"] == "10.0.0.5:443"


def test_tc302_reuseaddr_explicit_bind_takes_over_time_wait() -> None:
    facts = replace(CLIENT, reuseaddr=True)
    assert codes(_checks.check_socket_facts(facts)) == ["TC302"]


@pytest.mark.parametrize(
    "change",
    [
        {"port_chosen": False},  # the kernel picked the port
        {"port_chosen": None},  # range unknown
        {"listener_on_port": True},  # accepted from a listener on that port
        {"listener_on_port": None},  # socket table unknown
        {"peer": None},  # not connected
        {"listening": True},
        {"local_port": 0},
    ],
)
def test_tc301_tc302_near_misses(change: dict[str, Any]) -> None:
    for reuseaddr in (False, True):
        facts = replace(CLIENT, reuseaddr=reuseaddr, **change)
        assert _checks.fixed_port_client(facts) is None
        assert _checks.reuseaddr_takeover(facts) is None


def test_tc301_from_time_wait_on_fixed_ports() -> None:
    summary = TimeWaitSummary(bound_by_port={5000: Timers(2), 5001: Timers(1)})
    finding = _checks.fixed_port_time_wait(summary)
    assert finding is not None
    assert finding.code == "TC301"
    assert finding.evidence == {"time_wait": 3, "local_ports": [5000, 5001]}
    assert _checks.fixed_port_time_wait(TimeWaitSummary(accepted_by_port={80: Timers(3)})) is None


# -- TC303: TIME_WAIT towards one destination vs the ephemeral range ---------------------

RANGE_100 = Sysctls(ip_local_port_range=(40000, 40099), tcp_tw_reuse=0, tcp_timestamps=1)


@pytest.mark.parametrize(
    ("count", "expected"),
    [(91, Severity.ERROR), (90, Severity.WARNING), (51, Severity.WARNING), (50, None)],
)
def test_tc303_thresholds(count: int, expected: Severity | None) -> None:
    found = _checks.time_wait_near_port_range({("10.0.0.5", 443): count}, RANGE_100)
    if expected is None:
        assert found == []
    else:
        (finding,) = found
        assert finding.code == "TC303"
        assert finding.severity is expected
        assert finding.evidence["destination"] == "10.0.0.5:443"


def test_tc303_reserved_ports_shrink_the_range() -> None:
    sysctls = Sysctls(
        ip_local_port_range=(40000, 40099),
        ip_local_reserved_ports=((40000, 40049), (50000, 50010)),
        tcp_tw_reuse=0,
    )
    assert sysctls.ephemeral_ports == 50
    (finding,) = _checks.time_wait_near_port_range({("10.0.0.5", 443): 46}, sysctls)
    assert finding.severity is Severity.ERROR
    assert finding.evidence["ephemeral_ports"] == 50


def test_tc303_tw_reuse_keeps_it_a_warning() -> None:
    reuse = Sysctls(ip_local_port_range=(40000, 40099), tcp_tw_reuse=1, tcp_timestamps=1)
    (finding,) = _checks.time_wait_near_port_range({("10.0.0.5", 443): 99}, reuse)
    assert finding.severity is Severity.WARNING
    assert finding.evidence["tw_reuse_applies"] is True
    # tcp_tw_reuse=2 covers loopback only.
    two = Sysctls(ip_local_port_range=(40000, 40099), tcp_tw_reuse=2, tcp_timestamps=1)
    found = _checks.time_wait_near_port_range({("127.0.0.1", 80): 99, ("10.0.0.5", 443): 98}, two)
    assert [(f.evidence["destination"], f.severity) for f in found] == [
        ("127.0.0.1:80", Severity.WARNING),
        ("10.0.0.5:443", Severity.ERROR),
    ]
    # Without timestamps tcp_tw_reuse does nothing.
    no_ts = Sysctls(ip_local_port_range=(40000, 40099), tcp_tw_reuse=1, tcp_timestamps=0)
    (finding,) = _checks.time_wait_near_port_range({("10.0.0.5", 443): 99}, no_ts)
    assert finding.severity is Severity.ERROR


def test_tc303_unknown_range_is_silent() -> None:
    assert _checks.time_wait_near_port_range({("10.0.0.5", 443): 60000}, Sysctls()) == []


# -- TC304 - TC306: tcp_tw_reuse ---------------------------------------------------------


def test_tc304_tw_reuse_relied_on_for_accepted_connections() -> None:
    finding = _checks.tw_reuse_for_accepted(tcp_tw_reuse=1, accepted_time_wait=5000)
    assert finding is not None
    assert finding.code == "TC304"
    # Near misses: few accepted TIME_WAIT; the default value 2 (nobody set it on purpose).
    assert _checks.tw_reuse_for_accepted(tcp_tw_reuse=1, accepted_time_wait=999) is None
    assert _checks.tw_reuse_for_accepted(tcp_tw_reuse=2, accepted_time_wait=5000) is None
    assert _checks.tw_reuse_for_accepted(tcp_tw_reuse=0, accepted_time_wait=5000) is None


@pytest.mark.parametrize("reuse", [1, 2])
def test_tc305_tw_reuse_without_timestamps(reuse: int) -> None:
    finding = _checks.tw_reuse_without_timestamps(tcp_tw_reuse=reuse, tcp_timestamps=0)
    assert finding is not None
    assert finding.code == "TC305"


@pytest.mark.parametrize(("reuse", "timestamps"), [(0, 0), (1, 1), (1, 2), (1, None), (None, 0)])
def test_tc305_near_misses(reuse: int | None, timestamps: int | None) -> None:
    assert (
        _checks.tw_reuse_without_timestamps(tcp_tw_reuse=reuse, tcp_timestamps=timestamps) is None
    )


def test_tc306_tw_reuse_2_with_non_loopback_traffic() -> None:
    finding = _checks.tw_reuse_loopback_only(tcp_tw_reuse=2, non_loopback_time_wait=100)
    assert finding is not None
    assert finding.code == "TC306"
    assert finding.severity is Severity.INFO
    assert _checks.tw_reuse_loopback_only(tcp_tw_reuse=2, non_loopback_time_wait=99) is None
    assert _checks.tw_reuse_loopback_only(tcp_tw_reuse=1, non_loopback_time_wait=500) is None


# -- TC307 - TC312: other sysctls and socket options -------------------------------------


def test_tc307_tw_recycle() -> None:
    finding = _checks.tw_recycle_on(1)
    assert finding is not None
    assert finding.severity is Severity.ERROR
    assert _checks.tw_recycle_on(0) is None
    assert _checks.tw_recycle_on(None) is None  # removed in Linux 4.12


@pytest.mark.parametrize(
    ("time_wait", "limit", "overflows", "expected"),
    [
        (4096, 4096, 0, Severity.ERROR),
        (3277, 4096, 0, Severity.WARNING),  # >= 80 %
        (3276, 4096, 0, None),  # near miss
        (10, 4096, 7, Severity.WARNING),  # it overflowed since boot
        (None, None, 7, Severity.WARNING),
        (None, 4096, None, None),
    ],
)
def test_tc308_tw_buckets(
    time_wait: int | None, limit: int | None, overflows: int | None, expected: Severity | None
) -> None:
    finding = _checks.tw_buckets_near_limit(
        time_wait=time_wait, max_tw_buckets=limit, overflows=overflows
    )
    if expected is None:
        assert finding is None
    else:
        assert finding is not None
        assert finding.code == "TC308"
        assert finding.severity is expected


def test_tc309_rfc1337() -> None:
    finding = _checks.rfc1337_off(0)
    assert finding is not None
    assert finding.severity is Severity.INFO
    assert _checks.rfc1337_off(1) is None
    assert _checks.rfc1337_off(None) is None


def test_tc310_reuseport_listener() -> None:
    finding = _checks.reuseport_listener(listening=True, reuseport=True)
    assert finding is not None
    assert finding.code == "TC310"
    assert _checks.reuseport_listener(listening=False, reuseport=True) is None
    assert _checks.reuseport_listener(listening=True, reuseport=False) is None


def test_tc311_windows_reuseaddr() -> None:
    finding = _checks.windows_reuseaddr(platform="win32", reuseaddr=True, exclusiveaddruse=False)
    assert finding is not None
    assert finding.code == "TC311"
    assert (
        _checks.windows_reuseaddr(platform="win32", reuseaddr=False, exclusiveaddruse=True) is None
    )
    # SO_REUSEADDR on POSIX only allows binding over TIME_WAIT: not port theft.
    assert (
        _checks.windows_reuseaddr(platform="linux", reuseaddr=True, exclusiveaddruse=None) is None
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (5, Severity.INFO),
        (14, Severity.INFO),
        (15, None),
        (60, None),
        (120, None),
        (121, Severity.WARNING),
        (None, None),
    ],
)
def test_tc312_fin_timeout(value: int | None, expected: Severity | None) -> None:
    finding = _checks.fin_timeout_unusual(value)
    if expected is None:
        assert finding is None
    else:
        assert finding is not None
        assert finding.code == "TC312"
        assert finding.severity is expected


# -- aggregates --------------------------------------------------------------------------


def test_check_system_all_unknown_is_silent() -> None:
    assert _checks.check_system(Sysctls(), Counters(), None) == []
    assert _checks.check_system(Sysctls(), Counters(), TimeWaitSummary()) == []


def test_check_system_combines_and_sorts() -> None:
    sysctls = Sysctls(
        ip_local_port_range=(40000, 40099),
        tcp_tw_reuse=1,
        tcp_timestamps=0,
        tcp_tw_recycle=1,
        tcp_max_tw_buckets=1000,
        tcp_max_orphans=100,
        tcp_rfc1337=0,
        tcp_fin_timeout=5,
    )
    counters = Counters(time_wait=1000, orphans=50, time_wait_overflows=3)
    summary = TimeWaitSummary(
        accepted_by_port={80: Timers(1000)},
        outgoing_by_destination={("10.0.0.5", 443): Timers(95)},
    )
    found = _checks.check_system(sysctls, counters, summary)
    assert codes(found) == [
        "TC303",
        "TC307",
        "TC308",
        "TC103",
        "TC304",
        "TC305",
        "TC309",
        "TC312",
    ]
    assert [f.severity.rank for f in found] == sorted(
        (f.severity.rank for f in found), reverse=True
    )


def test_summarize_time_wait_classifies_by_who_closed_first() -> None:
    sysctls = Sysctls(ip_local_port_range=(32768, 60999), ip_local_reserved_ports=((40000, 40000),))
    pairs = [
        (("10.0.0.1", 8080), ("10.0.0.9", 51000)),  # listener on 8080: server closed first
        (("10.0.0.1", 33000), ("10.0.0.5", 443)),  # ephemeral: outgoing
        (("::ffff:10.0.0.1", 33001), ("::ffff:10.0.0.5", 443)),  # mapped: same destination
        (("127.0.0.1", 33002), ("127.0.0.1", 6379)),  # loopback destination
        (("10.0.0.1", 5000), ("10.0.0.5", 443)),  # chosen port, no listener
        (("10.0.0.1", 40000), ("10.0.0.5", 443)),  # reserved: chosen too
        (("10.0.0.1", 8081), ("10.0.0.9", 51001)),  # a server's, its listener gone
    ]
    entries = [
        KernelState(TcpState.TIME_WAIT, "procfs", local, peer, seconds_left=30.0 + i)
        for i, (local, peer) in enumerate(pairs)
    ]
    entries.append(
        KernelState(TcpState.ESTABLISHED, "procfs", ("10.0.0.1", 33003), ("10.0.0.5", 443))
    )
    s = _facts.summarize_time_wait(entries, listening_ports={8080}, sysctls=sysctls)
    assert s.total == 7
    assert dict(s.by_side) == {"accepted": 2, "outgoing": 3, "bound": 2}
    assert list(s.accepted_by_port) == [8080, 8081]
    towards = {d: (t.count, t.min_left, t.max_left) for d, t in s.outgoing_by_destination.items()}
    assert towards == {("10.0.0.5", 443): (2, 31.0, 32.0), ("127.0.0.1", 6379): (1, 33.0, 33.0)}
    assert s.outgoing_non_loopback == 2
    assert {p: t.count for p, t in s.bound_by_port.items()} == {5000: 1, 40000: 1}
    # Unknown range: everything without a listener counts as outgoing.
    s = _facts.summarize_time_wait(entries, listening_ports=set(), sysctls=Sysctls())
    assert s.by_side["outgoing"] == 7
    assert not s.bound_by_port


# -- warn(): category, attributes, stacklevel, once per location -------------------------


def library_close(discarded: int) -> None:
    """Stands in for a close driver: the warning must point at *its* caller."""
    finding = _checks.abort_discards(discarded)
    if finding is not None:
        warn(finding, stacklevel=2)


def test_warn_issues_the_category_with_code_evidence_advice() -> None:
    line = inspect.currentframe().f_lineno + 2  # type: ignore[union-attr]
    with pytest.warns(DataLossWarning, match=r"^TC101 abort discarded") as record:
        library_close(512)
    (entry,) = record.list
    warning = entry.message
    assert isinstance(warning, TcpCloseWarning)
    assert warning.code == "TC101"
    assert warning.evidence == {"discarded_bytes": 512}
    assert warning.advice == CATALOGUE["TC101"].advice
    assert warning.docs_url.endswith("#tc101")
    assert entry.filename == __file__
    assert entry.lineno == line


def test_each_class_is_filterable_the_usual_way() -> None:
    finding = _checks.blocking_linger(linger_on=True, linger_time=5, nonblocking=True)
    assert finding is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=BlockingCloseWarning)
        warn(finding, stacklevel=1)  # ignored, so no exception
    with pytest.raises(BlockingCloseWarning):
        warn(finding, stacklevel=1)  # the suite's filterwarnings=error
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"TC201 ")
        warn(finding, stacklevel=1)


def test_warning_text_is_stable_per_code() -> None:
    texts = set()
    for n in (1, 10, 123456):
        finding = _checks.abort_discards(n)
        assert finding is not None
        warning = finding.category(
            finding.title, code=finding.code, evidence=finding.evidence, advice=finding.advice
        )
        texts.add(str(warning))
    assert len(texts) == 1


def test_a_thousand_closes_in_a_loop_warn_once() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")  # Python's default: once per location
        for i in range(1000):
            library_close(i + 1)  # the numbers differ every time
        line = inspect.currentframe().f_lineno - 1  # type: ignore[union-attr]
    assert len(record) == 1
    assert record[0].filename == __file__
    assert record[0].lineno == line
    assert issubclass(record[0].category, DataLossWarning)


def test_different_codes_at_one_location_each_warn_once() -> None:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("default")
        for i in range(100):
            for finding in (_checks.abort_discards(i + 1), _checks.close_with_unread(i + 1)):
                assert finding is not None
                warn(finding, stacklevel=1)
    assert sorted(w.message.code for w in record) == ["TC101", "TC102"]  # type: ignore[union-attr]


# -- every code is reachable, and its evidence is documented -----------------------------


def _samples() -> list[Finding | None]:
    reuse_client = replace(CLIENT, reuseaddr=True)
    return [
        _checks.abort_discards(1),
        _checks.close_with_unread(1),
        _checks.orphans_near_limit(orphans=2000, max_orphans=4096),
        _checks.blocking_linger(linger_on=True, linger_time=5, nonblocking=True),
        _checks.fixed_port_client(CLIENT),
        _checks.fixed_port_time_wait(TimeWaitSummary(bound_by_port={5000: Timers(1)})),
        _checks.reuseaddr_takeover(reuse_client),
        *_checks.time_wait_near_port_range({("10.0.0.5", 443): 99}, RANGE_100),
        _checks.tw_reuse_for_accepted(tcp_tw_reuse=1, accepted_time_wait=1000),
        _checks.tw_reuse_without_timestamps(tcp_tw_reuse=1, tcp_timestamps=0),
        _checks.tw_reuse_loopback_only(tcp_tw_reuse=2, non_loopback_time_wait=100),
        _checks.tw_recycle_on(1),
        _checks.tw_buckets_near_limit(time_wait=10, max_tw_buckets=10, overflows=1),
        _checks.rfc1337_off(0),
        _checks.reuseport_listener(listening=True, reuseport=True),
        _checks.windows_reuseaddr(platform="win32", reuseaddr=True, exclusiveaddruse=False),
        _checks.fin_timeout_unusual(5),
        _checks.unreadable_input("/snapshot/proc/net/tcp", "not a regular file"),
    ]


def test_every_code_is_reachable_and_its_evidence_documented() -> None:
    samples = [f for f in _samples() if f is not None]
    assert sorted({f.code for f in samples}) == list(CATALOGUE)
    text = DOCS.read_text(encoding="utf-8")
    for finding in samples:
        section = text.split(f"## {finding.code} — ", 1)[1].split("\n## ", 1)[0]
        for key in finding.evidence:
            assert f"`{key}`" in section, (finding.code, key)
        entry = CATALOGUE[finding.code]
        assert (finding.title, finding.advice, finding.category) == (
            entry.title,
            entry.advice,
            entry.category,
        )


def test_the_findings_modules_docstring_examples() -> None:
    for module in (_checks, _facts, _findings, _warnings):
        failures, tried = doctest.testmod(module)
        assert failures == 0, module.__name__
        assert tried > 0, module.__name__
