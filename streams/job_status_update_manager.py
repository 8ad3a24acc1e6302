"""JobStatusUpdateManager: one status stream per job, merged into one ordered outbound stream.

    job A:  received--accepted--completed|
    job B:        received--accepted------failed|
    merged: rA----rB--aA------aB--cA------fB         (each job's stream ends at its first final status)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, Protocol

import reactivex
from reactivex import operators as ops
from reactivex.subject import Subject

from streams.protocol import JobStatus, JobStatusMetadata, JobStatusUpdate

log = logging.getLogger(__name__)

Metadata = JobStatusMetadata | Mapping[str, Any] | None


class Report(Protocol):
    """What a dispatcher calls to report a job's progress: ``report(status, metadata=None)``."""

    def __call__(self, status: JobStatus | str, metadata: Metadata = None) -> bool: ...


class JobReporter:
    """The ``report`` callable handed to a dispatcher for one job."""

    __slots__ = ("_manager", "job_uuid")

    def __init__(self, manager: JobStatusUpdateManager, job_uuid: str) -> None:
        self._manager = manager
        self.job_uuid = job_uuid

    def __call__(self, status: JobStatus | str, metadata: Metadata = None) -> bool:
        return self._manager.report(self.job_uuid, status, metadata)


class JobStatusUpdateManager:
    def __init__(self) -> None:
        self._streams: Subject[reactivex.Observable[JobStatusUpdate]] = Subject()
        self._open: dict[str, Subject[JobStatusUpdate]] = {}
        self._updates = self._streams.pipe(ops.merge_all())
        self._stopped = False
        self._started = False
        self._early: list[JobStatusUpdate] = []
        self._unwired: list[Subject[JobStatusUpdate]] = []

    @property
    def updates(self) -> reactivex.Observable[JobStatusUpdate]:
        """All jobs' status updates, in report order (those reported before ``start()`` first)."""
        return self._updates

    def start(self) -> None:
        """Called once ``updates`` is subscribed: what was reported earlier goes out first, in order."""
        self._started = True
        early, self._early = self._early, []
        self._streams.on_next(reactivex.from_iterable(early))
        unwired, self._unwired = self._unwired, []
        for stream in unwired:
            self._streams.on_next(stream)

    def open(self, job_uuid: str) -> JobReporter:
        """Start a job's status stream; returns its ``report`` callable."""
        if self._stopped:
            raise RuntimeError("the JobStatusUpdateManager is stopped")
        if job_uuid not in self._open:
            stream: Subject[JobStatusUpdate] = Subject()
            self._open[job_uuid] = stream
            if self._started:
                self._streams.on_next(stream)
            else:
                self._unwired.append(stream)
        return JobReporter(self, job_uuid)

    def is_open(self, job_uuid: str) -> bool:
        return job_uuid in self._open

    @property
    def open_jobs(self) -> int:
        return len(self._open)

    def report(self, job_uuid: str, status: JobStatus | str, metadata: Metadata = None) -> bool:
        """Queue a status update. False (and a warning) once the job's stream has ended."""
        stream = self._open.get(job_uuid)
        if stream is None:
            log.warning("status %s for job %s ignored: its status stream has ended", status, job_uuid)
            return False
        update = JobStatusUpdate(uuid=job_uuid, status=JobStatus(status), metadata=_metadata(metadata))
        if self._started:
            stream.on_next(update)
        else:
            self._early.append(update)  # nothing is subscribed yet: kept for start()
        if update.status.is_final:
            self.stop_listener(job_uuid)
        return True

    def stop_listener(self, job_uuid: str) -> None:
        """End a job's status stream (after its final status, or when the host gives up on it)."""
        stream = self._open.pop(job_uuid, None)
        if stream is not None:
            stream.on_completed()

    def stop(self) -> None:
        self._stopped = True
        for job_uuid in list(self._open):
            self.stop_listener(job_uuid)
        self._streams.on_completed()


def _metadata(metadata: Metadata) -> JobStatusMetadata | None:
    if metadata is None or isinstance(metadata, JobStatusMetadata):
        return metadata
    return JobStatusMetadata.model_validate(dict(metadata))
