"""JobDispatcher: job requests in, one owned task per job, statuses out.

The client reports ``received`` on dispatch, dispatches a job uuid once however often the
facilitator sends it, caps how many jobs run at once, and turns a dispatcher that raises into a
``horde_failed`` status (reason ``unhandled_exception``). A dispatcher that returns, or is
cancelled at the client's stop, before its job reached a final status would leave the job
``accepted`` at the facilitator forever: the client reports ``horde_failed`` (reason
``generic_error``) for it. Not for a FeedingDispatcher (Celery): its ``handle()`` returns once the
job is queued and the statuses come later, from its workers. Three dispatchers ship: a callback
dispatcher around ``async def handle(job, report)``, a simulated one for demos and tests, and
(phase 2) a Celery one: all in :mod:`streams.dispatchers`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from dataclasses import dataclass

import reactivex
from reactivex.subject import Subject

from streams.dispatchers.base import Dispatcher, FeedingDispatcher, Handler, ManagedDispatcher, Report
from streams.dispatchers.callback import as_dispatcher
from streams.job_status_update_manager import JobStatusUpdateManager
from streams.lifecycle import TaskOwner
from streams.protocol import JobRejectionReason, JobStatus, JobStatusUpdate, V2JobRequest
from streams.signatures import SignatureVerifier, Verification

__all__ = ["JobDispatcher", "JobFailure", "JobRejected", "JobUnfinished"]

log = logging.getLogger(__name__)

@dataclass(frozen=True, slots=True)
class JobFailure:
    job_uuid: str
    error: BaseException
    kind: str = "raised"
    """``raised`` (the dispatcher raised ``error``), ``no_final_status`` (it returned without one) or
    ``cancelled`` (stopped by the client's teardown before the job finished)."""


class JobUnfinished(Exception):
    """The dispatcher ended without the job reaching a final status (the client reported horde_failed)."""


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
        self._feeding = isinstance(self._dispatcher, FeedingDispatcher)
        self.report_cancelled = True
        """Report horde_failed for a job cancelled at stop. The client turns it off with a journal,
        which keeps such a job open and reports it horde_failed at the next start."""
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
        """Called for every inbound job request, on the loop thread; never blocks.

        A uuid is handled once (dedup first, so a forged copy of a job already running cannot end it
        with a ``rejected``). Then the signature: a job that fails is reported ``rejected``
        (``invalid_signature``, the message says what failed) and never reaches the dispatcher.
        The check runs inline (~65-100 µs, about what decoding the frame costs; see bench.verify).
        """
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
            self._unfinished(job.uuid, report, "cancelled")
            raise
        except Exception as exc:
            self._failures.on_next(JobFailure(job.uuid, exc))
            if self._statuses.is_open(job.uuid):
                update = JobStatusUpdate.horde_failed(
                    job.uuid, reason="unhandled_exception", message=f"{type(exc).__name__}: {exc}"[:1000]
                )
                report(update.status, update.metadata)
        else:
            self._unfinished(job.uuid, report, "no_final_status")
        finally:
            self._finished.on_next(job.uuid)

    def _unfinished(self, job_uuid: str, report: Report, kind: str) -> None:
        """The dispatcher ended and the job has no final status: report horde_failed (and a JobFailure)."""
        if self._feeding or not self._statuses.is_open(job_uuid):
            return
        if kind == "cancelled" and not self.report_cancelled:
            return
        if kind == "cancelled":
            message = "the validator stopped before the job finished (its dispatcher was cancelled)"
        else:
            message = "the dispatcher returned without reporting a final status"
        self._failures.on_next(JobFailure(job_uuid, JobUnfinished(message), kind))
        update = JobStatusUpdate.horde_failed(job_uuid, reason="generic_error", message=message)
        report(update.status, update.metadata)

    async def start(self) -> None:
        if isinstance(self._dispatcher, ManagedDispatcher):
            await self._dispatcher.start()

    def stop_accepting(self) -> None:
        self._accepting = False

    async def cancel_running(self) -> None:
        """At the start of the client's teardown: cancel the running jobs so that the horde_failed
        each one then reports is still sent in the drain (a FeedingDispatcher's jobs are left alone:
        its workers go on and report through the feed)."""
        self._accepting = False
        if not self._feeding:
            await self._tasks.cancel_all()

    async def stop(self) -> None:
        """Stop taking jobs, cancel running ones, and stop the dispatcher."""
        self._accepting = False
        await self._tasks.aclose()
        if isinstance(self._dispatcher, ManagedDispatcher):
            await self._dispatcher.stop()
        for subject in (self._dispatched, self._duplicates, self._failures, self._rejected, self._finished):
            subject.on_completed()
