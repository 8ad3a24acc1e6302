"""Idle cost: the CPU a connected client uses with nothing to send (heartbeats and pings only).

The client is connected to the simulator (its own process), then left alone for ``seconds`` with a
short heartbeat period and ping interval, so that the measurement includes their timers; the
figure is this process's CPU time over that span. No polling loop should show up here.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from bench.common import SimProcess, running_client


@dataclass(frozen=True, slots=True)
class Idle:
    seconds: float
    cpu_seconds: float
    heartbeat_period: float
    ping_interval: float

    @property
    def cpu_percent(self) -> float:
        return self.cpu_seconds / self.seconds * 100


async def idle_run(seconds: float, heartbeat_period: float = 1.0, ping_interval: float = 1.0) -> Idle:
    async with SimProcess("--accept-unknown-jobs") as sim:
        async with running_client(
            sim.url, "bench-idle-client", heartbeat_period=heartbeat_period, ping_interval=ping_interval
        ):
            await asyncio.sleep(0.5)  # past the connect and the first heartbeat
            cpu0, t0 = time.process_time(), time.perf_counter()
            await asyncio.sleep(seconds)  # the measurement itself: doing nothing is the point
            elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    return Idle(elapsed, cpu, heartbeat_period, ping_interval)
