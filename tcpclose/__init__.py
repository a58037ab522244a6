"""tcpclose: end TCP connections on purpose, and see what the kernel did.

Close sockets and asyncio transports with a named policy (``graceful``,
``peer-first``, ``abort``, ``default``), get a report of the state the kernel left
(TIME_WAIT with 58 s left, CLOSED, RST sent, bytes lost), and be warned before a
choice loses data or reuses a port unsafely.

    >>> import tcpclose
    >>> tcpclose.ClosePolicy.parse("peer-first timeout=2s fallback=abort")
    ClosePolicy('peer-first timeout=2s fallback=abort')
"""

from __future__ import annotations

# -- foundation ------------------------------------------------------------------------
from ._errors import NotTcpSocketError as NotTcpSocketError
from ._errors import PolicyError as PolicyError
from ._errors import TcpCloseError as TcpCloseError
from ._kernel._types import KernelState as KernelState
from ._kernel._types import Queues as Queues
from ._kernel._types import TcpState as TcpState
from ._kernel._types import TimerKind as TimerKind
from ._policy import CloseMode as CloseMode
from ._policy import ClosePolicy as ClosePolicy
from ._policy import Fallback as Fallback
from ._version import __version__ as __version__
from ._warnings import BlockingCloseWarning as BlockingCloseWarning
from ._warnings import DataLossWarning as DataLossWarning
from ._warnings import TcpCloseWarning as TcpCloseWarning
from ._warnings import UnsafeReuseWarning as UnsafeReuseWarning

# -- kernel view (issue 4) ---------------------------------------------------------------
# isort: split
from ._kernel import TcpInfo as TcpInfo
from ._kernel import lookup as lookup
from ._kernel import queues as queues
from ._kernel import tcp_info as tcp_info

# -- close policies, sync driver (issue 5) -----------------------------------------------
from ._plan import Outcome as Outcome
from ._report import CloseReport as CloseReport
from ._sync import ClosingHandle as ClosingHandle
from ._sync import close as close
from ._sync import closing as closing

# -- adoption: the background closer (issue 15) -------------------------------------------
# isort: split
from ._background import BackgroundCloser as BackgroundCloser
from ._background import close_in_background as close_in_background

# -- warnings and audit (issue 7) --------------------------------------------------------
# isort: split
from ._audit import audit as audit
from ._audit import check_socket as check_socket
from ._findings import Finding as Finding
from ._findings import Severity as Severity

__all__ = (
    "BackgroundCloser",
    "BlockingCloseWarning",
    "CloseMode",
    "ClosePolicy",
    "CloseReport",
    "ClosingHandle",
    "DataLossWarning",
    "Fallback",
    "Finding",
    "KernelState",
    "NotTcpSocketError",
    "Outcome",
    "PolicyError",
    "Queues",
    "Severity",
    "TcpCloseError",
    "TcpCloseWarning",
    "TcpInfo",
    "TcpState",
    "TimerKind",
    "UnsafeReuseWarning",
    "__version__",
    "audit",
    "check_socket",
    "close",
    "close_in_background",
    "closing",
    "lookup",
    "queues",
    "tcp_info",
)
