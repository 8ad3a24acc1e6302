"""Shutdown: seconds from SIGINT to the exit of ``python -m streams run`` with 1,000 updates queued.

The CLI runs as a child process against a simulator process that stalls every connection right
after its auth Response (it stops reading: nothing is acknowledged, and the close handshake can
never complete). The CLI's dispatcher is :class:`QueueOnStart` (``--dispatcher
bench.shutdown:QueueOnStart``): when the client starts, it reports ``BENCH_SHUTDOWN_QUEUE`` status
updates (default 1,000), which stay pending. Once the CLI's events file shows it connected, SIGINT
is sent and the time to exit is measured. The MESSAGE_DROPPED ("disposed") events it writes on the
way out say how many updates were still pending; stderr is checked for asyncio's "Task was
destroyed" and "never awaited" warnings. ``journal=True`` runs it with ``--journal FILE`` (else
``--no-journal``): nothing is dropped then, the pending updates stay in the file (counted after the exit).
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.common import ROOT, STATUSES, SimProcess
from streams.dispatchers import Report, StatusFeed
from streams.journal import summarize
from streams.protocol import V2JobRequest

QUEUE_ENV = "BENCH_SHUTDOWN_QUEUE"


class QueueOnStart:
    """A dispatcher for the CLI that queues N status updates as soon as the client starts."""

    def __init__(self) -> None:
        self.count = int(os.environ.get(QUEUE_ENV, "1000"))
        self._feed: StatusFeed | None = None

    def bind(self, feed: StatusFeed) -> None:
        self._feed = feed

    async def start(self) -> None:
        assert self._feed is not None, "bind() comes first"
        rng = random.Random(4)
        jobs = [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range((self.count + 4) // 5)]
        queued = 0
        for status in STATUSES:
            for job in jobs:
                if queued < self.count:
                    self._feed.report(job, status)
                    queued += 1

    async def stop(self) -> None:
        """Nothing to release."""

    async def handle(self, job: V2JobRequest, report: Report) -> None:
        """No job requests come in this benchmark."""


@dataclass(frozen=True, slots=True)
class Shutdown:
    seconds: float
    returncode: int | None
    pending: int
    """Status updates the CLI reported as still pending at exit (MESSAGE_DROPPED "disposed" events)."""
    warnings: list[str]
    kept: int = 0
    """Status updates left in the journal for the next start (with ``journal=True``)."""


def _events(path: Path) -> list[dict[str, Any]]:
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    return [orjson.loads(line) for line in lines if line.strip()]


async def shutdown_run(queued: int = 1000, journal: bool = False) -> Shutdown:
    async with SimProcess("--accept-unknown-jobs", "--stall-after-auth") as sim:
        with tempfile.TemporaryDirectory() as tmp:
            events = Path(tmp) / "events.jsonl"
            journal_path = Path(tmp) / "journal.sqlite3"
            journal_args = ["--journal", str(journal_path)] if journal else ["--no-journal"]
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "streams", "run", "--url", sim.url, "--hotkey-uri", "//Alice",
                "--dispatcher", "bench.shutdown:QueueOnStart", "--events", str(events), *journal_args,
                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), QUEUE_ENV: str(queued)},
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )
            try:
                async with asyncio.timeout(30):
                    while not any(e["type"] == "CONNECTED" for e in _events(events)):
                        if proc.returncode is not None:
                            raise RuntimeError(f"the CLI exited early with {proc.returncode}")
                        await asyncio.sleep(0.02)
                await asyncio.sleep(0.2)  # let the send loop write what it can into the stalled socket
                t0 = time.perf_counter()
                proc.send_signal(signal.SIGINT)
                async with asyncio.timeout(30):
                    returncode = await proc.wait()
                seconds = time.perf_counter() - t0
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            assert proc.stderr is not None
            stderr = (await proc.stderr.read()).decode(errors="replace")
            pending = sum(
                int(e["data"].get("count", 1)) for e in _events(events)
                if e["type"] == "MESSAGE_DROPPED" and e["data"].get("message_type") == "V0JobStatusUpdate"
            )
            kept = summarize(journal_path).pending_by_kind.get("V0JobStatusUpdate", 0) if journal else 0
    warnings = [
        line for line in stderr.splitlines()
        if "was destroyed but it is pending" in line or "was never awaited" in line or "Traceback" in line
    ]
    return Shutdown(seconds, returncode, pending, warnings, kept)
