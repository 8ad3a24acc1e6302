"""Latency: enqueue-to-wire at a steady 1,000 status updates per second, while connected.

Each update is timed from just before ``report(status)`` (so the model, the encoding and the
whole outbox are inside the span) to the moment its ``ws.send`` returned (the frame is written to
the socket, or queued in the transport's buffer), as the client's ``messages.sent`` stream reports
it. Responses flow at the same time (the simulator, in its own process, answers every update).
The first ``warmup`` updates are not counted.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from bench.common import SimProcess, quantile, running_client, workload
from streams.dispatchers import Report
from streams.message_manager import Sent


@dataclass(frozen=True, slots=True)
class Latency:
    rate: float
    count: int
    p50: float
    p99: float
    max: float
    achieved_rate: float


async def latency_run(rate: float, seconds: float, warmup: int = 500) -> Latency:
    total = warmup + int(rate * seconds)
    updates = workload(total, seed=3)
    started: dict[tuple[str, str], tuple[int, float]] = {}
    samples: list[float] = []
    done = asyncio.Event()
    clock = time.monotonic

    def on_sent(sent: Sent) -> None:
        envelope = sent.envelope
        if envelope.job_uuid is None or sent.resend:
            return
        begun = started.pop((envelope.job_uuid, envelope.status or ""), None)
        if begun is not None and begun[0] >= warmup:
            samples.append(clock() - begun[1])
            if len(samples) == total - warmup:
                done.set()

    async with SimProcess("--accept-unknown-jobs") as sim:
        async with running_client(sim.url, "bench-latency-client") as client:
            client._messages.sent.subscribe(on_sent)
            reporters: dict[str, Report] = {}
            begin = clock()
            first_counted = 0.0
            for i, (job, status) in enumerate(updates):
                due = begin + i / rate
                delay = due - clock()
                if delay > 0:
                    await asyncio.sleep(delay)
                if i == warmup:
                    first_counted = clock()
                report = reporters.get(job)
                if report is None:
                    report = reporters[job] = client._statuses.open(job)
                started[(job, status.value)] = (i, clock())
                report(status)
            elapsed = clock() - first_counted
            async with asyncio.timeout(10):
                await done.wait()
    return Latency(
        rate, len(samples), quantile(samples, 0.5), quantile(samples, 0.99), max(samples),
        (total - warmup) / elapsed,
    )
