"""The fault matrix's TLS rows (issue 9): ``aclose()`` on a TLS transport, on asyncio's
loop and on uvloop, against a peer that closes TCP without close_notify and one that
never answers ours. (The blocking driver does not speak TLS.)

The server side is ours, in the server namespace; the peer is a blocking
``ssl.SSLSocket`` in the client namespace. Checks as in ``test_matrix.py``.
"""

from __future__ import annotations

import contextlib
import functools
import socket
import ssl
import threading

import pytest

from tcpclose import CloseMode, Fallback, Outcome, TcpState
from tests._support import Peer, recv_exactly
from tests.faults._matrix_support import (
    IDLE_S,
    KIB,
    TIMEOUT_S,
    Case,
    CloseRun,
    urandom,
)

pytestmark = [
    pytest.mark.netns,
    pytest.mark.timeout(60),
    pytest.mark.parametrize("driver", ["asyncio", "uvloop"], indirect=True),
]

RESPONSE = urandom(16 * KIB)


@functools.cache
def contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server, client) contexts: a throwaway CA and a certificate for ``localhost``."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


class TlsPeer:
    """The client: handshake, read RESPONSE, then ``then`` on its thread:

    * ``"close-without-notify"``: once ``release`` is set, with ``wait_for_notify``
      first read until the server's close_notify; then end the TCP connection
      without sending ours (FIN, no close_notify);
    * ``"hold"``: never answer anything, at either layer, until ``release``.
    """

    def __init__(self, raw: socket.socket, then: str, *, wait_for_notify: bool = False) -> None:
        self.raw = raw
        self.then = then
        self.wait_for_notify = wait_for_notify
        self.got_response = threading.Event()
        self.release = threading.Event()
        self.notify: object = None  # what reading for the close_notify gave
        self._peer = Peer(self._run, name="tls-peer")

    def _run(self) -> None:
        _, client = contexts()
        self.raw.settimeout(10)
        with client.wrap_socket(
            self.raw, server_hostname="localhost", suppress_ragged_eofs=False
        ) as tls:
            assert recv_exactly(tls, len(RESPONSE)) == RESPONSE
            self.got_response.set()
            self.release.wait(10)
            if self.then == "close-without-notify":
                if self.wait_for_notify:
                    tls.settimeout(5)
                    try:
                        self.notify = tls.recv(1) == b""
                    except OSError as exc:
                        self.notify = type(exc).__name__
                with contextlib.suppress(OSError):  # (an abort may have reset it already)
                    tls.shutdown(socket.SHUT_RDWR)  # a plain TCP shutdown: no close_notify
            elif self.then != "hold":  # pragma: no cover - a typo in a test
                raise ValueError(self.then)

    def result(self) -> None:
        self.release.set()
        self._peer.result()


async def _send_response(writer: object) -> None:
    import asyncio

    assert isinstance(writer, asyncio.StreamWriter)
    writer.write(RESPONSE)
    await writer.drain()


def _start(case: Case, then: str, *, wait_for_notify: bool = False) -> tuple[TlsPeer, CloseRun]:
    server_ctx, _ = contexts()  # made here, once: the threads below only read the cache
    peer_raw, ours = case.connect()
    peer = TlsPeer(peer_raw, then, wait_for_notify=wait_for_notify)
    run = case.start_close(ours, ssl_context=server_ctx, before_close=_send_response)
    if not peer.got_response.wait(10):
        peer.result()  # raises what went wrong on the peer's side
        raise AssertionError("the peer never got the response")
    return peer, run


def test_tls_peer_closes_without_close_notify(case: Case) -> None:
    """The peer ends the TCP connection (FIN) without a TLS close_notify: after ours
    (graceful), or first, while we wait for it (peer-first)."""
    name = case.policy_name
    peer, run = _start(case, "close-without-notify", wait_for_notify=name == "graceful")
    try:
        peer.release.set()
        if name == "abort":
            case.close_and_check(run, outcome=Outcome.ABORTED, states={TcpState.CLOSED})
        elif name == "graceful":
            # Our close_notify first; our FIN waits for the peer's answer, which is its
            # FIN here: the peer closed TCP first, TIME_WAIT lands on it (issue 20).
            report = case.close_and_check(
                run, outcome=Outcome.PEER_EOF, states={TcpState.LAST_ACK, TcpState.CLOSED}
            )
            assert report.fin_sent  # (our close_notify: the end of our stream)
            assert report.peer_closed_first
        else:
            report = case.close_and_check(
                run, outcome=Outcome.PEER_EOF, states={TcpState.LAST_ACK, TcpState.CLOSED}
            )
            assert report.peer_closed_first
            assert report.mode is CloseMode.PEER_FIRST
            assert report.fallback is None
    finally:
        peer.result()
    if name == "graceful":
        assert peer.notify is True  # our close_notify came, and no FIN before its answer


def test_tls_peer_never_answers_close_notify(case: Case) -> None:
    """The peer has its response and then says nothing at all, at either layer."""
    name = case.policy_name
    peer, run = _start(case, "hold")
    try:
        # Over TLS our FIN waits for the answer to our close_notify: it leaves at the
        # idle bound, and may not be acknowledged yet when the report looks.
        fin_sent_at_the_end = {TcpState.FIN_WAIT1, TcpState.FIN_WAIT2}
        if name == "graceful":
            report = case.close_and_check(
                run, outcome=Outcome.IDLE_TIMEOUT, states=fin_sent_at_the_end, min_duration=IDLE_S
            )
            assert report.fin_sent
        elif name == "peer-first/graceful":
            report = case.close_and_check(
                run,
                outcome=Outcome.IDLE_TIMEOUT,
                states=fin_sent_at_the_end,
                min_duration=TIMEOUT_S + IDLE_S,
            )
            assert report.fallback is Fallback.GRACEFUL
        elif name in ("peer-first/abort", "peer-first/auto"):
            report = case.close_and_check(
                run, outcome=Outcome.ABORTED, states={TcpState.CLOSED}, min_duration=TIMEOUT_S
            )
            assert report.fallback is Fallback.ABORT
        else:
            case.close_and_check(run, outcome=Outcome.ABORTED, states={TcpState.CLOSED})
    finally:
        peer.result()
