"""Sinks for ``on_close``: metrics engines, a log line per close, and host gauges.

    >>> import tcpclose.metrics
    >>> callable(tcpclose.metrics.tee(print))
    True

* :class:`PrometheusSink`, :class:`PrometheusHostCollector` -- ``prometheus_client``
  collectors (extra ``tcpclose[metrics]``)
* :class:`OpenTelemetrySink`, :func:`register_host_gauges` -- the OpenTelemetry
  metrics API (extra ``tcpclose[metrics]``)
* :class:`LogSink` -- one structured ``logging`` line per close, sampled
* :class:`CloseTally` -- the counts both metrics sinks export, for any other engine
* :func:`tee` -- several sinks as one ``on_close``
* :func:`format_report`, :func:`report_fields` -- a report as one line, as log fields

Per close, each metrics sink only updates a tally (0.7 us called in a row, 1 to 3 us
inside an event loop on a shared machine, where its caches are cold); the engines read it
when they collect, and the host gauges read the kernel's socket table then too.
"Watching closes in production" in the docs shows them at work, with the measurements
and a dashboard.
"""

from __future__ import annotations

from ._logsink import LogSink as LogSink
from ._metrics import DURATION_BUCKETS as DURATION_BUCKETS
from ._metrics import CloseTally as CloseTally
from ._metrics import KeyTotals as KeyTotals
from ._metrics import TallySnapshot as TallySnapshot
from ._metrics import tee as tee
from ._metrics_otel import OpenTelemetrySink as OpenTelemetrySink
from ._metrics_otel import register_host_gauges as register_host_gauges
from ._metrics_prometheus import PrometheusHostCollector as PrometheusHostCollector
from ._metrics_prometheus import PrometheusSink as PrometheusSink
from ._report import format_report as format_report
from ._report import report_fields as report_fields

__all__ = (
    "DURATION_BUCKETS",
    "CloseTally",
    "KeyTotals",
    "LogSink",
    "OpenTelemetrySink",
    "PrometheusHostCollector",
    "PrometheusSink",
    "TallySnapshot",
    "format_report",
    "register_host_gauges",
    "report_fields",
    "tee",
)
