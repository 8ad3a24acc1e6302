"""Celery dispatch (phase 2): jobs run on worker hosts, their statuses come back through a Redis Stream.

    validator host                                                       worker hosts
    facilitator ─► client ─► CeleryDispatcher.handle ─► send_task(name, [raw job], queue) ─► Celery worker
       ▲                                                                                        │ report()
       └── outbox ◄─ statuses.report ◄─ XREADGROUP (consumer group) ◄── Redis Stream ◄── XADD ──┘
                        acks ─► XACK (+ XDEL) once the facilitator answered the update

Why a stream read through a consumer group: an entry stays in the consumer's pending list until it
is XACKed, and it is XACKed only after the facilitator answered the status update it became. A
client that crashes and restarts (same consumer name) reads its pending entries first, in stream
order, so nothing is lost and each job's statuses keep their order (the stream is one FIFO and the
client's outbox is another). A resent update the facilitator already stored is answered
``job.integrity_error``, which counts as acknowledged.

Redis being unavailable is never fatal: every failed read, XACK or publish is logged, emitted on
``CeleryDispatcher.failures`` and retried with full-jitter backoff.

celery and redis are optional (the ``celery`` extra): they are imported where used, so this module
(and the CLI that registers its commands) imports without them.
"""

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
    GROUP,
    STREAM_KEY,
    TASK_NAME,
    check_redis_url,
)
from streams.dispatchers.celery.dispatcher import CeleryDispatcher, DispatcherFailure
from streams.dispatchers.celery.entries import decode_entry, encode_entry
from streams.dispatchers.celery.worker import (
    StatusReporter,
    make_celery_app,
    play_lifecycle,
    report,
    reporter_for,
    worker_command,
)

__all__ = [
    "DEFAULT_BROKER",
    "DEFAULT_QUEUE",
    "DEFAULT_VISIBILITY_TIMEOUT",
    "ENV_BROKER",
    "ENV_QUEUE",
    "ENV_STEP_DELAY",
    "ENV_STREAM_KEY",
    "ENV_VISIBILITY_TIMEOUT",
    "ENV_WORKER_ID",
    "GROUP",
    "STREAM_KEY",
    "TASK_NAME",
    "CeleryDispatcher",
    "DispatcherFailure",
    "StatusReporter",
    "check_redis_url",
    "decode_entry",
    "encode_entry",
    "make_celery_app",
    "play_lifecycle",
    "report",
    "reporter_for",
    "worker_command",
]
