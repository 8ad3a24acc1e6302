"""Django Channels adapters: machine specs and job statuses as the ComputeHorde validator sends them.

The validator feeds its facilitator client through the channel layer (channels_redis). Its spec producer does
``channel_layer.send("machine_spec_sending", {"specs": {...}, "miner_hotkey": "...", "batch_id": "..."})`` and
its job driver (in Celery workers) does ``channel_layer.send(f"job_status_updates__{job_uuid}",
{"type": "job_status_update", "payload": <JobStatusUpdate as JSON>})``. These adapters read both, so a host
keeps its producer and its driver untouched::

    spec producer ── send(machine_spec_sending) ──► ChannelSpecSource ──► FacilitatorClient(spec_updates=...)
    facilitator ─► client ─► ChannelsDispatcher.handle(job, report) ─► host handler ─► job driver (Celery)
                     ▲               └─ receive(job_status_updates__{uuid}) ◄── send(...) ──┘
                     └──── report(status, metadata), in order, until a final status

Delivery: channels_redis keeps a channel's messages in Redis (for ``expiry`` s, 60 by default) until they
are received, and a receive cut short (cancelled) leaves its message there. What is received goes into the
client's outbox at once (no await in between), where the client's own rules hold: statuses at least once
and in order, specs in order. A malformed message is reported (``failures``, and through the client as
a SOURCE_FAILED / DISPATCHER_FAILED event) and skipped, never fatal; an unreachable channel layer is
reported and retried with full-jitter backoff.

Needs the ``channels`` extra (``channels``, ``channels-redis``) only for :func:`redis_channel_layer`: any
object with ``async send(channel, message)`` / ``async receive(channel)`` (Django's ``get_channel_layer()``,
``channels.layers.InMemoryChannelLayer``) works as well.
"""

from __future__ import annotations

import asyncio
import logging
import random
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any, Protocol
from urllib.parse import urlsplit

import orjson
import reactivex
from pydantic import ValidationError

from operators import Backoff
from streams.config import redact_url as redact
from streams.dispatchers import Dispatcher, Handler, Metadata, Report, as_dispatcher
from streams.exceptions import DispatcherError
from streams.protocol import JobStatus, JobStatusUpdate, V0MachineSpecsUpdate, V2JobRequest, json_kind
from streams.safe_subject import SafeSubject

log = logging.getLogger(__name__)

__all__ = [
    "SPEC_CHANNEL",
    "STATUS_CHANNEL_PREFIX",
    "STATUS_MESSAGE_TYPE",
    "ChannelFailure",
    "ChannelLayer",
    "ChannelSpecSource",
    "ChannelsDispatcher",
    "MetadataRejected",
    "parse_spec_message",
    "parse_status_message",
    "redis_channel_layer",
    "status_channel",
]

SPEC_CHANNEL = "machine_spec_sending"
"""Where the validator's spec producer sends machine specs (its ``MACHINE_SPEC_CHANNEL``)."""
STATUS_CHANNEL_PREFIX = "job_status_updates__"
"""The validator's job driver sends a job's statuses to ``job_status_updates__{job_uuid}``."""
STATUS_MESSAGE_TYPE = "job_status_update"

_REDIS_SCHEMES = ("redis", "rediss", "unix")


class ChannelLayer(Protocol):
    """What is used of a Django Channels layer (``channels_redis.core.RedisChannelLayer`` fits)."""

    async def send(self, channel: str, message: dict[str, Any]) -> None: ...

    async def receive(self, channel: str) -> dict[str, Any]: ...


class ChannelFailure(DispatcherError):
    """What ``failures`` emits (a DispatcherError: the client reports it as an event). ``operation``:

    - ``receive``: the channel layer was unreachable (retried after ``retry_in`` s);
    - ``message``: a message that is not a spec update / status update (skipped);
    - ``metadata``: a status whose metadata the facilitator would refuse (the status is sent without it);
    - ``timeout``: no status for a job within ``idle_timeout`` (``horde_failed`` is reported).
    """

    def __init__(
        self, operation: str, channel: str, error: BaseException, attempt: int = 1, retry_in: float | None = None
    ) -> None:
        super().__init__(operation, error, attempt, retry_in)
        self.channel = channel
        self.args = (f"{operation} on {channel}: {type(error).__name__}: {error}",)


class MetadataRejected(ValueError):
    """A valid status with metadata the facilitator's models refuse; ``update`` is the status without it."""

    def __init__(self, update: JobStatusUpdate, reason: str) -> None:
        self.update = update
        self.reason = reason
        super().__init__(reason)


# --------------------------------------------------------------------------- the channel layer


def redis_channel_layer(url: str, *, prefix: str = "asgi", expiry: int = 60, capacity: int = 100) -> ChannelLayer:
    """A channels_redis layer on ``url`` (``redis://[:PASSWORD@]HOST:PORT/DB``), as Django's CHANNEL_LAYERS makes it.

    ``prefix``, ``expiry`` and ``capacity`` must match the validator's settings (these are channels_redis's
    defaults). Connections fail fast (2 s connect timeout, no hidden retries) so outages are reported.
    """
    if urlsplit(url).scheme not in _REDIS_SCHEMES:
        raise ValueError(f"the channel layer needs a Redis URL (redis://HOST:PORT/DB), got {redact(url)!r}")
    try:
        from channels_redis.core import RedisChannelLayer
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
    except ImportError as exc:
        raise ImportError(
            f"the channel layer needs the channels extra (pip install 'facilitator-streams[channels]'): {exc}"
        ) from exc
    host = {"address": url, "socket_connect_timeout": 2.0, "socket_keepalive": True, "retry": Retry(NoBackoff(), 0)}
    layer: ChannelLayer = RedisChannelLayer(hosts=[host], prefix=prefix, expiry=expiry, capacity=capacity)
    return layer


def _layer_of(channel_layer: ChannelLayer | str) -> tuple[ChannelLayer, bool]:
    """(layer, owned): a URL makes a layer this adapter owns and closes."""
    if isinstance(channel_layer, str):
        return redis_channel_layer(channel_layer), True
    if not callable(getattr(channel_layer, "receive", None)):
        raise TypeError(
            f"channel_layer must be a Redis URL or a channel layer with async receive(channel), "
            f"got {type(channel_layer).__name__}"
        )
    return channel_layer, False


async def _close_layer(layer: ChannelLayer) -> None:
    close = getattr(layer, "close_pools", None)  # channels_redis: waits for its cleaners, closes connections
    if close is None:
        return
    try:
        await close()
    except Exception as exc:  # closing a broken connection may raise; nothing is lost
        log.debug("closing the channel layer: %s", exc)



async def _receive(
    layer: ChannelLayer, channel: str, backoff: Backoff, fail: Callable[[ChannelFailure], None]
) -> object:
    """One message from ``channel``; while the layer is unreachable, report and retry with backoff."""
    while True:
        try:
            message: object = await layer.receive(channel)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            delay = backoff.next_delay()
            log.warning(
                "channel layer unavailable (receive on %s): %s: %s; retry %d in %.2f s",
                channel, type(exc).__name__, exc, backoff.attempt, delay,
            )
            fail(ChannelFailure("receive", channel, exc, backoff.attempt, delay))
            await asyncio.sleep(delay)
            continue
        if backoff.attempt:
            log.warning("channel layer reachable again: receiving on %s (after %d failures)", channel, backoff.attempt)
            backoff.reset()
        return message


def _short(value: object, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}…(+{len(text) - limit} chars)"


def _summarise(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    parts = [f"{'.'.join(str(p) for p in e['loc']) or '(object)'}: {e['msg']}" for e in errors[:3]]
    if len(errors) > 3:
        parts.append(f"(+{len(errors) - 3} more errors)")
    return "; ".join(parts)


# --------------------------------------------------------------------------- machine specs


def parse_spec_message(message: object, validator_hotkey: str) -> V0MachineSpecsUpdate:
    """``{"specs", "miner_hotkey", "batch_id"}`` -> V0MachineSpecsUpdate with our hotkey; ValueError says why not."""
    if not isinstance(message, Mapping):
        raise ValueError(f"a spec message must be a dict, got {json_kind(message)}: {_short(message)}")
    missing = [key for key in ("specs", "miner_hotkey", "batch_id") if key not in message]
    if missing:
        present = ", ".join(map(str, message)) or "nothing"
        raise ValueError(f"spec message lacks {', '.join(missing)} (it has: {present})")
    specs, miner_hotkey, batch_id = message["specs"], message["miner_hotkey"], message["batch_id"]
    if not isinstance(specs, Mapping):
        raise ValueError(f"spec message: specs must be an object, got {json_kind(specs)}")
    for name, value in (("miner_hotkey", miner_hotkey), ("batch_id", batch_id)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"spec message: {name} must be a non-empty string, got {_short(value, 60)}")
    try:
        return V0MachineSpecsUpdate(
            miner_hotkey=miner_hotkey, validator_hotkey=validator_hotkey, batch_id=batch_id, specs=dict(specs)
        )
    except ValidationError as exc:
        raise ValueError(f"spec message does not make a V0MachineSpecsUpdate: {_summarise(exc)}") from None


class ChannelSpecSource:
    """Machine-spec updates received from a channel layer channel, for ``FacilitatorClient(spec_updates=...)``.

    An async iterable: each message becomes a V0MachineSpecsUpdate with ``validator_hotkey`` filled in (the
    validator's own ss58 address, whatever the message says), in the order received. The client consumes it
    in a task it owns; at stop the receive is cancelled (the message stays in Redis) and a layer made from
    a URL is closed.
    """

    def __init__(
        self,
        channel_layer: ChannelLayer | str,
        validator_hotkey: str,
        *,
        channel: str = SPEC_CHANNEL,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        if not isinstance(validator_hotkey, str) or not validator_hotkey:
            raise ValueError(f"validator_hotkey must be the validator's ss58 address, got {validator_hotkey!r}")
        if not channel:
            raise ValueError("channel must be a non-empty channel name")
        self._layer, self._owned = _layer_of(channel_layer)
        self.validator_hotkey = validator_hotkey
        self.channel = channel
        self._backoff = Backoff(backoff_base, backoff_cap, stable_after=0.0, rng=rng)
        self._failures: SafeSubject[ChannelFailure] = SafeSubject()
        self.received = 0
        """Spec updates yielded."""
        self.malformed = 0
        """Messages skipped because they were not spec updates."""

    @property
    def failures(self) -> reactivex.Observable[ChannelFailure]:
        """Malformed messages (``message``) and channel-layer outages (``receive``); the client reports both."""
        return self._failures

    def __aiter__(self) -> AsyncIterator[V0MachineSpecsUpdate]:
        return self._updates()

    async def _updates(self) -> AsyncIterator[V0MachineSpecsUpdate]:
        try:
            while True:
                message = await _receive(self._layer, self.channel, self._backoff, self._failures.on_next)
                try:
                    update = parse_spec_message(message, self.validator_hotkey)
                except ValueError as exc:
                    self.malformed += 1
                    log.warning("spec message on %s skipped: %s", self.channel, exc)
                    self._failures.on_next(ChannelFailure("message", self.channel, exc))
                    continue
                self.received += 1
                yield update
        finally:
            if self._owned:
                await _close_layer(self._layer)


# --------------------------------------------------------------------------- job statuses


def status_channel(job_uuid: str, prefix: str = STATUS_CHANNEL_PREFIX) -> str:
    """``job_status_updates__{uuid}``, the uuid in canonical form (the driver's ``str(job.job_uuid)``)."""
    try:
        return prefix + str(uuid.UUID(job_uuid))
    except ValueError:
        raise ValueError(f"job uuid {job_uuid[:64]!r} is not a UUID: no status channel for it") from None


def parse_status_message(message: object, job_uuid: str) -> JobStatusUpdate:
    """``{"type": "job_status_update", "payload": {uuid, status, metadata, ...}}`` -> JobStatusUpdate for ``job_uuid``.

    ValueError says what is wrong; MetadataRejected (a ValueError) when only the metadata does not fit the
    facilitator's models, carrying the status without it. The payload may be the dict or its JSON text.
    """
    if not isinstance(message, Mapping):
        raise ValueError(f"a status message must be a dict, got {json_kind(message)}: {_short(message)}")
    if message.get("type") != STATUS_MESSAGE_TYPE:
        raise ValueError(f"status message type must be {STATUS_MESSAGE_TYPE!r}, got {_short(message.get('type'), 60)}")
    payload = message.get("payload")
    if isinstance(payload, str | bytes):
        try:
            payload = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"status message payload is not valid JSON ({exc})") from None
    if not isinstance(payload, Mapping):
        raise ValueError(f"status message payload must be a JobStatusUpdate object, got {json_kind(payload)}")
    payload_uuid = payload.get("uuid")
    try:
        same_job = isinstance(payload_uuid, str) and uuid.UUID(payload_uuid) == uuid.UUID(job_uuid)
    except ValueError:
        same_job = False
    if not same_job:
        raise ValueError(f"status message payload is for job {_short(payload_uuid, 60)}, not {job_uuid}")
    raw_status = payload.get("status")
    try:
        status = JobStatus(raw_status) if isinstance(raw_status, str) else None
    except ValueError:
        status = None
    if status is None:
        raise ValueError(f"status message has an unknown status {_short(raw_status, 60)}")
    try:
        return JobStatusUpdate.model_validate({"uuid": job_uuid, "status": status, "metadata": payload.get("metadata")})
    except ValidationError as exc:
        reason = f"{status.value} metadata the facilitator would refuse: {_summarise(exc)}"
        raise MetadataRejected(JobStatusUpdate(uuid=job_uuid, status=status), reason) from None


class _TrackedReport:
    """The ``report`` handed to the host's handler: notes when the host itself reported a final status."""

    __slots__ = ("_report", "final")

    def __init__(self, report: Report) -> None:
        self._report = report
        self.final = False

    def __call__(self, status: JobStatus | str, metadata: Metadata = None) -> bool:
        accepted = self._report(status, metadata)
        if accepted and JobStatus(status).is_final:
            self.final = True
        return accepted


class ChannelsDispatcher:
    """Runs the host's job routing and feeds back the statuses its job driver sends over the channel layer.

    For each job: start listening on ``job_status_updates__{uuid}``, call the host's handler (``async def
    handle(job, report)`` or a Dispatcher: it hands the job to the validator's job driver, and may report
    statuses itself, e.g. ``rejected`` when no miner fits), and forward every status that arrives to the
    job's ``report`` in order, until a final one. ``handle`` returns once the handler returned and the
    job's status stream has ended. A ``received`` from the driver is skipped (the client reported it on
    dispatch). The handler raising ends the listening too (the client then reports ``horde_failed``).

    ``idle_timeout``: seconds without a status after which the job is given up (``horde_failed``,
    ``unhandled_timeout``); None (default) waits as long as the driver takes, like the validator did.
    Each job waiting for a status holds one Redis connection (a blocking receive), as the legacy client
    did: ``ClientConfig.max_concurrent_jobs`` bounds them.
    """

    def __init__(
        self,
        handler: Dispatcher | Handler,
        channel_layer: ChannelLayer | str,
        *,
        prefix: str = STATUS_CHANNEL_PREFIX,
        idle_timeout: float | None = None,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
        rng: random.Random | None = None,
    ) -> None:
        if idle_timeout is not None and idle_timeout <= 0:
            raise ValueError(f"idle_timeout must be > 0 or None, got {idle_timeout!r}")
        self._inner = as_dispatcher(handler)
        self._layer, self._owned = _layer_of(channel_layer)
        self.prefix = prefix
        self.idle_timeout = idle_timeout
        self._backoff_args = (backoff_base, backoff_cap)
        self._rng = rng or random.Random()
        self._failures: SafeSubject[ChannelFailure] = SafeSubject()
        self.forwarded = 0
        """Statuses received from the channel layer and reported."""
        self.malformed = 0
        """Status messages skipped (or forwarded without their metadata)."""

    @property
    def failures(self) -> reactivex.Observable[ChannelFailure]:
        """Outages, malformed messages, timeouts: the client reports them as DISPATCHER_FAILED events."""
        return self._failures

    @property
    def handler(self) -> Dispatcher:
        return self._inner

    async def start(self) -> None:
        start = getattr(self._inner, "start", None)
        if start is not None:
            await start()

    async def stop(self) -> None:
        """Called by the client after its job tasks ended: stop the host's dispatcher, close an owned layer."""
        try:
            stop = getattr(self._inner, "stop", None)
            if stop is not None:
                await stop()
        finally:
            if self._owned:
                await _close_layer(self._layer)
            self._failures.on_completed()

    async def handle(self, job: V2JobRequest, report: Report) -> None:
        channel = status_channel(job.uuid, self.prefix)
        tracked = _TrackedReport(report)
        listener = asyncio.create_task(self._listen(job.uuid, channel, tracked), name=f"channels-status:{job.uuid}")
        try:
            await self._inner.handle(job, tracked)
            if not tracked.final:
                await asyncio.wait({listener})  # until a final status (cancelling handle() ends it below)
        finally:
            if not listener.done():
                listener.cancel()  # the host reported the final status itself, raised, or we are stopping
            await asyncio.wait({listener})
            error = None if listener.cancelled() else listener.exception()
        if error is not None:
            raise error

    async def _listen(self, job_uuid: str, channel: str, report: _TrackedReport) -> None:
        backoff = Backoff(*self._backoff_args, stable_after=0.0, rng=self._rng)
        while not report.final:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    message = await _receive(self._layer, channel, backoff, self._fail)
            except TimeoutError:
                self._timed_out(job_uuid, channel, report)
                return
            try:
                update = parse_status_message(message, job_uuid)
            except MetadataRejected as exc:
                self.malformed += 1
                log.warning("status of job %s on %s sent without its metadata: %s", job_uuid, channel, exc)
                self._fail(ChannelFailure("metadata", channel, exc))
                update = exc.update
            except ValueError as exc:
                self.malformed += 1
                log.warning("status message on %s skipped: %s", channel, exc)
                self._fail(ChannelFailure("message", channel, exc))
                continue
            if update.status is JobStatus.RECEIVED:
                continue  # the client reported it when it dispatched the job
            try:
                report(update.status, update.metadata)
            except ValueError as exc:  # report() checks more than the model (e.g. enum values)
                self.malformed += 1
                log.warning("status of job %s on %s sent without its metadata: %s", job_uuid, channel, exc)
                self._fail(ChannelFailure("metadata", channel, exc))
                report(update.status, None)
            self.forwarded += 1
            if update.status.is_final:
                return

    def _timed_out(self, job_uuid: str, channel: str, report: _TrackedReport) -> None:
        text = f"no status on {channel} for {self.idle_timeout:g} s: the job is given up"
        log.warning("job %s: %s", job_uuid, text)
        self._fail(ChannelFailure("timeout", channel, TimeoutError(text)))
        update = JobStatusUpdate.horde_failed(job_uuid, reason="unhandled_timeout", message=text)
        report(update.status, update.metadata)

    def _fail(self, failure: ChannelFailure) -> None:
        self._failures.on_next(failure)
