"""``python -m streams worker`` and the flags of ``run --dispatcher celery`` (phase 2, the ``celery`` extra)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from streams.cli.common import CliError, Command, at_least, non_negative
from streams.dispatchers.celery import (
    DEFAULT_QUEUE,
    GROUP,
    STREAM_KEY,
    TASK_NAME,
    CeleryDispatcher,
    check_redis_url,
    worker_command,
)

__all__ = ["add_run_flags", "dispatcher_from_args", "register"]


def add_run_flags(run: argparse.ArgumentParser) -> None:
    """The flags of ``run --dispatcher celery``."""
    group = run.add_argument_group("--dispatcher celery (jobs run on Celery workers)")
    group.add_argument("--broker", metavar="URL", help="Redis broker, e.g. redis://127.0.0.1:6379/0")
    group.add_argument("--queue", default=DEFAULT_QUEUE, help=f"Celery queue (default {DEFAULT_QUEUE})")
    group.add_argument("--task-name", default=TASK_NAME, help=f"Celery task run per job (default {TASK_NAME})")
    group.add_argument("--stream-key", default=STREAM_KEY, help="Redis Stream of the workers' statuses")
    group.add_argument("--group", default=GROUP, help="consumer group reading the stream")
    group.add_argument("--consumer", default=None,
                       help="this client's name in the group: stable across restarts (default: host name)")


def register(sub: Any) -> dict[str, Command]:
    """Adds ``worker``: a Celery worker that plays the sample job lifecycle."""
    worker = sub.add_parser("worker", help="run a Celery worker that plays the sample job lifecycle")
    worker.add_argument("--broker", required=True, metavar="URL", help="Redis broker, e.g. redis://HOST:6379/0")
    worker.add_argument("--queue", default=DEFAULT_QUEUE, help=f"Celery queue to consume (default {DEFAULT_QUEUE})")
    worker.add_argument("--stream-key", default=STREAM_KEY, help="Redis Stream the statuses go to")
    worker.add_argument("--step-delay", type=non_negative, default=0.5, help="seconds per lifecycle step (default 0.5)")
    worker.add_argument("--concurrency", type=at_least(1), default=8, help="jobs run at once (default 8)")
    worker.add_argument("--pool", default="threads", choices=["threads", "prefork", "solo"],
                        help="Celery worker pool (default threads: the sample job only sleeps)")
    return {"worker": _worker}


def dispatcher_from_args(args: argparse.Namespace) -> CeleryDispatcher:
    """The CeleryDispatcher of ``run --dispatcher celery --broker URL --queue NAME``."""
    broker = getattr(args, "broker", None)
    if not broker:
        raise CliError("--dispatcher celery needs --broker URL (e.g. redis://127.0.0.1:6379/0)")
    try:
        return CeleryDispatcher(
            broker, args.queue, task_name=args.task_name, stream_key=args.stream_key, group=args.group,
            consumer=args.consumer,
        )
    except ImportError as exc:
        raise CliError(f"--dispatcher celery needs the celery extra (pip install 'facilitator-streams[celery]'): "
                       f"{exc}") from None
    except ValueError as exc:
        raise CliError(str(exc)) from None




async def _worker(args: argparse.Namespace) -> None:
    """Replace this process with the Celery worker: Celery then owns signals (SIGTERM: warm shutdown)."""
    try:
        check_redis_url(args.broker)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    try:
        import celery  # noqa: F401
        import redis  # noqa: F401
    except ImportError as exc:
        raise CliError(
            f"the worker needs the celery extra (pip install 'facilitator-streams[celery]'): {exc}"
        ) from None
    argv, env = worker_command(
        args.broker, args.queue, step_delay=args.step_delay, concurrency=args.concurrency, pool=args.pool,
        stream_key=args.stream_key, log_level=args.log_level,
    )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, {**os.environ, **env})
