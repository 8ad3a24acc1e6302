"""JobDispatcher: job requests in, one owned task per job, statuses out.

The client reports ``received`` on dispatch, dispatches a job uuid once however often the
facilitator sends it, caps how many jobs run at once, and turns a dispatcher that raises into a
``horde_failed`` status (reason ``unhandled_exception``). Three dispatchers ship: a callback
dispatcher around ``async def handle(job, report)``, a simulated one for demos and tests, and
(phase 2) a Celery one in ``streams.celery``.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import reactivex
from reactivex.subject import Subject

from streams.job_status_update_manager import JobStatusUpdateManager, Report
from streams.protocol import JobRejectionReason, JobStatus, JobStatusUpdate, V2JobRequest
from streams.signatures import SignatureVerifier, Verification
from streams.tasks import TaskOwner

log = logging.getLogger(__name__)

Handler = Callable[[V2JobRequest, Report], Awaitable[None]]


@runtime_checkable
class Dispatcher(Protocol):
    """Runs one job. Report progress with ``report(status, metadata=None)``.

    Optional hooks a dispatcher may define: ``async start()`` / ``async stop()`` (called with the
    client's lifecycle) and ``bind(statuses, acks)``, called once before start with the client's
    JobStatusUpdateManager and the observable of acknowledged status updates (``AckOutcome``), for
    dispatchers whose statuses arrive from elsewhere (Celery workers) and must be confirmed there.
    """

    async def handle(self, job: V2JobRequest, report: Report) -> None: ...


class CallbackDispatcher:
    """Wraps ``async def handle(job, report)``: the simplest dispatcher (the seed's phase 1)."""

    def __init__(self, handler: Handler) -> None:
        if not callable(handler):
            raise TypeError(f"dispatcher callback must be callable, got {type(handler).__name__}")
        self._handler = handler

    async def handle(self, job: V2JobRequest, report: Report) -> None:
        await self._handler(job, report)


class SimulatedDispatcher:
    """Plays a job's lifecycle with a delay between steps; ``env SIMULATE=fail`` ends in ``failed``."""

    STEPS = (JobStatus.ACCEPTED, JobStatus.EXECUTOR_READY, JobStatus.VOLUMES_READY, JobStatus.EXECUTION_DONE)

    def __init__(self, step_delay: float = 0.5) -> None:
        if step_delay < 0:
            raise ValueError(f"step_delay must be >= 0, got {step_delay!r}")
        self.step_delay = step_delay

    async def handle(self, job: V2JobRequest, report: Report) -> None:
        for status in self.STEPS:
            await asyncio.sleep(self.step_delay)
            report(status)
        await asyncio.sleep(self.step_delay)
        if job.env.get("SIMULATE") == "fail":
            report(
                JobStatus.FAILED,
                {"job_failure_details": {"reason": "nonzero_return_code", "stage": "execution",
                                         "message": "simulated failure (env SIMULATE=fail)",
                                         "docker_process_exit_status": 1}},
            )
        else:
            report(
                JobStatus.COMPLETED,
                {"miner_response": {"docker_process_stdout": f"simulated {job.uuid}",
                                    "docker_process_stderr": "", "artifacts": {}, "upload_results": {}}},
            )


def as_dispatcher(dispatcher: Dispatcher | Handler) -> Dispatcher:
    if isinstance(dispatcher, Dispatcher):
        return dispatcher
    if callable(dispatcher):
        return CallbackDispatcher(dispatcher)
    raise TypeError(
        f"dispatcher must have `async def handle(job, report)` or be such a function; got {type(dispatcher).__name__}"
    )


@dataclass(frozen=True, slots=True)
class JobFailure:
    job_uuid: str
    error: BaseException


@dataclass(frozen=True, slots=True)
class JobRejected:
    """A job not run because its signature did not verify; it was reported ``rejected``."""

    job: V2JobRequest
    verification: Verification


class JobDispatcher:
    """The component: owns the job tasks and the dedup window."""

    def __init__(
        self,
        dispatcher: Dispatcher | Handler,
        statuses: JobStatusUpdateManager,
        *,
        max_concurrent: int | None = 100,
        dedup_window: int = 100_000,
        verifier: SignatureVerifier | None = None,
    ) -> None:
        """``verifier``: every job must pass it before dispatch; None dispatches unverified (tests)."""
        self._dispatcher = as_dispatcher(dispatcher)
        self._statuses = statuses
        self._slots = asyncio.Semaphore(max_concurrent) if max_concurrent else None
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._dedup_window = dedup_window
        self._tasks = TaskOwner("jobs")
        self._accepting = True
        self._dispatched: Subject[V2JobRequest] = Subject()
        self._duplicates: Subject[V2JobRequest] = Subject()
        self._failures: Subject[JobFailure] = Subject()
        self._verifier = verifier
        self._rejected: Subject[JobRejected] = Subject()
        self._finished: Subject[str] = Subject()

    @property
    def dispatcher(self) -> Dispatcher:
        return self._dispatcher

    @property
    def dispatched(self) -> reactivex.Observable[V2JobRequest]:
        return self._dispatched

    @property
    def duplicates(self) -> reactivex.Observable[V2JobRequest]:
        return self._duplicates

    @property
    def failures(self) -> reactivex.Observable[JobFailure]:
        return self._failures

    @property
    def rejected(self) -> reactivex.Observable[JobRejected]:
        """Jobs refused by signature verification (never dispatched)."""
        return self._rejected

    @property
    def finished(self) -> reactivex.Observable[str]:
        """Job uuids whose dispatcher call returned, raised or was cancelled."""
        return self._finished

    @property
    def active(self) -> int:
        return len(self._tasks)

    def submit(self, job: V2JobRequest) -> None:
        """Called for every inbound job request, on the loop thread; never blocks."""
        if not self._accepting:
            log.warning("job %s not dispatched: the client is stopping", job.uuid)
            return
        if job.uuid in self._seen:
            self._duplicates.on_next(job)
            return
        self._seen[job.uuid] = None
        if len(self._seen) > self._dedup_window:
            self._seen.popitem(last=False)
        verification = None if self._verifier is None else self._verifier.verify_job(job)
        report = self._statuses.open(job.uuid)
        try:
            if verification is not None and not verification.ok:
                update = JobStatusUpdate.rejected(
                    job.uuid, JobRejectionReason.INVALID_SIGNATURE, verification.message
                )
                report(update.status, update.metadata)
                self._rejected.on_next(JobRejected(job, verification))
                return
            report(JobStatus.RECEIVED)
        except ValueError as exc:
            # A uuid that is not a UUID: no status can ever be reported for this job, so it is not
            # dispatched, and it is reported (JOB_DISPATCH_FAILED) instead of raising into the reader.
            self._statuses.stop_listener(job.uuid)
            self._failures.on_next(JobFailure(job.uuid, exc))
            return
        self._dispatched.on_next(job)
        self._tasks.start(self._run(job, report), job.uuid)

    async def _run(self, job: V2JobRequest, report: Report) -> None:
        try:
            if self._slots is None:
                await self._dispatcher.handle(job, report)
            else:
                async with self._slots:
                    await self._dispatcher.handle(job, report)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failures.on_next(JobFailure(job.uuid, exc))
            if self._statuses.is_open(job.uuid):
                update = JobStatusUpdate.horde_failed(
                    job.uuid, reason="unhandled_exception", message=f"{type(exc).__name__}: {exc}"[:1000]
                )
                report(update.status, update.metadata)
        finally:
            self._finished.on_next(job.uuid)

    async def start(self) -> None:
        start = getattr(self._dispatcher, "start", None)
        if start is not None:
            await start()

    def stop_accepting(self) -> None:
        self._accepting = False

    async def stop(self) -> None:
        """Stop taking jobs, cancel running ones, and stop the dispatcher."""
        self._accepting = False
        await self._tasks.aclose()
        stop = getattr(self._dispatcher, "stop", None)
        if stop is not None:
            await stop()
        for subject in (self._dispatched, self._duplicates, self._failures, self._rejected, self._finished):
            subject.on_completed()
