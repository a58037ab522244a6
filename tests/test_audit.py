"""Fact gathering, ``audit()``, ``check_socket()`` and ``tcpclose audit``.

Sysctls and counters are injected through the ``root`` parameter (a temporary
directory laid out like ``/proc``), never by changing this machine's settings. Socket
options are checked end to end on real loopback sockets.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

import tcpclose
from tcpclose import Finding, KernelState, NotTcpSocketError, Severity, TcpState, _audit
from tcpclose._audit import (
    audit,
    check_socket,
    read_counters,
    read_socket_table,
    read_sysctls,
    socket_facts,
)
from tcpclose._cli import main
from tcpclose._facts import Sysctls
from tcpclose._kernel._address import format_address
from tcpclose._kernel._proctext import parse_netstat, parse_sockstat
from tests._support import LOOPBACK, listener, tcp_pair, wait_until

Address = tuple[str, int]

# Captured from Linux 6.18 (the machine in KERNEL-NOTES.md).
SOCKSTAT = """\
sockets: used 13
TCP: inuse 1 orphan 0 tw 1 alloc 1 mem 0
UDP: inuse 0 mem 0
UDPLITE: inuse 0
RAW: inuse 0
FRAG: inuse 0 memory 0
"""
NETSTAT = """\
TcpExt: SyncookiesSent SyncookiesRecv TW TWRecycled TCPTimeWaitOverflow TCPAbortOnMemory
TcpExt: 0 0 9 0 0 0
IpExt: InNoRoutes InTruncatedPkts
IpExt: 0 0
"""


def codes(findings: list[Finding]) -> list[str]:
    return [f.code for f in findings]


def by_code(findings: list[Finding], code: str) -> Finding:
    (found,) = [f for f in findings if f.code == code]
    return found


# -- a fake /proc ------------------------------------------------------------------------

#: Sysctls with nothing to report (tcp_rfc1337=1, timestamps on, defaults elsewhere).
QUIET = {
    "ip_local_port_range": "32768\t60999",
    "ip_local_reserved_ports": "",
    "tcp_tw_reuse": "2",
    "tcp_timestamps": "1",
    "tcp_max_tw_buckets": "131072",
    "tcp_max_orphans": "131072",
    "tcp_rfc1337": "1",
    "tcp_fin_timeout": "60",
}


def make_root(
    base: Path,
    sysctls: Mapping[str, str] | None = None,
    files: Mapping[str, str] | None = None,
) -> Path:
    """A directory laid out like ``/``: ``proc/sys/net/ipv4/<name>`` and other files."""
    sysdir = base / "proc" / "sys" / "net" / "ipv4"
    sysdir.mkdir(parents=True, exist_ok=True)
    for name, value in (sysctls if sysctls is not None else QUIET).items():
        (sysdir / name).write_text(value + "\n")
    for relative, text in (files or {}).items():
        path = base / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return base


def proc_hex(host: str) -> str:
    """Encode a host the way ``/proc/net/tcp`` prints it: 32-bit words, host order."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    raw = socket.inet_pton(family, host)
    return "".join(
        f"{int.from_bytes(raw[i : i + 4], sys.byteorder):08X}" for i in range(0, len(raw), 4)
    )


#: The header lines the kernel prints (``tcp4_seq_show``, ``tcp6_seq_show``).
PROC_HEADERS: dict[int, str] = {
    socket.AF_INET: "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when"
    " retrnsmt   uid  timeout inode",
    socket.AF_INET6: "  sl  local_address                         remote_address"
    "                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode",
}


def proc_tcp(rows: list[tuple[Address, Address, TcpState]], family: int = socket.AF_INET) -> str:
    """A ``/proc/net/tcp`` (``family=AF_INET6``: ``tcp6``) text, header and all, with
    the given ``(local, peer, state)`` rows."""
    lines = [PROC_HEADERS[family]]
    for i, (local, peer, state) in enumerate(rows):
        lines.append(
            f"{i:4d}: {proc_hex(local[0])}:{local[1]:04X} {proc_hex(peer[0])}:{peer[1]:04X} "
            f"{state.value:02X} 00000000:00000000 03:00000F9C 00000000     0        0 0 3 "
            "0000000000000000"
        )
    return "\n".join(lines) + "\n"


def sockstat(*, tw: int = 0, orphan: int = 0) -> str:
    return f"sockets: used 9\nTCP: inuse 1 orphan {orphan} tw {tw} alloc 1 mem 0\n"


# -- reading sysctls and counters --------------------------------------------------------


def test_read_sysctls_from_a_root(tmp_path: Path) -> None:
    root = make_root(
        tmp_path,
        {
            **QUIET,
            "ip_local_port_range": "1024 65000",
            "ip_local_reserved_ports": "8080,9000-9010",
            "tcp_tw_recycle": "1",
        },
    )
    s = read_sysctls(root)
    assert s.ip_local_port_range == (1024, 65000)
    assert s.ip_local_reserved_ports == ((8080, 8080), (9000, 9010))
    assert s.ephemeral_ports == 65000 - 1024 + 1 - 12
    assert s.tcp_tw_reuse == 2
    assert s.tcp_tw_recycle == 1
    assert s.tcp_fin_timeout == 60


def test_missing_sysctls_are_unknown_not_errors(tmp_path: Path) -> None:
    """Other kernels and containers lack some sysctls: unknown, never an exception."""
    assert read_sysctls(tmp_path) == Sysctls()
    assert read_sysctls(tmp_path / "does-not-exist") == Sysctls()
    root = make_root(tmp_path, {"tcp_tw_reuse": "1"})
    s = read_sysctls(root)
    assert s.tcp_tw_reuse == 1
    assert s.tcp_tw_recycle is None  # gone since Linux 4.12
    assert s.ip_local_port_range is None
    assert s.ephemeral_ports is None


def test_malformed_sysctls_are_unknown(tmp_path: Path) -> None:
    root = make_root(
        tmp_path,
        {
            "ip_local_port_range": "32768",
            "ip_local_reserved_ports": "80,abc",
            "tcp_tw_reuse": "yes",
            "tcp_fin_timeout": "",
        },
    )
    (root / "proc/sys/net/ipv4/tcp_rfc1337").mkdir()  # a directory: unreadable
    assert read_sysctls(root) == Sysctls()


def test_this_machines_sysctls_read_without_error() -> None:
    s = read_sysctls()
    if Path("/proc/sys/net/ipv4/tcp_tw_reuse").exists():
        assert s.tcp_tw_reuse in (0, 1, 2)


def test_parse_sockstat_and_netstat_captured() -> None:
    assert parse_sockstat(SOCKSTAT)["TCP"] == {
        "inuse": 1,
        "orphan": 0,
        "tw": 1,
        "alloc": 1,
        "mem": 0,
    }
    table = parse_netstat(NETSTAT)
    assert table["TcpExt"]["TCPTimeWaitOverflow"] == 0
    assert table["TcpExt"]["TW"] == 9
    assert table["IpExt"] == {"InNoRoutes": 0, "InTruncatedPkts": 0}
    assert parse_netstat("TcpExt: A B\nTcpExt: 1\n") == {}  # mismatched pair skipped


def test_read_counters(tmp_path: Path) -> None:
    root = make_root(
        tmp_path,
        files={
            "proc/net/sockstat": sockstat(tw=7, orphan=3),
            "proc/net/netstat": NETSTAT.replace("9 0 0 0", "9 0 5 0"),
        },
    )
    counters = read_counters(root)
    assert (counters.time_wait, counters.orphans, counters.time_wait_overflows) == (7, 3, 5)
    empty = read_counters(tmp_path / "nothing")
    assert (empty.time_wait, empty.orphans, empty.time_wait_overflows) == (None, None, None)


# -- the socket table --------------------------------------------------------------------


def test_read_socket_table_from_a_root(tmp_path: Path) -> None:
    assert read_socket_table(tmp_path) is None  # no proc/net/tcp: unknown
    rows = [
        (("10.0.0.1", 80), ("0.0.0.0", 0), TcpState.LISTEN),
        (("10.0.0.1", 40000), ("10.0.0.5", 443), TcpState.TIME_WAIT),
    ]
    rows6 = [
        (("::", 80), ("::", 0), TcpState.LISTEN),
        (("::1", 40001), ("::ffff:10.0.0.5", 443), TcpState.TIME_WAIT),
    ]
    root = make_root(
        tmp_path,
        files={
            "proc/net/tcp": proc_tcp(rows),
            "proc/net/tcp6": proc_tcp(rows6, socket.AF_INET6),
        },
    )
    table = read_socket_table(root, states=(TcpState.LISTEN,))
    assert table is not None
    assert [s.local for s in table] == [("10.0.0.1", 80), ("::", 80)]
    table = read_socket_table(root, port=443)
    assert table is not None
    assert [(s.local, s.peer, s.state) for s in table] == [rows[1], rows6[1]]
    (root / "proc/net/tcp6").write_text("garbage line here\n")
    assert read_socket_table(root) is None  # undecodable: unknown, not an exception


def _failing_dump(*args: object, **kwargs: object) -> Iterator[KernelState]:
    raise TimeoutError("sock_diag dump stalled")


@pytest.mark.parametrize("kernel_view", ["as-built", "failing"])
def test_live_table_with_and_without_the_kernel_view(
    family: int, kernel_view: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The live table comes from the kernel view's dump(), and from /proc/net/tcp{,6}
    when the dump fails: the same listener either way."""
    if kernel_view == "failing":
        monkeypatch.setattr(_audit, "dump", _failing_dump)
    with listener(family) as lst:
        port = lst.getsockname()[1]
        table = read_socket_table(states=(TcpState.LISTEN,), port=port)
        assert table is not None
        assert [(s.state, s.local[1] if s.local else None) for s in table] == [
            (TcpState.LISTEN, port)
        ]


# -- audit() over a fake root: one case per host-wide check ------------------------------


def test_audit_of_an_empty_root_finds_nothing(tmp_path: Path) -> None:
    assert audit(root=tmp_path) == []
    assert audit(443, root=tmp_path / "missing") == []
    assert tcpclose.audit(root=tmp_path) == []


def test_audit_quiet_settings(tmp_path: Path) -> None:
    root = make_root(tmp_path, files={"proc/net/sockstat": sockstat(tw=10, orphan=1)})
    assert audit(root=root) == []


@pytest.mark.parametrize(
    ("changes", "code", "severity"),
    [
        ({"tcp_tw_recycle": "1"}, "TC307", Severity.ERROR),
        ({"tcp_tw_reuse": "1", "tcp_timestamps": "0"}, "TC305", Severity.WARNING),
        ({"tcp_rfc1337": "0"}, "TC309", Severity.INFO),
        ({"tcp_fin_timeout": "5"}, "TC312", Severity.INFO),
        ({"tcp_fin_timeout": "600"}, "TC312", Severity.WARNING),
    ],
)
def test_audit_sysctl_checks(
    tmp_path: Path, changes: dict[str, str], code: str, severity: Severity
) -> None:
    findings = audit(root=make_root(tmp_path, {**QUIET, **changes}))
    assert codes(findings) == [code]
    assert findings[0].severity is severity


@pytest.mark.parametrize(
    "changes",
    [
        {"tcp_tw_recycle": "0"},
        {"tcp_tw_reuse": "0", "tcp_timestamps": "0"},
        {"tcp_fin_timeout": "30"},
        {"tcp_fin_timeout": "120"},
    ],
)
def test_audit_sysctl_near_misses(tmp_path: Path, changes: dict[str, str]) -> None:
    assert audit(root=make_root(tmp_path, {**QUIET, **changes})) == []


def test_audit_tw_buckets(tmp_path: Path) -> None:
    sysctls = {**QUIET, "tcp_max_tw_buckets": "4096"}
    full = make_root(tmp_path / "full", sysctls, {"proc/net/sockstat": sockstat(tw=4096)})
    assert by_code(audit(root=full), "TC308").severity is Severity.ERROR
    near = make_root(tmp_path / "near", sysctls, {"proc/net/sockstat": sockstat(tw=3300)})
    assert by_code(audit(root=near), "TC308").severity is Severity.WARNING
    below = make_root(tmp_path / "below", sysctls, {"proc/net/sockstat": sockstat(tw=3000)})
    assert audit(root=below) == []
    overflowed = make_root(
        tmp_path / "overflowed",
        sysctls,
        {
            "proc/net/sockstat": sockstat(tw=10),
            "proc/net/netstat": NETSTAT.replace("9 0 0 0", "9 0 12 0"),
        },
    )
    finding = by_code(audit(root=overflowed), "TC308")
    assert finding.evidence["time_wait_overflows"] == 12


def test_tw_buckets_says_why_it_fires(tmp_path: Path) -> None:
    """600 of 4,000 (15%) is not "near" the limit: the finding fires because the kernel
    overflowed since boot, and its title and evidence say so."""
    sysctls = {**QUIET, "tcp_max_tw_buckets": "4000"}
    files = {
        "proc/net/sockstat": sockstat(tw=600),
        "proc/net/netstat": NETSTAT.replace("9 0 0 0", "9 0 3 0"),
    }
    finding = by_code(audit(root=make_root(tmp_path, sysctls, files)), "TC308")
    assert finding.severity is Severity.WARNING
    assert finding.evidence["reason"] == "overflowed since boot"
    assert finding.evidence["percent_of_limit"] == 15.0
    assert "overflowed it since boot" in finding.title
    assert "at or near" not in finding.title
    full = make_root(tmp_path / "full", sysctls, {"proc/net/sockstat": sockstat(tw=4000)})
    assert by_code(audit(root=full), "TC308").evidence["reason"] == "at the limit"


def test_audit_orphans(tmp_path: Path) -> None:
    sysctls = {**QUIET, "tcp_max_orphans": "4096"}
    over = make_root(tmp_path / "over", sysctls, {"proc/net/sockstat": sockstat(orphan=5000)})
    assert by_code(audit(root=over), "TC103").severity is Severity.ERROR
    near = make_root(tmp_path / "near", sysctls, {"proc/net/sockstat": sockstat(orphan=1100)})
    assert by_code(audit(root=near), "TC103").severity is Severity.WARNING
    fine = make_root(tmp_path / "fine", sysctls, {"proc/net/sockstat": sockstat(orphan=1000)})
    assert audit(root=fine) == []


def _outgoing(
    n: int, dest: Address, first_port: int = 40000
) -> list[tuple[Address, Address, TcpState]]:
    return [(("10.0.0.1", first_port + i), dest, TcpState.TIME_WAIT) for i in range(n)]


def test_audit_time_wait_towards_one_destination(tmp_path: Path) -> None:
    sysctls = {**QUIET, "ip_local_port_range": "40000 40019", "tcp_tw_reuse": "0"}
    rows = _outgoing(19, ("10.0.0.5", 443)) + _outgoing(3, ("10.0.0.6", 80))
    root = make_root(tmp_path, sysctls, {"proc/net/tcp": proc_tcp(rows)})
    finding = by_code(audit(root=root), "TC303")
    assert finding.severity is Severity.ERROR
    assert finding.evidence["destination"] == "10.0.0.5:443"
    assert finding.evidence["time_wait"] == 19
    assert finding.evidence["ephemeral_ports"] == 20
    assert codes(audit(443, root=root)) == ["TC303"]
    assert audit(80, root=root) == []  # 3 of 20 towards port 80


def test_audit_time_wait_reserved_ports_count(tmp_path: Path) -> None:
    """Near miss turned hit: 9 of 20 ports is fine, 9 of 10 (half reserved) is not."""
    rows = _outgoing(9, ("10.0.0.5", 443))
    sysctls = {**QUIET, "ip_local_port_range": "40000 40019", "tcp_tw_reuse": "0"}
    root = make_root(tmp_path / "a", sysctls, {"proc/net/tcp": proc_tcp(rows)})
    assert audit(root=root) == []
    sysctls["ip_local_reserved_ports"] = "40010-40019"
    root = make_root(tmp_path / "b", sysctls, {"proc/net/tcp": proc_tcp(rows)})
    assert by_code(audit(root=root), "TC303").severity is Severity.WARNING  # 90 %, not above


def test_audit_tw_reuse_expected_for_accepted(tmp_path: Path) -> None:
    listen = (("10.0.0.1", 8080), ("0.0.0.0", 0), TcpState.LISTEN)
    accepted = [
        (("10.0.0.1", 8080), (f"10.1.{i // 250}.{i % 250 + 1}", 50000), TcpState.TIME_WAIT)
        for i in range(1000)
    ]
    sysctls = {**QUIET, "tcp_tw_reuse": "1"}
    root = make_root(tmp_path / "hit", sysctls, {"proc/net/tcp": proc_tcp([listen, *accepted])})
    finding = by_code(audit(root=root), "TC304")
    assert finding.evidence["accepted_time_wait"] == 1000
    fewer = [listen, *accepted[:999]]
    root = make_root(tmp_path / "miss", sysctls, {"proc/net/tcp": proc_tcp(fewer)})
    assert audit(root=root) == []


def test_audit_tw_reuse_2_with_remote_traffic(tmp_path: Path) -> None:
    remote = _outgoing(100, ("10.0.0.5", 443))
    root = make_root(tmp_path / "hit", files={"proc/net/tcp": proc_tcp(remote)})
    assert codes(audit(root=root)) == ["TC306"]
    local = [
        (("127.0.0.1", 40000 + i), ("127.0.0.1", 6379), TcpState.TIME_WAIT) for i in range(100)
    ]
    root = make_root(tmp_path / "miss", files={"proc/net/tcp": proc_tcp(local)})
    assert audit(root=root) == []


def test_audit_time_wait_on_a_fixed_client_port(tmp_path: Path) -> None:
    rows = [(("10.0.0.1", 5000), ("10.0.0.5", 443), TcpState.TIME_WAIT)]
    root = make_root(tmp_path / "hit", files={"proc/net/tcp": proc_tcp(rows)})
    assert by_code(audit(root=root), "TC301").evidence["local_ports"] == [5000]
    with_listener = [(("0.0.0.0", 5000), ("0.0.0.0", 0), TcpState.LISTEN), *rows]
    root = make_root(tmp_path / "miss", files={"proc/net/tcp": proc_tcp(with_listener)})
    assert audit(root=root) == []


def test_audit_server_time_wait_after_its_listener_closed(tmp_path: Path) -> None:
    """A server on fixed port 5000 closed first, then its listener went away: its
    TIME_WAIT points at its clients' ephemeral ports. That is not a client bound to a
    fixed port (TC301), which points at a service's port."""
    server_rows = [
        (("10.0.0.1", 5000), ("10.0.0.9", 40000 + i), TcpState.TIME_WAIT) for i in range(5)
    ]
    root = make_root(tmp_path / "server", files={"proc/net/tcp": proc_tcp(server_rows)})
    assert "TC301" not in codes(audit(root=root))
    client_rows = [(("10.0.0.1", 5000), ("10.0.0.5", 443), TcpState.TIME_WAIT)]
    root = make_root(tmp_path / "client", files={"proc/net/tcp": proc_tcp(client_rows)})
    assert "TC301" in codes(audit(root=root))


def test_audit_counts_time_wait_from_the_table_without_sockstat(tmp_path: Path) -> None:
    sysctls = {**QUIET, "tcp_max_tw_buckets": "10"}
    rows = _outgoing(10, ("10.0.0.5", 443))
    root = make_root(tmp_path, sysctls, {"proc/net/tcp": proc_tcp(rows)})
    assert by_code(audit(root=root), "TC308").evidence["time_wait"] == 10


@pytest.mark.parametrize("port", [0, 65536, -1, True, "443"])
def test_audit_rejects_bad_ports(tmp_path: Path, port: object) -> None:
    with pytest.raises(ValueError, match="expected a port"):
        audit(port, root=tmp_path)  # type: ignore[arg-type]


def test_audit_of_this_machine_runs() -> None:
    findings = audit()
    assert all(isinstance(f, Finding) for f in findings)
    json.dumps([f.as_dict() for f in findings])


# -- check_socket() on real sockets ------------------------------------------------------


@pytest.fixture
def pair(family: int) -> Iterator[tuple[socket.socket, socket.socket]]:
    client, server = tcp_pair(family)
    try:
        yield client, server
    finally:
        for s in (client, server):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 0, 0))
            s.close()


def set_linger(sock: socket.socket, on: int, seconds: int) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", on, seconds))


def test_linger_5_on_a_nonblocking_socket(pair: tuple[socket.socket, socket.socket]) -> None:
    client, _ = pair
    set_linger(client, 1, 5)
    client.setblocking(False)
    finding = by_code(check_socket(client), "TC201")
    assert finding.evidence["linger_seconds"] == 5.0
    assert finding.evidence["nonblocking"] is True
    assert finding.evidence["event_loop"] is False
    assert tcpclose.check_socket(client) == check_socket(client)


def test_linger_near_misses(pair: tuple[socket.socket, socket.socket]) -> None:
    client, _ = pair
    set_linger(client, 1, 5)
    client.settimeout(3.0)  # blocking with a timeout: a blocking close is expected
    assert "TC201" not in codes(check_socket(client))
    set_linger(client, 1, 0)  # an abort
    client.setblocking(False)
    assert "TC201" not in codes(check_socket(client))


def test_linger_on_an_asyncio_transport(family: int) -> None:
    async def scenario() -> tuple[list[str], list[str]]:
        server = await asyncio.start_server(lambda r, w: w.close(), LOOPBACK[family], 0)
        try:
            port = server.sockets[0].getsockname()[1]
            _, writer = await asyncio.open_connection(LOOPBACK[family], port)
            tsock = writer.get_extra_info("socket")
            tsock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 5))
            through_socket = codes(check_socket(tsock))
            through_writer = codes(check_socket(writer))
            facts = socket_facts(writer)
            assert facts.event_loop
            assert facts.nonblocking
            tsock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 0, 0))
            writer.close()
            await writer.wait_closed()
            return through_socket, through_writer
        finally:
            server.close()
            await server.wait_closed()

    through_socket, through_writer = asyncio.run(scenario())
    assert through_socket == ["TC201"]
    assert through_writer == ["TC201"]


def _free_port_below_ephemeral(host: str, count: int = 1) -> int:
    """First port of ``count`` consecutive bindable ports below the ephemeral range."""
    rng = read_sysctls().ip_local_port_range
    if rng is None or rng[0] < 2048 + count:
        pytest.skip("needs a known ephemeral range with room below it")
    top = min(rng[0], 32768) - count
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    for base in range(top - 1, 2048, -97)[:100]:  # bounded
        probes: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                probe = socket.socket(family, socket.SOCK_STREAM)
                probes.append(probe)
                probe.bind((host, port))
        except OSError:
            continue
        finally:
            for probe in probes:
                probe.close()
        return base
    pytest.skip("no free port block below the ephemeral range")


def _fixed_port_client(family: int, port: int, *, reuseaddr: bool) -> tuple[socket.socket, ...]:
    lst = listener(family)
    client = socket.socket(family, socket.SOCK_STREAM)
    if reuseaddr:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    client.bind((LOOPBACK[family], port))
    client.connect(lst.getsockname()[:2])
    server, _ = lst.accept()
    return client, server, lst


def _abort_all(*socks: socket.socket) -> None:
    """Close with RST so no TIME_WAIT is left on the fixed port."""
    for s in socks:
        set_linger(s, 1, 0)
        s.close()


@pytest.mark.parametrize(("reuseaddr", "code"), [(False, "TC301"), (True, "TC302")])
def test_client_bound_to_a_fixed_port(family: int, reuseaddr: bool, code: str) -> None:
    port = _free_port_below_ephemeral(LOOPBACK[family])
    client, server, lst = _fixed_port_client(family, port, reuseaddr=reuseaddr)
    try:
        found = check_socket(client)
        assert codes(found) == [code]
        assert found[0].evidence["local_port"] == port
        # The accepted end uses the listener's kernel-chosen port: no finding.
        assert check_socket(server) == []
    finally:
        _abort_all(client, server, lst)


def test_accepted_socket_on_a_fixed_port_listener_is_not_a_client(family: int) -> None:
    port = _free_port_below_ephemeral(LOOPBACK[family])
    lst = socket.socket(family, socket.SOCK_STREAM)
    lst.bind((LOOPBACK[family], port))
    lst.listen()
    client = socket.socket(family, socket.SOCK_STREAM)
    client.connect(lst.getsockname()[:2])
    server, _ = lst.accept()
    try:
        facts = socket_facts(server)
        assert facts.port_chosen is True
        assert facts.listener_on_port is True
        assert check_socket(server) == []
        assert check_socket(client) == []  # kernel-chosen port
        assert check_socket(lst) == []  # a listener without SO_REUSEPORT
    finally:
        _abort_all(client, server, lst)


@pytest.mark.skipif(not hasattr(socket, "SO_REUSEPORT"), reason="no SO_REUSEPORT")
def _server_time_wait_on(host: str, port: int) -> int:
    table = read_socket_table("/", states=(TcpState.TIME_WAIT,), port=port) or []
    return sum(1 for s in table if s.local == (host, port))


def test_server_time_wait_after_its_listener_closed_is_not_tc301(family: int) -> None:
    """A server on a fixed port closes three connections first, then its listener:
    audit() must not call its TIME_WAIT a client bound to a fixed port (TC301)."""
    host = LOOPBACK[family]
    port = _free_port_below_ephemeral(host)
    lst = socket.socket(family, socket.SOCK_STREAM)
    lst.bind((host, port))
    lst.listen()
    try:
        for _ in range(3):
            client = socket.socket(family, socket.SOCK_STREAM)
            client.connect((host, port))
            server, _ = lst.accept()
            server.close()  # the server closes first: TIME_WAIT on port
            assert client.recv(1) == b""
            client.close()
        wait_until(lambda: _server_time_wait_on(host, port) == 3, message="3 server TIME_WAIT")
    finally:
        lst.close()
    assert _server_time_wait_on(host, port) == 3  # listener gone, TIME_WAIT stays
    assert "TC301" not in codes(audit(port))


def test_reuseport_listener(family: int) -> None:
    lst = socket.socket(family, socket.SOCK_STREAM)
    try:
        lst.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        lst.bind((LOOPBACK[family], 0))
        assert check_socket(lst) == []  # bound, not listening yet
        lst.listen()
        assert codes(check_socket(lst)) == ["TC310"]
    finally:
        lst.close()


def test_check_socket_accepts_any_fileno_owner(pair: tuple[socket.socket, socket.socket]) -> None:
    client, _ = pair

    class Wrapper:
        def fileno(self) -> int:
            return client.fileno()

    set_linger(client, 1, 5)
    client.setblocking(False)
    assert codes(check_socket(Wrapper())) == ["TC201"]  # O_NONBLOCK read from the fd
    client.setblocking(True)
    assert check_socket(Wrapper()) == []
    assert client.fileno() >= 0  # the fd was borrowed (detached after), not closed


def test_check_socket_rejects_what_is_not_tcp() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        with pytest.raises(NotTcpSocketError, match="expected a TCP socket"):
            check_socket(udp)
        with pytest.raises(TypeError):
            check_socket(udp)
    with pytest.raises(TypeError, match="got int instead"):
        check_socket(3)
    closed = socket.socket()
    closed.close()
    with pytest.raises(ValueError, match="closed"):
        check_socket(closed)


# -- many TIME_WAIT towards one port, for real -------------------------------------------


def _time_wait_from(host: str, ports: range, lport: int) -> int:
    table = read_socket_table("/", states=(TcpState.TIME_WAIT,)) or []
    return sum(
        1
        for s in table
        if s.local and s.peer and s.local == (host, s.local[1])
        if s.local[1] in ports and s.peer[1] == lport
    )


def test_many_time_wait_towards_one_port(family: int, tmp_path: Path) -> None:
    """19 clients on 19 of 20 ports close first towards one listener; a fake root gives
    the ephemeral range as exactly those 20 ports, so 95% of it is in TIME_WAIT."""
    host = LOOPBACK[family]
    base = _free_port_below_ephemeral(host, count=21)
    ports = range(base, base + 19)
    # The listener on a fixed port too, as a service is: TIME_WAIT on a fixed local
    # port towards an ephemeral peer port would be a server's own (listener gone).
    lport = base + 20
    lst = socket.socket(family, socket.SOCK_STREAM)
    lst.bind((host, lport))
    lst.listen()
    try:
        for port in ports:
            client = socket.socket(family, socket.SOCK_STREAM)
            client.bind((host, port))
            client.connect((host, lport))
            server, _ = lst.accept()
            client.close()  # the client closes first: TIME_WAIT lands on its side
            assert server.recv(1) == b""
            server.close()
        wait_until(lambda: _time_wait_from(host, ports, lport) == 19, message="19 TIME_WAIT")
    finally:
        lst.close()

    # This machine's table, as-is: the clients' ports are outside the real range.
    assert "TC301" in codes(audit(lport))

    # The same table with a 20-port ephemeral range, through a fake root.
    snapshot = {
        f"proc/net/{name}": Path(f"/proc/net/{name}").read_text()
        for name in ("tcp", "tcp6")
        if Path(f"/proc/net/{name}").exists()
    }
    sysctls = {
        **QUIET,
        "ip_local_port_range": f"{base} {base + 19}",
        "tcp_tw_reuse": "0",
    }
    root = make_root(tmp_path / "narrow", sysctls, snapshot)
    destination = format_address((host, lport))
    (finding,) = [
        f
        for f in audit(lport, root=root)
        if f.code == "TC303" and f.evidence["destination"] == destination
    ]
    assert finding.severity is Severity.ERROR
    assert finding.evidence["time_wait"] == 19
    assert finding.evidence["percent"] == 95.0
    # Near miss: a 40-port range is under half used.
    sysctls["ip_local_port_range"] = f"{base} {base + 39}"
    root = make_root(tmp_path / "wide", sysctls, snapshot)
    assert not [
        f
        for f in audit(lport, root=root)
        if f.code == "TC303" and f.evidence["destination"] == destination
    ]


# -- the command line --------------------------------------------------------------------


def test_cli_audit_table_and_exit_status(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    quiet = make_root(tmp_path / "quiet")
    assert main(["audit", "--root", str(quiet)]) == 0
    assert capsys.readouterr().out.strip() == "no findings"

    info = make_root(tmp_path / "info", {**QUIET, "tcp_rfc1337": "0"})
    assert main(["audit", "--root", str(info)]) == 0  # info only
    out = capsys.readouterr().out
    assert "TC309" in out
    assert "advice:" in out
    assert "#tc309" in out

    bad = make_root(tmp_path / "bad", {**QUIET, "tcp_tw_recycle": "1", "tcp_rfc1337": "0"})
    assert main(["audit", "--root", str(bad)]) == 1
    out = capsys.readouterr().out
    assert out.index("TC307") < out.index("TC309")  # most severe first
    assert "2 findings: 1 error, 0 warning, 1 info" in out


def test_cli_audit_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = make_root(tmp_path, {**QUIET, "tcp_tw_recycle": "1"})
    assert main(["audit", "--json", "--port", "443", "--root", str(bad)]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["counts"] == {"info": 0, "warning": 0, "error": 1}
    (finding,) = document["findings"]
    assert finding["code"] == "TC307"
    assert finding["severity"] == "error"
    assert finding["category"] == "UnsafeReuseWarning"
    assert finding["evidence"] == {"tcp_tw_recycle": 1}


@pytest.mark.parametrize("argv", [["--port", "0"], ["--port", "http"], ["--bogus"]])
def test_cli_audit_bad_arguments_exit_2(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["audit", *argv]) == 2
    err = capsys.readouterr().err
    assert "error:" in err
    assert len(err.strip().splitlines()) == 1  # one line, no usage dump or traceback


def test_cli_audit_help_has_examples(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out
    assert "tcpclose audit --port 443" in out
    assert "exit status" in out


def test_cli_audit_as_a_program(tmp_path: Path) -> None:
    """``python -m tcpclose audit`` in a subprocess: the exit status CI sees."""
    bad = make_root(tmp_path, {**QUIET, "tcp_tw_recycle": "1"})
    done = subprocess.run(
        [sys.executable, "-m", "tcpclose", "audit", "--root", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "TC307" in done.stdout
    assert done.stderr == ""


# -- files that are not what they seem (issue 20) ----------------------------------------

SYSCTL = "proc/sys/net/ipv4"


def _tc313(findings: list[Finding]) -> list[tuple[str, str]]:
    return [
        (str(f.evidence["path"]), str(f.evidence["reason"])) for f in findings if f.code == "TC313"
    ]


@pytest.mark.timeout(20)
def test_a_fifo_behind_a_sysctl_is_one_finding_not_a_hang(tmp_path: Path) -> None:
    """Before: ``open()`` of a FIFO waits for a writer, and audit hung for ever."""
    root = make_root(tmp_path)
    fifo = root / SYSCTL / "tcp_tw_reuse"
    fifo.unlink()
    os.mkfifo(fifo)
    findings = audit(root=root)
    assert _tc313(findings) == [(str(fifo), "not a regular file")]
    assert [f.code for f in findings] == ["TC313"]  # the other sysctls still checked: quiet


@pytest.mark.timeout(20)
def test_dev_zero_behind_a_sysctl_is_one_finding_not_a_hang(tmp_path: Path) -> None:
    """Before: ``read_text()`` of ``/dev/zero`` never ends (and grows without bound)."""
    root = make_root(tmp_path)
    link = root / SYSCTL / "tcp_max_tw_buckets"
    link.unlink()
    link.symlink_to("/dev/zero")
    assert _tc313(audit(root=root)) == [(str(link), "not a regular file")]


@pytest.mark.timeout(60)
def test_a_socket_table_past_the_limit_is_not_read(tmp_path: Path) -> None:
    """Before: a 336 MB ``proc/net/tcp`` was read whole, and decoded into 1.9 GB. Now
    a table past 32 MiB is one finding and is not decoded (a sparse file here)."""
    root = make_root(tmp_path)
    table = root / "proc/net/tcp"
    table.parent.mkdir(parents=True, exist_ok=True)
    table.write_text(proc_tcp([]))
    os.truncate(table, _audit._TABLE_FILE_LIMIT + 1)
    (path, reason) = _tc313(audit(root=root))[0]
    assert path == str(table)
    assert reason == f"larger than {_audit._TABLE_FILE_LIMIT} bytes, not read"


@pytest.mark.parametrize(
    ("relative", "text", "reason"),
    [
        (f"{SYSCTL}/ip_local_port_range", "1" * 100_000 + " 60999", "larger than 65536 bytes"),
        (f"{SYSCTL}/ip_local_port_range", "1" * 5_000 + " 60999", "malformed value '"),
        (f"{SYSCTL}/ip_local_reserved_ports", "8080," + "9" * 5_000, "malformed value '"),
        (f"{SYSCTL}/tcp_max_tw_buckets", "7" * 100_000, "larger than 65536 bytes"),
        (f"{SYSCTL}/tcp_max_tw_buckets", "7" * 5_000, "malformed value '"),
        (f"{SYSCTL}/tcp_fin_timeout", "-" + "7" * 5_000, "malformed value '"),
    ],
)
def test_a_100000_digit_sysctl_is_one_finding_not_a_crash(
    tmp_path: Path, relative: str, text: str, reason: str
) -> None:
    """Before: ``int()`` of more than 4,300 digits raised ValueError out of audit()."""
    root = make_root(tmp_path, files={relative: text + "\n"})
    ((path, found),) = _tc313(audit(root=root))
    assert path == str(root / relative)
    assert found.startswith(reason)
    assert len(found) < 60  # a malformed value is quoted cut short


def test_5000_digit_counters_are_skipped(tmp_path: Path) -> None:
    huge = "9" * 5_000
    files = {
        "proc/net/sockstat": f"TCP: inuse 1 orphan 0 tw {huge} alloc 1 mem 0\n",
        "proc/net/netstat": f"TcpExt: TW TCPTimeWaitOverflow\nTcpExt: 9 {huge}\n",
    }
    counters = read_counters(make_root(tmp_path, files=files))
    assert (counters.time_wait, counters.orphans, counters.time_wait_overflows) == (None, 0, None)


def test_a_malformed_socket_table_is_one_finding(tmp_path: Path) -> None:
    root = make_root(tmp_path, files={"proc/net/tcp": "garbage\n"})
    ((path, reason),) = _tc313(audit(root=root))
    assert path == str(root / "proc/net/tcp")
    assert reason.startswith("malformed table: ")


@pytest.mark.timeout(60)
def test_cli_audit_of_a_bad_snapshot_finishes_with_one_line_per_file(tmp_path: Path) -> None:
    """The program, as CI runs it: a FIFO, /dev/zero and a huge number in one snapshot
    give three TC313 findings (warnings: exit 0), no traceback, no hang."""
    root = make_root(tmp_path, files={f"{SYSCTL}/tcp_fin_timeout": "1" * 5_000})
    os.unlink(root / SYSCTL / "tcp_tw_reuse")
    os.mkfifo(root / SYSCTL / "tcp_tw_reuse")
    os.unlink(root / SYSCTL / "tcp_rfc1337")
    (root / SYSCTL / "tcp_rfc1337").symlink_to("/dev/zero")
    done = subprocess.run(
        [sys.executable, "-m", "tcpclose", "audit", "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert done.stdout.count("TC313") == 3
    assert "3 findings: 0 error, 3 warning, 0 info" in done.stdout


@pytest.mark.parametrize("kind", ["missing", "file", "no proc"])
def test_cli_audit_root_that_cannot_be_read_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    """Before: ``--root /nonexistent`` printed "no findings" and exited 0, so a health
    check passed on no facts at all."""
    root = tmp_path / "nonexistent"
    if kind == "file":
        root.write_text("not a directory\n")
    elif kind == "no proc":
        root.mkdir()
    assert main(["audit", "--root", str(root)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"tcpclose: error: audit: --root {root}: ")
    assert err.count("\n") == 1
    # The library itself stays lenient: nothing there is nothing found.
    assert audit(root=root) == []


def test_decoders_docstring_examples() -> None:
    """The /proc text decoders' and the audit's worked examples."""
    import doctest

    from tcpclose._kernel import _proctext

    for module in (_proctext, _audit):
        failures, tried = doctest.testmod(module)
        assert failures == 0, module.__name__
        assert tried > 0, module.__name__


def test_one_netstat_counter_reads_as_the_whole_file_does() -> None:
    """The close path reads one counter of /proc/net/netstat (netstat_field); on this
    host's real file every counter reads as the full decoder has it."""
    from tcpclose._kernel._proctext import netstat_field, parse_netstat

    with open("/proc/net/netstat", encoding="ascii") as f:
        text = f.read()
    table = parse_netstat(text)
    assert table.get("TcpExt")
    for group, fields in table.items():
        for name, value in fields.items():
            assert netstat_field(text, group, name) == value, (group, name)
    assert netstat_field(text, "TcpExt", "NoSuchCounter") is None
    assert netstat_field(text, "NoSuchGroup", "TW") is None
    assert netstat_field("TcpExt: TW X\nTcpExt: 1\n", "TcpExt", "TW") is None  # mismatched
