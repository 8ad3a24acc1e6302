"""In-memory counters, gauges and timings, mirrored to statsd when an address is configured.

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
from collections.abc import Sequence
from typing import Any

import statsd

__all__ = ["RESERVOIR", "Metrics", "quantile", "safe_name"]

log = logging.getLogger(__name__)

RESERVOIR = 10_000

_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")


@functools.lru_cache(maxsize=4096)
def safe_name(name: str) -> str:
    """Parts of names come off the wire (the facilitator's error types): keep statsd's ``:|@`` out."""
    return _UNSAFE.sub("_", name)


class Metrics:
    def __init__(
        self,
        statsd_host: str | None = None,
        statsd_port: int = 8125,
        prefix: str = "facilitator_client",
    ) -> None:
        self.prefix = prefix
        self._counters: dict[str, float] = {}
        self._gauges: dict[str, float] = {}
        self._timings: dict[str, deque[float]] = {}
        self._timing_counts: dict[str, int] = {}
        self._statsd: statsd.StatsClient | None = None
        self._statsd_failed = False
        self._flush_scheduled = False
        self._pipeline: Any = None
        if statsd_host:
            try:
                if not 0 < statsd_port < 65536:  # getaddrinfo would silently wrap it around
                    raise ValueError(f"port {statsd_port} is out of range")
                self._statsd = statsd.StatsClient(statsd_host, statsd_port, prefix=prefix)
                self._pipeline = self._statsd.pipeline()
            except Exception as exc:  # unresolvable (OSError), malformed name (UnicodeError), bad port
                log.warning("statsd %s:%s unusable, metrics stay in memory: %s", statsd_host, statsd_port, exc)

    # -- recording ------------------------------------------------------------------------------
    def incr(self, name: str, count: float = 1) -> None:
        name = safe_name(name)
        self._counters[name] = self._counters.get(name, 0) + count
        self._mirror("incr", name, count)

    def gauge(self, name: str, value: float) -> None:
        name = safe_name(name)
        if self._gauges.get(name) == value:
            return
        self._gauges[name] = value
        self._mirror("gauge", name, value)

    def timing(self, name: str, seconds: float) -> None:
        name = safe_name(name)
        samples = self._timings.get(name)
        if samples is None:
            samples = self._timings[name] = deque(maxlen=RESERVOIR)
        samples.append(seconds)
        self._timing_counts[name] = self._timing_counts.get(name, 0) + 1
        self._mirror("timing", name, seconds * 1000.0)

    def _mirror(self, method: str, name: str, value: float) -> None:
        if self._statsd is None:
            return
        try:
            getattr(self._pipeline, method)(name, value)
        except Exception as exc:  # statsd must never break the client
            self._statsd_error(exc)
            return
        if not self._flush_scheduled:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # no loop (a host's thread, tests): send at once
                self.flush()
                return
            self._flush_scheduled = True
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send what was recorded since the last flush, packed into few UDP datagrams.

        Called once per event-loop iteration: one datagram per metric call would cost a system
        call each, several per status update at full speed.
        """
        self._flush_scheduled = False
        if self._statsd is None:
            return
        try:
            self._pipeline.send()
        except Exception as exc:  # statsd must never break the client
            self._statsd_error(exc)

    def _statsd_error(self, exc: Exception) -> None:
        if not self._statsd_failed:
            log.warning("statsd send failed (further failures are silent): %s", exc)
            self._statsd_failed = True

    # -- reading --------------------------------------------------------------------------------
    def counter(self, name: str) -> float:
        return self._counters.get(safe_name(name), 0)

    def gauge_value(self, name: str) -> float | None:
        return self._gauges.get(safe_name(name))

    def samples(self, name: str) -> list[float]:
        return list(self._timings.get(safe_name(name), ()))

    def snapshot(self) -> dict[str, Any]:
        """A JSON-able copy: counters, gauges, and per timing count/mean/p50/p99/max in seconds."""
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
        if self._statsd is not None:
            try:
                self._statsd.close()
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
