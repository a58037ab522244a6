"""Typing at the edges: what a type checker and a truth test see of the public API.

* ``tcpclose.aio.start_server`` and ``create_server`` pass keywords on to the loop:
  a misspelt one must fail ``mypy``, as it does with ``asyncio.start_server``'s own
  stubs, not only at run time. Checked by running mypy on a small program.
* ``TcpState.CLOSED`` equals 0, yet ``if report.state:`` must not be false for it.
"""

from __future__ import annotations

import asyncio
import enum
import socket
import textwrap
from pathlib import Path

import pytest

import tcpclose
import tcpclose.aio
from tcpclose import TcpState
from tests._support import LOOPBACK

mypy_api = pytest.importorskip("mypy.api")

ROOT = Path(__file__).resolve().parent.parent

PROGRAM = textwrap.dedent(
    """\
    import asyncio
    import tcpclose.aio


    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"ok")


    async def main() -> None:
        await asyncio.start_server(handle, "127.0.0.1", 0, reuse_port=True, backlog=10)
        await tcpclose.aio.start_server(handle, "127.0.0.1", 0, reuse_port=True, backlog=10)
        await tcpclose.aio.start_server(handle, "127.0.0.1", 0, reuse_prt=True)
        await tcpclose.aio.start_server(handle, "127.0.0.1", 0, backlog="10")
        await tcpclose.aio.create_server(asyncio.Protocol, "127.0.0.1", 0, start_servng=False)
    """
)


def _mypy_errors(tmp_path: Path, program: str) -> list[str]:
    source = tmp_path / "program.py"
    source.write_text(program)
    out, err, _ = mypy_api.run(
        [
            "--strict",
            "--no-error-summary",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(source),
        ]
    )
    assert err == "", err
    return [line for line in out.splitlines() if ": error: " in line]


@pytest.mark.timeout(180)
def test_a_misspelt_server_keyword_fails_mypy(tmp_path: Path) -> None:
    errors = _mypy_errors(tmp_path, PROGRAM)
    lines = sorted(int(line.split(":")[1]) for line in errors)
    # Line 10 (asyncio's own) and 11 (ours, right) pass; 12-14 are the mistakes.
    assert lines == [12, 13, 14], errors
    assert any('"reuse_prt"' in line for line in errors)
    assert any('"start_servng"' in line for line in errors)


def test_the_server_keywords_still_reach_the_loop() -> None:
    """The typed keywords work at run time: ``reuse_port`` and ``backlog`` get through."""

    async def main() -> bool:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.close()

        server = await tcpclose.aio.start_server(
            handle, LOOPBACK[socket.AF_INET], 0, reuse_port=True, backlog=5
        )
        async with server:
            (sock,) = server.sockets
            return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT))

    assert asyncio.run(main()) is True


def test_every_tcp_state_is_true_closed_too() -> None:
    """An IntEnum member equal to 0 is false: a plain copy of the enum shows the trap
    ``if report.state:`` fell into; TcpState does not."""

    class Plain(enum.IntEnum):
        CLOSED = 0
        ESTABLISHED = 1

    assert not Plain.CLOSED  # the trap, without the fix
    assert all(bool(state) for state in TcpState)
    assert int(TcpState.CLOSED) == 0  # still the number it was


def test_a_closed_connection_s_state_is_true() -> None:
    """For real: after an abort, ``lookup`` says CLOSED, and the state tests true."""
    server = socket.create_server((LOOPBACK[socket.AF_INET], 0))
    client = socket.create_connection(server.getsockname()[:2])
    conn, _ = server.accept()
    local, peer = client.getsockname()[:2], client.getpeername()[:2]
    for s in (conn, client):
        tcpclose.close(s, "abort")
    server.close()
    state = tcpclose.lookup(local, peer).state
    assert state is TcpState.CLOSED
    assert state  # `if report.state:` no longer skips a closed connection
