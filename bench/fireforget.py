"""The old design, for comparison: a task per job, ``ws.send`` per status, no acknowledgement tracking.

This is what the client this library replaces did (and what most ad-hoc validator loops do): every
job gets its own asyncio task that sends its statuses in order; nothing is held while
disconnected, nothing is resent, and Responses are read only to drain the socket. It is the floor
the reactive client must beat while also keeping order and at-least-once delivery.
"""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

from websockets.asyncio.client import connect

from bench.common import ALICE, SimProcess, frames_of, workload
from bench.throughput import Run
from streams.protocol import MAX_FRAME_BYTES, JobStatus, JobStatusUpdate, V0AuthenticationRequest, encode


async def fire_and_forget_run(count: int, *, pre_encoded: bool = False) -> Run:
    """One run of the old design. Its job tasks build each status's frame as they send it, as the old
    client did (a JobStatusUpdate per status, encoded, sent); ``pre_encoded``: every frame is encoded
    before the clock starts instead (cheaper than the old design ever was; reported for comparison)."""
    updates = workload(count)
    per_job: dict[str, list[str]] = defaultdict(list)
    per_job_updates: dict[str, list[JobStatus]] = defaultdict(list)
    if pre_encoded:
        for (job, _status), frame in zip(updates, frames_of(updates), strict=True):
            per_job[job].append(frame)
    else:
        for job, status in updates:
            per_job_updates[job].append(status)
    async with SimProcess("--accept-unknown-jobs") as sim:
        async with connect(sim.url, max_size=MAX_FRAME_BYTES) as ws:
            await ws.send(encode(V0AuthenticationRequest.from_signer(ALICE)))
            reply = await ws.recv()
            assert '"success"' in str(reply), reply

            async def job_task(job_frames: list[str]) -> None:
                for frame in job_frames:
                    await ws.send(frame)

            async def encoding_job_task(job: str, statuses: list[JobStatus]) -> None:
                for status in statuses:
                    await ws.send(encode(JobStatusUpdate(uuid=job, status=status)))

            async def drain_responses() -> None:
                for _ in range(count):
                    await ws.recv()

            sim_cpu0 = (await sim.command("stats"))["cpu"]
            cpu0, t0 = time.process_time(), time.perf_counter()
            async with asyncio.timeout(120):
                reader = asyncio.create_task(drain_responses())
                async with asyncio.TaskGroup() as group:
                    for job_frames in per_job.values():
                        group.create_task(job_task(job_frames))
                    for job, statuses in per_job_updates.items():
                        group.create_task(encoding_job_task(job, statuses))
                await reader
            seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
            stats = await sim.command("stats")
    assert stats["stored"] == count, stats
    return Run("fire-and-forget", count, seconds, cpu, stats["cpu"] - sim_cpu0)
