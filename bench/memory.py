"""Memory: bytes per status update buffered while disconnected.

    python -m bench.memory --mode tracemalloc|rss [--count 100000]

Runs in a fresh process per mode (tracemalloc's own bookkeeping would inflate the RSS figure).
The client is started against a port nothing listens on, so it stays disconnected; then
``count`` status updates (count/5 jobs, received → … → completed) are reported and held by the
outbox. The figure is the growth of traced memory (or RSS) divided by ``count``, measured after
``gc.collect()`` on both sides; the job uuid strings are created inside the measured span (each
is shared by its job's five updates, as a real job's uuid would be).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import socket
import sys
import tracemalloc
import uuid

import orjson

from bench.common import ALICE, STATUSES, rss_bytes
from streams import ClientConfig, FacilitatorClient, SimulatedDispatcher
from streams.events import EventType, SystemEvent


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def measure(mode: str, count: int) -> dict[str, float]:
    config = ClientConfig(
        url=f"ws://127.0.0.1:{_closed_port()}/ws/v0/", backoff_base=30.0, backoff_cap=60.0, backoff_seed=1
    )
    client = FacilitatorClient(config, signer=ALICE, dispatcher=SimulatedDispatcher(0))
    failed = asyncio.Event()

    def on_event(event: SystemEvent) -> None:
        if event.type is EventType.CONNECT_FAILED:
            failed.set()

    client.events.subscribe(on_event)
    task = asyncio.create_task(client.start(), name="bench-memory-client")
    try:
        async with asyncio.timeout(10):
            await failed.wait()  # disconnected, and backing off for 30 s or more
        rng = random.Random(1)
        gc.collect()
        if mode == "tracemalloc":
            tracemalloc.start()
            before = tracemalloc.get_traced_memory()[0]
        else:
            before = rss_bytes()
        jobs = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count // len(STATUSES))]
        reporters = [client._statuses.open(job) for job in jobs]
        for status in STATUSES:
            for report in reporters:
                report(status)
        del jobs, reporters
        gc.collect()
        after = tracemalloc.get_traced_memory()[0] if mode == "tracemalloc" else rss_bytes()
        if mode == "tracemalloc":
            tracemalloc.stop()
        depth = client.pending
        assert depth.held == count, depth
        dropped = client.metrics.counter("messages.dropped.V0JobStatusUpdate")
        assert dropped == 0, dropped
        return {
            "count": count,
            "bytes_per_message": (after - before) / count,
            "held_frame_bytes_per_message": depth.held_bytes / count,
        }
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory")
    parser.add_argument("--mode", choices=["tracemalloc", "rss"], required=True)
    parser.add_argument("--count", type=int, default=100_000)
    args = parser.parse_args()
    result = asyncio.run(measure(args.mode, args.count))
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


if __name__ == "__main__":
    cli()
