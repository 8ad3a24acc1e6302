"""The client under chaos against the strict simulator with production's routing, sped up: server pings,
jobs created only for a fresh heartbeat and fanned out to every channel (dead ones included), crashed
rows left behind and evicted by heartbeat age. Jobs that reached the client lose nothing, reorder nothing."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from streams.devtools.simulator import FacilitatorSimulator, JobNotCreated
from streams.protocol import V2JobRequest
from tests.helpers import FULL_SEQUENCE, fast_config, running_client, wait_until

pytestmark = pytest.mark.timeout(90)
SEED = 20261203
JOBS = 150


async def test_chaos_with_production_routing_loses_and_reorders_nothing_that_reached_the_client() -> None:
    print(f"strict chaos seed {SEED}")
    dispatched: list[str] = []

    async def handle(job: V2JobRequest, report: Callable[..., bool]) -> None:
        dispatched.append(job.uuid)
        for status in FULL_SEQUENCE[1:]:
            await asyncio.sleep(0.01)
            report(status)

    async with FacilitatorSimulator(
        seed=SEED,
        ping_interval=0.2,
        ping_timeout=1.0,
        job_heartbeat_window=0.8,
        eviction_interval=0.1,
        eviction_age=1.0,
    ) as sim:
        config = fast_config(
            sim.url,
            heartbeat_period=0.1,
            ping_interval=0.2,
            ping_timeout=0.3,
            close_timeout=0.3,
            send_timeout=1.0,
            backoff_cap=0.05,
            max_concurrent_jobs=None,
        )
        async with running_client(config, handle) as run:
            await sim.wait_for_validator(5)
            sim.chaos(every=40, kinds=("drop", "close", "stall"), rng=random.Random(SEED))
            created: list[str] = []
            refused = 0
            for _ in range(JOBS):
                while True:
                    try:
                        created.append((await sim.send_job_request())["uuid"])
                        break
                    except JobNotCreated:  # as an SDK: the facilitator said no; try again once it can
                        refused += 1
                        await sim.wait_for_validator(10)
                await asyncio.sleep(0.02)
            await sim.wait_for(
                lambda: all(len(sim.stored[j]) == 1 + len(FULL_SEQUENCE) for j in set(dispatched)),
                45,
                "every status of every dispatched job stored",
            )
            sim.chaos(every=0)
            await wait_until(lambda: run.client.pending.pending == 0, 15, "outbox empty")
            await sim.wait_for(lambda: all(ch.alive for ch in sim.channels.values()), 10, "crashed rows evicted")

        assert len(dispatched) == len(set(dispatched)), "a job request dispatched twice"
        for job_uuid in dispatched:
            assert sim.stored[job_uuid] == ["sent", *FULL_SEQUENCE], (job_uuid, sim.stored[job_uuid])
        # A job the client never saw went only to connections that died (the facilitator never resends).
        for job_uuid in set(created) - set(dispatched):
            assert all(sim.connection_log[c].closed_at is not None for c in sim.job_channels[job_uuid]), job_uuid
        fanned_out = [j for j in created if len(sim.job_channels[j]) + sum(u == j for _, u in sim.lost) > 1]
        pongs = sum(record.pongs for record in sim.connection_log.values())
        kinds = {description.split()[1] for _, description in sim.faults}
        print(
            f"created {len(created)}, dispatched {len(dispatched)}, refused {refused}, lost frames {len(sim.lost)}, "
            f"fanned out {len(fanned_out)}, evictions {len(sim.evictions)}, pongs {pongs}, faults {len(sim.faults)} "
            f"{sorted(kinds)}, connections {sim.connections}"
        )
        assert len(dispatched) >= JOBS * 0.8, "most jobs reached the client"
        assert kinds == {"drop", "close", "stall"}
        assert sim.evictions and sim.lost and fanned_out and pongs > 0, "production routing was exercised"
        assert not [v for v in sim.violations if "crashes" in v or "before authentication" in v], sim.violations
