"""``fallback=auto`` and data that is ours but not in the kernel yet (issue 9).

``auto`` promises to abort only when nothing of ours is left unacknowledged. Over
asyncio, "ours" includes the transport's own write buffer: bytes the application
wrote that the kernel has not taken yet. The soak across two namespaces lost such
bytes under ``peer-first fallback=auto`` (the fallback aborted while the transport
still held part of a response); this reproduces the moment deterministically on
loopback: the peer has read (and so acknowledged) everything the kernel held, while
the loop, busy, has not yet moved the rest of the transport's buffer into the kernel.
Nothing is faked: the loop is simply kept busy for that moment, as a loaded server's is.
"""

from __future__ import annotations

import asyncio
import hashlib
import socket
import threading
import time
import warnings
from collections.abc import Callable

import pytest

import tcpclose
from tcpclose import CloseMode, Fallback
from tests._support import listener, open_fd_count, wait_until

pytestmark = pytest.mark.timeout(30)

RESPONSE = bytes(range(256)) * (32 * 1024)  # 8 MiB


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        uvloop.new_event_loop().close()  # libuv's process-wide pipe, opened once
        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop


def _read_while(sock: socket.socket, more_to_come: Callable[[], bool]) -> bytes:
    """Read what arrives until ``more_to_come()`` is false and nothing is left unread;
    bounded at 10 s."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + 10
    sock.settimeout(0.01)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(1 << 20)
        except TimeoutError:
            if not more_to_come() and tcpclose.queues(sock).unread == 0:
                return b"".join(chunks)
            continue
        assert chunk, "EOF"
        chunks.append(chunk)
    raise AssertionError("the kernel's queue never emptied")


def _read_to_end(sock: socket.socket, out: list[tuple[bytes, str]]) -> None:
    chunks = []
    sock.settimeout(10)
    try:
        while chunk := sock.recv(1 << 20):
            chunks.append(chunk)
        out.append((b"".join(chunks), "eof"))
        sock.shutdown(socket.SHUT_WR)  # and the peer closes in turn
    except ConnectionResetError:
        out.append((b"".join(chunks), "reset"))


@pytest.mark.parametrize("loop_name", ["asyncio", "uvloop"])
def test_auto_counts_the_transports_buffer_as_unacknowledged(loop_name: str) -> None:
    pytest.importorskip("tcpclose.aio", reason="the asyncio driver has not landed yet")
    from tcpclose import aio

    factory = _loop_factory(loop_name)
    tcpclose.lookup(("127.0.0.1", 1), ("127.0.0.1", 2))  # this thread's sock_diag socket
    fds = open_fd_count()
    lst = listener(socket.AF_INET)
    peer = socket.create_connection(lst.getsockname()[:2])
    ours, _ = lst.accept()
    lst.close()
    first: list[bytes] = []
    rest: list[tuple[bytes, str]] = []
    codes: list[str] = []

    async def main() -> tcpclose.CloseReport:
        ours.setblocking(False)
        _, writer = await asyncio.open_connection(sock=ours)
        transport = writer.transport
        writer.write(RESPONSE)  # the kernel takes what it can; the transport keeps the rest
        raw = writer.get_extra_info("socket")
        wait_until(lambda: tcpclose.queues(raw).outgoing > 0, message="data in the kernel")
        buffered = transport.get_write_buffer_size()
        assert buffered > 0
        # The loop is busy (this coroutine does not yield) while the peer reads all that
        # the kernel held, and acknowledges it: our kernel queue empties, while the
        # transport's buffer cannot move.
        first.append(_read_while(peer, lambda: tcpclose.queues(raw).outgoing > 0))
        assert transport.get_write_buffer_size() == buffered
        reader = threading.Thread(target=_read_to_end, args=(peer, rest), daemon=True)
        reader.start()  # the peer goes on reading: a graceful close can deliver the rest
        # Peer-first's time is up at once: the fallback decides now.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            report = await aio.aclose(writer, "peer-first timeout=0s fallback=auto linger_time=5s")
        reader.join(10)
        codes.extend(getattr(w.message, "code", "?") for w in caught)
        return report

    with asyncio.Runner(loop_factory=factory) as runner:
        report = runner.run(main())
    peer.close()
    wait_until(lambda: open_fd_count() == fds, message="fd count back to the start")
    # What auto promised: not to abort while bytes of ours are unacknowledged.
    assert report.discarded_bytes == 0, report
    assert codes == []  # no DataLossWarning
    assert report.fallback is Fallback.GRACEFUL, report
    assert report.mode is CloseMode.GRACEFUL, report
    ((data, how),) = rest
    assert how == "eof"
    assert hashlib.sha256(first[0] + data).digest() == hashlib.sha256(RESPONSE).digest()
