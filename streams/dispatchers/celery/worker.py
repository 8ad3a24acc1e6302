"""The worker side: report statuses to the stream, the sample task, the Celery app and its command."""

from __future__ import annotations

import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from operators import Backoff
from streams.dispatchers.base import Metadata
from streams.dispatchers.lifecycle import IN_PROGRESS, final_status
from streams.protocol import JobStatus

if TYPE_CHECKING:
    import redis
    import redis.asyncio

from streams.dispatchers.celery.common import (
    DEFAULT_BROKER,
    DEFAULT_QUEUE,
    DEFAULT_VISIBILITY_TIMEOUT,
    ENV_BROKER,
    ENV_QUEUE,
    ENV_STEP_DELAY,
    ENV_STREAM_KEY,
    ENV_VISIBILITY_TIMEOUT,
    ENV_WORKER_ID,
    STREAM_KEY,
    TASK_NAME,
    check_redis_url,
    redact,
)
from streams.dispatchers.celery.entries import encode_entry

log = logging.getLogger(__name__)

__all__ = [
    "StatusReporter",
    "make_celery_app",
    "play_lifecycle",
    "report",
    "reporter_for",
    "worker_command",
]


class StatusReporter:
    """Worker side: ``report(job_uuid, status, metadata)`` appends to the status stream (XADD).

    Redis unavailable: the XADD is retried with backoff for up to ``retry_for`` seconds, so a Redis
    restart delays a job's statuses instead of losing them. A retried XADD whose first try did land
    adds a duplicate entry; the facilitator answers it ``job.integrity_error`` (harmless).
    Thread-safe (one client, one connection pool), for Celery's thread pool.
    """

    def __init__(
        self,
        redis_url: str,
        stream_key: str = STREAM_KEY,
        *,
        retry_for: float = 300.0,
        backoff_base: float = 0.05,
        backoff_cap: float = 2.0,
    ) -> None:
        check_redis_url(redis_url)
        self.redis_url = redis_url
        self.stream_key = stream_key
        self.retry_for = retry_for
        self._backoff = (backoff_base, backoff_cap)
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()

    def _redis(self) -> redis.Redis:
        with self._lock:
            if self._client is None:
                import redis
                from redis.backoff import NoBackoff
                from redis.retry import Retry

                self._client = redis.Redis.from_url(
                    self.redis_url,
                    socket_connect_timeout=2.0,
                    socket_timeout=10.0,
                    retry=Retry(NoBackoff(), 0),  # we retry, and say so
                )
            return self._client

    def report(self, job_uuid: str, status: JobStatus | str, metadata: Metadata = None) -> str:
        """Append one status update to the stream; returns the entry id."""
        import redis

        fields = encode_entry(job_uuid, status, metadata)
        backoff = Backoff(*self._backoff, stable_after=0.0)
        deadline = time.monotonic() + self.retry_for
        while True:
            try:
                entry_id = self._redis().xadd(self.stream_key, fields)  # type: ignore[arg-type]
                return entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                delay = backoff.next_delay()
                if time.monotonic() + delay > deadline:
                    raise
                log.warning(
                    "redis unavailable at %s: status %s of job %s not appended yet (%s: %s); retry %d in %.2f s",
                    redact(self.redis_url), fields["status"], job_uuid, type(exc).__name__, exc,
                    backoff.attempt, delay,
                )
                time.sleep(delay)

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()


class _Reporting(Protocol):
    def __call__(self, job_uuid: str, status: JobStatus | str, metadata: Metadata = None) -> object: ...


def play_lifecycle(
    raw_job: Mapping[str, Any],
    report: _Reporting,
    step_delay: float,
    sleep: Callable[[float], None] = time.sleep,
) -> JobStatus:
    """The sample job: accepted … execution_done, then completed (``env SIMULATE=fail``: failed)."""
    job_uuid = str(raw_job["uuid"])
    for status in IN_PROGRESS:
        sleep(step_delay)
        report(job_uuid, status)
    sleep(step_delay)
    final, metadata = final_status(job_uuid, raw_job.get("env"))
    report(job_uuid, final, metadata)
    return final


_reporters_lock = threading.Lock()


def reporter_for(app: Any) -> StatusReporter:
    """The StatusReporter of a Celery app (made once per app, from its ``facilitator_streams_*`` settings)."""
    reporter = getattr(app, "_facilitator_streams_reporter", None)
    if reporter is None:
        with _reporters_lock:
            reporter = getattr(app, "_facilitator_streams_reporter", None)
            if reporter is None:
                conf = app.conf
                reporter = StatusReporter(
                    conf.get("facilitator_streams_redis_url") or conf.broker_url,
                    conf.get("facilitator_streams_stream_key") or STREAM_KEY,
                )
                app._facilitator_streams_reporter = reporter
    assert isinstance(reporter, StatusReporter)
    return reporter


def report(job_uuid: str, status: JobStatus | str, metadata: Metadata = None) -> str:
    """From inside a Celery task: report a job's status to the validator's client (XADD to the stream)."""
    from celery import current_app

    return reporter_for(current_app).report(job_uuid, status, metadata)


def make_celery_app(
    broker_url: str = DEFAULT_BROKER,
    queue: str = DEFAULT_QUEUE,
    *,
    stream_key: str = STREAM_KEY,
    step_delay: float = 0.5,
    redis_url: str | None = None,
    task_name: str = TASK_NAME,
    acks_late: bool = True,
    visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
) -> Any:
    """A Celery app for both sides: the validator publishes with it, workers run its sample task.

    ``redis_url`` is where the status stream lives (default: the broker). Built to survive a Redis
    restart (see :mod:`streams.dispatchers.celery.resilience`): the broker connection is retried forever, tasks
    are acknowledged late (after they ran) and re-queued when their worker is lost, so a job is
    never lost with its worker. The price is that a job may run twice (its worker died mid-job, or
    its ack could not reach Redis): harmless here, since a status already stored is answered
    ``job.integrity_error`` by the facilitator, which the client counts as acknowledged.
    ``visibility_timeout`` (s) must exceed the longest job: a message delivered that long ago and
    never acknowledged (its worker died) goes back on the queue, and a job still running that long
    is run a second time.
    """
    from celery import Celery

    from streams.dispatchers.celery import resilience

    if not queue:
        raise ValueError("queue must be a non-empty name")
    if not step_delay >= 0 or math.isinf(step_delay):
        raise ValueError(f"step_delay must be a finite number >= 0, got {step_delay!r}")
    if not visibility_timeout >= 1 or math.isinf(visibility_timeout):
        raise ValueError(f"visibility_timeout must be a finite number of seconds >= 1, got {visibility_timeout!r}")
    check_redis_url(redis_url or broker_url)
    app = Celery("facilitator_streams", broker=broker_url, set_as_current=False)
    app.conf.update(
        task_default_queue=queue,
        task_routes={task_name: {"queue": queue}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=acks_late,
        task_reject_on_worker_lost=acks_late,  # a worker process that died: its job goes back on the queue
        worker_prefetch_multiplier=1,
        broker_connection_retry=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # forever (ResilientConsumer also shortens the delays)
        broker_connection_timeout=2.0,
        broker_transport_options={
            # A publish must not hang on a dead connection: it runs in a thread the client waits for.
            "socket_connect_timeout": 2.0,
            "socket_timeout": 10.0,
            "visibility_timeout": visibility_timeout,
            # How soon a message left unacknowledged by a dead worker is noticed once it is visible.
            "unacked_restore_interval": max(1.0, min(10.0, visibility_timeout / 10)),
            "unacked_restore_throttle": 1,
            # No task priorities: one list per queue, which the worker reads with BLMOVE into an
            # in-flight list (resilience._Channel) instead of BRPOP, so a fetch cut short loses nothing.
            "priority_steps": [0],
        },
        # A running job is not cancelled when the connection drops: it finishes, its statuses are
        # retried until Redis is back, and ResilientRequest acknowledges it on the new connection.
        worker_cancel_long_running_tasks_on_connection_loss=False,
        facilitator_streams_stream_key=stream_key,
        facilitator_streams_step_delay=step_delay,
        facilitator_streams_redis_url=redis_url or broker_url,
    )
    resilience.install(app)

    def run_job(raw_job: dict[str, Any]) -> str:
        """The sample task: plays a job's lifecycle, reporting each status to the stream."""
        final = play_lifecycle(raw_job, reporter_for(app).report, float(app.conf.facilitator_streams_step_delay))
        return final.value

    app.task(name=task_name, Request=resilience.ResilientRequest)(run_job)
    return app


def worker_command(
    broker: str,
    queue: str,
    *,
    step_delay: float = 0.5,
    concurrency: int = 8,
    pool: str = "threads",
    stream_key: str = STREAM_KEY,
    log_level: str = "WARNING",
    visibility_timeout: float = DEFAULT_VISIBILITY_TIMEOUT,
) -> tuple[list[str], dict[str, str]]:
    """The plain ``celery ... worker`` command (argv, extra environment) that ``worker`` runs."""
    argv = [
        sys.executable, "-m", "celery", "-A", "streams.dispatchers.celery.app", "worker",
        "--queues", queue, "--pool", pool, "--concurrency", str(concurrency), "--loglevel", log_level,
        "--hostname", f"facilitator-streams-{os.getpid()}@%h", "--without-mingle", "--without-gossip",
    ]
    env = {ENV_BROKER: broker, ENV_QUEUE: queue, ENV_STREAM_KEY: stream_key, ENV_STEP_DELAY: repr(step_delay),
           ENV_VISIBILITY_TIMEOUT: repr(visibility_timeout),
           # Names the worker's in-flight lists: the same for every Celery process this command starts.
           ENV_WORKER_ID: f"{socket.gethostname()}:{os.getpid()}"}
    return argv, env
