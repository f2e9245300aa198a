"""Prometheus metrics for the serving layer, written in the text exposition format by hand.

A deliberately small implementation (counters, gauges, histograms with
labels) so that serving needs no ``prometheus_client``: every metric lives in
a :class:`MetricsRegistry`, and :meth:`MetricsRegistry.render` produces the
``text/plain; version=0.0.4`` page served at ``GET /metrics``.

Metric families (all prefixed ``aladin_``):

- ``aladin_requests_total{endpoint, status}`` counter: HTTP requests by route and status code;
- ``aladin_shutdown_refusals_total{endpoint, stage}`` counter: requests answered 503 ``shutting_down``
  (also counted above as status 503): ``stage="draining"`` refused on arrival (or a reload abandoned)
  once shutdown began, ``stage="deadline"`` accepted but not answered when the graceful timeout
  expired (or at a forced exit);
- ``aladin_request_latency_seconds{endpoint}`` histogram: end-to-end handler latency;
- ``aladin_batch_size{queue}`` histogram: requests merged into one fused call;
- ``aladin_batch_latency_seconds{queue}`` histogram: time of one fused call in the worker;
- ``aladin_queue_depth{queue}`` gauge: requests waiting for a batch right now;
- ``aladin_inflight_requests`` gauge: HTTP requests being handled right now;
- ``aladin_open_connections`` gauge: HTTP connections open right now (``max_connections``);
- ``aladin_connections_closed_total{reason}`` counter: connections the server closed for a limit
  (``header_timeout``, ``header_too_large``; see :mod:`aladin_fast.serving.connections`);
- ``aladin_reloads_total{status}`` counter (``ok``, ``error``, ``abandoned``: refused or cut short by
  shutdown), ``aladin_gallery_generation`` gauge,
  ``aladin_gallery_items{direction}`` gauge.

Updates take a lock: they come from the event loop and from worker threads.
"""
from __future__ import annotations

import math
import threading
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

__all__ = ["Counter", "Gauge", "Histogram", "MetricsRegistry", "LATENCY_BUCKETS", "BATCH_SIZE_BUCKETS",
           "CONTENT_TYPE", "parse_exposition"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)

LabelValues = Tuple[str, ...]


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _format_number(value: float) -> str:
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _label_text(names: Sequence[str], values: Sequence[str], extra: Optional[Tuple[str, str]] = None) -> str:
    pairs = [f'{name}="{_escape(value)}"' for name, value in zip(names, values)]
    if extra is not None:
        pairs.append(f'{extra[0]}="{_escape(extra[1])}"')
    return "{" + ",".join(pairs) + "}" if pairs else ""


class _Metric:
    kind = "untyped"

    def __init__(self, name: str, help_text: str, label_names: Sequence[str], lock: threading.Lock):
        self.name = name
        self.help_text = help_text
        self.label_names = tuple(label_names)
        self._lock = lock

    def _key(self, labels: Dict[str, str]) -> LabelValues:
        if set(labels) != set(self.label_names):
            raise ValueError(f"metric {self.name} takes labels {list(self.label_names)}, got {sorted(labels)}")
        return tuple(str(labels[name]) for name in self.label_names)

    def header(self) -> List[str]:
        return [f"# HELP {self.name} {self.help_text}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """Monotonic count per label set."""

    kind = "counter"

    def __init__(self, *args):
        super().__init__(*args)
        self._values: Dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def lines(self) -> List[str]:
        return [f"{self.name}{_label_text(self.label_names, key)} {_format_number(value)}"
                for key, value in sorted(self._values.items())]


class Gauge(Counter):
    """A value that goes up and down per label set."""

    kind = "gauge"

    def set(self, value: float, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def dec(self, amount: float = 1.0, **labels) -> None:
        self.inc(-amount, **labels)

    def remove(self, **labels) -> None:
        """Drop the series of ``labels`` (it is no longer exported)."""
        key = self._key(labels)
        with self._lock:
            self._values.pop(key, None)


class Histogram(_Metric):
    """Cumulative buckets, sum and count per label set (Prometheus ``histogram``)."""

    kind = "histogram"

    def __init__(self, name, help_text, label_names, lock, buckets: Iterable[float]):
        super().__init__(name, help_text, label_names, lock)
        self.buckets = tuple(sorted(float(bound) for bound in buckets))
        self._series: Dict[LabelValues, List[float]] = {}  # bucket counts..., sum, count

    def observe(self, value: float, **labels) -> None:
        key = self._key(labels)
        with self._lock:
            series = self._series.get(key)
            if series is None:
                series = self._series[key] = [0.0] * (len(self.buckets) + 2)
            for position, bound in enumerate(self.buckets):
                if value <= bound:
                    series[position] += 1
            series[-2] += value
            series[-1] += 1

    def snapshot(self, **labels) -> Dict[str, float]:
        """``{"count": n, "sum": s, "le=<bound>": cumulative, ...}`` of one label set (zeros if unseen)."""
        with self._lock:
            series = self._series.get(self._key(labels), [0.0] * (len(self.buckets) + 2))
            out = {f"le={_format_number(bound)}": series[i] for i, bound in enumerate(self.buckets)}
            out.update(sum=series[-2], count=series[-1])
            return out

    def lines(self) -> List[str]:
        lines = []
        for key, series in sorted(self._series.items()):
            for position, bound in enumerate(self.buckets):
                labels = _label_text(self.label_names, key, ("le", _format_number(bound)))
                lines.append(f"{self.name}_bucket{labels} {_format_number(series[position])}")
            lines.append(f"{self.name}_bucket{_label_text(self.label_names, key, ('le', '+Inf'))} "
                         f"{_format_number(series[-1])}")
            lines.append(f"{self.name}_sum{_label_text(self.label_names, key)} {_format_number(series[-2])}")
            lines.append(f"{self.name}_count{_label_text(self.label_names, key)} {_format_number(series[-1])}")
        return lines


class MetricsRegistry:
    """The serving metrics (see the module docstring) and their exposition."""

    def __init__(self):
        self._lock = threading.Lock()
        self._metrics: List[_Metric] = []
        self.requests = self._add(Counter("aladin_requests_total", "HTTP requests by endpoint and status code.",
                                          ("endpoint", "status"), self._lock))
        self.shutdown_refusals = self._add(Counter(
            "aladin_shutdown_refusals_total", "Requests answered 503 shutting_down, by endpoint and shutdown stage "
            "(draining: refused on arrival; deadline: not answered within the graceful timeout).",
            ("endpoint", "stage"), self._lock))
        self.request_latency = self._add(Histogram(
            "aladin_request_latency_seconds", "End-to-end request latency in seconds.", ("endpoint",), self._lock,
            LATENCY_BUCKETS))
        self.batch_size = self._add(Histogram("aladin_batch_size", "Requests merged into one fused call.", ("queue",),
                                              self._lock, BATCH_SIZE_BUCKETS))
        self.batch_latency = self._add(Histogram(
            "aladin_batch_latency_seconds", "Time of one fused call in the worker thread.", ("queue",), self._lock,
            LATENCY_BUCKETS))
        self.queue_depth = self._add(Gauge("aladin_queue_depth", "Requests waiting to be batched.", ("queue",),
                                           self._lock))
        self.inflight = self._add(Gauge("aladin_inflight_requests", "HTTP requests being handled.", (), self._lock))
        self.open_connections = self._add(Gauge("aladin_open_connections", "HTTP connections open.", (),
                                                self._lock))
        self.connections_closed = self._add(Counter(
            "aladin_connections_closed_total", "Connections closed by the server for a limit, by reason "
            "(header_timeout, header_too_large).", ("reason",), self._lock))
        self.reloads = self._add(Counter("aladin_reloads_total", "Gallery reloads by outcome.", ("status",),
                                         self._lock))
        self.generation = self._add(Gauge("aladin_gallery_generation", "Generation of the serving gallery.", (),
                                          self._lock))
        self.gallery_items = self._add(Gauge("aladin_gallery_items", "Gallery items per direction.", ("direction",),
                                             self._lock))

    def _add(self, metric):
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        """The whole registry in Prometheus text format (``CONTENT_TYPE``)."""
        lines: List[str] = []
        with self._lock:
            for metric in self._metrics:
                lines.extend(metric.header())
                lines.extend(metric.lines())
        return "\n".join(lines) + "\n"


def parse_exposition(text: str) -> Dict[str, float]:
    """Sample lines of an exposition page as ``{'name{labels}': value}`` (for tests and the load test)."""
    samples = {}
    for line in text.split("\n"):  # not splitlines(): \r, \x1e, \u2028... are legal, unescaped, in label values
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        samples[name] = float(value)
    return samples
