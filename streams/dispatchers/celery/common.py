"""What both sides of Celery dispatch share: names, defaults, environment keys, Redis URL checks."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    pass

from streams.config import redact_url as redact

log = logging.getLogger(__name__)

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
    "check_redis_url",
    "is_connection_error",
    "redact",
]


TASK_NAME = "facilitator_streams.run_job"
STREAM_KEY = "facilitator-streams:statuses"
GROUP = "facilitator-client"
DEFAULT_QUEUE = "facilitator-jobs"
DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
DEFAULT_VISIBILITY_TIMEOUT = 600.0

ENV_BROKER = "FACILITATOR_STREAMS_BROKER"
ENV_QUEUE = "FACILITATOR_STREAMS_QUEUE"
ENV_STREAM_KEY = "FACILITATOR_STREAMS_STREAM_KEY"
ENV_STEP_DELAY = "FACILITATOR_STREAMS_STEP_DELAY"
ENV_VISIBILITY_TIMEOUT = "FACILITATOR_STREAMS_VISIBILITY_TIMEOUT"
ENV_WORKER_ID = "FACILITATOR_STREAMS_WORKER_ID"


_REDIS_SCHEMES = ("redis", "rediss", "unix")



def is_connection_error(exc: BaseException) -> bool:
    """Errors that mean "Redis / the broker is not reachable right now": retried, never fatal."""
    from kombu.exceptions import OperationalError
    from redis import exceptions

    if isinstance(exc, exceptions.ResponseError):
        return "NOGROUP" in str(exc) or "LOADING" in str(exc)  # restarted without the group / still loading
    redis_down = exceptions.ConnectionError | exceptions.TimeoutError
    return isinstance(exc, OSError | TimeoutError | OperationalError | redis_down)


def check_redis_url(url: str) -> None:
    scheme = urlsplit(url).scheme
    if scheme not in _REDIS_SCHEMES:
        raise ValueError(f"the status stream needs a Redis URL (redis://HOST:PORT/DB), got {redact(url)!r}")

