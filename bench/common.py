"""Shared pieces of the benchmarks: the simulator process, the workload, counters and clocks."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
from bittensor_wallet import Keypair

from streams import ClientConfig, FacilitatorClient, SimulatedDispatcher
from streams.events import ConnectionState
from streams.protocol import JobStatus, JobStatusUpdate, encode

ROOT = Path(__file__).resolve().parent.parent
ALICE = Keypair.create_from_uri("//Alice")
STATUSES = (
    JobStatus.RECEIVED,
    JobStatus.ACCEPTED,
    JobStatus.EXECUTOR_READY,
    JobStatus.EXECUTION_DONE,
    JobStatus.COMPLETED,
)
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Resident set size of this process, from /proc/self/statm."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


def workload(count: int, seed: int = 1) -> list[tuple[str, JobStatus]]:
    """``count`` status updates: count/5 jobs, each received → … → completed, interleaved by status.

    Deterministic (seeded), so the full client and the baseline send byte-identical frames.
    """
    rng = random.Random(seed)
    jobs = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range((count + 4) // 5)]
    updates = [(job, status) for status in STATUSES for job in jobs]
    return updates[:count]


def frames_of(updates: list[tuple[str, JobStatus]]) -> list[str]:
    """The exact frames the client sends for ``updates``."""
    return [encode(JobStatusUpdate(uuid=job, status=status)) for job, status in updates]


def enqueue(client: FacilitatorClient, updates: list[tuple[str, JobStatus]]) -> None:
    """Report every update through the public path (one status stream per job)."""
    open_ = client._statuses.open
    reporters: dict[str, Callable[..., bool]] = {}
    for job, status in updates:
        report = reporters.get(job)
        if report is None:
            report = reporters[job] = open_(job)
        report(status)


def bench_config(url: str, **overrides: Any) -> ClientConfig:
    """Defaults, except quick reconnects (the figures measure the client, not its backoff)."""
    values: dict[str, Any] = dict(backoff_base=0.01, backoff_cap=0.05, backoff_seed=1, heartbeat_period=60.0)
    values.update(overrides)
    return ClientConfig(url=url, **values)


class SimProcess:
    """``python -m bench.simserver`` as a child process, with its stdin/stdout command channel."""

    def __init__(self, *args: str) -> None:
        self._args = args
        self._proc: asyncio.subprocess.Process | None = None
        self.url = ""
        self.port = 0

    async def __aenter__(self) -> SimProcess:
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bench.simserver", *self._args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        ready = await self._read()
        self.url, self.port = ready["url"], ready["port"]
        return self

    async def _read(self) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        async with asyncio.timeout(30):
            line = await self._proc.stdout.readline()
        if not line:
            raise RuntimeError("the simulator process exited")
        result: dict[str, Any] = orjson.loads(line)
        return result

    async def command(self, name: str) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdin is not None
        self._proc.stdin.write(name.encode() + b"\n")
        await self._proc.stdin.drain()
        return await self._read()

    async def __aexit__(self, *exc: object) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


class Counter:
    """Counts items of an observable; ``await reached(n)`` waits until ``n`` have been seen."""

    def __init__(self) -> None:
        self.count = 0
        self._target = 0
        self._event = asyncio.Event()

    def __call__(self, _item: object) -> None:
        self.count += 1
        if self._target and self.count >= self._target:
            self._event.set()

    async def reached(self, target: int, timeout: float) -> None:
        self._target = target
        if self.count >= target:
            return
        self._event.clear()
        async with asyncio.timeout(timeout):
            await self._event.wait()


async def until_state(client: FacilitatorClient, wanted: ConnectionState, timeout: float = 10.0) -> None:
    """Wait until the client's connection state is ``wanted`` (at once if it already is)."""
    reached = asyncio.Event()

    def on_state(state: ConnectionState) -> None:
        if state is wanted:
            reached.set()

    subscription = client.state.subscribe(on_state)  # a BehaviorSubject: the current state comes first
    try:
        async with asyncio.timeout(timeout):
            await reached.wait()
    finally:
        subscription.dispose()


async def until_connected(client: FacilitatorClient, timeout: float = 10.0) -> None:
    await until_state(client, ConnectionState.CONNECTED, timeout)


def quantile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def median(values: list[float]) -> float:
    return statistics.median(values)


@contextlib.asynccontextmanager
async def running_client(url: str, name: str, **config: Any) -> AsyncIterator[FacilitatorClient]:
    """A client started against ``url`` and connected; stopped (and its task awaited) on exit."""
    client = FacilitatorClient(bench_config(url, **config), signer=ALICE, dispatcher=SimulatedDispatcher(0))
    task = asyncio.create_task(client.start(), name=name)
    try:
        await until_connected(client)
        yield client
    finally:
        await client.stop()
        await task
