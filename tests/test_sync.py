"""The sync driver's own surface: socket modes, SO_LINGER on a non-blocking socket,
fds and ``TransportSocket``, ``closing()``, bad input, the warning's line, fd leaks,
debug logging. Real loopback connections, kernel read back.

The close behaviours every driver shares (cooperating, silent, flooding, trickling
and resetting peers, the RST trap, peer-first's fallbacks, abort, the report) are in
``tests/test_conformance.py``, which runs them through this driver too.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time
import warnings

import pytest

import tcpclose
from tcpclose import CloseMode, ClosePolicy, Outcome, PolicyError
from tcpclose._report import format_address
from tests._support import (
    Peer,
    addr,
    fill_send_queue,
    listener,
    open_fd_count,
    tcp_pair,
    wait_until,
)


def read_all(sock: socket.socket, limit: int | None = None) -> tuple[bytes, str]:
    """Read until EOF (or ``limit`` bytes); return the data and how it ended."""
    chunks: list[bytes] = []
    total = 0
    while limit is None or total < limit:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return b"".join(chunks), "reset"
        if not chunk:
            return b"".join(chunks), "eof"
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks), "limit"


def read_then_close(sock: socket.socket) -> tuple[bytes, str]:
    """A cooperating peer: read until EOF, then close."""
    result = read_all(sock)
    sock.close()
    return result


def linger_zero(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))


# -- abort: the warning, and allow_data_loss -------------------------------------------------


def test_abort_warning_points_at_the_callers_line() -> None:
    """The DataLossWarning of an abort with queued bytes points at the line that called
    ``tcpclose.close`` (its stacklevel), not into tcpclose."""
    client, server = tcp_pair()
    fill_send_queue(server)
    with pytest.warns(tcpclose.DataLossWarning, match="TC101") as caught:
        report = tcpclose.close(server, "abort")
    assert report.warnings == ("TC101",)
    assert caught[0].filename == __file__
    client.close()


def test_abort_with_allow_data_loss_is_silent(family: int) -> None:
    client, server = tcp_pair(family)
    server.setblocking(False)
    fill_send_queue(server)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = tcpclose.close(server, "abort", allow_data_loss=True)
    assert report.discarded_bytes > 0
    assert report.warnings == ()
    client.close()


# -- socket modes, closing(), bad input, fds ------------------------------------------------------


@pytest.mark.parametrize("mode", ["blocking", "nonblocking", "timeout"])
def test_socket_modes(family: int, mode: str) -> None:
    client, server = tcp_pair(family)
    if mode == "nonblocking":
        server.setblocking(False)
    elif mode == "timeout":
        server.settimeout(0.05)  # shorter than the drain: the policy's bounds rule
    reader = Peer(lambda: read_then_close(client))
    assert server.send(b"hello") == 5
    report = tcpclose.close(server, "graceful idle_timeout=1s")
    reader.result()
    assert report.outcome is Outcome.PEER_EOF


def test_linger_on_a_nonblocking_socket_warns_that_close_blocks(family: int) -> None:
    """Without the library, close() on a non-blocking socket with SO_LINGER {1, 1}
    and unacknowledged data blocks for the linger time; tcpclose warns (TC201)."""
    client, server = tcp_pair(family)
    fill_send_queue(server)  # the peer does not read: our data stays unacknowledged
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 1))
    start = time.monotonic()
    server.close()  # non-blocking, and still:
    assert time.monotonic() - start >= 0.9
    client.close()

    client, server = tcp_pair(family)
    server.setblocking(False)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 1))
    client.close()
    with pytest.warns(tcpclose.BlockingCloseWarning, match="TC201") as caught:
        report = tcpclose.close(server, "graceful")
    assert report.warnings == ("TC201",)
    assert caught[0].filename == __file__


def test_fd_number_and_transport_socket(family: int) -> None:
    import asyncio.trsock

    client, server = tcp_pair(family)
    client.close()
    fd = server.detach()
    report = tcpclose.close(fd, "graceful")
    assert report.outcome is Outcome.PEER_EOF
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(fd)

    client, server = tcp_pair(family)
    client.close()
    report = tcpclose.close(asyncio.trsock.TransportSocket(server), "graceful")
    assert report.outcome is Outcome.PEER_EOF
    assert server.fileno() == -1


def test_closing_context_manager(family: int) -> None:
    client, server = tcp_pair(family)
    reader = Peer(lambda: read_then_close(client))
    with tcpclose.closing(server, "graceful") as handle:
        report_inside = handle.report
        handle.sock.sendall(b"in the block")
    assert report_inside is None
    reader.result()
    assert handle.report is not None
    assert handle.report.outcome is Outcome.PEER_EOF
    assert handle.report.trigger == "close"


def test_closing_applies_on_error_policy_and_reraises(family: int) -> None:
    client, server = tcp_pair(family)
    with (
        pytest.raises(RuntimeError, match="handler failed"),
        tcpclose.closing(server, "graceful", on_error="abort") as handle,
    ):
        raise RuntimeError("handler failed")
    assert handle.report is not None
    assert handle.report.mode is CloseMode.ABORT
    assert handle.report.trigger == "error"
    with pytest.raises(ConnectionResetError):
        client.recv(1)
    client.close()


def test_bad_input() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(TypeError):
        tcpclose.close(udp)
    with (
        socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unix,
        pytest.raises(TypeError, match="TCP"),
    ):
        tcpclose.close(unix)
    lst = listener(socket.AF_INET)
    with pytest.raises(ValueError, match="listening"):
        tcpclose.close(lst)
    assert lst.fileno() != -1  # bad input: left untouched
    lst.close()
    with pytest.raises(ValueError, match="closed"):
        tcpclose.close(lst)
    client, server = tcp_pair()
    with pytest.raises(PolicyError, match="'bogus'"):
        tcpclose.close(server, "bogus")
    assert server.fileno() != -1
    with pytest.raises(TypeError):
        tcpclose.close(object())
    client.close()
    server.close()


def test_ten_thousand_closes_leak_no_fd() -> None:
    """Every mode and outcome, 10,000 times: the process's fd count is unchanged."""
    before = open_fd_count()
    lst = listener(socket.AF_INET, backlog=512)
    outcomes: dict[Outcome, int] = {}
    policies = [
        ClosePolicy.graceful(idle_timeout=0.002),
        ClosePolicy.peer_first(timeout=0.002, fallback="abort"),
        ClosePolicy.abort(),
        ClosePolicy(mode=CloseMode.DEFAULT),
    ]
    deadline = time.monotonic() + 120
    for i in range(10_000):
        assert time.monotonic() < deadline, f"too slow: {i} closes in 120 s"
        client, server = tcp_pair(socket.AF_INET, lst)
        kind = i % 4
        if kind == 0:
            client.close()  # peer-eof
        elif kind == 1:
            linger_zero(client)
            client.close()  # reset
        elif kind == 2:
            client.sendall(b"unread")  # data to drain, then silence: idle-timeout
        else:
            client.sendall(b"unread")
            client.close()  # data to drain, then peer-eof
        policy = policies[i % len(policies)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", tcpclose.TcpCloseWarning)
            report = tcpclose.close(server, policy, report=i % 2 == 0)
        outcomes[report.outcome] = outcomes.get(report.outcome, 0) + 1
        if client.fileno() != -1:
            client.close()
    lst.close()
    assert open_fd_count() == before
    assert {Outcome.PEER_EOF, Outcome.RESET, Outcome.ABORTED, Outcome.CLOSED} <= set(outcomes)


def test_debug_log_has_each_step_and_no_payload(
    family: int, caplog: pytest.LogCaptureFixture
) -> None:
    client, server = tcp_pair(family)
    secret = b"payload-that-must-not-be-logged"
    client.sendall(secret)
    client.close()
    wait_until(lambda: tcpclose.queues(server).unread == len(secret), message="data arrives")
    local, peer = addr(server), addr(server, peer=True)
    with caplog.at_level(logging.DEBUG, logger="tcpclose"):
        tcpclose.close(server, "graceful")
    text = caplog.text
    # Each line names the connection (formatted only when debug logging is on).
    assert f"close {format_address(local)}->{format_address(peer)}: start" in text, text
    for step in (
        "start graceful",
        "flush --flushed--> shutdown",
        "shutdown --done--> drain",
        "drain --peer-eof--> close",
        "close --done--> done",
    ):
        assert step in text, text
    assert secret.decode() not in text
    assert all(r.name == "tcpclose" for r in caplog.records)
