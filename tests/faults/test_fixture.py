"""The two-host fixture and each of its faults, shown with plain sockets (issue 9).

Also the problems tcpclose exists for, reproduced across two hosts without it: a plain
``close()`` with unread data resets the peer and loses part of its response, and a plain
graceful shutdown waits for ever on a silent or dead peer.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest

from tests._netns import (
    NAME_PREFIX,
    TwoHosts,
    _setns,
    create_two_hosts,
    current_namespace_inode,
    send_queue_bytes,
    sweep_stale_namespaces,
    total_retransmits,
    unread_bytes,
)
from tests._support import addr, recv_exactly, ss_lookup, wait_until

pytestmark = [pytest.mark.netns, pytest.mark.timeout(30)]

KIB = 1024


# -- helpers ----------------------------------------------------------------------------------


def netns_list() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]


def read_until_end(sock: socket.socket, timeout: float = 5.0) -> tuple[int, OSError | None]:
    """Read until EOF or an error: ``(bytes received, the error or None for EOF)``."""
    deadline = time.monotonic() + timeout
    total = 0
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no EOF or error within {timeout}s ({total} bytes read)")
        sock.settimeout(left)
        try:
            chunk = sock.recv(256 * KIB)
        except TimeoutError:
            continue
        except OSError as exc:
            return total, exc
        if not chunk:
            return total, None
        total += len(chunk)


def fill_send_buffer(sock: socket.socket, limit: int = 64 * 1024 * KIB) -> int:
    """Write without blocking until the kernel takes no more; return the bytes taken."""
    sock.setblocking(False)
    chunk = b"r" * (64 * KIB)
    sent = 0
    try:
        while sent < limit:
            try:
                sent += sock.send(chunk)
            except BlockingIOError:
                break
    finally:
        sock.setblocking(True)
    return sent


def abort(sock: socket.socket) -> None:
    """Close with RST (``SO_LINGER {1, 0}``)."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def link_flags(netns: str, ifname: str) -> str:
    """The flags ``ip link`` shows for an interface, e.g. ``BROADCAST,MULTICAST,UP,LOWER_UP``."""
    out = subprocess.run(
        ["ip", "-n", netns, "-o", "link", "show", ifname],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.split("<", 1)[1].split(">", 1)[0]


def in_namespace_fd(fd: int, fn: Callable[[], str]) -> str:
    """Run ``fn`` in a fresh thread that entered the namespace ``fd`` refers to."""
    result: list[str] = []
    errors: list[BaseException] = []

    def main() -> None:
        try:
            _setns(fd)
            result.append(fn())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=main, daemon=True)
    thread.start()
    thread.join(10)
    if errors:
        raise errors[0]
    assert result, "namespace thread did not finish"
    return result[0]


# -- the fixture itself -----------------------------------------------------------------------


def test_hosts_are_separate_named_namespaces(two_hosts: TwoHosts) -> None:
    server, client = two_hosts.hosts
    listed = netns_list()
    for host in two_hosts.hosts:
        assert host.netns in listed
        assert host.netns.startswith(f"{NAME_PREFIX}-{os.getpid()}-")
    root = current_namespace_inode()
    inodes = {server.call(current_namespace_inode), client.call(current_namespace_inode)}
    assert len(inodes) == 2
    assert root not in inodes
    assert os.stat(f"/run/netns/{server.netns}").st_ino == server.call(current_namespace_inode)


def test_each_host_has_loopback_and_its_veth_address(two_hosts: TwoHosts) -> None:
    for host in two_hosts.hosts:
        text = host.run(["ip", "-o", "addr", "show"]).stdout
        assert "127.0.0.1/8" in text
        assert f"{host.ipv4}/30" in text
        if two_hosts.has_ipv6:
            (line,) = [x for x in text.splitlines() if f"{host.ipv6}/64" in x]
            assert "tentative" not in line  # usable at once: no duplicate address detection
        # loopback works inside the namespace
        lst = host.listen(socket.AF_INET)
        lst.close()
        with host.call(socket.socket) as s:
            s.bind(("127.0.0.1", 0))


def test_connect_across_the_veth(two_hosts: TwoHosts, netns_family: int) -> None:
    client, server = two_hosts.connect_pair(netns_family)
    assert addr(client)[0] == two_hosts.client.address(netns_family)
    assert addr(client, peer=True)[0] == two_hosts.server.address(netns_family)
    client.sendall(b"ping")
    assert recv_exactly(server, 4) == b"ping"
    server.sendall(b"pong")
    assert recv_exactly(client, 4) == b"pong"
    assert two_hosts.client.tcp_state(addr(client), addr(server)) == "ESTAB"
    assert two_hosts.server.tcp_state(addr(server), addr(client)) == "ESTAB"
    # the root namespace never sees these connections
    assert ss_lookup(addr(client), addr(server)) is None


def test_namespace_addresses_do_not_exist_in_the_root_namespace(two_hosts: TwoHosts) -> None:
    with socket.socket() as s, pytest.raises(OSError, match="assign requested address") as info:
        s.bind((two_hosts.server.ipv4, 0))
    assert info.value.errno == errno.EADDRNOTAVAIL


def test_entered_moves_only_the_block(two_hosts: TwoHosts) -> None:
    root = current_namespace_inode()
    with two_hosts.server.entered():
        assert current_namespace_inode() != root
        with socket.socket() as s:
            s.bind((two_hosts.server.ipv4, 0))  # only exists in the server namespace
            s.listen()
            client = two_hosts.client.connect(s.getsockname())
            peer, _ = s.accept()
            peer.close()
            client.close()
    assert current_namespace_inode() == root


def test_run_and_sysctl_are_scoped_to_the_host(two_hosts: TwoHosts) -> None:
    key = "net.ipv4.tcp_fin_timeout"
    with open("/proc/sys/net/ipv4/tcp_fin_timeout") as f:
        root_value = f.read().strip()
    new = "17" if root_value != "17" else "18"
    assert two_hosts.server.sysctl(key, new) == new
    assert two_hosts.server.run(["cat", "/proc/sys/net/ipv4/tcp_fin_timeout"]).stdout.strip() == new
    assert two_hosts.client.sysctl(key) != new
    with open("/proc/sys/net/ipv4/tcp_fin_timeout") as f:
        assert f.read().strip() == root_value


def test_popen_runs_a_process_on_a_host(two_hosts: TwoHosts) -> None:
    lst = two_hosts.server.listen()
    host, port = lst.getsockname()
    script = (
        "import socket, sys\n"
        f"with socket.create_connection(({host!r}, {port}), timeout=5) as s:\n"
        "    s.sendall(b'from a process')\n"
    )
    proc = two_hosts.client.popen([sys.executable, "-c", script])
    lst.settimeout(5)
    conn, (peer_host, _) = lst.accept()
    with conn:
        assert peer_host == two_hosts.client.ipv4
        assert recv_exactly(conn, 14) == b"from a process"
    _, err = proc.communicate(timeout=5)
    assert proc.returncode == 0, err


@pytest.mark.usefixtures("needs_netns")
def test_popen_processes_are_stopped_at_teardown() -> None:
    with create_two_hosts() as hosts:
        proc = hosts.server.popen(["cat"], stdin=subprocess.PIPE)  # waits for input for ever
        assert proc.poll() is None
    assert proc.returncode is not None
    assert proc.stdout is not None
    assert proc.stdout.closed


def test_asyncio_uses_namespace_sockets(two_hosts: TwoHosts, loop_name: str) -> None:
    async def main() -> bytes:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readexactly(5))
            await writer.drain()
            writer.close()
            await writer.wait_closed()

        lst = two_hosts.server.listen()
        lst.setblocking(False)
        server = await asyncio.start_server(echo, sock=lst)
        try:
            sock = two_hosts.client.socket()
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, lst.getsockname())
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"hello")
            await writer.drain()
            data = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            await writer.wait_closed()
            return data
        finally:
            server.close()
            await server.wait_closed()

    if loop_name == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    else:
        factory = asyncio.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        assert runner.run(main()) == b"hello"


@pytest.mark.usefixtures("needs_netns")
def test_teardown_on_failure_leaves_nothing() -> None:
    """Namespaces, veth, threads and sockets go even when the test body raises."""
    names: tuple[str, ...] = ()
    sockets: list[socket.socket] = []
    pinned: list[int] = []

    def failing_test() -> None:
        nonlocal names
        with create_two_hosts() as hosts:
            names = hosts.namespaces
            sockets.append(hosts.client.socket())
            # Hold the client namespace open past teardown, to look inside it afterwards.
            pinned.append(os.open(f"/run/netns/{hosts.client.netns}", os.O_RDONLY))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        failing_test()
    (sock,), (pinned_fd,) = sockets, pinned
    try:
        assert names
        assert not set(names) & set(netns_list())
        assert sock.fileno() == -1
        assert not [t for t in threading.enumerate() if t.name.startswith("netns:")]

        def veths() -> str:
            proc = subprocess.run(
                ["ip", "-o", "link", "show", "type", "veth"], capture_output=True, text=True
            )
            return proc.stdout + proc.stderr

        # The namespace still exists (we pin it) but holds no veth any more.
        assert in_namespace_fd(pinned_fd, veths).strip() == ""
    finally:
        os.close(pinned_fd)


def test_stale_namespaces_of_dead_runs_are_swept(two_hosts: TwoHosts) -> None:
    with open("/proc/sys/kernel/pid_max") as f:
        dead_pid = int(f.read()) + 1  # no process can have this pid
    stale = f"{NAME_PREFIX}-{dead_pid}-1-server"
    subprocess.run(["ip", "netns", "add", stale], check=True)
    try:
        removed = sweep_stale_namespaces()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, check=False)
    assert stale in removed
    assert stale not in netns_list()
    # a live run's namespaces (ours) are left alone
    assert two_hosts.server.netns in netns_list()


# -- packet faults ----------------------------------------------------------------------------


@pytest.mark.usefixtures("needs_nft")
def test_drop_all_leaves_data_unacknowledged(two_hosts: TwoHosts) -> None:
    client, server = two_hosts.connect_pair()
    dead = two_hosts.server.faults.drop_all()
    client.sendall(b"x" * 1000)
    wait_until(lambda: total_retransmits(client) >= 1, 3, message="a retransmission")
    assert send_queue_bytes(client) == 1000
    assert unread_bytes(server) == 0
    assert dead.packets() >= 2  # the first transmission and at least one retransmission
    dead.remove()
    wait_until(lambda: send_queue_bytes(client) == 0, 5, message="the data acknowledged")
    assert recv_exactly(server, 1000) == b"x" * 1000


@pytest.mark.usefixtures("needs_nft")
def test_drop_fin_keeps_peer_established(two_hosts: TwoHosts, netns_family: int) -> None:
    client, server = two_hosts.connect_pair(netns_family)
    here, there = addr(client), addr(server)
    no_fin = two_hosts.server.faults.drop_fin()  # the server never receives a FIN
    client.close()
    wait_until(lambda: no_fin.packets() >= 2, 3, message="the FIN and a retransmission dropped")
    ours = two_hosts.client.ss(here, there)
    assert ours is not None
    assert ours.state == "FIN-WAIT-1"
    assert ours.timer == "on"  # lost on the wire: the retransmission timer runs
    assert two_hosts.server.tcp_state(there, here) == "ESTAB"
    no_fin.remove()
    # the retransmitted FIN now gets through
    two_hosts.server.wait_state(there, here, "CLOSE-WAIT")
    two_hosts.client.wait_state(here, there, "FIN-WAIT-2")
    server.close()
    two_hosts.client.wait_state(here, there, "TIME-WAIT")
    two_hosts.server.wait_state(there, here, None)


@pytest.mark.usefixtures("needs_nft")
def test_drop_first_fin_only_then_retransmission_closes(two_hosts: TwoHosts) -> None:
    first_fin = two_hosts.server.faults.drop_first_fin()
    flows = [two_hosts.connect_pair() for _ in range(2)]
    for n, (client, server) in enumerate(flows, start=1):
        here, there = addr(client), addr(server)
        client.shutdown(socket.SHUT_WR)
        two_hosts.server.wait_state(there, here, "CLOSE-WAIT")
        two_hosts.client.wait_state(here, there, "FIN-WAIT-2")
        assert total_retransmits(client) >= 1  # the FIN went out twice
        assert first_fin.packets() == n  # one drop per connection, not more
        server.close()
        two_hosts.client.wait_state(here, there, "TIME-WAIT")
        two_hosts.server.wait_state(there, here, None)
        client.close()


@pytest.mark.usefixtures("needs_nft")
def test_drop_final_ack_leaves_peer_in_last_ack_once(two_hosts: TwoHosts) -> None:
    client, server = two_hosts.connect_pair()
    here, there = addr(client), addr(server)
    final_ack = two_hosts.server.faults.drop_final_ack()  # (it must see the client's FIN)
    client.shutdown(socket.SHUT_WR)  # the client closes first ...
    two_hosts.server.wait_state(there, here, "CLOSE-WAIT")
    server.close()  # ... the server second: its FIN's ACK is lost once
    wait_until(lambda: final_ack.packets() >= 1, message="the final ACK dropped")
    assert two_hosts.server.tcp_state(there, here) == "LAST-ACK"  # its retransmit is ~200 ms off
    two_hosts.client.wait_state(here, there, "TIME-WAIT")
    # the server retransmits its FIN; the client's second ACK gets through
    two_hosts.server.wait_state(there, here, None)
    assert final_ack.packets() == 1
    client.close()


@pytest.mark.usefixtures("needs_nft")
def test_drop_rst_keeps_peer_established(two_hosts: TwoHosts) -> None:
    client, server = two_hosts.connect_pair()
    here, there = addr(client), addr(server)
    no_rst = two_hosts.server.faults.drop_rst()
    abort(client)
    wait_until(lambda: no_rst.packets() >= 1, message="the RST dropped")
    assert two_hosts.client.tcp_state(here, there) is None  # gone here ...
    assert two_hosts.server.tcp_state(there, here) == "ESTAB"  # ... the peer never heard
    # Data to the vanished socket draws another RST from the client kernel: dropped too.
    server.sendall(b"anyone?")
    wait_until(lambda: no_rst.packets() >= 2, message="the answering RST dropped")
    no_rst.remove()
    server.settimeout(5)
    with pytest.raises(ConnectionResetError):
        server.recv(1)  # the next retransmission draws an RST that gets through


@pytest.mark.usefixtures("needs_nft")
def test_drop_pure_acks_keeps_our_data_unacknowledged(two_hosts: TwoHosts) -> None:
    client, server = two_hosts.connect_pair()
    no_acks = two_hosts.client.faults.drop_pure_acks()  # the peer's ACKs never reach us
    payload = os.urandom(16 * KIB)
    client.sendall(payload)
    wait_until(lambda: unread_bytes(server) > 0, message="data arriving at the peer")
    wait_until(lambda: total_retransmits(client) >= 1, 3, message="a retransmission")
    assert send_queue_bytes(client) == len(payload)  # it arrived, but none is acknowledged
    assert no_acks.packets() >= 1
    no_acks.remove()
    wait_until(lambda: send_queue_bytes(client) == 0, 5, message="the data acknowledged")
    assert recv_exactly(server, len(payload)) == payload


@pytest.mark.usefixtures("needs_nft")
def test_nft_fault_is_removed_cleanly(two_hosts: TwoHosts) -> None:
    faults = two_hosts.server.faults
    with faults.drop_all() as everything, faults.drop_fin() as fin:
        assert len(everything.rules) == 2  # input and output
        assert fin.counts().packets == 0  # no TCP traffic yet
        handles = {h for _, h in (*everything.rules, *fin.rules)}
        assert handles <= set(faults.counters())
    assert not handles & set(faults.counters())
    with pytest.raises(RuntimeError, match="removed"):
        fin.counts()
    fin.remove()  # idempotent
    # traffic flows again
    client, server = two_hosts.connect_pair()
    client.sendall(b"ok")
    assert recv_exactly(server, 2) == b"ok"


@pytest.mark.usefixtures("needs_nft")
def test_output_drop_is_a_local_send_failure(two_hosts: TwoHosts) -> None:
    """Dropping our own outgoing FIN is not a loss to our TCP: no retransmission counted."""
    client, server = two_hosts.connect_pair()
    here, there = addr(client), addr(server)
    fin_refused = two_hosts.client.faults.drop_fin(direction="output")
    client.shutdown(socket.SHUT_WR)
    wait_until(lambda: fin_refused.packets() >= 1, message="the FIN refused")
    ours = two_hosts.client.ss(here, there)
    assert ours is not None
    assert ours.state == "FIN-WAIT-1"
    assert ours.timer == "persist"  # the FIN waits to be sent, under the probe timer
    assert total_retransmits(client) == 0
    fin_refused.remove()
    two_hosts.server.wait_state(there, here, "CLOSE-WAIT")


# -- link faults --------------------------------------------------------------------------------


def test_link_down_holds_data_until_link_up(two_hosts: TwoHosts, netns_family: int) -> None:
    client, server = two_hosts.connect_pair(netns_family)
    with two_hosts.client.link_down():
        assert "LOWER_UP" not in link_flags(two_hosts.server.netns, "veth-server")
        client.sendall(b"y" * 1000)
        assert send_queue_bytes(client) == 1000
        assert unread_bytes(server) == 0
    # addresses (IPv6 too) survive down/up, and the queued data is delivered
    assert recv_exactly(server, 1000, timeout=8) == b"y" * 1000
    wait_until(lambda: send_queue_bytes(client) == 0, 5, message="the data acknowledged")


def test_vanished_peer_never_answers(two_hosts: TwoHosts) -> None:
    client, server = two_hosts.connect_pair()
    here, there = addr(client), addr(server)
    gone = two_hosts.server.netns
    two_hosts.vanish(two_hosts.server)
    assert gone not in netns_list()
    assert server.fileno() == -1
    with pytest.raises(RuntimeError, match="vanished"):
        two_hosts.server.socket()
    # our side keeps its link and carrier ...
    assert "LOWER_UP" in link_flags(two_hosts.client.netns, "veth-client")
    # ... and its data goes out and is never answered: no ACK, no RST
    client.sendall(b"z" * 1000)
    wait_until(lambda: total_retransmits(client) >= 1, 3, message="a retransmission")
    assert send_queue_bytes(client) == 1000
    assert two_hosts.client.tcp_state(here, there) == "ESTAB"
    client.settimeout(0.3)
    with pytest.raises(TimeoutError):
        client.recv(1)


@pytest.mark.usefixtures("needs_tc")
def test_slow_link_slows_a_bulk_transfer(two_hosts: TwoHosts) -> None:
    client, server = two_hosts.connect_pair()
    size = 1024 * KIB
    payload = b"b" * size

    def timed_transfer() -> float:
        sender = threading.Thread(target=client.sendall, args=(payload,), daemon=True)
        start = time.monotonic()
        sender.start()
        recv_exactly(server, size, timeout=10)
        elapsed = time.monotonic() - start
        sender.join(5)
        assert not sender.is_alive()
        return elapsed

    fast = timed_transfer()
    rate_bps = 16_000_000
    with two_hosts.client.slow_link(rate="16mbit", burst="32kb", latency="400ms") as slow:
        shaped = timed_transfer()
        stats = slow.stats()
    floor = (size - 32 * KIB) * 8 / rate_bps  # what the token bucket allows at best
    assert shaped >= 0.9 * floor, (shaped, floor)
    assert shaped >= 5 * fast, (shaped, fast)
    assert stats.sent_bytes >= size
    assert stats.overlimits > 0
    # removed: fast again
    assert timed_transfer() < shaped / 5


# -- the problems, without the library ------------------------------------------------------------


def _serve_large_response(
    two_hosts: TwoHosts, read_whole_request: bool
) -> tuple[int, int, OSError | None]:
    """Client posts a request with a body; server answers a large response and close()s.

    Returns (bytes the server's kernel accepted, bytes the client received, the client's
    error or None for a clean EOF).
    """
    client, server = two_hosts.connect_pair()
    head, body = b"POST / HTTP/1.1\r\ncontent-length: 65536\r\n\r\n", b"q" * (64 * KIB)
    client.sendall(head + body)
    recv_exactly(server, len(head))
    if read_whole_request:
        recv_exactly(server, len(body))
    else:
        wait_until(lambda: unread_bytes(server) == len(body), message="the body queued unread")
    # The client is not reading yet: the response fills its window and our send queue.
    sent = fill_send_buffer(server)
    assert send_queue_bytes(server) > 0
    server.close()
    received, error = read_until_end(client)
    return sent, received, error


def test_plain_close_with_unread_data_resets_peer_and_loses_response(two_hosts: TwoHosts) -> None:
    """The problem exists: unread request data turns close() into RST; the response is cut."""
    sent, received, error = _serve_large_response(two_hosts, read_whole_request=False)
    assert isinstance(error, ConnectionResetError)
    assert received < sent


def test_plain_close_after_reading_everything_delivers_all(two_hosts: TwoHosts) -> None:
    """The control: with nothing unread, close() sends FIN and every byte arrives."""
    sent, received, error = _serve_large_response(two_hosts, read_whole_request=True)
    assert error is None
    assert received == sent


def test_silent_peer_keeps_graceful_shutdown_waiting(two_hosts: TwoHosts) -> None:
    """The problem exists: shutdown(SHUT_WR) then read waits for ever on a silent peer."""
    client, server = two_hosts.connect_pair()
    here, there = addr(client), addr(server)
    client.shutdown(socket.SHUT_WR)
    two_hosts.server.wait_state(there, here, "CLOSE-WAIT")  # the peer got our FIN, says nothing
    entry = two_hosts.client.wait_state(here, there, "FIN-WAIT-2")
    assert entry is not None
    assert entry.timer is None  # with our fd open, no kernel timer will end this
    client.settimeout(0.5)
    with pytest.raises(TimeoutError):
        client.recv(4096)  # without the timeout: for ever
    assert two_hosts.client.tcp_state(here, there) == "FIN-WAIT-2"
    assert two_hosts.server.tcp_state(there, here) == "CLOSE-WAIT"


@pytest.mark.usefixtures("needs_nft")
def test_dead_peer_keeps_graceful_shutdown_waiting(two_hosts: TwoHosts) -> None:
    """With the peer dead, our FIN is never acknowledged and the read never returns."""
    client, server = two_hosts.connect_pair()
    here, there = addr(client), addr(server)
    dead = two_hosts.server.faults.drop_all()
    client.shutdown(socket.SHUT_WR)
    wait_until(lambda: total_retransmits(client) >= 1, 3, message="the FIN retransmitted")
    assert two_hosts.client.tcp_state(here, there) == "FIN-WAIT-1"
    client.settimeout(0.5)
    with pytest.raises(TimeoutError):
        client.recv(4096)
    assert two_hosts.client.tcp_state(here, there) == "FIN-WAIT-1"
    assert dead.packets() >= 2
