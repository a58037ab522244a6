"""Close policies in asyncio: a drop-in start_server, and with_policy around a protocol.

1. tcpclose.aio.start_server() with "peer-first": the handler writes a response with
   `Connection: close` and returns; the client closes when it has the response, so
   TIME_WAIT lands on the client and the server's report says "peer closed first".
2. tcpclose.aio.with_policy() around a plain asyncio.Protocol that calls
   transport.close() itself, as a third-party server would, with "graceful": the
   protocol's close sends FIN first, so TIME_WAIT stays on the server, and the client
   still gets every byte.

Linux, loopback only; runs in well under a second. Exit status 0 when the kernel showed
what is described above, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import sys

import tcpclose
import tcpclose.aio
from tcpclose import CloseReport, TcpState

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
Address = tuple[str, int]


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await reader.readuntil(b"\r\n\r\n")
    writer.write(RESPONSE)
    # Returning hands the connection to the close policy: no writer.close() needed.


class OneResponse(asyncio.Protocol):
    """Stands for a third-party server's protocol: it closes the transport itself."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if data.endswith(b"\r\n\r\n"):
            assert isinstance(self.transport, asyncio.WriteTransport)
            self.transport.write(RESPONSE)
            self.transport.close()  # goes through the policy


async def fetch(port: int, *, until_eof: bool) -> tuple[Address, Address, bytes]:
    """A client: send a request, read the response, close. Returns its 4-tuple."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    local, peer = writer.get_extra_info("sockname"), writer.get_extra_info("peername")
    writer.write(b"GET / HTTP/1.1\r\nHost: example\r\n\r\n")
    body = await (reader.read() if until_eof else reader.readexactly(len(RESPONSE)))
    writer.close()
    await writer.wait_closed()
    return local, peer, body


async def first_report(reports: list[CloseReport]) -> CloseReport:
    async with asyncio.timeout(5):
        while not reports:
            await asyncio.sleep(0.002)
    return reports[0]


async def main() -> int:
    ok = True

    reports: list[CloseReport] = []
    server = await tcpclose.aio.start_server(
        handle, "127.0.0.1", 0, close_policy="peer-first timeout=2s", on_close=reports.append
    )
    async with server:
        port = server.sockets[0].getsockname()[1]
        local, peer, body = await fetch(port, until_eof=False)
        report = await first_report(reports)
    client = tcpclose.lookup(local, peer)
    print(f"start_server, peer-first   server: {report}")
    print(f"                           client: {client}, got {len(body)} of {len(RESPONSE)} B")
    ok &= report.peer_closed_first and report.state is TcpState.CLOSED
    ok &= client.state is TcpState.TIME_WAIT and body == RESPONSE

    reports = []
    loop = asyncio.get_running_loop()
    factory = tcpclose.aio.with_policy(OneResponse, "graceful", on_close=reports.append)
    plain = await loop.create_server(factory, "127.0.0.1", 0)
    async with plain:
        port = plain.sockets[0].getsockname()[1]
        local, peer, body = await fetch(port, until_eof=True)
        report = await first_report(reports)
    client = tcpclose.lookup(local, peer)
    print(f"with_policy, graceful      server: {report}")
    print(f"                           client: {client}, got {len(body)} of {len(RESPONSE)} B")
    ok &= report.state is TcpState.TIME_WAIT and client.state is TcpState.CLOSED
    ok &= body == RESPONSE
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
