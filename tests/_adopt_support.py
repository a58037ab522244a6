"""Helpers for the adoption tests (issue 15): the RST trap's clients, judged by curl and
by a checksumming client, and TIME_WAIT counts per server port, judged by ``ss``.

The trap: the client posts a 512 KiB body the application never reads and gets a
2 MiB ``Connection: close`` answer. A server that closes with unread bytes in its
receive queue sends RST, and the client loses what had not reached it yet.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import tcpclose.kernel
from tests._support import Peer, wait_until

#: The request body nobody reads, and the answer.
REQUEST_BODY = (hashlib.sha256(b"request").digest() * 2048 * 8)[: 512 << 10]
ANSWER = (hashlib.sha256(b"answer").digest() * 2048 * 32)[: 2 << 20]
ANSWER_SHA = hashlib.sha256(ANSWER).hexdigest()
#: The small answer of the TIME_WAIT runs.
SMALL = b"small answer\n"


@dataclass(frozen=True)
class Outcome:
    whole: bool
    got: int
    error: str | None


def curl_post(
    url: str, body: bytes = REQUEST_BODY, timeout: float = 20, method: str = "POST"
) -> Outcome:
    """curl sends ``body``; whole when it exits 0 with the answer's exact bytes."""
    proc = subprocess.run(
        [
            *("curl", "-sS", "--max-time", str(timeout), "-H", "Expect:", "-X", method),
            *("--data-binary", "@-", url),
        ],
        input=body,
        capture_output=True,
        timeout=timeout + 10,
        check=False,
    )
    whole = proc.returncode == 0 and hashlib.sha256(proc.stdout).hexdigest() == ANSWER_SHA
    error = None if proc.returncode == 0 else proc.stderr.decode(errors="replace").strip()
    return Outcome(whole, len(proc.stdout), error)


def checksum_post(
    port: int,
    path: str = "/",
    body: bytes = REQUEST_BODY,
    timeout: float = 20,
    method: str = "POST",
) -> Outcome:
    """A client that sends the request and body on one thread while it reads the answer
    on another, as a browser would, and checks the answer's length and digest. It
    stops at the end of the answer (Content-Length) and closes."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    head = (
        f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: {len(body)}\r\n"
        "Content-Type: application/octet-stream\r\nConnection: close\r\n\r\n"
    ).encode()

    def send() -> None:
        try:
            sock.sendall(head + body)
        except OSError:
            pass  # reset, or we shut the socket down after the answer

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    data = bytearray()
    error: str | None = None
    length: int | None = None
    start = 0
    try:
        while length is None or len(data) - start < length:
            chunk = sock.recv(1 << 16)
            if not chunk:
                error = "eof"
                break
            data.extend(chunk)
            if length is None and b"\r\n\r\n" in data:
                headers, _, _ = bytes(data).partition(b"\r\n\r\n")
                start = len(headers) + 4
                for line in headers.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length is None:
                    error = "no content-length"
                    break
    except OSError as exc:
        error = type(exc).__name__
    finally:
        try:
            sock.shutdown(socket.SHUT_RDWR)  # (wakes the sender if it still waits)
        except OSError:
            pass
        sender.join(timeout)
        sock.close()
    answer = bytes(data[start : start + (length or 0)])
    whole = (
        error is None and length == len(ANSWER) and hashlib.sha256(answer).hexdigest() == ANSWER_SHA
    )
    return Outcome(whole, len(answer), error)


def get_small(port: int, path: str = "/small", timeout: float = 10) -> bytes:
    """GET with ``Connection: close``; read the answer to its Content-Length, then
    close (this client's FIN comes after the answer, as a browser's would)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(4096)
            assert chunk, data
            data += chunk
        headers, _, rest = data.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in headers.split(b"\r\n")[1:]
            if line.lower().startswith(b"content-length:")
        )
        while len(rest) < length:
            chunk = sock.recv(4096)
            assert chunk, rest
            rest += chunk
        return rest[:length]


def time_wait_count(port: int, *, side: str) -> int:
    """TIME_WAIT entries ``ss`` shows for the server listening on ``port``: on the
    server's side (``sport``) or on the clients' (``dport``)."""
    exe = shutil.which("ss")
    assert exe is not None, "ss (iproute2) is not installed"
    key = "sport" if side == "server" else "dport"
    out = subprocess.run(
        [exe, "-tanH", "state", "time-wait", key, "=", f":{port}"],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
    ).stdout
    return sum(1 for line in out.splitlines() if line.strip())


def wait_quiet(port: int, timeout: float = 10.0) -> None:
    """Wait until no connection to ``port`` is still closing on the server's side (the
    closes handed to a background closer finish after the clients have their answer)."""
    exe = shutil.which("ss")
    assert exe is not None
    deadline = time.monotonic() + timeout
    busy = {"estab", "syn-recv", "close-wait", "last-ack", "fin-wait-1", "fin-wait-2", "closing"}
    while True:
        out = subprocess.run(
            [exe, "-tanH", "sport", "=", f":{port}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
        states = [line.split()[0].lower() for line in out.splitlines() if line.strip()]
        if not busy.intersection(states):
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"connections to :{port} still closing: {states}")
        time.sleep(0.02)


def serve_in_thread(server: object) -> Peer:
    """Run ``server.serve_forever`` on a thread (stop with ``server.shutdown()``)."""
    return Peer(server.serve_forever, name="server")  # type: ignore[attr-defined]


def free_port() -> int:
    """A free port on 127.0.0.1 (the session runs in its own network namespace:
    nobody takes it between)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def listening(port: int) -> bool:
    return any(True for _ in tcpclose.kernel.dump(states="LISTEN", port=port))


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without tcpclose's variables and ``PYTHONPATH``, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TCPCLOSE_")}
    env.pop("PYTHONPATH", None)
    env.update(extra)
    return env


def launched(command: Sequence[str], launcher: Sequence[str] | None) -> list[str]:
    """``command`` run through ``tcpclose run`` with ``launcher``'s arguments, or as it
    is when ``launcher`` is None."""
    if launcher is None:
        return list(command)
    return [sys.executable, "-m", "tcpclose", "run", *launcher, "--", *command]


@contextmanager
def server_command(
    argv: Sequence[str],
    port: int,
    *,
    cwd: Path,
    env: dict[str, str] | None = None,
    name: str = "server",
    start_timeout: float = 20.0,
) -> Iterator[Path]:
    """Start ``argv`` (a server that will listen on ``port``), wait until it listens,
    yield the file its stderr goes to; terminate it on exit."""
    err = cwd / f"{name}-{port}.stderr.txt"
    with err.open("wb") as err_file:
        proc = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=env if env is not None else clean_env(),
            stdout=subprocess.DEVNULL,
            stderr=err_file,
        )
    try:
        wait_until(
            lambda: proc.poll() is not None or listening(port),
            start_timeout,
            message=f"{name} to listen",
        )
        assert proc.poll() is None, err.read_text()
        yield err
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def report_lines(err: Path) -> list[str]:
    """The per-close log lines (``tcpclose: ...``) a launched server wrote."""
    return [line for line in err.read_text().splitlines() if line.startswith("tcpclose: ")]


def trap_runs(
    port: int, tries: int, *, path: str = "/", method: str = "POST"
) -> tuple[int, int, list[str]]:
    """``tries`` requests carrying the unread body by curl and as many by the
    checksumming client: whole answers of each, and the errors seen."""
    url = f"http://127.0.0.1:{port}{path}"
    errors: list[str] = []
    whole_curl = whole_client = 0
    for _ in range(tries):
        by_curl = curl_post(url, method=method)
        whole_curl += by_curl.whole
        if by_curl.error:
            errors.append(f"curl: {by_curl.error} after {by_curl.got} bytes")
        by_client = checksum_post(port, path, method=method)
        whole_client += by_client.whole
        if by_client.error:
            errors.append(f"client: {by_client.error} after {by_client.got} bytes")
    return whole_curl, whole_client, errors


def time_wait_placement(port: int, connections: int) -> tuple[int, int]:
    """``connections`` small GETs, each closed by the client once it has the answer;
    then the TIME_WAIT entries (on the server, on the clients) once every close is
    over."""
    for _ in range(connections):
        assert get_small(port) == SMALL
    wait_quiet(port)
    return time_wait_count(port, side="server"), time_wait_count(port, side="clients")


#: An ASGI application, as a file for servers started as commands (``app:app``): it
#: answers without reading the request body, ``Connection: close``; ``/small`` gets
#: :data:`SMALL`, anything else the 2 MiB answer (read from ``big`` beside it).
ASGI_APP = """
ANSWER = open("big", "rb").read()
SMALL = b"small answer\\n"


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = SMALL if scope["path"] == "/small" else ANSWER
    headers = [(b"content-length", str(len(body)).encode()), (b"connection", b"close")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})
"""


def write_app(directory: Path, source: str, name: str = "app.py") -> None:
    """``source`` as ``directory/name``, with the 2 MiB answer beside it as ``big``."""
    (directory / "big").write_bytes(ANSWER)
    (directory / name).write_text(source)
