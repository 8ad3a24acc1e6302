"""The journal wired into the client: crashes (SIGKILL) and clean exits lose nothing; restarts resend first.

The crash tests run the client in a child process (``tests/journal_child.py``) against the facilitator
simulator in this process, kill it, start another on the same journal, and check the simulator's stored
rows: every job's statuses stored once each, in order (a resent duplicate is refused by the facilitator
as ``job.integrity_error`` and never stored twice), and every job interrupted mid-flight ``horde_failed``.
The seeded kill loop prints its seed; replay with ``JOURNAL_KILL_SEED=N``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import sqlite3
import sys
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams import ClientConfig, FacilitatorClient
from streams.devtools.simulator import FacilitatorSimulator
from streams.dispatchers.base import StatusFeed
from streams.events import EventType
from streams.journal import Journal, JournalError, summarize
from streams.message_manager import Sent
from streams.protocol import JobStatus, V2JobRequest
from tests.helpers import ALICE, FULL_SEQUENCE, ProcessLines, fast_config, running_client, wait_until
from tests.journal_child import STEPS, jobs_of

ROOT = Path(__file__).resolve().parent.parent
STATUS = "V0JobStatusUpdate"
PROMISED = ["sent", *[s.value for s in STEPS]]
"""What the facilitator stores for each job of a child's batch."""
KILL_SEED = int(os.environ.get("JOURNAL_KILL_SEED", "20261203"))
KILLS = 20


class Child(ProcessLines):
    """One client process; its stdout lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        super().__init__(proc, "stdout")

    @classmethod
    async def start(cls, url: str, journal: Path, run: int, count: int, *extra: str) -> Child:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.journal_child", url, str(journal), str(run), str(count), *extra,
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )
        return cls(proc)

    async def wait_line(self, text: str, timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while text not in self.lines:
                if self.proc.returncode is not None and self._reader.done():
                    raise AssertionError(f"the child exited ({self.proc.returncode}) before {text!r}: {self.lines}")
                self.changed.clear()
                await self.changed.wait()

    async def finish(self, sig: int | None = None, timeout: float = 30) -> int:  # type: ignore[override]
        if sig is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
        return await super().finish(timeout)

    @property
    def summary(self) -> dict[str, Any]:
        result: dict[str, Any] = orjson.loads(self.lines[-1])
        return result

    async def stderr(self) -> str:
        assert self.proc.stderr is not None
        return (await self.proc.stderr.read()).decode(errors="replace")



@contextlib.asynccontextmanager
async def child(url: str, journal: Path, run: int, count: int = 1000, *extra: str) -> AsyncIterator[Child]:
    proc = await Child.start(url, journal, run, count, *extra)
    try:
        yield proc
    finally:
        await proc.kill()


def status_copies(sim: FacilitatorSimulator) -> Counter[tuple[str, str]]:
    return Counter(
        (r.parsed["uuid"], r.parsed["status"]) for r in sim.received
        if r.parsed is not None and r.parsed.get("message_type") == STATUS
    )


def error_types(sim: FacilitatorSimulator) -> Counter[str]:
    """Error types of every Response the simulator sent (job.integrity_error = a duplicate refused)."""
    kinds: Counter[str] = Counter()
    for _, _, frame in sim.sent:
        body = orjson.loads(frame)
        if body.get("status") == "error":
            kinds.update(error.get("type", "?") for error in body.get("errors", []))
    return kinds


def assert_horde_failed(sim: FacilitatorSimulator, job: str) -> None:
    details = sim.stored_metadata[job][-1]["horde_failure_details"]
    assert details["reported_by"] == "validator"
    assert details["reason"] == "unhandled_exception"
    assert details["message"] == "validator restarted while the job was running"
    assert details["context"]["last_status"] in ("received", "accepted")


def requested(sim: FacilitatorSimulator) -> list[str]:
    """Jobs the facilitator sent as job requests (not the ones only known from status updates)."""
    return [job for job, request in sim.jobs.items() if request]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


# -- a crash: SIGKILL with 1,000 queued and a job mid-flight --------------------------------------------


@pytest.mark.timeout(120)
async def test_sigkill_with_1000_queued_and_a_job_mid_flight_loses_nothing_after_a_restart(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite3"
    jobs = jobs_of(0, 1000)
    async with FacilitatorSimulator(accept_unknown_jobs=True, ack_delay=0.2) as sim:
        sim.job_requests_on_auth(1)  # after the first auth only: the first process's job mid-flight
        async with child(sim.url, journal, 0, 1000, "after-job") as first:
            await first.wait_line("durable 0")  # reported once the job was running: it is mid-flight
            await sim.wait_for(lambda: sum(status_copies(sim).values()) >= 2 + 100, 30, "some updates on the wire")
            first.proc.send_signal(signal.SIGKILL)
            assert await first.finish() == -signal.SIGKILL
        delivered = sum(status_copies(sim).values())
        assert delivered < 1000 + 2, "the kill came after everything was delivered: nothing was tested"
        [mid_flight] = requested(sim)
        pending = summarize(journal)
        assert pending.holder_pid is None, "a killed holder's lock is gone with it"
        assert [(j.uuid, j.last_status) for j in pending.open_jobs] == [(mid_flight, "accepted")]
        assert sum(pending.pending_by_kind.values()) > 0

        async with child(sim.url, journal, run=1, count=0) as second:
            await sim.wait_for(
                lambda: all(sim.stored[j] == PROMISED for j in jobs) and sim.stored[mid_flight][-1] == "horde_failed",
                60, "every update delivered and the interrupted job reported",
            )
            await wait_until(lambda: not summarize(journal).pending_by_kind, 30, "the journal emptied")
            assert await second.finish(signal.SIGTERM) == 0, await second.stderr()
            [recovered] = second.summary["recovered"]

    assert all(sim.stored[j] == PROMISED for j in jobs), "lost or reordered"
    assert sim.stored[mid_flight] == ["sent", "received", "accepted", "horde_failed"]
    assert_horde_failed(sim, mid_flight)
    assert recovered["horde_failed_jobs"] == 1 and recovered["jobs"] == [mid_flight]
    assert 0 < recovered["resent_status_updates"] <= 1000 + 2  # the batch and the mid-flight job's two
    # Resent copies of updates the facilitator had stored were refused as duplicates, nothing else failed.
    duplicates = sum(n - 1 for n in status_copies(sim).values())
    assert set(error_types(sim)) <= {"job.integrity_error"}, error_types(sim)
    assert error_types(sim)["job.integrity_error"] == duplicates
    assert summarize(journal).open_jobs == ()


# -- twenty crashes at random moments ---------------------------------------------------------------------


@pytest.mark.timeout(300)
async def test_a_seeded_loop_of_20_kills_at_random_points_loses_nothing(tmp_path: Path) -> None:
    print(f"kill seed {KILL_SEED} (replay: JOURNAL_KILL_SEED={KILL_SEED} pytest tests/test_journal_client.py -k loop)")
    rng = random.Random(KILL_SEED)
    journal = tmp_path / "journal.sqlite3"
    per_run = 200
    promised: set[int] = set()
    async with FacilitatorSimulator(accept_unknown_jobs=True, ack_delay=0.02) as sim:
        sim.job_requests_on_auth(1, each=True)  # every connection brings a job that then runs "forever"
        for run in range(KILLS):
            async with child(sim.url, journal, run=run, count=per_run) as proc:
                if rng.random() < 0.25:
                    await asyncio.sleep(rng.uniform(0.0, 0.8))  # anywhere from start-up on
                else:
                    await proc.wait_line("connected")
                    await asyncio.sleep(rng.uniform(0.0, 0.3))  # while sending, acking, recovering
                proc.proc.send_signal(signal.SIGKILL)
                await proc.finish()
                if f"durable {run}" in proc.lines:
                    promised.add(run)
        async with child(sim.url, journal, run=KILLS, count=per_run) as last:
            await last.wait_line(f"durable {KILLS}")
            await wait_until(lambda: not summarize(journal).pending_by_kind, 60, "the journal emptied")
            assert await last.finish(signal.SIGTERM) == 0, await last.stderr()

    batches = {run: jobs_of(run, per_run) for run in range(KILLS + 1)}
    ours = {job for jobs in batches.values() for job in jobs}
    for run, jobs in batches.items():
        stored = [sim.stored.get(job) for job in jobs]
        if run in promised or run == KILLS:
            assert all(s == PROMISED for s in stored), f"run {run}: durable updates lost or reordered: {stored[:3]}"
        else:  # killed before its batch committed: one transaction, so all of it or none of it
            assert all(s == PROMISED for s in stored) or all(s is None for s in stored), f"run {run}: {stored[:3]}"
    assert not ours & set(requested(sim))
    interrupted = 0
    still_running = _open_jobs(journal)  # the last run's own job, left running by its clean exit
    for job in requested(sim):
        statuses = sim.stored[job]
        lifecycle = ["sent", "received", "accepted", "horde_failed"]
        assert statuses == lifecycle[: len(statuses)] or statuses == ["sent", "received", "horde_failed"], (
            f"job {job}: {statuses}"
        )
        if "received" in statuses and job not in still_running:
            assert statuses[-1] == "horde_failed", f"job {job} left hanging: {statuses}"
            assert_horde_failed(sim, job)
            interrupted += 1
    assert set(error_types(sim)) <= {"job.integrity_error"}, error_types(sim)
    print(f"{len(promised)} of {KILLS} killed runs had made their batch durable; {interrupted} jobs horde_failed")
    assert interrupted >= 1
    assert promised, "no kill came after a batch was durable: the loop tested nothing"


def _open_jobs(journal: Path) -> set[str]:
    return {job.uuid for job in summarize(journal).open_jobs}


# -- a clean exit with the journal keeps everything for the next start ------------------------------------


@pytest.mark.timeout(120)
async def test_sigint_with_1000_queued_keeps_them_and_the_next_start_sends_them_all(tmp_path: Path) -> None:
    journal = tmp_path / "journal.sqlite3"
    jobs = jobs_of(0, 1000)
    # Nothing listens: every update stays queued.
    async with child(f"ws://127.0.0.1:{free_port()}/ws/v0/", journal, run=0) as first:
        await first.wait_line("durable 0")
        assert await first.finish(signal.SIGINT) == 0, await first.stderr()
        stderr = await first.stderr()
    assert "was destroyed but it is pending" not in stderr and "never awaited" not in stderr, stderr
    assert first.summary["dropped"] == 0, "with the journal, a clean exit drops nothing"
    assert first.summary["kept"] == 1000
    assert summarize(journal).pending_by_kind == {STATUS: 1000}

    async with FacilitatorSimulator(accept_unknown_jobs=True) as sim:
        async with child(sim.url, journal, run=1, count=0) as second:
            await sim.wait_for(lambda: all(sim.stored.get(j) == PROMISED for j in jobs), 60, "all 1,000 delivered")
            await wait_until(lambda: not summarize(journal).pending_by_kind, 30, "the journal emptied")
            assert await second.finish(signal.SIGINT) == 0
            [recovered] = second.summary["recovered"]
    assert recovered["resent_status_updates"] == 1000 and recovered["horde_failed_jobs"] == 0
    # In the original order: the facilitator received them exactly as they were reported.
    order = [(r.parsed["uuid"], r.parsed["status"]) for r in sim.received
             if r.parsed is not None and r.parsed.get("message_type") == STATUS]
    assert order == [(job, status.value) for status in STEPS for job in jobs]


# -- in-process ---------------------------------------------------------------------------------------


async def test_a_normal_run_answers_and_prunes_everything_and_reports_journal_metrics(tmp_path: Path) -> None:
    journal = tmp_path / "j.sqlite3"
    async with FacilitatorSimulator() as sim:
        config = fast_config(sim.url, journal_path=journal)
        async with running_client(config) as run:
            await wait_until(lambda: run.client._messages is not None, 10, "the client started")
            opened = run.client.journal
            assert opened is not None and run.client._messages is not None
            # Durable before sent: at the moment each update is written, its journal row has committed.
            sends: list[tuple[int, int]] = []

            def on_sent(sent: Sent) -> None:
                if sent.envelope.expects_ack:
                    sends.append((sent.envelope.seq, opened.durable_seq))

            run.client._messages.sent.subscribe(on_sent)
            await sim.wait_for_validator()
            jobs = [(await sim.send_job_request())["uuid"] for _ in range(20)]
            await sim.wait_for(lambda: all(len(sim.stored[j]) == 1 + len(FULL_SEQUENCE) for j in jobs), 20, "done")
            await wait_until(lambda: opened.pending == 0, 10, "pruned")
            await wait_until(lambda: opened.open_jobs == 0, 10, "closed")
            metrics = run.client.metrics
            assert metrics.samples("journal.write_latency"), "commit latency measured"
            assert (metrics.gauge_value("journal.bytes") or 0) > 0
        assert len(sends) == 20 * len(FULL_SEQUENCE)
        assert all(0 < seq <= durable for seq, durable in sends), [s for s in sends if not 0 < s[0] <= s[1]][:5]
        assert opened.stats().commits < len(sends), "batched: fewer commits than updates"
        assert not run.events_of("MESSAGE_DROPPED")
    summary = summarize(journal)
    assert summary.pending_by_kind == {} and summary.open_jobs == () and summary.holder_pid is None


async def test_a_bad_journal_refuses_the_start_and_the_client_can_then_be_dropped(tmp_path: Path) -> None:
    journal = tmp_path / "j.sqlite3"
    journal.write_text("not a journal")
    client = FacilitatorClient(
        ClientConfig(url="ws://127.0.0.1:9/ws/v0/", journal_path=journal), signer=ALICE, dispatcher=_never
    )
    with pytest.raises(JournalError, match="not a journal") as caught:
        await client.start()
    assert str(journal) in str(caught.value) and "--journal-reset" in str(caught.value)
    await client.stop()


async def _never(job: V2JobRequest, report: Any) -> None:
    raise AssertionError("no job expected")


async def test_a_failing_journal_turns_durability_off_keeps_sending_and_comes_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = tmp_path / "j.sqlite3"
    broken = True
    real_write = Journal._write

    def write(self: Journal, work: Any) -> None:
        if broken:
            raise sqlite3.OperationalError("database or disk is full")
        real_write(self, work)

    monkeypatch.setattr(Journal, "_write", write)
    async with FacilitatorSimulator() as sim:
        config = fast_config(sim.url, journal_path=journal, journal_retry_interval=0.05)
        async with running_client(config) as run:
            await sim.wait_for_validator()
            jobs = [(await sim.send_job_request())["uuid"] for _ in range(5)]
            await sim.wait_for(lambda: all(len(sim.stored[j]) == 1 + len(FULL_SEQUENCE) for j in jobs), 20,
                               "delivered from memory while the journal fails")
            [failed] = run.events_of(EventType.JOURNAL_FAILED)
            assert "durability is OFF" in failed.description and failed.data["exception"] == "OperationalError"
            assert run.counters["journal.failures"] == 1
            assert run.client.metrics.gauge_value("journal.durable") == 0
            broken = False
            await wait_until(lambda: bool(run.events_of(EventType.JOURNAL_RESUMED)), 10, "durable again")
            assert run.client.metrics.gauge_value("journal.durable") == 1
            more = [(await sim.send_job_request())["uuid"] for _ in range(5)]
            await sim.wait_for(lambda: all(len(sim.stored[j]) == 1 + len(FULL_SEQUENCE) for j in more), 20, "more")
            await wait_until(lambda: run.client.journal is not None and run.client.journal.pending == 0, 10, "pruned")
    assert summarize(journal).pending_by_kind == {}


async def test_celery_style_dispatchers_jobs_are_not_tracked_as_in_process(tmp_path: Path) -> None:
    journal = tmp_path / "j.sqlite3"

    class Handoff:
        """Like the Celery dispatcher (a FeedingDispatcher): the job runs elsewhere, its statuses come back."""

        def bind(self, feed: StatusFeed) -> None:
            self.feed = feed

        async def handle(self, job: V2JobRequest, report: Any) -> None:
            self.feed.report(job.uuid, JobStatus.ACCEPTED)  # as if a worker reported it

    async with FacilitatorSimulator() as sim:
        async with running_client(fast_config(sim.url, journal_path=journal), Handoff()) as run:
            await sim.wait_for_validator()
            job = (await sim.send_job_request())["uuid"]
            await sim.wait_for(lambda: sim.stored[job][-1:] == ["accepted"], 10, "accepted")
            assert run.client.journal is not None and run.client.journal.open_jobs == 0
    assert summarize(journal).open_jobs == ()
