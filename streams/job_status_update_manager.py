"""JobStatusUpdateManager: one status stream per job, merged into one ordered outbound stream.

    job A:  received--accepted--completed|
    job B:        received--accepted------failed|
    merged: rA----rB--aA------aB--cA------fB         (each job's stream ends at its first final status)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import reactivex
from pydantic import ValidationError
from reactivex.subject import Subject

from streams.dispatchers.base import Metadata
from streams.exceptions import MessageRefused, UsageError
from streams.protocol import (
    EncodedStatusUpdate,
    JobStatus,
    JobStatusMetadata,
    JobStatusUpdate,
    encoded_status_update,
    is_facilitator_uuid,
)
from streams.safe_subject import LoopSubject

__all__ = ["JobReporter", "JobStatusUpdateManager", "build_update"]

log = logging.getLogger(__name__)


class JobReporter:
    """The ``report`` callable handed to a dispatcher for one job."""

    __slots__ = ("_manager", "_uuid_checked", "job_uuid")

    def __init__(self, manager: JobStatusUpdateManager, job_uuid: str) -> None:
        self._manager = manager
        self.job_uuid = job_uuid
        self._uuid_checked = is_facilitator_uuid(job_uuid)  # once per job, not per status

    def __call__(self, status: JobStatus | str, metadata: Metadata = None) -> bool:
        return self._manager.report(self.job_uuid, status, metadata, uuid_checked=self._uuid_checked)


class JobStatusUpdateManager:
    def __init__(self) -> None:
        # The per-job streams are merged by emitting each job's updates straight into one Subject,
        # in report order (everything runs on the loop thread). A Subject per job flattened with
        # ops.merge_all() cost ~85 µs per job (reactivex subscribes each one through its trampoline
        # and locks): the top hotspot of the throughput benchmark, ~20 µs per status update.
        self._updates: Subject[JobStatusUpdate | EncodedStatusUpdate] = LoopSubject()
        self._open: set[str] = set()
        """Jobs whose status stream is open (until their first final status)."""
        self._stopped = False
        self._started = False
        self._early: list[JobStatusUpdate | EncodedStatusUpdate] = []

    @property
    def updates(self) -> reactivex.Observable[JobStatusUpdate | EncodedStatusUpdate]:
        """All jobs' status updates, in report order (those reported before ``start()`` first)."""
        return self._updates

    async def start(self) -> None:
        """Called once ``updates`` is subscribed: what was reported earlier goes out first, in order."""
        self._started = True
        early, self._early = self._early, []
        for update in early:
            try:
                self._updates.on_next(update)
            except MessageRefused:
                pass  # reported by the outbox; its caller has returned long ago

    def open(self, job_uuid: str) -> JobReporter:
        """Start a job's status stream; returns its ``report`` callable."""
        if self._stopped:
            raise UsageError("the JobStatusUpdateManager is stopped")
        self._open.add(job_uuid)
        return JobReporter(self, job_uuid)

    def is_open(self, job_uuid: str) -> bool:
        return job_uuid in self._open

    def report(
        self, job_uuid: str, status: JobStatus | str, metadata: Metadata = None, *, uuid_checked: bool = False
    ) -> bool:
        """Queue a status update. False (and a warning) once the job's stream has ended.

        Raises ValueError, naming the field, for a status or metadata the facilitator would not
        take (PROTOCOL.md "Typed status metadata"): nothing invalid is queued. Raises
        :class:`~streams.exceptions.MessageRefused` (a ValueError) when the outbox refuses the
        update (its frame is over ``max_outbound_frame_bytes``); the job's stream then stays open, so a
        smaller final status can still be reported.
        """
        update = build_update(job_uuid, status, metadata, uuid_checked=uuid_checked)
        if job_uuid not in self._open:
            log.warning("status %s for job %s ignored: its status stream has ended", status, job_uuid)
            return False
        if self._started:
            self._updates.on_next(update)
        else:
            self._early.append(update)  # nothing is subscribed yet: kept for start()
        if update.status.is_final:
            self.stop_listener(job_uuid)
        return True

    def stop_listener(self, job_uuid: str) -> None:
        """End a job's status stream (after its final status, or when the host gives up on it)."""
        self._open.discard(job_uuid)

    async def stop(self) -> None:
        self._stopped = True
        self._open.clear()
        self._updates.on_completed()


_MAX_ERRORS_SHOWN = 5


def build_update(
    job_uuid: str, status: JobStatus | str, metadata: Metadata = None, *, uuid_checked: bool = False
) -> JobStatusUpdate | EncodedStatusUpdate:
    """The update ``report(status, metadata)`` queues, or a ValueError saying what is wrong.

    A dispatcher's mistake must surface at its own call, not as an error Response after the fact
    (or never: the facilitator stores an unknown enum value as ``unknown``). Without metadata (the
    common case) a valid update is checked and encoded without a pydantic model; anything else,
    and every invalid input, takes the model's validation (and its error message).
    """
    if metadata is None:
        encoded = encoded_status_update(job_uuid, status, uuid_checked=uuid_checked)
        if encoded is not None:
            return encoded
    try:
        status = JobStatus(status)
    except ValueError:
        raise ValueError(
            f"report(): status {status!r} is not a job status; expected one of {', '.join(JobStatus)}"
        ) from None
    if metadata is not None and not isinstance(metadata, JobStatusMetadata | Mapping):
        raise ValueError(
            f"report(): metadata must be a mapping, a JobStatusMetadata or None, not {type(metadata).__name__}"
        )
    try:
        if isinstance(metadata, Mapping):
            metadata = JobStatusMetadata.model_validate(dict(metadata))
        return JobStatusUpdate(uuid=job_uuid, status=status, metadata=metadata)
    except ValidationError as exc:
        raise ValueError(f"report(): invalid {status.value} update for job {job_uuid}: {_describe(exc)}") from None


def _describe(exc: ValidationError) -> str:
    """``metadata.job_failure_details.reason: Input should be 'unknown', ...`` per error, briefly."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    prefix = "" if exc.title == JobStatusUpdate.__name__ else "metadata."
    parts = [f"{prefix}{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors[:_MAX_ERRORS_SHOWN]]
    if len(errors) > _MAX_ERRORS_SHOWN:
        parts.append(f"(+{len(errors) - _MAX_ERRORS_SHOWN} more)")
    return "; ".join(parts)
