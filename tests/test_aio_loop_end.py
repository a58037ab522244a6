"""A loop that ends while closes still wait for peers (issue 20).

``asyncio.run()`` returning with a close under way used to leave the transport open
to a closed loop: "unclosed transport" ResourceWarnings on both loops. Now the end of
the loop cuts the close short: the transport is aborted, ``on_close`` gets a report
saying so, nothing is left open.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
import warnings
from typing import Any

import pytest

import tcpclose.aio
from tcpclose import CloseReport
from tests._aio_support import loop_factory, wait_for

pytestmark = pytest.mark.timeout(30)


def _serve_then_return(
    loop_name: str, policy: str, reports: list[CloseReport], report: bool = True
) -> None:
    """Run a loop whose server answers one silent client and returns while the
    policy's close of that connection still waits for the client. ``report=False``:
    reports off, so that the close is a quick one (it hands over when cut short)."""
    client_done = threading.Event()

    def silent_client(port: int) -> None:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(b"hi\n")
            sock.recv(3)
            client_done.wait(10)  # says nothing more, closes nothing

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"ok\n")  # returning starts the policy's close

    async def main() -> None:
        server = await tcpclose.aio.start_server(
            handle, "127.0.0.1", 0, close_policy=policy, on_close=reports.append, report=report
        )
        port = int(server.sockets[0].getsockname()[1])
        client = threading.Thread(target=silent_client, args=(port,))
        client.start()
        conns = server._registry.conns  # the connection, while its close waits
        await wait_for(lambda: any(c.closer is not None for c in conns), 5, "the close")
        server._server.close()  # the listener only: the close is still under way
        # ... and return: the runner ends the loop.

    try:
        with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
            runner.run(main())
    finally:
        client_done.set()


@pytest.mark.parametrize("report", [True, False], ids=["reports", "quick"])
@pytest.mark.parametrize("policy", ["graceful", "peer-first timeout=5s"])
def test_loop_end_cuts_pending_closes_short(loop_name: str, policy: str, report: bool) -> None:
    reports: list[CloseReport] = []
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _serve_then_return(loop_name, policy, reports, report)
        gc.collect()
    unclosed = [str(w.message) for w in seen if issubclass(w.category, ResourceWarning)]
    assert unclosed == []
    assert len(reports) == 1
    assert reports[0].error == "RuntimeError: event loop closing"


def test_one_failing_close_does_not_stall_the_others_in_its_deadline_slot(
    loop_name: str,
) -> None:
    """The closes due in one deadline slot are woken in a loop; an exception from one
    of them (uvloop's socket wrapper raised ValueError in the TLS soak) stopped the
    rest, whose closes then never ended (issue 20). Now the loop's exception handler
    gets it and every other close is woken."""
    from tcpclose._aio_closer import _Deadlines

    woken: list[str] = []
    handled: list[dict[str, Any]] = []

    class Due:
        def __init__(self, name: str, fail: bool) -> None:
            self.name = name
            self.fail = fail

        def on_deadline(self, slot: int) -> None:
            woken.append(self.name)
            if self.fail:
                raise ValueError("negative file descriptor")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda _loop, context: handled.append(context))
        deadlines = _Deadlines.of(loop)
        when = deadlines.clock() + 0.01
        for name, fail in (("first", True), ("second", False), ("third", False)):
            deadlines.add(Due(name, fail), when)  # type: ignore[arg-type]  # stand-ins
        await wait_for(lambda: len(woken) == 3, 2, "every close in the slot")

    with asyncio.Runner(loop_factory=loop_factory(loop_name)) as runner:
        runner.run(main())
    assert woken == ["first", "second", "third"]
    assert [type(c["exception"]) for c in handled] == [ValueError]
