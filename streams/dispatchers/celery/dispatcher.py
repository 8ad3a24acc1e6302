"""The validator side: CeleryDispatcher publishes jobs and feeds the workers' statuses back to the client."""

from __future__ import annotations

import asyncio
import logging
import math
import random
import socket
import time
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import reactivex
from reactivex.abc import DisposableBase

from operators import Backoff
from streams.dispatchers.base import Report, StatusAck, StatusFeed
from streams.exceptions import DispatcherError, UsageError
from streams.protocol import V2JobRequest
from streams.safe_subject import SafeSubject

if TYPE_CHECKING:
    import redis
    import redis.asyncio

from streams.dispatchers.celery.common import (
    DEFAULT_QUEUE,
    GROUP,
    STREAM_KEY,
    TASK_NAME,
    check_redis_url,
    is_connection_error,
    redact,
)
from streams.dispatchers.celery.entries import decode_entry
from streams.dispatchers.celery.worker import make_celery_app

log = logging.getLogger(__name__)

__all__ = [
    "CeleryDispatcher",
    "DispatcherFailure",
]


DispatcherFailure = DispatcherError
"""What ``CeleryDispatcher.failures`` emits (see :class:`streams.exceptions.DispatcherError`)."""


class CeleryDispatcher:
    """Submits each job to a Celery queue and feeds the workers' statuses back into the client.

    ``handle(job, report)`` publishes the untouched raw job (``send_task(task_name, args=[raw])``)
    from a thread, never blocking the loop, retrying while the broker is unavailable. ``start()``
    runs one owned task reading the status stream; ``stop()`` ends it. The client calls ``bind()``,
    ``start()`` and ``stop()`` itself.

    ``consumer`` names this client in the consumer group. It must be the same across restarts (a
    restarted client reads what its predecessor read but never acknowledged) and unique among
    clients running at once: the default is the host name (give a stable ``consumer`` where the
    host name changes on restart, as in containers). Entries pending for another consumer for
    ``claim_idle`` seconds (a client that is gone) are taken over, at start and every ``claim_idle`` s.
    ``max_unacked`` bounds the entries held in memory: past it, the backlog waits in Redis.
    """

    def __init__(
        self,
        broker_url: str,
        queue: str = DEFAULT_QUEUE,
        *,
        task_name: str = TASK_NAME,
        stream_key: str = STREAM_KEY,
        group: str = GROUP,
        consumer: str | None = None,
        redis_url: str | None = None,
        block_ms: int = 1000,
        batch: int = 100,
        max_unacked: int = 10_000,
        claim_idle: float | None = 60.0,
        delete_acked: bool = True,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
        publish_threads: int = 4,
        app: Any = None,
        rng: random.Random | None = None,
    ) -> None:
        if not queue:
            raise ValueError("queue must be a non-empty name")
        if block_ms <= 0 or batch <= 0 or max_unacked <= 0 or publish_threads <= 0:
            raise ValueError("block_ms, batch, max_unacked and publish_threads must be > 0")
        self.redis_url = redis_url or broker_url
        check_redis_url(self.redis_url)
        self.broker_url = broker_url
        self.queue = queue
        self.task_name = task_name
        self.stream_key = stream_key
        self.group = group
        self.consumer = consumer or socket.gethostname()
        self.block_ms = block_ms
        self.batch = batch
        self.max_unacked = max_unacked
        self.claim_idle = claim_idle
        self.delete_acked = delete_acked
        self._backoff_args = (backoff_base, backoff_cap)
        self._rng = rng or random.Random()
        self._owns_app = app is None
        self._app = app if app is not None else make_celery_app(
            broker_url, queue, stream_key=stream_key, redis_url=redis_url, task_name=task_name
        )
        self._executor = ThreadPoolExecutor(publish_threads, thread_name_prefix="celery-publish")

        self._statuses: StatusFeed | None = None
        self._acks_subscription: DisposableBase | None = None
        self._redis: redis.asyncio.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._failures: SafeSubject[DispatcherFailure] = SafeSubject()
        self._stopped = False

        self._inflight: dict[str, tuple[str, str]] = {}
        """Entry id -> (job uuid, status): handed to the outbox, not yet XACKed."""
        self._by_key: dict[tuple[str, str], deque[str]] = {}
        """(job uuid, status) -> entry ids awaiting the facilitator's answer, in report order."""
        self._to_ack: list[str] = []
        self._ack_wake = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()
        self._finished: OrderedDict[str, None] = OrderedDict()
        self._stored: OrderedDict[tuple[str, str], None] = OrderedDict()
        """(job uuid, status) the facilitator already answered: a later entry for it is a rerun's duplicate."""
        self.delivered = 0
        """Entries reported to the client (redelivered ones included)."""
        self.recovered = 0
        """Entries resent from the pending list: read before (by a predecessor or a vanished consumer), never XACKed."""
        self.acknowledged = 0
        self.duplicates = 0
        """Entries not sent because the facilitator already answered their (job, status): a job run twice."""
        self.malformed = 0
        self.published = 0

    # -- the Dispatcher protocol ---------------------------------------------------------------
    @property
    def failures(self) -> reactivex.Observable[DispatcherFailure]:
        """Every failed (and retried) Redis/broker operation and every dropped malformed entry."""
        return self._failures

    @property
    def app(self) -> Any:
        return self._app

    @property
    def pending(self) -> int:
        """Stream entries handed to the client and not yet XACKed."""
        return len(self._inflight)

    def bind(self, feed: StatusFeed) -> None:
        """Called by the client before start(): where to report statuses and learn they were answered."""
        if self._statuses is not None:
            raise UsageError("CeleryDispatcher.bind() was already called: one dispatcher serves one client")
        self._statuses = feed
        self._acks_subscription = feed.acks.subscribe(self._on_ack)

    async def handle(self, job: V2JobRequest, report: Report) -> None:
        """Publish the job; while the broker is unavailable, retry (the job is not lost)."""
        loop = asyncio.get_running_loop()
        backoff = self._new_backoff()
        while True:
            try:
                await loop.run_in_executor(self._executor, self._publish, job.raw)
            except Exception as exc:
                if not is_connection_error(exc):
                    raise  # the client reports horde_failed for this job
                delay = backoff.next_delay()
                self._fail("publish", exc, backoff.attempt, delay, f"job {job.uuid} not queued yet")
                await asyncio.sleep(delay)
                continue
            self.published += 1
            if backoff.attempt:
                log.warning("job %s queued on %s after %d failed attempts", job.uuid, self.queue, backoff.attempt)
            return

    def _publish(self, raw: dict[str, Any]) -> None:
        self._app.send_task(self.task_name, args=[raw], queue=self.queue, retry=False)

    async def start(self) -> None:
        if self._statuses is None:
            raise UsageError("CeleryDispatcher.start() needs bind(feed) first (the client calls it)")
        if self._task is not None or self._stopped:
            raise UsageError("CeleryDispatcher.start() can be called once")
        import redis.asyncio
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        self._redis = redis.asyncio.Redis.from_url(
            self.redis_url,
            decode_responses=True,
            socket_connect_timeout=2.0,
            # No socket_timeout: with one, redis-py (8.1, Python 3.11) now and then loses the
            # cancellation of a blocking XREADGROUP. TCP keepalive finds a dead peer instead.
            socket_timeout=None,
            socket_keepalive=True,
            socket_keepalive_options=_keepalive_options(),
            retry=Retry(NoBackoff(), 0),  # we retry, and say so
        )
        self._task = asyncio.create_task(self._run(), name="celery-status-stream")

    async def stop(self) -> None:
        """Cancel the stream task, close connections. Unacknowledged entries stay pending in Redis."""
        self._stopped = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            _done, pending = await asyncio.wait({task}, timeout=1.0)
            if pending and self._redis is not None:
                # A cancellation lost inside the Redis client: failing its connections ends the read.
                log.warning("the status stream reader did not stop at once; closing its Redis connections")
                await self._redis.connection_pool.disconnect()
            try:
                await task
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise
            except Exception:
                log.exception("the status stream task failed")
        if self._acks_subscription is not None:
            self._acks_subscription.dispose()
            self._acks_subscription = None
        if self._redis is not None:
            client, self._redis = self._redis, None
            try:
                await client.aclose()
            except Exception as exc:  # closing a broken connection may raise; nothing is lost
                log.debug("closing the redis client: %s", exc)
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._owns_app:
            await asyncio.to_thread(self._app.close)  # closes the broker connection pool
        self._failures.on_completed()

    # -- the status stream ----------------------------------------------------------------------
    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._read_loop(), name="celery-status-reader")
            group.create_task(self._ack_loop(), name="celery-status-acker")

    async def _read_loop(self) -> None:
        backoff = self._new_backoff()
        recover = True
        next_claim = math.inf if self.claim_idle is None else 0.0
        while True:
            _raise_if_cancelling()
            try:
                if recover:
                    await self._ensure_group()
                    await self._claim_stale()
                    await self._read_pending()
                    recover = False
                    if backoff.attempt:
                        log.warning(
                            "redis reachable again at %s: reading the status stream %s (after %d failed attempts)",
                            redact(self.redis_url), self.stream_key, backoff.attempt,
                        )
                        backoff.reset()
                elif time.monotonic() >= next_claim and await self._claim_stale():
                    await self._read_pending()
                if self.claim_idle is not None and time.monotonic() >= next_claim:
                    next_claim = time.monotonic() + self.claim_idle
                await self._room.wait()
                reply = await self._client.xreadgroup(
                    self.group, self.consumer, {self.stream_key: ">"}, count=self.batch, block=self.block_ms
                )
                self._deliver(_entries(reply))
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _raise_if_cancelling(exc)
                # After any failure, read the pending list again: a reply lost with the connection
                # left entries pending that were never reported (the ones that were are skipped).
                recover = True
                delay = backoff.next_delay()
                self._fail("read", exc, backoff.attempt, delay, f"reading the status stream {self.stream_key}")
                await asyncio.sleep(delay)

    async def _ensure_group(self) -> None:
        """Create the group at the start of the stream (a Redis restart without persistence loses it)."""
        from redis.exceptions import ResponseError

        try:
            await self._client.xgroup_create(self.stream_key, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _claim_stale(self) -> int:
        """Take over entries pending for ``claim_idle`` s with another consumer (a client that is gone).

        Runs at start and every ``claim_idle`` seconds. Entries taken over late may reach the
        facilitator after later statuses of the same job: better than never. A consumer name that
        stays the same across restarts avoids this path altogether.
        """
        from redis.exceptions import ResponseError

        if self.claim_idle is None:
            return 0
        start, taken = "0-0", 0
        while True:
            try:
                claim: list[Any] = await self._client.xautoclaim(
                    self.stream_key, self.group, self.consumer, int(self.claim_idle * 1000),
                    start_id=start, count=self.batch,  # not justid: redis-py then drops the cursor
                )
            except ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                log.warning("redis has no XAUTOCLAIM (before 6.2): entries of other consumers are not taken over")
                self.claim_idle = None
                return taken
            taken += sum(1 for entry in (claim[1] if len(claim) > 1 else []) if str(entry[0]) not in self._inflight)
            start = str(claim[0])
            if start in ("0-0", "0"):
                break
        if taken:
            log.warning("took over %d status entries left pending by another consumer of group %s", taken, self.group)
        return taken

    async def _read_pending(self) -> None:
        """Report what this consumer read but never acknowledged (a crashed predecessor), in order."""
        last, recovered = "0", 0
        while True:
            await self._room.wait()
            reply = await self._client.xreadgroup(
                self.group, self.consumer, {self.stream_key: last}, count=self.batch
            )
            entries = _entries(reply)
            if not entries:
                break
            recovered += sum(1 for entry_id, _ in entries if entry_id not in self._inflight)
            self._deliver(entries)
            last = entries[-1][0]
        if recovered:
            self.recovered += recovered
            log.warning(
                "resending %d status entries read earlier by consumer %s but never acknowledged by the facilitator",
                recovered, self.consumer,
            )

    def _deliver(self, entries: list[tuple[str, dict[str, str] | None]]) -> None:
        statuses = self._statuses
        assert statuses is not None
        for entry_id, fields in entries:
            if entry_id in self._inflight:
                continue  # already with the client (read again while recovering from a Redis error)
            if not fields:  # deleted while pending: nothing to report
                self._queue_ack(entry_id)
                continue
            try:
                update = decode_entry(fields)
            except ValueError as exc:
                self.malformed += 1
                log.error("status stream entry %s dropped: %s; fields %r", entry_id, exc, dict(fields))
                self._failures.on_next(DispatcherFailure("entry", exc, 1, None))
                self._queue_ack(entry_id)
                continue
            key = (update.uuid, update.status.value)
            if key in self._stored:
                # A job run twice (acks_late: its worker or its ack was lost with Redis) reports its
                # statuses again; the facilitator would answer job.integrity_error: not sent at all.
                self.duplicates += 1
                self._queue_ack(entry_id)
                continue
            self._inflight[entry_id] = key
            ids = self._by_key.setdefault(key, deque())
            ids.append(entry_id)
            try:
                # (Re)opens the job's stream: a job whose stream ended is redelivered after a restart.
                statuses.report(update.uuid, update.status, update.metadata)
            except BaseException:
                # Not handed over: forget it, so that reading the pending list again retries it.
                del self._inflight[entry_id]
                ids.pop()
                if not ids:
                    del self._by_key[key]
                raise
            self.delivered += 1
            if update.status.is_final:
                self._finished[update.uuid] = None
                if len(self._finished) > 10_000:
                    self._finished.popitem(last=False)
            elif update.uuid in self._finished:
                statuses.release(update.uuid)  # a duplicate after the final status: do not leak the stream
        self._update_room()

    def _on_ack(self, ack: StatusAck) -> None:
        """Any answer (success, duplicate, error) means the facilitator will not need it again."""
        try:
            key = (ack.job_uuid, ack.status)
            ids = self._by_key.get(key)
            if not ids:
                return  # an update the client reported itself (received, horde_failed)
            entry_id = ids.popleft()
            if not ids:
                del self._by_key[key]
            self._queue_ack(entry_id)
            self._stored[key] = None
            if len(self._stored) > 100_000:
                self._stored.popitem(last=False)
        except Exception:
            log.exception("matching an acknowledgement to its stream entry failed")

    def _queue_ack(self, entry_id: str) -> None:
        self._to_ack.append(entry_id)
        self._ack_wake.set()

    async def _ack_loop(self) -> None:
        backoff = self._new_backoff()
        while True:
            _raise_if_cancelling()
            await self._ack_wake.wait()
            ids = self._to_ack[: self.batch]
            if not ids:
                self._ack_wake.clear()
                continue
            try:
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.xack(self.stream_key, self.group, *ids)
                    if self.delete_acked:
                        pipe.xdel(self.stream_key, *ids)  # the stream only holds what is not yet delivered
                    await pipe.execute()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                _raise_if_cancelling(exc)
                delay = backoff.next_delay()
                self._fail("ack", exc, backoff.attempt, delay, f"{len(self._to_ack)} acknowledgements waiting")
                await asyncio.sleep(delay)
                continue
            if backoff.attempt:
                log.warning("redis reachable again at %s: acknowledgements resumed", redact(self.redis_url))
                backoff.reset()
            del self._to_ack[: len(ids)]
            for entry_id in ids:
                self._inflight.pop(entry_id, None)
            self.acknowledged += len(ids)
            self._update_room()

    def _update_room(self) -> None:
        if len(self._inflight) < self.max_unacked:
            self._room.set()
        else:
            self._room.clear()

    # -- helpers ----------------------------------------------------------------------------------
    @property
    def _client(self) -> redis.asyncio.Redis:
        if self._redis is None:
            raise RuntimeError("the status stream is not running")
        return self._redis

    def _new_backoff(self) -> Backoff:
        return Backoff(*self._backoff_args, stable_after=0.0, rng=self._rng)

    def _fail(self, operation: str, exc: BaseException, attempt: int, delay: float, what: str) -> None:
        where = redact(self.broker_url if operation == "publish" else self.redis_url)
        down = is_connection_error(exc)
        problem = ("broker" if operation == "publish" else "redis") + " unavailable" if down else f"{operation} failed"
        log.warning(
            "%s at %s (%s): %s: %s; retry %d in %.2f s", problem, where, what, type(exc).__name__, exc,
            attempt, delay, exc_info=None if down else exc,  # not an outage: show where it came from
        )
        self._failures.on_next(DispatcherFailure(operation, exc, attempt, delay))


def _raise_if_cancelling(cause: BaseException | None = None) -> None:
    """Re-raise a cancellation that a library swallowed (and maybe turned into another error)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from cause


def _keepalive_options() -> dict[int, int | bytes]:
    """Probe an idle connection after 10 s, every 5 s, 3 times: a dead Redis is noticed in ~25 s."""
    wanted = (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3))
    return {getattr(socket, name): value for name, value in wanted if hasattr(socket, name)}


def _entries(reply: Any) -> list[tuple[str, dict[str, str] | None]]:
    """XREADGROUP's reply (RESP2 list or RESP3 dict) for one stream, as (entry id, fields) pairs."""
    if not reply:
        return []
    streams = reply.values() if isinstance(reply, dict) else (item[1] for item in reply)
    entries: list[tuple[str, dict[str, str] | None]] = []
    for stream in streams:
        for entry in stream:
            entries.append((str(entry[0]), entry[1]))
    return entries
