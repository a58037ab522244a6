"""The RST trap, and the lingering close that avoids it. Standard library only.

A client sends a request body that the server never reads; the server writes its
response and closes. With a plain close() the unread body makes Linux send RST
instead of FIN (RFC 1122 section 4.2.2.13): the client gets ECONNRESET and loses the
part of the response still queued on the server. With a lingering close --
shutdown(SHUT_WR), read until the client's FIN, then close() -- nothing is unread at
close() and the client gets every byte.

tcpclose's "graceful" policy is the second server, with bounds on the wait.
Loopback only; runs in a fraction of a second. Exit status 0 when Linux behaved as
described, 1 otherwise.
"""

from __future__ import annotations

import socket
import sys
import threading

BODY = b"b" * 32 * 1024  # the request body the server leaves unread
CHUNK = b"r" * 64 * 1024  # the response, written until the kernel's buffers are full


def fill(conn: socket.socket) -> int:
    """Write until the send buffer is full, so the kernel still holds data; return bytes."""
    conn.setblocking(False)
    written = 0
    try:
        while True:
            written += conn.send(CHUNK)
    except BlockingIOError:
        pass
    conn.settimeout(5.0)
    return written


def read_all(sock: socket.socket) -> tuple[int, str]:
    """Read to the end; return (bytes, how it ended: "EOF" or "ECONNRESET")."""
    received = 0
    try:
        while chunk := sock.recv(65536):
            received += len(chunk)
    except ConnectionResetError:
        return received, "ECONNRESET"
    return received, "EOF"


def drain_then_close(conn: socket.socket) -> None:
    """The lingering close's second half: discard input until the peer's FIN."""
    while conn.recv(65536):
        pass
    conn.close()


def serve_once(lingering: bool) -> tuple[int, int, str]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname()[:2], timeout=5.0)
        conn, _ = listener.accept()
        conn.settimeout(5.0)
        client.sendall(b"POST /upload HTTP/1.1\r\n\r\n" + BODY)
        conn.recv(16)  # the server reads the start of the request only
        written = fill(conn)
        if lingering:
            conn.shutdown(socket.SHUT_WR)  # FIN after the response; keep reading
            drainer = threading.Thread(target=drain_then_close, args=(conn,))
            drainer.start()
            received, ending = read_all(client)
            client.close()  # the client's FIN ends the server's drain
            drainer.join()
        else:
            conn.close()  # unread bytes in the receive queue: RST
            received, ending = read_all(client)
            client.close()
    return written, received, ending


def main() -> int:
    plain = serve_once(lingering=False)
    lingering = serve_once(lingering=True)
    for name, (written, received, ending) in (
        ("plain close()", plain),
        ("lingering close", lingering),
    ):
        print(
            f"{name:16} server wrote {written:>9,} B, client received {received:>9,} B, "
            f"then {ending}: {written - received:,} B lost"
        )
    as_described = (
        plain[2] == "ECONNRESET"
        and plain[1] < plain[0]
        and lingering[2] == "EOF"
        and lingering[1] == lingering[0]
    )
    return 0 if as_described else 1


if __name__ == "__main__":
    sys.exit(main())
