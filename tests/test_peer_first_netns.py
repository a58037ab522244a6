"""``peer-first`` across two network namespaces joined by veth (issue 14).

Prompt clients (a Python client that closes as soon as it has a Content-Length
response) on another "host", through a rate-limited link (tbf: our 20 KB response takes
about 20 ms to cross it, so the plan waits for its ACK before the grace starts): they
close first on every connection, and TIME_WAIT stays on their side, on both loops.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Iterator

import pytest

import tcpclose
import tcpclose.aio
import tcpclose.kernel
from tcpclose import CloseReport, TcpState
from tests._aio_support import payload, run, wait_for
from tests._netns import Host, TwoHosts, create_two_hosts, tc_unavailable

pytestmark = pytest.mark.netns

RECOMMENDED = "peer-first timeout=5s grace=50ms fallback=graceful"
BODY = payload(20_000, seed=142)
N = 200


@pytest.fixture
def two_hosts() -> Iterator[TwoHosts]:
    reason = tc_unavailable()
    if reason is not None:
        pytest.skip(reason)
    with create_two_hosts(ipv6=False) as hosts:
        yield hosts


async def _handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(BODY)
    writer.write(head + BODY)


def _prompt_clients(client: Host, address: tuple[str, int]) -> int:
    """N connections from ``client`` that close once the response is complete; errors."""
    errors = 0
    for _ in range(N):
        sock = client.connect(address, timeout=10)
        with sock:
            sock.settimeout(10)
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            data = b""
            while not data.endswith(BODY):
                try:
                    chunk = sock.recv(65536)
                except OSError:
                    break
                if not chunk:
                    break
                data += chunk
            errors += not data.endswith(BODY)
    return errors


def _time_wait(port: int) -> tuple[int, int]:
    """TIME_WAIT entries for ``port``: (local port is ``port``, peer port is ``port``)."""
    here = there = 0
    for state in tcpclose.kernel.dump(states=TcpState.TIME_WAIT):
        if state.local is not None and state.local[1] == port:
            here += 1
        elif state.peer is not None and state.peer[1] == port:
            there += 1
    return here, there


def test_prompt_clients_across_veth(two_hosts: TwoHosts, loop_name: str) -> None:
    server_host, client_host = two_hosts.server, two_hosts.client
    address = ("", 0)

    async def main() -> list[CloseReport]:
        nonlocal address
        reports: list[CloseReport] = []
        listener = server_host.listen(socket.AF_INET)
        address = listener.getsockname()[:2]
        server = await tcpclose.aio.start_server(
            _handle, sock=listener, close_policy=RECOMMENDED, on_close=reports.append
        )
        async with server:
            errors = await asyncio.to_thread(_prompt_clients, client_host, address)
            assert errors == 0
            await wait_for(lambda: len(reports) >= N, 20, "the reports")
        return reports

    with server_host.slow_link(rate="8mbit", burst="32kb", latency="100ms"):
        reports = run(loop_name, main, timeout=120)
    here, _ = server_host.call(_time_wait, address[1])
    _, there = client_host.call(_time_wait, address[1])
    assert here == 0
    assert there == N
    assert all(r.peer_closed_first and r.fallback is None for r in reports)
    assert sum(r.rst_sent for r in reports) == 0
