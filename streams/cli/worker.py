"""``python -m streams worker`` and the flags of ``run --dispatcher celery`` (phase 2, the ``celery`` extra)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import random
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

from operators import Backoff
from streams.cli.common import CliError, Command, at_least, non_negative
from streams.dispatchers.celery import (
    DEFAULT_QUEUE,
    DEFAULT_VISIBILITY_TIMEOUT,
    GROUP,
    STREAM_KEY,
    TASK_NAME,
    CeleryDispatcher,
    check_redis_url,
    worker_command,
)

__all__ = ["add_run_flags", "dispatcher_from_args", "refuse_celery_flags", "register", "supervise"]

log = logging.getLogger(__name__)


def add_run_flags(run: argparse.ArgumentParser) -> None:
    """The flags of ``run --dispatcher celery`` (defaults None: given without it, they are refused)."""
    group = run.add_argument_group("--dispatcher celery (jobs run on Celery workers)")
    group.add_argument("--broker", metavar="URL", help="Redis broker, e.g. redis://127.0.0.1:6379/0")
    group.add_argument("--queue", help=f"Celery queue (default {DEFAULT_QUEUE})")
    group.add_argument("--task-name", help=f"Celery task run per job (default {TASK_NAME})")
    group.add_argument("--stream-key", help=f"Redis Stream of the workers' statuses (default {STREAM_KEY})")
    group.add_argument("--group", help=f"consumer group reading the stream (default {GROUP})")
    group.add_argument("--consumer",
                       help="this client's name in the group: stable across restarts (default: host name)")


_RUN_FLAGS = {"broker": "--broker", "queue": "--queue", "task_name": "--task-name", "stream_key": "--stream-key",
              "group": "--group", "consumer": "--consumer"}
"""``run``'s flags that only mean something with ``--dispatcher celery`` (argparse dest -> flag)."""


def refuse_celery_flags(args: argparse.Namespace) -> None:
    """``run --broker ...`` without ``--dispatcher celery``: an error, not a flag silently ignored."""
    given = [flag for dest, flag in _RUN_FLAGS.items() if getattr(args, dest, None) is not None]
    if given and getattr(args, "dispatcher", None) != "celery":
        verb = "applies" if len(given) == 1 else "apply"
        raise CliError(f"{', '.join(given)} only {verb} to --dispatcher celery "
                       f"(this run uses --dispatcher {args.dispatcher})")


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
    worker.add_argument("--visibility-timeout", type=at_least_one_second, default=DEFAULT_VISIBILITY_TIMEOUT,
                        metavar="SECONDS", help="longer than your longest job: a job whose worker died runs again "
                        f"after it (default {DEFAULT_VISIBILITY_TIMEOUT:g})")
    return {"worker": _worker}


def at_least_one_second(value: str) -> float:
    """A finite number of seconds >= 1 (an argparse type)."""
    seconds = non_negative(value)
    if not 1 <= seconds < math.inf:
        raise argparse.ArgumentTypeError(f"{value!r} must be a finite number of seconds >= 1")
    return seconds


def dispatcher_from_args(args: argparse.Namespace) -> CeleryDispatcher:
    """The CeleryDispatcher of ``run --dispatcher celery --broker URL --queue NAME``."""
    broker = getattr(args, "broker", None)
    if not broker:
        raise CliError("--dispatcher celery needs --broker URL (e.g. redis://127.0.0.1:6379/0)")

    def given(value: str | None, default: str) -> str:
        return default if value is None else value

    try:
        return CeleryDispatcher(
            broker, given(args.queue, DEFAULT_QUEUE), task_name=given(args.task_name, TASK_NAME),
            stream_key=given(args.stream_key, STREAM_KEY), group=given(args.group, GROUP), consumer=args.consumer,
        )
    except ImportError as exc:
        raise CliError(f"--dispatcher celery needs the celery extra (pip install 'facilitator-streams[celery]'): "
                       f"{exc}") from None
    except ValueError as exc:
        raise CliError(str(exc)) from None


async def _worker(args: argparse.Namespace) -> None:
    """Run the Celery worker as a supervised child (:func:`supervise`); exit with its status."""
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
        stream_key=args.stream_key, log_level=args.log_level, visibility_timeout=args.visibility_timeout,
    )
    rc = await supervise(argv, env)
    if rc:
        raise SystemExit(rc)


RESTART_BACKOFF = (1.0, 30.0)
STABLE_AFTER = 60.0


async def supervise(argv: Sequence[str], env: Mapping[str, str], *, rng_seed: int | None = None) -> int:
    """Run ``argv`` (a Celery worker) as a child; restart it whenever it dies without being asked to.

    The first SIGINT/SIGTERM becomes a SIGTERM for the child (Celery's warm shutdown: running jobs
    finish, exit status 0), a second one a SIGQUIT (cold shutdown). The child gets its own session,
    so a terminal's Ctrl-C reaches it only through here, and ``PR_SET_PDEATHSIG`` (Linux), so it
    does not outlive a supervisor that is SIGKILLed. Returns the child's exit status once asked to
    stop (or once it exited 0 by itself: a remote shutdown).
    """
    loop = asyncio.get_running_loop()
    signals_received = 0
    child: asyncio.subprocess.Process | None = None
    woken = asyncio.Event()

    def forward() -> None:
        if child is not None and child.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM if signals_received == 1 else signal.SIGQUIT)

    def on_signal(signum: int) -> None:
        nonlocal signals_received
        signals_received += 1
        log.warning("%s: stopping the celery worker (%s)", signal.Signals(signum).name,
                    "warm shutdown: running jobs finish" if signals_received == 1 else "cold shutdown")
        woken.set()
        forward()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    backoff = Backoff(*RESTART_BACKOFF, stable_after=STABLE_AFTER, rng=random.Random(rng_seed))
    try:
        while True:
            started = time.monotonic()
            child = await asyncio.create_subprocess_exec(
                *argv, env={**os.environ, **env}, start_new_session=True, preexec_fn=_die_with_parent,
            )
            log.warning("celery worker started (pid %d)", child.pid)
            if signals_received:  # a signal came while it was starting
                forward()
            rc = await child.wait()
            if signals_received and rc == -signal.SIGTERM:
                return 0  # stopped before Celery installed its handlers: nothing was running
            if signals_received or rc == 0:
                return rc if rc >= 0 else 128 - rc
            if time.monotonic() - started >= STABLE_AFTER:
                backoff.reset()
            delay = backoff.next_delay()
            log.error("celery worker (pid %d) exited with status %d; restarting it in %.1f s (restart %d)",
                      child.pid, rc, delay, backoff.attempt)
            woken.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(woken.wait(), delay)
            if signals_received:
                return 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        if child is not None and child.returncode is None:  # cancelled: do not leave it behind
            child.kill()
            await child.wait()


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the supervisor dies (Linux; elsewhere nothing)."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
