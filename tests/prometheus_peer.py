"""A client process whose metrics go to Prometheus (multiprocess mode when PROMETHEUS_MULTIPROC_DIR is set).

    python -m tests.prometheus_peer JOBS

Runs a simulator and a client in this process, plays JOBS jobs to completion, stops, marks the process dead
(multiprocess mode: its live gauges go), and prints the client's in-memory counters as JSON.
"""

from __future__ import annotations

import asyncio
import sys

import orjson

from streams import FacilitatorClient
from streams.devtools.simulator import FacilitatorSimulator
from streams.dispatchers import SimulatedDispatcher
from streams.integrations.prometheus import PrometheusSink, mark_process_dead
from tests.helpers import ALICE, fast_config, wait_until


async def main(jobs: int) -> None:
    async with FacilitatorSimulator(seed=jobs) as sim:
        client = FacilitatorClient(fast_config(sim.url), signer=ALICE, dispatcher=SimulatedDispatcher(0.0))
        client.metrics.add_sink(PrometheusSink())  # the global REGISTRY, as a validator would
        task = asyncio.create_task(client.start())
        try:
            await wait_until(lambda: client.is_connected, 5, "connected")
            sent = [await sim.send_job_request() for _ in range(jobs)]
            await sim.wait_for(lambda: all(sim.stored[j["uuid"]][-1] == "completed" for j in sent), 10, "jobs done")
            await wait_until(lambda: client.pending.pending == 0, 5, "every update acknowledged")
        finally:
            await client.stop()
            await task
    mark_process_dead()
    sys.stdout.write(orjson.dumps(client.metrics.snapshot()["counters"]).decode() + "\n")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
