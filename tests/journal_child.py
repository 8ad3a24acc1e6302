"""A client process for the journal's crash tests.

    python -m tests.journal_child URL JOURNAL RUN [QUEUE [after-job]]


It starts a client with the journal at JOURNAL, then (``after-job``: once its first job request is
running) reports QUEUE status updates (default 1,000) for
QUEUE/5 fresh jobs of its own (``received`` … ``execution_done``, interleaved by status, all in one loop
iteration: one journal transaction), and prints ``durable RUN`` once they are all durable. Job requests
from the facilitator are dispatched in-process to a handler that reports ``accepted`` and then runs
forever (a job mid-flight). It prints ``connected`` at its first connection. SIGINT/SIGTERM cancel the
client as the CLI does; at exit it prints one JSON line with what it reported.
"""

from __future__ import annotations

import asyncio
import random
import signal
import sys
import uuid

import orjson

from streams import ClientConfig, FacilitatorClient
from streams.dispatchers import Report
from streams.events import ConnectionState, EventType, SystemEvent
from streams.protocol import JobStatus, V2JobRequest
from tests.helpers import ALICE, BOB

STEPS = (JobStatus.RECEIVED, JobStatus.ACCEPTED, JobStatus.EXECUTOR_READY, JobStatus.VOLUMES_READY,
         JobStatus.EXECUTION_DONE)


def jobs_of(run: int, count: int) -> list[str]:
    """The job uuids run ``run`` reports for (the test computes the same list)."""
    rng = random.Random(f"journal-child:{run}")
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range((count + 4) // 5)]


RUNNING = asyncio.Event()


async def mid_flight(job: V2JobRequest, report: Report) -> None:
    report(JobStatus.ACCEPTED)
    RUNNING.set()
    await asyncio.Event().wait()  # runs until the process dies or stops


async def main(url: str, journal: str, run: int, count: int, after_job: bool) -> None:
    config = ClientConfig(
        url=url, journal_path=journal, heartbeat_period=5.0, ping_interval=1.0, ping_timeout=1.0,
        backoff_base=0.01, backoff_cap=0.05, connect_timeout=2.0, auth_timeout=2.0, max_in_flight=100,
        trusted_signatories=(BOB.ss58_address,),  # the simulator's job signer: its jobs run mid-flight
    )
    client = FacilitatorClient(config, signer=ALICE, dispatcher=mid_flight)
    events: list[SystemEvent] = []
    client.events.subscribe(events.append)
    connected = False

    def on_state(state: ConnectionState) -> None:
        nonlocal connected
        if state is ConnectionState.CONNECTED and not connected:
            connected = True
            print("connected", flush=True)

    client.state.subscribe(on_state)
    task = asyncio.create_task(client.start())
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    await asyncio.sleep(0)  # start() wires the pipeline and opens the journal
    assert client.journal is not None
    if after_job:
        await RUNNING.wait()
    reporters = [client._statuses.open(job) for job in jobs_of(run, count)]  # as bench/ does: no public API
    queued = 0
    for status in STEPS:
        for report in reporters:
            if queued < count:
                report(status)
                queued += 1
    if await client.journal.flush(timeout=30):
        print(f"durable {run}", flush=True)
    try:
        await task
    except asyncio.CancelledError:
        pass
    dropped = [e for e in events if e.type is EventType.MESSAGE_DROPPED]
    print(orjson.dumps({
        "kept": client.metrics.gauge_value("journal.kept_at_exit"),
        "dropped": len(dropped),
        "recovered": [e.data for e in events if e.type is EventType.JOURNAL_RECOVERED],
    }).decode(), flush=True)


if __name__ == "__main__":
    count = int(sys.argv[4]) if len(sys.argv) > 4 else 1000
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), count, sys.argv[5:6] == ["after-job"]))
