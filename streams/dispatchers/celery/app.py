"""The Celery app a worker host runs: ``celery -A streams.dispatchers.celery.app worker --queues NAME``.

Configured from the environment, because ``celery -A`` imports a module and takes its ``app``:
``FACILITATOR_STREAMS_BROKER`` (default redis://127.0.0.1:6379/0), ``FACILITATOR_STREAMS_QUEUE``,
``FACILITATOR_STREAMS_STREAM_KEY``, ``FACILITATOR_STREAMS_STEP_DELAY`` (seconds per lifecycle step
of the sample task) and ``FACILITATOR_STREAMS_VISIBILITY_TIMEOUT`` (seconds). ``python -m streams
worker`` sets these and runs exactly this (as a supervised child process).
"""

from __future__ import annotations

import os
from typing import Any

from streams.dispatchers.celery import (
    DEFAULT_BROKER,
    DEFAULT_QUEUE,
    DEFAULT_VISIBILITY_TIMEOUT,
    ENV_BROKER,
    ENV_QUEUE,
    ENV_STEP_DELAY,
    ENV_STREAM_KEY,
    ENV_VISIBILITY_TIMEOUT,
    STREAM_KEY,
    make_celery_app,
)

__all__ = ["app"]

app: Any = make_celery_app(
    os.environ.get(ENV_BROKER) or DEFAULT_BROKER,
    os.environ.get(ENV_QUEUE) or DEFAULT_QUEUE,
    stream_key=os.environ.get(ENV_STREAM_KEY) or STREAM_KEY,
    step_delay=float(os.environ.get(ENV_STEP_DELAY) or 0.5),
    visibility_timeout=float(os.environ.get(ENV_VISIBILITY_TIMEOUT) or DEFAULT_VISIBILITY_TIMEOUT),
)
