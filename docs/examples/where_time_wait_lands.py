"""Where TIME_WAIT lands, per policy: one loopback connection each, as the kernel shows it.

The server writes a response and closes with tcpclose.close(); the client reads it,
waits 10 ms for the server's FIN, and closes (a prompt client: within peer-first's
50 ms grace). For each policy the script prints the
server's report and the client side's kernel state from tcpclose.lookup():

* graceful:   the server sends FIN first, so TIME_WAIT is on the server;
* peer-first: the server gives the client its grace to close first, so TIME_WAIT is
              on the client;
* abort:      RST, so TIME_WAIT is nowhere. The server aborts only after the client has
              read everything, so nothing is lost (what fallback=auto checks).

Linux, loopback only; runs in about half a second. Exit status 0 when the kernel showed
what is described above, 1 otherwise.
"""

from __future__ import annotations

import select
import socket
import sys
import threading
import time

import tcpclose
from tcpclose import TcpState

RESPONSE = b"r" * 100_000
#: States that last one round trip on loopback; wait them out before reading the table.
#: (FIN_WAIT2 too: here the other side's FIN always follows, within one trip.)
TRANSIENT = {TcpState.FIN_WAIT1, TcpState.FIN_WAIT2, TcpState.CLOSING, TcpState.LAST_ACK}


def client(sock: socket.socket, done_reading: threading.Event, seen: dict[str, object]) -> None:
    """Read the response, wait up to 10 ms for the server's FIN, then close."""
    seen.update(local=sock.getsockname(), peer=sock.getpeername())
    received = 0
    while received < len(RESPONSE) and (chunk := sock.recv(65536)):
        received += len(chunk)
    done_reading.set()
    ending = "no FIN within 10 ms, so it closed first"
    try:
        if select.select([sock], [], [], 0.01)[0] and sock.recv(1) == b"":
            ending = "the server's FIN"
    except ConnectionResetError:
        ending = "the server's RST"
    seen["ending"] = ending
    sock.close()


def settled_state(local: tuple[str, int], peer: tuple[str, int]) -> tcpclose.KernelState:
    deadline = time.monotonic() + 1.0
    while True:
        state = tcpclose.lookup(local, peer)
        if state.state not in TRANSIENT or time.monotonic() > deadline:
            return state
        time.sleep(0.001)


def one_connection(listener: socket.socket, policy: str) -> tuple[tcpclose.CloseReport, object]:
    conn = socket.create_connection(listener.getsockname()[:2], timeout=5.0)
    server_side, _ = listener.accept()
    done_reading = threading.Event()
    seen: dict[str, object] = {}
    reader = threading.Thread(target=client, args=(conn, done_reading, seen))
    reader.start()
    server_side.sendall(RESPONSE)
    if policy == "abort":
        done_reading.wait(5.0)  # abort only once nothing of ours is outstanding
    report = tcpclose.close(server_side, policy)
    reader.join(5.0)
    client_state = settled_state(seen["local"], seen["peer"])  # type: ignore[arg-type]
    print(f"{policy:<11} server: {report}")
    print(f"{'':<11} client: {client_state} (it saw {seen['ending']})")
    return report, client_state.state


def settled_server_state(report: tcpclose.CloseReport) -> TcpState:
    """The report's state, or, when the report caught a round trip still under way
    (LAST_ACK: our FIN not yet acknowledged), the state once it is over."""
    if report.state not in TRANSIENT or report.local is None or report.peer is None:
        return report.state
    return settled_state(report.local, report.peer).state


def main() -> int:
    expected = {
        "graceful": (TcpState.TIME_WAIT, TcpState.CLOSED),
        "peer-first": (TcpState.CLOSED, TcpState.TIME_WAIT),
        "abort": (TcpState.CLOSED, TcpState.CLOSED),
    }
    as_described = True
    with socket.create_server(("127.0.0.1", 0)) as listener:
        for policy, (server_expected, client_expected) in expected.items():
            report, client_state = one_connection(listener, policy)
            server_state = settled_server_state(report)
            as_described &= server_state is server_expected and client_state is client_expected
    return 0 if as_described else 1


if __name__ == "__main__":
    sys.exit(main())
