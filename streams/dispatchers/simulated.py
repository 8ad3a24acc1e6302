"""SimulatedDispatcher: plays the sample job lifecycle in-process (demos, benchmarks, tests; never a default)."""

from __future__ import annotations

import asyncio

from streams.dispatchers.base import Report
from streams.dispatchers.lifecycle import IN_PROGRESS, final_status
from streams.protocol import V2JobRequest

__all__ = ["SimulatedDispatcher"]


class SimulatedDispatcher:
    """Plays a job's lifecycle with a delay between steps; ``env SIMULATE=fail`` ends in ``failed``."""

    def __init__(self, step_delay: float = 0.5) -> None:
        if not step_delay >= 0:
            raise ValueError(f"step_delay must be >= 0, got {step_delay!r}")
        self.step_delay = step_delay

    async def handle(self, job: V2JobRequest, report: Report) -> None:
        for status in IN_PROGRESS:
            await asyncio.sleep(self.step_delay)
            report(status)
        await asyncio.sleep(self.step_delay)
        report(*final_status(job.uuid, job.env))
