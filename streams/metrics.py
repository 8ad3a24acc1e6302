"""In-memory counters, gauges and timings, mirrored to sinks: statsd when an address is configured, others
(``streams.integrations.prometheus.PrometheusSink``) added with ``Metrics.add_sink``.

statsd has no tags, so dimensions go into dotted names (``messages.sent.V0JobStatusUpdate``).
A statsd address that does not resolve or a send that fails never breaks the client: statsd is
UDP and fire-and-forget, and every call here is guarded.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import re
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import statsd

__all__ = ["RESERVOIR", "FlushedPerIteration", "Metrics", "Tally", "quantile", "safe_name"]

log = logging.getLogger(__name__)

RESERVOIR = 10_000

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


@functools.lru_cache(maxsize=4096)
def safe_name(name: str) -> str:
    """Parts of names come off the wire (the facilitator's error types): keep statsd's ``:|@`` out."""
    return _UNSAFE.sub("_", name)


class MetricsSink(Protocol):
    """Where recorded metrics are mirrored (statsd, Prometheus, a host's own).

    Called on the per-message path, on the loop thread: keep each call cheap and never raise
    (``Metrics`` guards every call anyway: a sink that raises is logged once and then ignored).
    Names are the dotted ``safe_name``s of the README's table; timings are in seconds.
    """

    def incr(self, name: str, count: float) -> None: ...

    def gauge(self, name: str, value: float) -> None: ...

    def timing(self, name: str, seconds: float) -> None: ...

    def close(self) -> None: ...


class FlushedPerIteration:
    """Holds what it records and hands it on in ``flush()``, scheduled once per event-loop iteration.

    The per-message path only appends to memory; the hand-over (a UDP send, the Prometheus collectors,
    the `Metrics` dictionaries) runs once for everything one loop iteration recorded. Outside a
    running loop (a host's thread, tests) it hands over at once. Subclasses implement ``flush()``
    and start it with ``super().flush()`` (which clears the schedule).
    """

    _flush_scheduled = False

    def _schedule(self) -> None:
        if self._flush_scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop: hand over at once
            self.flush()
            return
        self._flush_scheduled = True
        loop.call_soon(self.flush)

    def flush(self) -> None:
        self._flush_scheduled = False


class StatsdSink(FlushedPerIteration):
    """statsd over UDP: ``<prefix>.<name>``, timings in ms, packed into few datagrams per loop iteration."""

    def __init__(self, host: str, port: int = 8125, prefix: str = "facilitator_client") -> None:
        """Raises (OSError, UnicodeError, ValueError) when the address cannot be used."""
        if not 0 < port < 65536:  # getaddrinfo would silently wrap it around
            raise ValueError(f"port {port} is out of range")
        self._statsd = statsd.StatsClient(host, port, prefix=prefix)
        self._pipeline: Any = self._statsd.pipeline()
        self._failed = False

    def incr(self, name: str, count: float) -> None:
        self._pipeline.incr(name, count)
        self._schedule()

    def gauge(self, name: str, value: float) -> None:
        self._pipeline.gauge(name, value)
        self._schedule()

    def timing(self, name: str, seconds: float) -> None:
        self._pipeline.timing(name, seconds * 1000.0)
        self._schedule()

    def flush(self) -> None:
        """Send what was recorded since the last flush, packed into few UDP datagrams.

        Called once per event-loop iteration: one datagram per metric call would cost a system
        call each, several per status update at full speed.
        """
        super().flush()
        try:
            self._pipeline.send()
        except Exception as exc:  # statsd must never break the client
            self._error(exc)

    def _error(self, exc: Exception) -> None:
        if not self._failed:
            log.warning("statsd send failed (further failures are silent): %s", exc)
            self._failed = True

    def close(self) -> None:
        self.flush()
        try:
            self._statsd.close()
        except Exception:
            pass


class Tally(FlushedPerIteration):
    """Per-message counts and timings kept as plain ints and lists, handed to `Metrics` once per
    event-loop iteration (issue 17: a ``Metrics.incr`` per status update sent, acknowledged and
    received was ~7% of the client's own CPU per update). Reading the metrics hands them over first,
    so a read is always exact; sinks get them at most one loop iteration later. Get one with
    `Metrics.tally`; use it from the loop's thread."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self._counts: dict[str, int] = {}
        self._timings: dict[str, list[float]] = {}
        self._flush_scheduled = False

    def incr(self, name: str) -> None:
        counts = self._counts
        counts[name] = counts.get(name, 0) + 1
        if not self._flush_scheduled:
            self._schedule()

    def timing(self, name: str, seconds: float) -> None:
        samples = self._timings.get(name)
        if samples is None:
            samples = self._timings[name] = []
        samples.append(seconds)
        if not self._flush_scheduled:
            self._schedule()

    def flush(self) -> None:
        """Hand what was tallied to the metrics (and their sinks)."""
        super().flush()
        counts, timings = self._counts, self._timings
        if counts:
            self._counts = {}
            for name, count in counts.items():
                self._metrics.incr(name, count)
        if timings:
            self._timings = {}
            for name, samples in timings.items():
                self._metrics.timings(name, samples)


class Metrics:
    def __init__(
        self,
        statsd_host: str | None = None,
        statsd_port: int = 8125,
        prefix: str = "facilitator_client",
        sinks: Iterable[MetricsSink] = (),
    ) -> None:
        self.prefix = prefix
        self._counters: dict[str, float] = {}
        self._gauges: dict[str, float] = {}
        self._timings: dict[str, deque[float]] = {}
        self._timing_counts: dict[str, int] = {}
        self._sinks: list[MetricsSink] = []
        self._failed_sinks: set[int] = set()
        self._tallies: list[Tally] = []
        if statsd_host:
            try:
                self._sinks.append(StatsdSink(statsd_host, statsd_port, prefix))
            except Exception as exc:  # unresolvable (OSError), malformed name (UnicodeError), bad port
                log.warning("statsd %s:%s unusable, metrics stay in memory: %s", statsd_host, statsd_port, exc)
        for sink in sinks:
            self.add_sink(sink)

    @property
    def sinks(self) -> tuple[MetricsSink, ...]:
        return tuple(self._sinks)

    def add_sink(self, sink: MetricsSink) -> None:
        """Mirror metrics to ``sink`` too; what was counted so far (counters, gauges) is handed over first."""
        for method in ("incr", "gauge", "timing", "close"):
            if not callable(getattr(sink, method, None)):
                raise TypeError(f"a metrics sink needs .{method}(); {type(sink).__name__} has none")
        for name, count in self._counters.items():
            self._call(sink, "incr", name, count)
        for name, value in self._gauges.items():
            self._call(sink, "gauge", name, value)
        self._sinks.append(sink)

    def tally(self) -> Tally:
        """A `Tally` for per-message counts and timings, handed over once per loop iteration."""
        tally = Tally(self)
        self._tallies.append(tally)
        return tally

    def _collect(self) -> None:
        for tally in self._tallies:
            tally.flush()

    # -- recording ------------------------------------------------------------------------------
    def incr(self, name: str, count: float = 1) -> None:
        name = safe_name(name)
        self._counters[name] = self._counters.get(name, 0) + count
        if self._sinks:
            for sink in self._sinks:
                try:
                    sink.incr(name, count)
                except Exception as exc:  # a sink must never break the client
                    self._sink_error(sink, exc)

    def gauge(self, name: str, value: float) -> None:
        name = safe_name(name)
        if self._gauges.get(name) == value:
            return
        self._gauges[name] = value
        if self._sinks:
            for sink in self._sinks:
                try:
                    sink.gauge(name, value)
                except Exception as exc:
                    self._sink_error(sink, exc)

    def timing(self, name: str, seconds: float) -> None:
        name = safe_name(name)
        samples = self._timings.get(name)
        if samples is None:
            samples = self._timings[name] = deque(maxlen=RESERVOIR)
        samples.append(seconds)
        self._timing_counts[name] = self._timing_counts.get(name, 0) + 1
        if self._sinks:
            for sink in self._sinks:
                try:
                    sink.timing(name, seconds)
                except Exception as exc:
                    self._sink_error(sink, exc)

    def timings(self, name: str, samples: Sequence[float]) -> None:
        """``timing(name, s)`` for each of ``samples``, in one call."""
        name = safe_name(name)
        reservoir = self._timings.get(name)
        if reservoir is None:
            reservoir = self._timings[name] = deque(maxlen=RESERVOIR)
        reservoir.extend(samples)
        self._timing_counts[name] = self._timing_counts.get(name, 0) + len(samples)
        if self._sinks:
            for sink in self._sinks:
                try:
                    for seconds in samples:
                        sink.timing(name, seconds)
                except Exception as exc:
                    self._sink_error(sink, exc)

    def _call(self, sink: MetricsSink, method: str, name: str, value: float) -> None:
        try:
            getattr(sink, method)(name, value)
        except Exception as exc:
            self._sink_error(sink, exc)

    def _sink_error(self, sink: MetricsSink, exc: Exception) -> None:
        if id(sink) not in self._failed_sinks:
            self._failed_sinks.add(id(sink))
            kind = "statsd" if isinstance(sink, StatsdSink) else type(sink).__name__
            log.warning("%s send failed (further failures are silent): %s", kind, exc)

    def flush(self) -> None:
        """Send what the sinks hold back (statsd batches per loop iteration)."""
        self._collect()
        for sink in self._sinks:
            flush = getattr(sink, "flush", None)
            if flush is not None:
                try:
                    flush()
                except Exception as exc:
                    self._sink_error(sink, exc)

    # -- reading --------------------------------------------------------------------------------
    def counter(self, name: str) -> float:
        self._collect()
        return self._counters.get(safe_name(name), 0)

    def gauge_value(self, name: str) -> float | None:
        self._collect()
        return self._gauges.get(safe_name(name))

    def samples(self, name: str) -> list[float]:
        self._collect()
        return list(self._timings.get(safe_name(name), ()))

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able copy: counters, gauges, and per timing count/mean/p50/p99/max in seconds."""
        self._collect()
        timings: dict[str, dict[str, float]] = {}
        for name, samples in self._timings.items():
            ordered = sorted(samples)
            timings[name] = {
                "count": self._timing_counts[name],
                "mean": statistics.fmean(ordered),
                "p50": quantile(ordered, 0.50),
                "p99": quantile(ordered, 0.99),
                "max": ordered[-1],
            }
        return {"counters": dict(self._counters), "gauges": dict(self._gauges), "timings": timings}

    def close(self) -> None:
        self.flush()
        for sink in self._sinks:
            try:
                sink.close()
            except Exception:
                pass


def quantile(ordered: Sequence[float], q: float) -> float:
    """The q-quantile of sorted values, interpolated linearly between ranks (0.0 for no values).

    The one definition the metrics snapshot and the replay summary share.
    """
    if not ordered:
        return 0.0
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
