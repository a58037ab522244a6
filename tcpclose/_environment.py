"""The environment variables that carry tcpclose's settings into a process:
``TCPCLOSE_POLICY`` (the close policy) and ``TCPCLOSE_LOG_REPORTS`` (the per-close log
line). ``tcpclose run`` sets them (``_launcher.py``); the server integrations
(gunicorn workers, protocol classes, aiohttp) read them here when their own settings
leave the policy or ``on_close`` unset.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Final

from ._policy import ClosePolicy
from ._report import CloseReport

__all__ = (
    "DEFAULT_POLICY",
    "LOG_REPORTS_ENV",
    "OFF_WORDS",
    "POLICY_ENV",
    "environment_on_close",
    "environment_policy",
    "log_sample",
)

#: The variable holding the policy in the launched processes.
POLICY_ENV: Final = "TCPCLOSE_POLICY"
#: Set to 1 to log one line per close (``--log-reports``), or to a fraction from 0 to 1
#: to log that share of the ordinary closes (``--log-reports 0.05``; closes worth a
#: look, such as one that sent RST, are always logged).
LOG_REPORTS_ENV: Final = "TCPCLOSE_LOG_REPORTS"
#: Values of ``TCPCLOSE_POLICY`` that turn the launcher's patches off.
OFF_WORDS: Final = frozenset({"off", "none", "0", "false", "no"})
DEFAULT_POLICY: Final = "graceful"


def environment_policy(environ: Mapping[str, str] | None = None) -> ClosePolicy | None:
    """The policy of ``TCPCLOSE_POLICY`` (``graceful`` when unset), or None when the
    variable turns policies off (``off``, ``none``, ``0``, ``false``, ``no``).

    Raises:
        PolicyError: the variable holds an invalid policy.
    """
    env = os.environ if environ is None else environ
    if env.get(POLICY_ENV, "").strip().lower() in OFF_WORDS:
        return None
    return ClosePolicy.from_env(POLICY_ENV, DEFAULT_POLICY, environ=env)


def log_sample(text: str) -> float:
    """The share of ordinary closes ``TCPCLOSE_LOG_REPORTS`` asks to log: 0 (unset,
    empty or ``0``: none) to 1 (``1``: every close).

    Raises:
        ValueError: not a number from 0 to 1.
    """
    text = text.strip()
    if not text:
        return 0.0
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value <= 1.0:
        raise ValueError(
            f"{LOG_REPORTS_ENV}: expected 1 (every close) or a fraction from 0 to 1, got {text!r}"
        )
    return value


def environment_on_close(
    environ: Mapping[str, str] | None = None,
) -> Callable[[CloseReport], object] | None:
    """The built-in per-close log line when ``TCPCLOSE_LOG_REPORTS`` asks for it (see
    :data:`LOG_REPORTS_ENV`), else None. One sink per process: worker processes each
    make their own, and log through their own stderr.

    Raises:
        ValueError: the variable is not a number from 0 to 1.
    """
    env = os.environ if environ is None else environ
    sample = log_sample(env.get(LOG_REPORTS_ENV, ""))
    if sample == 0.0:
        return None
    return _report_sink(sample)


def _report_sink(sample: float = 1.0) -> Callable[[CloseReport], object]:
    """The built-in per-close log line (:class:`tcpclose.metrics.LogSink`, logger
    ``tcpclose.close``), on stderr as ``tcpclose: <report>``: the logger gets a handler
    of its own and does not propagate, so that a handler the program puts on the root
    logger later does not print each line twice."""
    from ._logsink import LogSink

    sink = LogSink(sample=sample)
    if not sink.logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("tcpclose: %(message)s"))
        sink.logger.addHandler(handler)
        sink.logger.setLevel(logging.INFO)
        sink.logger.propagate = False
    return sink
