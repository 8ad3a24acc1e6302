"""Recovery: the facilitator is down while a 10,000-update backlog builds, then comes back up.

The simulator process stops listening (``down``: its connections close, new ones are refused), the
updates are reported and held by the outbox, then it listens again on the same port (``up``). The
figure is the time from ``up`` to the last Response read, compared with the time the throughput
run took for the same count. It includes the client's next reconnect attempt (backoff capped at
50 ms here), the opening handshake and the auth round trip.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from bench.common import (
    Counter,
    SimProcess,
    enqueue,
    running_client,
    until_connected,
    until_state,
    workload,
)
from streams import ConnectionState


@dataclass(frozen=True, slots=True)
class Recovery:
    count: int
    seconds: float
    """From the facilitator listening again to the last Response read."""
    reconnect_seconds: float
    """From the facilitator listening again to the client authenticated."""


async def recovery_run(count: int) -> Recovery:
    updates = workload(count, seed=2)
    async with SimProcess("--accept-unknown-jobs") as sim:
        async with running_client(sim.url, "bench-recovery-client") as client:
            await sim.command("down")
            await until_state(client, ConnectionState.DISCONNECTED)
            enqueue(client, updates)
            depth = client.pending
            assert depth.held + depth.wire == count, depth
            acks = Counter()
            client._messages.acks.subscribe(acks)
            reconnected = asyncio.create_task(until_connected(client, timeout=30), name="bench-recovery-reconnect")
            await sim.command("up")
            t0 = time.perf_counter()
            await reconnected
            reconnect_seconds = time.perf_counter() - t0
            await acks.reached(count, timeout=120)
            seconds = time.perf_counter() - t0
            counters = client.metrics.snapshot()["counters"]
            assert counters.get("acks.success") == count, counters
        stats = await sim.command("stats")
    assert stats["stored"] == count, stats
    return Recovery(count, seconds, reconnect_seconds)
