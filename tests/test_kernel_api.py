"""The kernel view's public surface: backend choice, argument checking, dump() and
summary() on live sockets, and the ``tcpclose.kernel`` module itself (issue 4)."""

from __future__ import annotations

import errno
import inspect
import socket
import struct
import subprocess
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tcpclose
import tcpclose.kernel
from tcpclose import KernelState, TcpState
from tcpclose._kernel import (
    DEFAULT_DUMP_STATES,
    Summary,
    _netlink,
    _procfs,
    _unsupported,
    select_backend,
)
from tcpclose._kernel._address import parse_four_tuple
from tcpclose._kernel._diag import decode_lookup_state, decode_reply, encode_lookup_request
from tests._support import addr, in_order, listener, tcp_pair, wait_until

DATA = Path(__file__).parent / "data"


# -- backend selection ---------------------------------------------------------------------------


def never() -> bool:
    raise AssertionError("must not be probed")


@pytest.mark.parametrize("platform", ["darwin", "win32", "freebsd14", "emscripten"])
def test_other_platforms_are_unsupported(platform: str) -> None:
    chosen = select_backend(platform, netlink_available=never, procfs_available=lambda r: True)
    assert chosen.name == "unsupported"


def test_linux_prefers_netlink_then_procfs_then_nothing() -> None:
    assert select_backend("linux", netlink_available=lambda: True).name == "netlink"
    procfs = select_backend(
        "linux",
        netlink_available=lambda: False,
        procfs_root=str(DATA / "proc"),
    )
    assert procfs.name == "procfs"
    assert isinstance(procfs, _procfs.ProcfsBackend)
    assert procfs.root == str(DATA / "proc")
    nothing = select_backend(
        "linux", netlink_available=lambda: False, procfs_root=str(DATA / "no-such-dir")
    )
    assert nothing.name == "unsupported"


def test_this_machine_uses_netlink() -> None:
    assert _netlink.probe()
    assert tcpclose.kernel.backend() == "netlink"


_AUDIT_SOCKETS = """
import sys
events = []
sys.addaudithook(lambda e, a: events.append(e) if e.startswith("socket.") else None)
import tcpclose, tcpclose.kernel, tcpclose.aio
print(sorted(set(events)), tcpclose._kernel._backend)
{after}
"""


def _python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    return done.stdout


def test_import_opens_no_socket() -> None:
    """Issue 17: importing tcpclose used to probe the kernel view (a sock_diag socket and
    a TCP listener bound on 127.0.0.1). The audit hook sees every socket made or bound:
    none at import; the first use of the kernel view makes the lookup socket, and only
    it (no TCP socket, no bind)."""
    after = """
events.clear()
print(tcpclose.kernel.backend(), sorted(set(events)))
st = tcpclose.lookup(("127.0.0.1", 1), ("127.0.0.1", 2))
print(st.state.name, sorted(set(events)))
"""
    lines = _python(_AUDIT_SOCKETS.format(after=after)).splitlines()
    assert lines == [
        "[] None",
        "netlink ['socket.__new__']",  # the detector works: it sees the lookup socket
        "CLOSED ['socket.__new__']",  # ... which the lookups then reuse
    ]


def test_probe_does_not_take_a_missing_tcp_diag_for_no_socket() -> None:
    """A kernel without a diag handler for the protocol answers an exact lookup with
    ENOENT, just as for a 4-tuple that has no socket (shown here with a protocol no
    kernel handles, asking for a socket that exists). The probe tells the two apart."""
    client, server = tcp_pair(socket.AF_INET)
    with client, server:
        _probe_tells(client)


def _probe_tells(client: socket.socket) -> None:
    four = parse_four_tuple(addr(client), addr(client, peer=True))
    chan = _netlink.channel()
    request = bytearray(encode_lookup_request(four))
    assert decode_reply(chan.buffer, chan.exchange(bytes(request))) is not None
    request[17] = 200  # sdiag_protocol: no handler
    assert decode_reply(chan.buffer, chan.exchange(bytes(request))) is None  # "no socket"
    assert _netlink.probe_protocol(200) is False
    assert _netlink.probe_protocol(socket.IPPROTO_TCP) is True
    size = chan.request(four)
    assert decode_lookup_state(chan.buffer, size, four).state is TcpState.ESTABLISHED


def test_without_sock_diag_the_first_use_falls_back_to_procfs() -> None:
    """The backend is chosen on first use; a failed probe (here: netlink sockets
    refused by the audit hook, as a seccomp profile would) gives the procfs view."""
    code = """
import sys
def deny(event, args):
    if event == "socket.__new__" and args[1] == 16:  # AF_NETLINK
        raise PermissionError(1, "netlink denied")
sys.addaudithook(deny)
import tcpclose.kernel
print(tcpclose._kernel._backend, tcpclose.kernel.backend())
"""
    assert _python(code).split() == ["None", "procfs"]


def test_unsupported_answers_unknown_and_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("tcpclose._kernel._backend", _unsupported.UnsupportedBackend())
    assert tcpclose.kernel.backend() == "unsupported"
    st = tcpclose.lookup(("127.0.0.1", 1), ("127.0.0.1", 2))
    assert st.state is TcpState.UNKNOWN
    assert st.source == "unsupported"
    assert not st.exists
    assert list(tcpclose.kernel.dump()) == []
    summary = tcpclose.kernel.summary()
    assert (summary.source, summary.total) == ("unsupported", 0)
    with pytest.raises(ValueError, match="local_addr"):  # bad input is still bad
        tcpclose.lookup(("localhost", 1), ("127.0.0.1", 2))


def test_procfs_backend_as_the_chosen_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole public API over the procfs backend (as when netlink is missing)."""
    monkeypatch.setattr("tcpclose._kernel._backend", _procfs.ProcfsBackend())
    client, server = tcp_pair(socket.AF_INET)
    with client, server:
        st = tcpclose.lookup(addr(client), addr(client, peer=True))
        assert (st.state, st.source) == (TcpState.ESTABLISHED, "procfs")
        ends = {addr(client), addr(server)}
        found = list(tcpclose.kernel.dump(port=addr(server)[1], family=socket.AF_INET))
        assert all(s.source == "procfs" for s in found)
        mine = [s for s in found if s.local in ends and s.peer in ends]
        assert [s.state for s in mine] == [TcpState.ESTABLISHED] * 2


# -- arguments ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "peer", "message"),
    [
        (("localhost", 80), ("127.0.0.1", 1), "literal IPv4 or IPv6"),
        (("127.0.0.1", 80), ("999.0.0.1", 1), "peer_addr"),
        (("127.0.0.1", 65536), ("127.0.0.1", 1), "port in 0..65535"),
        (("127.0.0.1", -1), ("127.0.0.1", 1), "port in 0..65535"),
        (("127.0.0.1", "80"), ("127.0.0.1", 1), "port"),
        (("127.0.0.1", True), ("127.0.0.1", 1), "port"),
        (("127.0.0.1",), ("127.0.0.1", 1), "got 1 items"),
        (("127.0.0.1", 80, 0), ("127.0.0.1", 1), "got 3 items"),
        ("127.0.0.1:80", ("127.0.0.1", 1), "tuple"),
        (None, ("127.0.0.1", 1), "tuple"),
        ((b"127.0.0.1", 80), ("127.0.0.1", 1), "host as a str"),
        (("::1", 80), ("127.0.0.1", 1), "different address families"),
        (("::1", 80, 0, -1), ("::1", 1), "scope_id"),
        (("::1", 80, 0, 2**32), ("::1", 1), "scope_id"),  # was struct.error (issue 20)
        (("fe80::1%4294967296", 80), ("fe80::2", 1), "interface index"),
        (("fe80::1%no-such-if", 80), ("fe80::2", 1), "unknown IPv6 scope"),
    ],
)
def test_malformed_addresses_are_value_errors(local: Any, peer: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tcpclose.lookup(local, peer)


def test_bad_scope_on_the_command_line_is_a_usage_error() -> None:
    """Issue 20: the CLI printed a struct.error traceback and exited 1 ("no socket")."""
    done = subprocess.run(
        [sys.executable, "-m", "tcpclose", "lookup", "[fe80::1%4294967296]:80", "[fe80::2]:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("cookie", [-1, 1 << 64, 1.5, True, "1"])
def test_bad_cookie_is_a_value_error(cookie: Any) -> None:
    with pytest.raises(ValueError, match="cookie"):
        tcpclose.lookup(("127.0.0.1", 1), ("127.0.0.1", 2), cookie=cookie)


def test_accepted_address_forms() -> None:
    v4 = parse_four_tuple(("127.0.0.1", 80), ["127.0.0.1", 81])
    assert v4.family == socket.AF_INET
    assert parse_four_tuple(("::ffff:127.0.0.1", 80, 0, 0), ("127.0.0.1", 81)) == v4
    v6 = parse_four_tuple(("[::1]", 80), ("::1", 81, 0, 0))
    assert (v6.family, v6.local, v6.scope_id) == (socket.AF_INET6, bytes(15) + b"\x01", 0)
    scoped = parse_four_tuple(("fe80::1%1", 80), ("fe80::2", 81))
    assert scoped.scope_id == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"states": [TcpState.CLOSED]}, "not a kernel TCP state"),
        ({"states": TcpState.UNKNOWN}, "not a kernel TCP state"),
        ({"states": ["TIME_WEIGHT"]}, "accepted: ESTABLISHED"),
        ({"states": [6]}, "not a kernel TCP state"),
        ({"port": 70000}, "port"),
        ({"port": "80"}, "port"),
        ({"family": socket.AF_UNIX}, "family"),
    ],
)
def test_bad_dump_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        tcpclose.kernel.dump(**kwargs)
    with pytest.raises(ValueError, match=message):
        tcpclose.kernel.summary(**kwargs)


# -- dump and summary, live ---------------------------------------------------------------------


def wait_for_state(local: tuple[str, int], peer: tuple[str, int], state: TcpState) -> None:
    wait_until(lambda: tcpclose.lookup(local, peer).state is state, message=state.name)


@pytest.fixture
def scene(family: int) -> Iterator[dict[str, Any]]:
    """A listener with one ESTABLISHED pair, one TIME_WAIT (client side) and one
    CLOSE_WAIT/FIN_WAIT2 pair on its port."""
    lst = listener(family)
    estab = tcp_pair(family, lst)
    c, s = tcp_pair(family, lst)
    tw_local, tw_peer = addr(c), addr(c, peer=True)
    c.close()
    s.close()
    half_c, half_s = tcp_pair(family, lst)
    half_local, half_peer = addr(half_c), addr(half_c, peer=True)
    half_c.close()
    for local, peer, state in (
        (tw_local, tw_peer, TcpState.TIME_WAIT),
        (half_local, half_peer, TcpState.FIN_WAIT2),
    ):
        wait_for_state(local, peer, state)
    yield {
        "ends": {addr(lst), addr(estab[0]), tw_local, half_local},
        "port": addr(lst)[1],
        "family": family,
        "time_wait": (tw_local, tw_peer),
        "fin_wait2": half_local,
    }
    for sock in (*estab, half_s, lst):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def _key(st: KernelState) -> tuple[Any, ...]:
    return (st.state, st.local, st.peer)


def ours(scene: dict[str, Any], states: Iterable[KernelState]) -> list[KernelState]:
    """The scene's sockets (other tests' TIME_WAIT may share the port number)."""
    known = scene["ends"]
    return [
        s
        for s in states
        if s.local in known and s.peer is not None and (s.peer in known or s.peer[1] == 0)
    ]


def test_dump_filters_port_in_the_kernel(scene: dict[str, Any]) -> None:
    port, family = scene["port"], scene["family"]
    found = list(tcpclose.kernel.dump(port=port, family=family))
    assert all(port in (s.local[1], s.peer[1]) for s in found if s.local and s.peer)
    mine = ours(scene, found)
    assert sorted(s.state.name for s in mine) == sorted(
        ["LISTEN", "ESTABLISHED", "ESTABLISHED", "TIME_WAIT", "FIN_WAIT2", "CLOSE_WAIT"]
    )
    tw = [s for s in mine if s.state is TcpState.TIME_WAIT]
    assert (tw[0].local, tw[0].peer) == scene["time_wait"]
    # The same sockets through the procfs backend, filtered in Python.
    procfs = _procfs.ProcfsBackend().dump(DEFAULT_DUMP_STATES, port, (scene["family"],))
    assert sorted(map(_key, ours(scene, procfs))) == sorted(map(_key, mine))


def test_dump_filters_states_in_the_kernel(scene: dict[str, Any]) -> None:
    port = scene["port"]
    only_tw = list(tcpclose.kernel.dump(states=[TcpState.TIME_WAIT], port=port))
    assert {s.state for s in only_tw} == {TcpState.TIME_WAIT}
    assert [(s.local, s.peer) for s in ours(scene, only_tw)] == [scene["time_wait"]]
    by_name = list(tcpclose.kernel.dump(states="fin-wait-2", port=port))
    assert [s.local for s in ours(scene, by_name)] == [scene["fin_wait2"]]
    other_family = socket.AF_INET6 if scene["family"] == socket.AF_INET else socket.AF_INET
    other = list(tcpclose.kernel.dump(port=port, family=other_family))
    assert all(s.local and (":" in s.local[0]) == (other_family == socket.AF_INET6) for s in other)


def test_summary_counts(scene: dict[str, Any]) -> None:
    summary = tcpclose.kernel.summary(port=scene["port"], family=scene["family"])
    assert isinstance(summary, Summary)
    assert summary.source == "netlink"
    assert summary.total == sum(summary.by_state.values()) >= 6
    assert summary.count(TcpState.ESTABLISHED) >= 2
    assert summary.count(TcpState.TIME_WAIT) >= 1
    tw_local, tw_peer = scene["time_wait"]
    assert summary.time_wait_by_local_port[tw_local[1]] >= 1
    assert summary.time_wait_by_destination[tw_peer] >= 1
    data = summary.as_dict()
    assert data["by_state"] == {s.name: n for s, n in summary.by_state.items()}
    with pytest.raises(TypeError):
        summary.by_state[TcpState.LISTEN] = 5  # type: ignore[index]


def test_summary_counts_what_dump_returns(scene: dict[str, Any]) -> None:
    """The netlink summary counts the kernel's answer without decoding each socket; it
    must equal counting dump()'s states."""
    for kwargs in ({}, {"port": scene["port"]}, {"states": ["TIME_WAIT"]}):
        for _ in range(5):  # sockets come and go between the two dumps: retry
            counted = tcpclose.kernel.summary(**kwargs)
            decoded = Summary.from_states(tcpclose.kernel.dump(**kwargs), "netlink")
            if counted == decoded:
                break
        assert counted == decoded, kwargs


def client_ports(count: int) -> range:
    """``count`` port numbers just below the ephemeral range: TIME_WAIT left with these
    as their peer port cannot share a number with a later test's listener (``dump(port=)``
    matches either end)."""
    with open("/proc/sys/net/ipv4/ip_local_port_range", encoding="ascii") as f:
        first_ephemeral = int(f.read().split()[0])
    return range(first_ephemeral - count, first_ephemeral)


def test_summary_of_many_time_wait_equals_counting_dump_in_order(family: int) -> None:
    """Issue 17: the counting path counts datagrams full of TIME_WAIT without decoding a
    socket (ports and peers read as one number each). On real sockets, with TIME_WAIT on
    two listening ports (the servers close first) and peers from two hosts where the
    family has them, half of the peers connected to both listeners, it gives exactly
    what counting dump()'s states gives: the same counts, in the same order (largest
    first, ties in first-seen order)."""
    listeners = [listener(family), listener(family)]
    client_hosts = ["127.0.0.1", "127.0.0.2"] if family == socket.AF_INET else ["::1"]
    try:
        for j, client_port in enumerate(client_ports(400)):
            for lst in listeners[: 2 - j % 2]:  # even ports: to both listeners
                client = socket.socket(family, socket.SOCK_STREAM)
                try:
                    client.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    client.bind((client_hosts[j % len(client_hosts)], client_port))
                    client.connect(lst.getsockname()[:2])
                    server, _ = lst.accept()
                    server.close()  # closes first: its end goes to TIME_WAIT
                except OSError as exc:  # the port is taken: one peer fewer
                    if exc.errno not in (errno.EADDRINUSE, errno.EADDRNOTAVAIL):
                        raise
                finally:
                    client.close()
        ports = {addr(lst)[1] for lst in listeners}
        wait_until(
            lambda: (
                sum(
                    n
                    for port, n in tcpclose.kernel.summary(
                        states="TIME_WAIT", family=family
                    ).time_wait_by_local_port.items()
                    if port in ports
                )
                >= 500  # of 600: a client port taken elsewhere is skipped
            ),
            message="500 TIME_WAIT",
        )
        for kwargs in ({"family": family}, {"states": "TIME_WAIT", "family": family}):
            for _ in range(5):  # sockets come and go between the two dumps: retry
                counted = in_order(tcpclose.kernel.summary(**kwargs))
                decoded = in_order(Summary.from_states(tcpclose.kernel.dump(**kwargs), "netlink"))
                if counted == decoded:
                    break
            assert counted == decoded, kwargs
            assert sum(n for port, n in counted[3] if port in ports) >= 500
            assert {n for _, n in counted[4]} >= {1, 2}  # ties to keep in order, both counts
    finally:
        for lst in listeners:
            lst.close()


def test_summary_from_states_counts_and_orders() -> None:
    def tw(local_port: int, peer: tuple[str, int]) -> KernelState:
        return KernelState(TcpState.TIME_WAIT, "netlink", ("10.0.0.1", local_port), peer)

    dest_a, dest_b = ("10.0.0.2", 80), ("10.0.0.3", 443)
    states = [
        tw(40000, dest_a),
        tw(40001, dest_a),
        tw(40002, dest_b),
        tw(40000, dest_b),
        KernelState(TcpState.ESTABLISHED, "netlink", ("10.0.0.1", 1), dest_a),
    ]
    summary = Summary.from_states(states, "netlink")
    assert summary.total == 5
    assert dict(summary.by_state) == {TcpState.TIME_WAIT: 4, TcpState.ESTABLISHED: 1}
    assert next(iter(summary.time_wait_by_local_port.items())) == (40000, 2)
    assert dict(summary.time_wait_by_destination) == {dest_a: 2, dest_b: 2}
    assert summary.count(TcpState.LISTEN) == 0
    assert str(summary) == "5 TCP sockets: TIME_WAIT 4, ESTABLISHED 1"
    data = summary.as_dict(top=1)
    assert data["time_wait_by_local_port"] == {"40000": 2}
    assert data["time_wait_by_destination"] == [{"host": "10.0.0.2", "port": 80, "count": 2}]


def test_dump_everything_is_consistent_with_lookup(scene: dict[str, Any]) -> None:
    everything = list(tcpclose.kernel.dump())
    assert len(everything) >= 6
    assert all(st.state in DEFAULT_DUMP_STATES for st in everything)
    tw_local, tw_peer = scene["time_wait"]
    (tw,) = [s for s in everything if s.local == tw_local and s.peer == tw_peer]
    looked_up = tcpclose.lookup(tw_local, tw_peer)
    assert (tw.state, tw.cookie) == (looked_up.state, looked_up.cookie)


# -- the public module ---------------------------------------------------------------------------


def test_public_module_exports_every_name_typed_and_documented() -> None:
    module = tcpclose.kernel
    assert isinstance(module.__all__, tuple)
    assert sorted(module.__all__) == list(module.__all__)
    for name in module.__all__:
        obj = getattr(module, name)
        if callable(obj) and not isinstance(obj, type):
            assert inspect.getdoc(obj), name
            assert "return" in inspect.get_annotations(obj), name
        elif isinstance(obj, type):
            assert inspect.getdoc(obj), name
    for name in (
        "lookup",
        "dump",
        "summary",
        "Summary",
        "tcp_info",
        "queues",
        "TcpInfo",
        "KernelState",
        "TcpState",
        "TimerKind",
        "Queues",
        "backend",
        "socket_cookie",
    ):
        assert name in module.__all__, name
    for name in ("lookup", "tcp_info", "queues", "TcpInfo"):
        assert name in tcpclose.__all__
        assert getattr(tcpclose, name) is getattr(module, name)
