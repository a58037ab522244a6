"""wsgiref (and any server that takes a server class) with a close policy:
with_close_policy(WSGIServer, ...) passed as make_server's server_class.

The WSGI application answers without reading the request body. Exit status 0 when
the client got the whole answer and the close drained the body instead of resetting.
"""

from __future__ import annotations

import hashlib
import socket
import sys
import threading
import wsgiref.simple_server
from collections.abc import Callable, Iterable
from typing import Any

import tcpclose.socketserver
from tcpclose import CloseReport

ANSWER = hashlib.sha256(b"answer").digest() * (1 << 15)  # 1 MiB
reports: list[CloseReport] = []
done = threading.Event()


def app(environ: dict[str, Any], start_response: Callable[..., object]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Length", str(len(ANSWER)))])
    return [ANSWER]


class QuietHandler(wsgiref.simple_server.WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def on_close(report: CloseReport) -> None:
    reports.append(report)
    done.set()


def main() -> int:
    server = wsgiref.simple_server.make_server(
        "127.0.0.1",
        0,
        app,
        server_class=tcpclose.socketserver.with_close_policy(
            wsgiref.simple_server.WSGIServer, "graceful", on_close=on_close
        ),
        handler_class=QuietHandler,
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    body = b"x" * (256 << 10)
    with socket.create_connection(("127.0.0.1", server.server_address[1])) as sock:
        head = f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        threading.Thread(target=sock.sendall, args=(head.encode() + body,), daemon=True).start()
        data = b""
        while chunk := sock.recv(1 << 16):  # graceful: the server's FIN ends the answer
            data += chunk
    done.wait(5)
    server.shutdown()
    server.server_close()
    answer = data.partition(b"\r\n\r\n")[2]
    (report,) = reports
    print("client got", len(answer), "bytes, whole:", answer == ANSWER)
    print("server:", report)
    return 0 if answer == ANSWER and not report.rst_sent else 1


if __name__ == "__main__":
    sys.exit(main())
