"""http.server with a close policy: ClosePolicyMixIn, nothing else changes.

The handler answers a POST without reading its body, with `Connection: close` (the
RST trap). The stdlib's own close would reset the client; with the mix-in the
connection goes to the background closer, which drains the unread body, waits for
the client's FIN (peer-first), and reports. Exit status 0 when the client got the
whole answer and the server kept no TIME_WAIT.
"""

from __future__ import annotations

import hashlib
import http.server
import socket
import sys
import threading
from typing import Any

import tcpclose.socketserver
from tcpclose import CloseReport, TcpState

ANSWER = hashlib.sha256(b"answer").digest() * (1 << 15)  # 1 MiB
reports: list[CloseReport] = []
done = threading.Event()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:  # the request body is never read
        self.send_response(200)
        self.send_header("Content-Length", str(len(ANSWER)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(ANSWER)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class Server(tcpclose.socketserver.ClosePolicyMixIn, http.server.ThreadingHTTPServer):
    close_policy = "peer-first timeout=2s"

    def on_close(self, report: CloseReport) -> None:  # optional: the reports
        reports.append(report)
        done.set()


def client(port: int) -> bytes:
    body = b"x" * (256 << 10)
    with socket.create_connection(("127.0.0.1", port)) as sock:
        head = f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
        threading.Thread(target=sock.sendall, args=(head.encode() + body,), daemon=True).start()
        data = b""
        while len(data) < len(ANSWER) + 200 and (chunk := sock.recv(1 << 16)):
            data += chunk
            if data.endswith(ANSWER):
                break
        return data.partition(b"\r\n\r\n")[2]


def main() -> int:
    server = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    answer = client(server.server_address[1])
    done.wait(5)
    server.shutdown()
    server.server_close()
    (report,) = reports
    print("client got", len(answer), "bytes, whole:", answer == ANSWER)
    print("server:", report)
    ok = answer == ANSWER and report.peer_closed_first and report.state is not TcpState.TIME_WAIT
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
