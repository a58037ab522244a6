"""A structured log line per close: an ``on_close`` sink for the ``logging`` module."""

from __future__ import annotations

import logging
import random
from typing import TYPE_CHECKING

from ._report import format_report, report_fields

if TYPE_CHECKING:
    from ._report import CloseReport

__all__ = ("LogSink",)


class LogSink:
    """An ``on_close`` callable that logs one line per close.

    The message is the report's one line (:func:`str` of a report); the fields go in
    ``extra=`` (``close_mode``, ``close_outcome``, ``close_state``,
    ``close_duration_s``, and the others only when set: see
    :func:`tcpclose.metrics.report_fields`), so a JSON formatter gets them as keys.

    Sampling: with ``sample=0.01`` one close in a hundred is logged, chosen at random;
    a close that is worth a look is always logged unless ``sample_problems=True``: one
    that sent RST, ended in an error or reset, issued a warning, or whose TIME_WAIT the
    kernel skipped. Those go out at ``problem_level`` (default WARNING), the others at
    ``level``.

    Args:
        logger: a ``logging.Logger`` or its name (default ``"tcpclose.close"``).
        level: the level of ordinary closes (default INFO).
        problem_level: the level of closes worth a look (default WARNING).
        sample: fraction of ordinary closes logged, 0 to 1 (default all).
        sample_problems: sample the closes worth a look too.

    Example::

        logging.basicConfig(level=logging.INFO)
        sink = LogSink(sample=0.05)
        server = await tcpclose.aio.start_server(handle, "0.0.0.0", 8080, on_close=sink)
        # INFO tcpclose.close graceful peer-eof 10.0.0.1:8080->10.0.0.9:51234 now TIME_WAIT ...
    """

    __slots__ = ("level", "logger", "problem_level", "sample", "sample_problems")

    def __init__(
        self,
        logger: logging.Logger | str = "tcpclose.close",
        *,
        level: int = logging.INFO,
        problem_level: int = logging.WARNING,
        sample: float = 1.0,
        sample_problems: bool = False,
    ) -> None:
        if not 0.0 <= sample <= 1.0:
            raise ValueError(f"sample: expected a fraction from 0 to 1, got {sample!r}")
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self.level = level
        self.problem_level = problem_level
        self.sample = sample
        self.sample_problems = sample_problems

    def __call__(self, report: CloseReport) -> None:
        """Log ``report`` (or not, as sampling decides)."""
        problem = bool(
            report.rst_sent
            or report.error
            or report.warnings
            or report.time_wait_skipped
            or report.outcome.value in ("reset", "error")
        )
        level = self.problem_level if problem else self.level
        if not self.logger.isEnabledFor(level):
            return
        if (
            (not problem or self.sample_problems)
            and self.sample < 1.0
            and random.random() >= self.sample
        ):
            return
        self.logger.log(level, "%s", _Line(report), extra=report_fields(report))


class _Line:
    """The report's line, formatted only if a handler formats the record."""

    __slots__ = ("_report",)

    def __init__(self, report: CloseReport) -> None:
        self._report = report

    def __str__(self) -> str:
        return format_report(self._report)
