"""What a dispatcher is, and the narrow interfaces the client hands the ones that need more.

    Dispatcher             async handle(job, report)          every dispatcher
    ManagedDispatcher      + async start() / async stop()     has resources to open and close
    FeedingDispatcher      + bind(feed: StatusFeed)           statuses arrive from elsewhere (Celery
                                                              workers) and must be confirmed there
    FailureReporting       .failures: Observable[DispatcherError]   backend trouble, as events

The client checks these Protocols with ``isinstance`` (they are runtime-checkable) and calls each
hook at the matching point of its own lifecycle: ``bind`` before ``start``, ``stop`` after the job
tasks are cancelled. A dispatcher sees only these types and :mod:`streams.protocol`, never the
client's managers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

import reactivex

from streams.exceptions import DispatcherError
from streams.protocol import JobStatus, JobStatusMetadata, V2JobRequest

__all__ = [
    "AckOutcomeName",
    "Dispatcher",
    "FailureReporting",
    "FeedingDispatcher",
    "Handler",
    "ManagedDispatcher",
    "Metadata",
    "Report",
    "StatusAck",
    "StatusFeed",
]

Metadata = JobStatusMetadata | Mapping[str, Any] | None
"""Status metadata as a host gives it: the model, or a mapping validated into it."""


class Report(Protocol):
    """What a dispatcher calls to report a job's progress: ``report(status, metadata=None)``.

    Returns False (and logs) once the job's status stream has ended (after a final status).
    """

    def __call__(self, status: JobStatus | str, metadata: Metadata = None) -> bool: ...


Handler = Callable[[V2JobRequest, Report], Awaitable[None]]
"""``async def handle(job, report)``: the simplest dispatcher, wrapped by CallbackDispatcher."""


@runtime_checkable
class Dispatcher(Protocol):
    """Runs one job. Report progress with ``report(status, metadata=None)``."""

    async def handle(self, job: V2JobRequest, report: Report) -> None: ...


@runtime_checkable
class ManagedDispatcher(Dispatcher, Protocol):
    """A dispatcher with resources: ``start()`` before the first job, ``stop()`` at the client's teardown."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


AckOutcomeName = Literal["success", "duplicate", "error", "refused"]


@dataclass(frozen=True, slots=True)
class StatusAck:
    """The facilitator answered the status update (job_uuid, status): it will not need it again."""

    job_uuid: str
    status: str
    outcome: AckOutcomeName
    """``success``, ``duplicate`` (``job.integrity_error``: already stored), ``error``, or ``refused``
    (never sent: the client refused it at enqueue, e.g. over the frame size limit; reported as an event)."""


class StatusFeed(Protocol):
    """What a FeedingDispatcher gets: a way to report any job's status, and the facilitator's answers."""

    def report(self, job_uuid: str, status: JobStatus | str, metadata: Metadata = None) -> bool:
        """Queue a status update for ``job_uuid``, (re)opening its status stream if needed."""
        ...

    def release(self, job_uuid: str) -> None:
        """End a job's status stream (e.g. after a duplicate that came after its final status)."""
        ...

    @property
    def acks(self) -> reactivex.Observable[StatusAck]:
        """Every answered status update, in the order the answers arrived."""
        ...


@runtime_checkable
class FeedingDispatcher(Dispatcher, Protocol):
    """A dispatcher whose statuses come from elsewhere and are confirmed there once answered."""

    def bind(self, feed: StatusFeed) -> None: ...


@runtime_checkable
class FailureReporting(Protocol):
    """A dispatcher whose backend can fail and recover (each failure becomes a DISPATCHER_FAILED event)."""

    @property
    def failures(self) -> reactivex.Observable[DispatcherError]: ...
