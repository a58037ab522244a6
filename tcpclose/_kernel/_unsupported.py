"""The kernel view on platforms tcpclose cannot read: every answer is ``UNKNOWN``.

Chosen when neither sock_diag netlink nor ``/proc/net/tcp`` is available (macOS,
the BSDs, Windows, sandboxes without either). It never raises: a close still works,
its report just says the platform could not tell.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Final

from ._address import RawFourTuple
from ._summary import Summary
from ._types import KernelState, TcpState

__all__ = ("UNKNOWN_STATE", "UnsupportedBackend")

#: The one answer this backend gives.
UNKNOWN_STATE: Final = KernelState(TcpState.UNKNOWN, "unsupported")


class UnsupportedBackend:
    """Answers ``TcpState.UNKNOWN`` with ``source="unsupported"``; dumps nothing."""

    name: Final = "unsupported"

    def lookup(self, four: RawFourTuple, cookie: int | None = None) -> KernelState:
        return UNKNOWN_STATE

    def dump(
        self, states: Collection[TcpState], port: int | None, families: Collection[int]
    ) -> Iterator[KernelState]:
        return iter(())

    def summary(
        self, states: Collection[TcpState], port: int | None, families: Collection[int]
    ) -> Summary:
        return Summary.from_states((), self.name)
