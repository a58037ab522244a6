"""A blocking server hands each connection to a BackgroundCloser after its answer.

The accepting thread answers 100 clients and hands each socket over; it never waits
for a client's FIN (the hand-over returns in microseconds), while the closer's one
thread applies "peer-first" to all of them. Exit status 0 when every client got its
answer, every close was reported, and the server kept no TIME_WAIT.
"""

from __future__ import annotations

import socket
import sys
import threading
import time

import tcpclose
from tcpclose import CloseReport, TcpState

N = 100


def clients(port: int, got: list[bytes]) -> None:
    for _ in range(N):
        with socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"hello")
            got.append(sock.recv(100))  # then close: our FIN comes first


def main() -> int:
    reports: list[CloseReport] = []
    lst = socket.create_server(("127.0.0.1", 0))
    got: list[bytes] = []
    peer = threading.Thread(target=clients, args=(lst.getsockname()[1], got))
    peer.start()
    handing = []
    with tcpclose.BackgroundCloser(on_close=reports.append) as closer:
        for _ in range(N):
            conn, _ = lst.accept()
            conn.recv(100)
            conn.sendall(b"world")
            started = time.perf_counter()
            closer.close(conn, "peer-first timeout=2s")
            handing.append(time.perf_counter() - started)
        peer.join()
        closer.wait_idle(5)
    lst.close()
    handing.sort()
    print(f"hand-over: median {handing[N // 2] * 1e6:.1f} us, {len(reports)} reports")
    print("last:", reports[-1])
    kept = sum(r.state is TcpState.TIME_WAIT for r in reports)
    return 0 if got == [b"world"] * N and len(reports) == N and kept == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
