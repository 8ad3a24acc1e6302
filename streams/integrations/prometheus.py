"""The client's metrics as Prometheus collectors, beside (or instead of) statsd.

    sink = PrometheusSink()                 # registers in prometheus_client's global REGISTRY
    client.metrics.add_sink(sink)           # before or after start(): counts so far are handed over

Every metric of the README's table becomes a counter (``_total``), a gauge, or a histogram in seconds,
named ``facilitator_client_<name>`` with the dimension statsd puts into the dotted name as a label
(``messages.sent.V0JobStatusUpdate`` -> ``facilitator_client_messages_sent_total{type="V0JobStatusUpdate"}``).
:data:`METRICS` is the mapping (the README's Prometheus table is checked against it). A name not in it
still shows up, under its dotted name with ``.`` -> ``_``.

Collectors are registered once per registry and namespace and shared by every sink on it, so two clients
in one process add up instead of failing as duplicates. The default is the global REGISTRY, which an
existing ``/metrics`` view (``prometheus_client.generate_latest()``) already shows. Multiprocess mode
(``PROMETHEUS_MULTIPROC_DIR`` set before prometheus_client is imported) works as prometheus_client
documents it: values go to files in that directory, gauges sum over live processes (``livesum``), and
the scraping process serves a registry with a ``MultiProcessCollector`` (:func:`serve_metrics` does).

Needs the ``prometheus`` extra (``prometheus_client``).
"""

from __future__ import annotations

import logging
import math
import os
import re
import threading
import weakref
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from streams.metrics import FlushedPerIteration

log = logging.getLogger(__name__)

__all__ = [
    "DURATION_BUCKETS",
    "LATENCY_BUCKETS",
    "METRICS",
    "MetricSpec",
    "MetricsServer",
    "PrometheusSink",
    "multiprocess_mode",
    "serve_metrics",
]

Kind = Literal["counter", "gauge", "histogram"]

LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0, 30.0, math.inf)
"""Seconds, for per-message latencies (enqueue to wire: sub-ms; acks: ms to s)."""
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
                    3600.0, math.inf)
"""Seconds, for connection set-up and outages (ms to an hour)."""


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One statsd name (``<label>`` marks the part that becomes a label) and its Prometheus collector."""

    statsd: str
    """e.g. ``messages.sent.<type>``: a dotted name, optionally ending in one ``<label>`` part."""
    kind: Kind
    name: str
    """The exposed name without the namespace, e.g. ``messages_sent_total``."""
    doc: str
    labels: tuple[tuple[str, str], ...] = ()
    """Fixed labels this statsd name sets (``acks.success`` -> ``outcome="success"``)."""
    buckets: tuple[float, ...] = LATENCY_BUCKETS

    @property
    def variable_label(self) -> str | None:
        _head, sep, tail = self.statsd.rpartition(".<")
        return tail[:-1] if sep else None

    @property
    def prefix(self) -> str:
        """The statsd name up to the variable part (with its trailing dot), or the whole name."""
        label = self.variable_label
        return self.statsd[: -len(label) - 2] if label else self.statsd


def _c(statsd: str, name: str, doc: str, *labels: tuple[str, str]) -> MetricSpec:
    return MetricSpec(statsd, "counter", name, doc, labels)


def _g(statsd: str, name: str, doc: str) -> MetricSpec:
    return MetricSpec(statsd, "gauge", name, doc)


def _h(statsd: str, name: str, doc: str, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> MetricSpec:
    return MetricSpec(statsd, "histogram", name, doc, (), buckets)


METRICS: tuple[MetricSpec, ...] = (
    _c("connect.attempts", "connect_attempts_total", "Connection attempts."),
    _c("connect.successes", "connect_successes_total", "Connections that reached auth success."),
    _c("connect.failures", "connect_failures_total", "Attempts that did not reach auth success."),
    _c("auth.failures", "auth_failures_total", "Auth rejected, unreadable or timed out."),
    _c("disconnects.<code>", "disconnects_total", "Authenticated connections that ended, by close code."),
    _g("connected", "connected", "1 while connected and authenticated, else 0."),
    _h("connect.duration", "connect_duration_seconds", "From the start of an attempt to auth success.",
       DURATION_BUCKETS),
    _h("downtime", "downtime_seconds", "From the end of a connection to the next auth success.", DURATION_BUCKETS),
    _c("messages.sent.<type>", "messages_sent_total", "Frames written, by message type (resends included)."),
    _c("messages.resent.<type>", "messages_resent_total", "Resends of unacknowledged status updates."),
    _c("messages.send_failed.<type>", "messages_send_failed_total", "Writes a dying connection refused."),
    _c("messages.requeued", "messages_requeued_total", "Unacknowledged updates put back when a connection ended."),
    _c("messages.dropped.<type>", "messages_dropped_total", "Messages given up, by type."),
    _c("messages.coalesced.<type>", "messages_coalesced_total", "Heartbeats replaced or discarded as stale."),
    _g("outbox.depth", "outbox_depth", "Messages queued and not yet written."),
    _g("outbox.bytes", "outbox_bytes", "Bytes of the messages the outbox holds back."),
    _g("inflight.depth", "inflight_depth", "Status updates written and awaiting their Response."),
    _h("latency.enqueue_to_wire", "enqueue_to_wire_latency_seconds", "From enqueue to first write."),
    _h("latency.ack", "ack_latency_seconds", "From the last write of a status update to its Response."),
    _c("acks.success", "acks_total", "Answered status updates, by outcome (and error type).",
       ("outcome", "success"), ("error_type", "")),
    _c("acks.duplicate", "acks_total", "", ("outcome", "duplicate"), ("error_type", "")),
    _c("acks.error.<error_type>", "acks_total", "", ("outcome", "error")),
    _c("messages.unexpected_responses", "unexpected_responses_total", "Responses with nothing in flight."),
    _c("messages.received.<type>", "messages_received_total", "Inbound messages, by type."),
    _c("messages.malformed", "messages_malformed_total", "Inbound frames that are not valid messages."),
    _c("jobs.dispatched", "jobs_dispatched_total", "Job requests handed to the dispatcher."),
    _c("jobs.duplicates", "jobs_duplicates_total", "Job requests for a uuid already dispatched."),
    _c("jobs.failed", "jobs_failed_total", "Dispatcher calls that raised (horde_failed reported)."),
    _g("jobs.active", "jobs_active", "Dispatched jobs not finished yet."),
    _c("cheat.reports", "cheat_reports_total", "V0JobCheated reports received."),
    _c("cheat.handler_failures", "cheat_handler_failures_total", "on_cheat calls that raised."),
    _c("dispatcher.failures.<operation>", "dispatcher_failures_total", "A dispatcher's own trouble, retried."),
    _c("source.failures.<operation>", "source_failures_total", "A spec source's trouble (outage, bad message)."),
    _c("events.subscriber_errors", "subscriber_errors_total", "Host subscribers that raised, by stream.",
       ("stream", "events")),
    _c("state.subscriber_errors", "subscriber_errors_total", "", ("stream", "state")),
)

_GENERIC = re.compile(r"[^A-Za-z0-9_]")


def multiprocess_mode() -> bool:
    """Whether prometheus_client writes values to ``PROMETHEUS_MULTIPROC_DIR`` (decided at its import)."""
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir"))


Collector = Counter | Gauge | Histogram


class _Collectors:
    """The collectors of one registry and namespace, created on first use and shared by all sinks."""

    def __init__(self, registry: CollectorRegistry, namespace: str) -> None:
        self.registry = registry
        self.namespace = namespace
        self.lock = threading.Lock()
        self.by_name: dict[str, Collector] = {}
        self.label_names: dict[str, tuple[str, ...]] = {}
        self.kinds: dict[str, Kind] = {}
        # Everything of the table at once: unlabelled series show 0 from the first scrape (rate() works).
        for spec in METRICS:
            self.get(spec.kind, spec.name, spec.doc or spec.name, self._label_names(spec), spec.buckets)

    @staticmethod
    def _label_names(spec: MetricSpec) -> tuple[str, ...]:
        names = [label for label, _ in spec.labels]
        variable = spec.variable_label
        if variable is not None and variable not in names:
            names.append(variable)
        # Every statsd name feeding one metric must give it the same label names.
        for other in METRICS:
            if other.name == spec.name:
                for label in [label for label, _ in other.labels] + [other.variable_label or ""]:
                    if label and label not in names:
                        names.append(label)
        return tuple(names)

    def get(
        self, kind: Kind, name: str, doc: str, labels: tuple[str, ...], buckets: tuple[float, ...] = LATENCY_BUCKETS
    ) -> Collector:
        with self.lock:
            existing = self.by_name.get(name)
            if existing is not None:
                if self.kinds[name] != kind or (labels and self.label_names[name] != labels):
                    raise ValueError(f"{name} is already a {self.kinds[name]} labelled {self.label_names[name]}")
                return existing
            full = f"{self.namespace}_{name}" if self.namespace else name
            collector: Collector
            if kind == "counter":
                collector = Counter(full.removesuffix("_total"), doc, labels, registry=self.registry)
            elif kind == "gauge":
                collector = Gauge(full, doc, labels, registry=self.registry, multiprocess_mode="livesum")
            else:
                collector = Histogram(full, doc, labels, registry=self.registry, buckets=buckets)
            self.by_name[name] = collector
            self.kinds[name] = kind
            self.label_names[name] = labels
            return collector


_shared: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, _Collectors]] = weakref.WeakKeyDictionary()
_shared_lock = threading.Lock()


def _collectors(registry: CollectorRegistry, namespace: str) -> _Collectors:
    with _shared_lock:
        per_namespace = _shared.setdefault(registry, {})
        collectors = per_namespace.get(namespace)
        if collectors is None:
            collectors = per_namespace[namespace] = _Collectors(registry, namespace)
        return collectors


_EXACT: dict[str, MetricSpec] = {spec.statsd: spec for spec in METRICS if spec.variable_label is None}
_PREFIXED: tuple[MetricSpec, ...] = tuple(spec for spec in METRICS if spec.variable_label is not None)


class _Timings:
    """One histogram's observations since the last flush, counted per bucket (what ``observe`` would add).

    ``publish`` adds each bucket's count to the child's ``_buckets[i]`` and the total to ``_sum``: exactly
    what ``Histogram.observe`` does per call (prometheus_client 0.2x), once per bucket instead of once
    per sample. Those are internals: a version without them gets plain ``observe`` calls per sample.
    """

    __slots__ = ("bounds", "child", "counts", "samples", "total")

    def __init__(self, child: Collector) -> None:
        self.child = child
        bounds = getattr(child, "_upper_bounds", None)
        batchable = (
            isinstance(bounds, list) and len(getattr(child, "_buckets", ())) == len(bounds)
            and hasattr(child, "_sum")
        )
        self.bounds: list[float] | None = bounds if batchable else None
        self.counts = [0] * len(bounds) if batchable and bounds is not None else []
        self.total = 0.0
        self.samples: list[float] = []  # only without the batchable internals

    def add(self, seconds: float) -> None:
        if self.bounds is None:
            self.samples.append(seconds)
            return
        self.counts[bisect_left(self.bounds, seconds)] += 1  # observe(): the first bound >= the value
        self.total += seconds

    def publish(self) -> None:
        """What the ``observe`` calls would have done, one ``inc`` per touched bucket."""
        if self.bounds is None:
            samples, self.samples = self.samples, []
            for seconds in samples:
                self.child.observe(seconds)  # type: ignore[union-attr]
            return
        buckets: Any = self.child._buckets  # type: ignore[union-attr]
        for index, count in enumerate(self.counts):
            if count:
                buckets[index].inc(count)
                self.counts[index] = 0
        self.child._sum.inc(self.total)  # type: ignore[union-attr]
        self.total = 0.0


class PrometheusSink(FlushedPerIteration):
    """A ``streams.metrics.MetricsSink`` batching into the collectors once per event-loop iteration.

    prometheus_client's own updates cost ~1-3 µs each (a lock, and a file write in multiprocess mode): on the
    per-message path the sink only adds to dicts and per-bucket counts, and ``flush()`` (scheduled once per
    loop iteration, at once without a running loop, and at ``close()``) hands the sums over. A scrape sees
    what was recorded up to the last loop iteration.

    ``registry``: where the collectors live (default the global REGISTRY). ``namespace``: the name prefix
    (default ``facilitator_client``, as the statsd prefix).
    """

    def __init__(self, registry: CollectorRegistry | None = None, namespace: str = "facilitator_client") -> None:
        if namespace and not re.fullmatch(r"[a-zA-Z_][a-zA-Z0-9_]*", namespace):
            raise ValueError(f"namespace must be a Prometheus name ([a-zA-Z_][a-zA-Z0-9_]*), got {namespace!r}")
        self.registry = registry if registry is not None else REGISTRY
        self._collectors = _collectors(self.registry, namespace)
        self._counts: dict[str, float] = {}
        self._gauges: dict[str, float] = {}
        self._timings: dict[str, _Timings] = {}
        self._touched: set[_Timings] = set()
        self._incs: dict[str, Callable[[float], None]] = {}
        self._sets: dict[str, Callable[[float], None]] = {}

    # -- the MetricsSink protocol: per-message path --------------------------------------------
    def incr(self, name: str, count: float) -> None:
        self._counts[name] = self._counts.get(name, 0.0) + count
        if not self._flush_scheduled:
            self._schedule()

    def gauge(self, name: str, value: float) -> None:
        self._gauges[name] = value
        if not self._flush_scheduled:
            self._schedule()

    def timing(self, name: str, seconds: float) -> None:
        timings = self._timings.get(name)
        if timings is None:
            timings = self._timings[name] = _Timings(self._resolve("histogram", name))
        timings.add(seconds)
        self._touched.add(timings)
        if not self._flush_scheduled:
            self._schedule()

    def flush(self) -> None:
        """Hand what was recorded since the last flush to the collectors."""
        super().flush()
        counts, self._counts = self._counts, {}
        for name, count in counts.items():
            inc = self._incs.get(name)
            if inc is None:
                inc = self._incs[name] = self._resolve("counter", name).inc  # type: ignore[union-attr]
            inc(count)
        gauges, self._gauges = self._gauges, {}
        for name, value in gauges.items():
            set_ = self._sets.get(name)
            if set_ is None:
                set_ = self._sets[name] = self._resolve("gauge", name).set  # type: ignore[union-attr]
            set_(value)
        touched, self._touched = self._touched, set()
        for timings in touched:
            timings.publish()

    def close(self) -> None:
        """Hand over what is pending; the collectors stay registered (a later scrape still shows the totals)."""
        self.flush()

    # -- first sight of a name ----------------------------------------------------------------
    def _resolve(self, kind: Kind, name: str) -> Collector:
        """The collector (child, with labels) for a statsd name; cached by the caller."""
        spec, variable = _lookup(name)
        if spec is not None and spec.kind == kind:
            collector = self._collectors.get(spec.kind, spec.name, spec.doc or spec.name, ())
            values = dict(spec.labels)
            if spec.variable_label is not None:
                values[spec.variable_label] = variable
            labels = self._collectors.label_names[spec.name]
            return collector.labels(**{label: values.get(label, "") for label in labels}) if labels else collector
        generic = _GENERIC.sub("_", name)
        suffix = {"counter": "_total", "gauge": "", "histogram": "_seconds"}[kind]
        try:
            collector = self._collectors.get(kind, f"{generic}{suffix}", f"{name} (statsd name)", ())
            if self._collectors.label_names[f"{generic}{suffix}"]:
                raise ValueError(f"{generic}{suffix} has labels {self._collectors.label_names[f'{generic}{suffix}']}")
            return collector
        except ValueError as exc:  # clashes with a collector of another type or labels
            log.warning("metric %s is not exported to Prometheus: %s", name, exc)
            return _NULL


def _lookup(name: str) -> tuple[MetricSpec | None, str]:
    spec = _EXACT.get(name)
    if spec is not None:
        return spec, ""
    for spec in _PREFIXED:
        prefix = spec.prefix
        if name.startswith(prefix) and len(name) > len(prefix):
            return spec, name[len(prefix):]
    return None, ""


class _Null:
    """Stands in for a metric that could not be registered: every update is a no-op."""

    def inc(self, amount: float = 1) -> None:
        pass

    def set(self, value: float) -> None:
        pass

    def observe(self, amount: float) -> None:
        pass


_NULL: Collector = _Null()  # type: ignore[assignment]


class MetricsServer:
    """``/metrics`` over HTTP in a daemon thread (prometheus_client's WSGI server)."""

    def __init__(self, port: int, host: str = "127.0.0.1", registry: CollectorRegistry | None = None) -> None:
        if registry is None:
            registry = REGISTRY
            if multiprocess_mode():
                from prometheus_client import multiprocess

                registry = CollectorRegistry()
                multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        self.registry = registry
        self._server, self._thread = start_http_server(port, addr=host, registry=registry)
        self.host = host
        self.port: int = self._server.server_address[1]

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port (waits for the serving thread, bounded)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def serve_metrics(port: int, host: str = "127.0.0.1", registry: CollectorRegistry | None = None) -> MetricsServer:
    """Serve ``registry`` (default: the global REGISTRY, or every process's values in multiprocess mode)."""
    return MetricsServer(port, host, registry)


def mark_process_dead(pid: int | None = None) -> None:
    """Multiprocess mode: drop this process's live gauges (call at exit; a no-op otherwise)."""
    if not multiprocess_mode():
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(os.getpid() if pid is None else pid)  # type: ignore[no-untyped-call]
