"""Throughput: N status updates through the full client vs a plain websockets client, same frames.

Both sides run in this process against a fresh ``bench.simserver`` process each, authenticate
first, then time from the first update handed over (client: reported via ``statuses.open(job)``;
baseline: the first ``ws.send``) to the last Response read. The baseline pipelines with the same
in-flight window as the client (``max_in_flight``): a sender task and a reader task.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import connect

from bench.common import (
    ALICE,
    Counter,
    SimProcess,
    bench_config,
    enqueue,
    frames_of,
    running_client,
    workload,
)
from streams.protocol import MAX_FRAME_BYTES, V0AuthenticationRequest, encode


@dataclass(frozen=True, slots=True)
class Run:
    side: str
    count: int
    seconds: float
    cpu_seconds: float
    """CPU time of this process (the simulator runs in another one)."""
    sim_cpu_seconds: float
    """CPU time of the simulator process over the same span."""

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    @property
    def cpu_us_per_msg(self) -> float:
        return self.cpu_seconds / self.count * 1e6

    @property
    def sim_cpu_us_per_msg(self) -> float:
        return self.sim_cpu_seconds / self.count * 1e6


async def baseline_run(count: int, window: int) -> Run:
    frames = frames_of(workload(count))
    async with SimProcess("--accept-unknown-jobs") as sim:
        async with connect(sim.url, max_size=MAX_FRAME_BYTES) as ws:
            await ws.send(encode(V0AuthenticationRequest.from_signer(ALICE)))
            reply = await ws.recv()
            assert '"success"' in str(reply), reply
            slots = asyncio.Semaphore(window)

            async def sender() -> None:
                for frame in frames:
                    await slots.acquire()
                    await ws.send(frame)

            async def reader() -> None:
                for _ in range(count):
                    response = await ws.recv()
                    if '"success"' not in str(response):
                        raise AssertionError(f"baseline got an error Response: {response!r}")
                    slots.release()

            sim_cpu0 = (await sim.command("stats"))["cpu"]
            cpu0, t0 = time.process_time(), time.perf_counter()
            async with asyncio.timeout(120):
                await asyncio.gather(sender(), reader())
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            stats = await sim.command("stats")
    assert stats["stored"] == count, stats
    return Run("baseline", count, seconds, cpu, stats["cpu"] - sim_cpu0)


async def client_run(count: int, **config: Any) -> Run:
    updates = workload(count)
    async with SimProcess("--accept-unknown-jobs") as sim:
        async with running_client(sim.url, "bench-client", **config) as client:
            acks = Counter()
            client._messages.acks.subscribe(acks)
            sim_cpu0 = (await sim.command("stats"))["cpu"]
            cpu0, t0 = time.process_time(), time.perf_counter()
            enqueue(client, updates)
            await acks.reached(count, timeout=120)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            sim_cpu = (await sim.command("stats"))["cpu"] - sim_cpu0
            counters = client.metrics.snapshot()["counters"]
            assert counters.get("acks.success") == count, counters
        stats = await sim.command("stats")
    assert stats["stored"] == count, stats
    return Run("client", count, seconds, cpu, sim_cpu)


async def compare(count: int, rounds: int) -> tuple[list[Run], list[Run], list[Run], list[Run]]:
    """Alternate baseline, client and the two fire-and-forget runs (frames built per status as the
    old client did, and pre-encoded), ``rounds`` of each (alternating evens out noise)."""
    from bench.fireforget import fire_and_forget_run

    window = bench_config("ws://127.0.0.1:1/").max_in_flight
    baselines: list[Run] = []
    clients: list[Run] = []
    old_design: list[Run] = []
    old_pre_encoded: list[Run] = []
    for _ in range(rounds):
        baselines.append(await baseline_run(count, window))
        clients.append(await client_run(count))
        old_design.append(await fire_and_forget_run(count))
        old_pre_encoded.append(await fire_and_forget_run(count, pre_encoded=True))
    return baselines, clients, old_design, old_pre_encoded
