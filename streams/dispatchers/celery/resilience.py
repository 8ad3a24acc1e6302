"""What keeps a Celery worker alive and its jobs moving through a Redis restart.

Celery 5 / kombu alone, with Redis SIGKILLed and restarted under a busy worker, lose jobs or the
worker: a closing channel that cannot reach Redis to put its messages back raises
``AttributeError: 'NoneType' object has no attribute 'hostname'`` ("Unrecoverable error": the
worker exits); the ack of a task that ends after its connection was replaced goes to a closed
channel; the messages the worker had reserved wait in kombu's ``unacked`` hash for the visibility
timeout; a message whose BRPOP Redis persisted but whose reply the crash cut is gone; and the
reconnect backoff grows to 30 s. Here:

* :class:`ResilientConsumer` reconnects forever, 0.5 s … 5 s apart, one log line per attempt;
* :class:`ResilientRedisTransport` takes messages off the queue into a per-worker in-flight list
  (``BLMOVE``) instead of out of Redis, and its channel's close never raises;
* :class:`ResilientRequest` acknowledges a task whose channel is gone straight in Redis (what
  kombu's ack does, from :class:`BrokerJanitor`'s thread), so a job that ran through the outage
  is not run again;
* :class:`RestoreHeld` (a consumer bootstep) puts back on the queue, at every (re)connection, the
  messages this worker held but will never run and what its in-flight list still holds, so they
  run within seconds instead of after the visibility timeout (or never);
* ``python -m streams worker`` (:mod:`streams.cli.worker`) runs the worker as a child process
  and restarts it if it dies anyway, under the same worker id (the same in-flight list).

A job that still runs twice (its worker died, or its ack could not reach Redis) is harmless: its
statuses are duplicates that the facilitator answers ``job.integrity_error`` and the validator's
client counts as acknowledged (the client does not even resend those already answered).
Known limits: an in-flight list is restored only by a worker with the same id (host name and the
``python -m streams worker`` process id), so a message taken at the instant of a crash by a
worker that never comes back stays there; task priorities are not used (one list per queue).
"""

from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Mapping
from queue import Empty
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from celery import bootsteps
from celery.worker.consumer import Consumer
from celery.worker.request import Request
from kombu.transport import redis as kombu_redis
from kombu.utils.url import maybe_sanitize_url

from operators import Backoff
from streams.dispatchers.celery.common import ENV_WORKER_ID

if TYPE_CHECKING:
    import redis

log = logging.getLogger(__name__)

__all__ = [
    "BrokerJanitor",
    "HeldMessages",
    "ResilientConsumer",
    "ResilientRedisTransport",
    "ResilientRequest",
    "RestoreHeld",
    "StrandedMessages",
    "install",
    "janitor_for",
]

RECONNECT_START = 0.5
RECONNECT_STEP = 1.0
RECONNECT_MAX = 5.0
"""Broker reconnect delays (s): 0.5, 1.5, 2.5, … capped at 5, forever."""

DIRECT_ACK_RETRY_FOR = 60.0


# --------------------------------------------------------------------------- reconnecting forever


class ResilientConsumer(Consumer):  # type: ignore[misc]
    """Celery's consumer, reconnecting to the broker forever with short, logged, capped delays."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Running tasks are not cancelled on a connection loss (they finish; ResilientRequest acks
        # them): Celery warns about its future default at every loss otherwise. Added here, after
        # Celery's logging setup turned its own warnings to "always".
        warnings.filterwarnings("ignore", message=r"(?s).*worker_cancel_long_running_tasks_on_connection_loss")

    def ensure_connected(self, conn: Any) -> Any:
        from celery.worker.state import maybe_shutdown

        where = maybe_sanitize_url(str(self.app.conf.broker_url))

        attempts = 0

        def on_error(exc: BaseException, interval: float) -> None:
            nonlocal attempts
            attempts += 1
            log.warning(
                "broker %s unreachable (%s: %s); retry %d in %.1f s", where, type(exc).__name__,
                str(exc).strip().rstrip("."), attempts, interval,
            )

        conn = conn.ensure_connection(
            on_error, None,  # max_retries None: forever
            interval_start=RECONNECT_START, interval_step=RECONNECT_STEP, interval_max=RECONNECT_MAX,
            callback=maybe_shutdown,  # SIGINT/SIGTERM end the waiting within a second
        )
        if attempts:
            log.warning("broker %s reachable again after %d failed attempts", where, attempts)
        self.first_connection_attempt = False
        return conn


# --------------------------------------------------------------------------- the messages a worker holds


class _QoS(kombu_redis.QoS):
    def append(self, message: Any, delivery_tag: Any) -> None:
        """Record a delivered message in kombu's unacked hash; if Redis is gone, keep it to put back.

        Only needed where kombu's BRPOP fetched it (the message is then nowhere else): it is kept
        here, and :class:`RestoreHeld` puts it back on the queue once the broker is reachable again.
        A message fetched with BLMOVE is still in the in-flight list, which RestoreHeld empties.
        """
        try:
            super().append(message, delivery_tag)  # type: ignore[no-untyped-call]
        except self.channel.connection_errors:
            if getattr(self.channel, "_fetching", None) is None:  # not fetched through an in-flight list
                STRANDED.add(message)
            raise

    def restore_unacked(self, client: Any = None) -> None:
        """Back on the queue with every delivered message, when the channel closes; never raises.

        With Redis gone this fails (a connection error, or an ``AttributeError`` from a channel whose
        connection was already dropped, that Celery calls an "Unrecoverable error" and exits on):
        the messages stay in kombu's unacked hash, and :class:`RestoreHeld` puts back the ones no
        task is running for as soon as the worker reconnects.
        """
        tags = [str(tag) for tag in self._delivered]
        try:
            super().restore_unacked(client)  # type: ignore[no-untyped-call]
        except Exception as exc:
            UNRESTORED.update(tags)
            self._delivered.clear()
            log.warning("%d delivered task messages could not be put back on the queue now (%s: %s): they will be "
                        "once the broker is reachable", len(tags), type(exc).__name__, exc)


WORKER_ID = os.environ.get(ENV_WORKER_ID) or f"{socket.gethostname()}:{os.getpid()}"
"""Names this worker's in-flight lists; ``python -m streams worker`` keeps it across restarts of Celery."""


def inflight_key(queue: str) -> str:
    """The list holding the messages this worker took off ``queue`` and has not recorded yet."""
    return f"facilitator-streams:inflight:{queue}:{WORKER_ID}"


class _Channel(kombu_redis.Channel):
    """Takes a message off the queue into an in-flight list (``BLMOVE``) instead of out of Redis (``BRPOP``).

    kombu pops a message (BRPOP) and only then records it as unacknowledged. When Redis dies
    between persisting the pop and sending the reply, the message is gone: nobody has it. Moved
    into this worker's in-flight list instead, it stays in Redis until it is recorded, and
    :class:`RestoreHeld` moves what is left there back to the queue at every (re)connection.
    Used when the channel consumes one queue with one priority step and no key prefix (what
    :func:`~streams.dispatchers.celery.make_celery_app` sets up); otherwise kombu's BRPOP.
    """

    QoS = _QoS
    _fetching: str | None = None

    def _brpop_start(self, timeout: float | None = None) -> None:
        queues = self._queue_cycle.consume(len(self.active_queues))
        if len(queues) != 1 or list(self.priority_steps) != [0] or self.global_keyprefix:
            return super()._brpop_start(timeout)  # type: ignore[no-any-return,no-untyped-call]
        queue = queues[0]
        self._fetching = queue
        self._in_poll = self.client.connection
        self._brpop_sent_at = time.monotonic()  # type: ignore[assignment]
        wait = self.brpop_timeout if timeout is None else timeout
        self.client.connection.send_command("BLMOVE", queue, inflight_key(queue), "RIGHT", "LEFT", wait or 0)
        return None

    def _brpop_read(self, **options: Any) -> bool:
        queue = self._fetching
        if queue is None:
            return super()._brpop_read(**options)  # type: ignore[no-any-return,no-untyped-call]
        from kombu.utils.json import loads

        try:
            try:
                item = self.client.parse_response(self.client.connection, "BLMOVE", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # as kombu does: the next poll reconnects
                raise
            if item is None:
                raise Empty()
            self._queue_cycle.rotate(queue)
            self.connection._deliver(loads(item.decode() if isinstance(item, bytes) else item), queue)  # type: ignore[no-untyped-call]
            # Recorded as unacknowledged now (or it raised): no longer only in the in-flight list.
            self.client.lrem(inflight_key(queue), 1, item)
            return True
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._fetching = None
            self._flush_brpop_reauth()  # type: ignore[no-untyped-call]


class ResilientRedisTransport(kombu_redis.Transport):
    """kombu's Redis transport, keeping the message a lost connection interrupted on its way in."""

    Channel = _Channel


class StrandedMessages:
    """Messages taken off the queue whose delivery failed with the connection: to put back."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: list[Any] = []

    def add(self, message: Any) -> None:
        log.warning("a task message arrived as the broker connection dropped: it goes back on the queue "
                    "once the broker is reachable")
        with self._lock:
            self._messages.append(message)

    def take(self) -> list[Any]:
        with self._lock:
            messages, self._messages = self._messages, []
        return messages


STRANDED = StrandedMessages()
UNRESTORED: set[str] = set()
"""Delivery tags a closing channel failed to put back on the queue (Redis was gone)."""


class HeldMessages:
    """Delivery tags of the task messages this worker process received and has not acknowledged."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, Request] = {}

    def add(self, request: Request) -> None:
        tag = _tag(request)
        if tag is not None:
            with self._lock:
                self._held[tag] = request

    def discard(self, request: Request) -> None:
        tag = _tag(request)
        if tag is not None:
            with self._lock:
                if self._held.get(tag) is request:
                    del self._held[tag]

    def take_orphans(self, channel: Any, pool_keeps_queued: bool) -> tuple[list[str], set[str]]:
        """(held messages of channels other than ``channel`` whose task will never run here, the
        delivery tags of the tasks that will: running, or queued in the pool).

        A task running is not an orphan (its request acknowledges it when it ends), nor one already
        handed to a pool that keeps its queue when the connection drops (Celery's thread pool: it
        runs later); a prefork pool discards what it has not started ("the broker redelivers it").
        """
        from celery.worker.state import active_requests

        running = set(map(id, active_requests))

        def will_run(request: Request) -> bool:
            return id(request) in running or (pool_keeps_queued and getattr(request, "_apply_result", None) is not None)

        with self._lock:
            orphans = [tag for tag, request in self._held.items()
                       if request.message.channel is not channel and not will_run(request)]
            for tag in orphans:
                del self._held[tag]
            running_tags = {tag for tag, request in self._held.items() if will_run(request)}
        running_tags.update(tag for tag in map(_tag, list(active_requests)) if tag is not None)
        return orphans, running_tags

    def __len__(self) -> int:
        return len(self._held)


HELD = HeldMessages()


def _tag(request: Request) -> str | None:
    tag = getattr(request.message, "delivery_tag", None)
    return None if tag is None else str(tag)


def _channel_usable(channel: Any) -> bool:
    """False once kombu closed the channel (its connection was replaced after a broker error)."""
    transport = getattr(channel, "connection", None)
    return not getattr(channel, "closed", False) and transport is not None and \
        getattr(transport, "client", None) is not None


class ResilientRequest(Request):  # type: ignore[misc]
    """A task request whose acknowledgement survives the replacement of its broker connection."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        HELD.add(self)

    acknowledged: bool

    def acknowledge(self) -> None:
        if self.acknowledged:
            return
        self.acknowledged = True
        HELD.discard(self)
        message = self.message
        if _channel_usable(message.channel):
            try:
                message.ack()
                return
            except Exception as exc:  # Redis went away under the ack: do it ourselves below
                log.info("ack of task %s failed on its channel (%s: %s); acknowledging in Redis directly",
                         self.id, type(exc).__name__, exc)
        janitor_for(self.task.app).ack(str(message.delivery_tag), self.id)

    def reject(self, requeue: bool = False) -> None:
        if self.acknowledged:
            return
        HELD.discard(self)
        if _channel_usable(self.message.channel):
            super().reject(requeue)
            return
        self.acknowledged = True
        if requeue:
            # The message stays in kombu's unacked hash: the next reconnect or the visibility timeout
            # puts it back on the queue.
            log.warning("task %s rejected after its broker connection was replaced: redelivered later", self.id)
        else:
            janitor_for(self.task.app).ack(str(self.message.delivery_tag), self.id)


# --------------------------------------------------------------------------- acting on kombu's keys


class BrokerJanitor:
    """Acknowledges task messages straight in kombu's Redis bookkeeping, from a thread of its own.

    For a task whose channel is gone. Never blocks the caller (a pool thread, or the worker's event
    loop with prefork): a daemon thread retries while Redis is unreachable, for up to
    ``DIRECT_ACK_RETRY_FOR`` seconds per message, and what it could not do before the process
    exits (at most 2 s spent trying then) runs again after the visibility timeout, harmlessly.
    """

    def __init__(self, broker_url: str, transport_options: Mapping[str, Any]) -> None:
        prefix = str(transport_options.get("global_keyprefix") or "")
        self.unacked_key = prefix + str(transport_options.get("unacked_key") or "unacked")
        self.unacked_index_key = prefix + str(transport_options.get("unacked_index_key") or "unacked_index")
        self.broker_url = broker_url
        self._client: redis.Redis | None = None
        self._lock = threading.Lock()
        self._pending: dict[str, tuple[str, float]] = {}
        """Delivery tag -> (task id, give up at)."""
        self._wake = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None
        self.acknowledged = 0

    def _redis(self) -> redis.Redis:
        if self._client is None:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry

            self._client = redis.Redis.from_url(
                self.broker_url, socket_connect_timeout=2.0, socket_timeout=10.0, retry=Retry(NoBackoff(), 0)
            )
        return self._client

    def ack(self, tag: str, task_id: str) -> None:
        """Remove a delivered message from kombu's unacked hash and index (kombu's Redis ack), soon."""
        with self._lock:
            self._pending[tag] = (task_id, time.monotonic() + DIRECT_ACK_RETRY_FOR)
            self._idle.clear()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="facilitator-streams-acks", daemon=True)
                self._thread.start()
                atexit.register(self.flush, 2.0)
        self._wake.set()

    def flush(self, timeout: float) -> bool:
        """Wait until every queued ack is done or given up; False on timeout."""
        return self._idle.wait(timeout)

    def _run(self) -> None:
        import redis

        backoff = Backoff(0.1, 2.0, stable_after=0.0)
        while True:
            self._wake.wait()
            self._wake.clear()
            with self._lock:
                batch = dict(self._pending)
            if not batch:
                with self._lock:
                    if not self._pending:
                        self._idle.set()
                continue
            try:
                pipe = self._redis().pipeline()
                for tag in batch:
                    pipe.zrem(self.unacked_index_key, tag)
                    pipe.hdel(self.unacked_key, tag)
                pipe.execute()
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                now = time.monotonic()
                with self._lock:
                    for tag, (task_id, give_up_at) in batch.items():
                        if give_up_at <= now and self._pending.pop(tag, None) is not None:
                            log.warning("task %s finished but its ack never reached the broker (%s): it runs again "
                                        "after the visibility timeout (harmless: its statuses are duplicates)",
                                        task_id, exc)
                time.sleep(backoff.next_delay())
                self._wake.set()
                continue
            backoff.reset()
            with self._lock:
                for tag in batch:
                    self._pending.pop(tag, None)
                self.acknowledged += len(batch)
            self._wake.set()  # look again: more may have come meanwhile


_janitors_lock = threading.Lock()


def janitor_for(app: Any) -> BrokerJanitor:
    janitor = getattr(app, "_facilitator_streams_janitor", None)
    if janitor is None:
        with _janitors_lock:
            janitor = getattr(app, "_facilitator_streams_janitor", None)
            if janitor is None:
                janitor = BrokerJanitor(app.conf.broker_url, app.conf.broker_transport_options or {})
                app._facilitator_streams_janitor = janitor
    assert isinstance(janitor, BrokerJanitor)
    return janitor


class RestoreHeld(bootsteps.StartStopStep):  # type: ignore[misc]
    """At every (re)connection: back to the queue with what this worker held but will never run.

    That is: messages of an earlier connection whose task is not running (reserved, never
    started: Celery drops them when the connection breaks), the messages a closing channel could
    not put back, and the messages that arrived as the connection broke (``STRANDED``). A running
    task's message is left alone: :class:`ResilientRequest` acknowledges it when the task ends.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        from celery.concurrency.base import BasePool

        channel = c.task_consumer.channel if c.task_consumer is not None else None
        keeps_queued = c.pool is not None and type(c.pool).flush is BasePool.flush  # threads, solo: flush no-op
        orphans, will_run = HELD.take_orphans(channel, keeps_queued)
        unrestored = [tag for tag in UNRESTORED if tag not in will_run]
        UNRESTORED.difference_update(unrestored)
        tags = list(dict.fromkeys(orphans + unrestored))
        stranded = STRANDED.take()
        default = c.connection.default_channel
        tags_given = tags
        done_tags = done_stranded = moved = 0
        try:
            queues = [queue.name for queue in (c.task_consumer.queues if c.task_consumer is not None else ())]
            with default.conn_or_acquire() as client:
                for queue in queues:  # taken off the queue, never recorded: back to where they were taken
                    while client.lmove(inflight_key(queue), queue, "RIGHT", "RIGHT") is not None:
                        moved += 1
            if tags:  # only those still unacknowledged (a task that ran since then was acknowledged)
                with default.conn_or_acquire() as client:
                    exists = client.pipeline()
                    for tag in tags:
                        exists.hexists(default.qos.unacked_key, tag)
                    tags = [tag for tag, there in zip(tags, exists.execute(), strict=True) if there]
            for tag in tags:
                default.qos.restore_by_tag(tag)
                done_tags += 1
            for message in stranded:
                info = message.delivery_info
                with default.conn_or_acquire() as client, client.pipeline() as pipe:
                    default._do_restore_message(message._raw, info["exchange"], info["routing_key"], pipe, False)
                    pipe.execute()
                done_stranded += 1
        except c.connection_errors:
            UNRESTORED.update(tags_given if tags is tags_given else tags[done_tags:])  # tried at the next reconnect
            for message in stranded[done_stranded:]:
                STRANDED.add(message)
            raise
        if done_tags or done_stranded or moved:
            log.warning("put back on the queue: %d task messages this worker held but had not started when the "
                        "broker connection dropped, %d that were on their way to it", done_tags, done_stranded + moved)


def install(app: Any) -> None:
    """Wire the above into a Celery app (``make_celery_app`` does)."""
    app.conf.worker_consumer = f"{__name__}:ResilientConsumer"
    app.conf.broker_transport = f"{__name__}:ResilientRedisTransport"
    url = urlsplit(str(app.conf.broker_url))
    if url.scheme == "rediss" and not app.conf.broker_use_ssl and "ssl_cert_reqs" not in url.query:
        # kombu gives a bare rediss:// TLS only when it picks the transport from the scheme (and then
        # without certificate checks); here, as redis-py does for the status stream: verified TLS.
        import ssl

        app.conf.broker_use_ssl = {"ssl_cert_reqs": ssl.CERT_REQUIRED}
    app.steps["consumer"].add(RestoreHeld)
