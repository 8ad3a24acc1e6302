"""FacilitatorClient: wires the components into one pipeline and owns their lifecycle.

    await client.start()   # runs until stop() or cancellation; the teardown is in `finally`

Nothing requires ``async with``; it exists as a convenience that runs ``start()`` in a background
task owned by the context manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
from types import TracebackType
from typing import Any

import reactivex
from reactivex import operators as ops
from reactivex.scheduler.eventloop import AsyncIOScheduler

from operators import Decoded, Malformed, decode_frames, partition_by
from streams.cheat_handler import CheatHandler, CheatReportHandler
from streams.config import ClientConfig
from streams.connection_manager import ConnectionManager
from streams.events import ConnectionState, EventType, SystemEvent
from streams.heartbeat_manager import HeartbeatManager
from streams.job_dispatcher import Dispatcher, Handler, JobDispatcher
from streams.job_status_update_manager import JobStatusUpdateManager
from streams.message_manager import MessageManager
from streams.metrics import Metrics
from streams.performance_monitor import PerformanceMonitor
from streams.protocol import (
    InboundMessage,
    Response,
    Signer,
    V0JobCheated,
    V0MachineSpecsUpdate,
    V2JobRequest,
    decode,
)
from streams.spec_update_manager import SpecSource, SpecUpdateManager
from streams.transport import Transport, WebSocketTransport

log = logging.getLogger(__name__)

Inbound = Decoded[InboundMessage] | Malformed


class _Phase(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


def _route(item: Inbound) -> str:
    if isinstance(item, Malformed):
        return "malformed"
    message = item.message
    if isinstance(message, Response):
        return "response"
    if isinstance(message, V2JobRequest):
        return "job"
    return "cheat"


class FacilitatorClient:
    def __init__(
        self,
        config: ClientConfig,
        *,
        signer: Signer,
        dispatcher: Dispatcher | Handler,
        on_cheat: CheatHandler | None = None,
        spec_updates: SpecSource | None = None,
        transport: Transport | None = None,
    ) -> None:
        if not isinstance(config, ClientConfig):
            raise TypeError(f"config must be a ClientConfig, got {type(config).__name__}")
        if not isinstance(getattr(signer, "public_key", None), bytes) or not callable(getattr(signer, "sign", None)):
            raise TypeError("signer needs .public_key (bytes) and .sign(bytes) -> bytes, like bittensor_wallet.Keypair")
        self.config = config
        self._transport = transport or WebSocketTransport.from_config(config)
        self.metrics = Metrics(config.statsd_host, config.statsd_port, config.statsd_prefix)
        self.monitor = PerformanceMonitor(self.metrics)
        self.connection = ConnectionManager(config, signer, self._transport)
        self.statuses = JobStatusUpdateManager()
        self.specs = SpecUpdateManager(spec_updates, on_source_error=self._spec_source_failed)
        self._spec_source = spec_updates
        self.jobs = JobDispatcher(
            dispatcher, self.statuses, max_concurrent=config.max_concurrent_jobs, dedup_window=config.dedup_window
        )
        self.cheats = CheatReportHandler(on_cheat)
        self._phase = _Phase.NEW
        self._ever_started = False
        self._stop_requested = asyncio.Event()
        self._done = asyncio.Event()
        self._background: asyncio.Task[None] | None = None
        self._messages: MessageManager | None = None
        self._heartbeats: HeartbeatManager | None = None

    # -- public surface -------------------------------------------------------------------------
    @property
    def events(self) -> reactivex.Observable[SystemEvent]:
        return self.monitor.events

    @property
    def state(self) -> reactivex.Observable[ConnectionState]:
        return self.connection.state

    @property
    def messages(self) -> MessageManager:
        if self._messages is None:
            raise RuntimeError("the MessageManager exists once start() has been called")
        return self._messages

    def publish_specs(self, update: V0MachineSpecsUpdate) -> None:
        if self._phase in (_Phase.STOPPING, _Phase.STOPPED):
            raise RuntimeError("publish_specs() called after the client was stopped")
        self.specs.publish(update)

    async def start(self) -> None:
        """Run until ``stop()`` or cancellation; teardown always runs (in ``finally``)."""
        if self._phase is _Phase.STOPPED and not self._ever_started:
            return  # stop() came before start() ran: nothing to do
        if self._phase is not _Phase.NEW:
            raise RuntimeError(
                f"FacilitatorClient.start() can be called once; this client is {self._phase.value}"
            )
        self._phase = _Phase.RUNNING
        self._ever_started = True
        cancelled = True
        tasks: list[asyncio.Task[None]] = []
        try:
            self._wire(AsyncIOScheduler(asyncio.get_running_loop()))
            await self.jobs.start()
            tasks = [
                asyncio.create_task(self.connection.run(), name="facilitator-connection"),
                asyncio.create_task(self.messages.run(), name="facilitator-send-loop"),
            ]
            stop_waiter = asyncio.create_task(self._stop_requested.wait(), name="facilitator-stop-waiter")
            try:
                done, _ = await asyncio.wait([stop_waiter, *tasks], return_when=asyncio.FIRST_COMPLETED)
            finally:
                stop_waiter.cancel()
            for task in done:
                if task is not stop_waiter and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
            cancelled = False
        finally:
            drain = self.config.cancel_drain_timeout if cancelled else self.config.drain_timeout
            try:
                await self._teardown(tasks, drain, close_timeout=0.5 if cancelled else self.config.close_timeout)
            finally:
                self._phase = _Phase.STOPPED
                self._done.set()

    async def stop(self) -> None:
        """Ask a running client to stop and wait for its teardown. Idempotent."""
        if self._phase is _Phase.NEW:
            self._phase = _Phase.STOPPED
            self._done.set()
            return
        self._stop_requested.set()
        await self._done.wait()

    async def __aenter__(self) -> FacilitatorClient:
        self._background = asyncio.create_task(self.start(), name="facilitator-client")
        await asyncio.sleep(0)  # let start() wire the pipeline before the host uses the client
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()
        if self._background is not None:
            await self._background

    # -- wiring ---------------------------------------------------------------------------------
    def _wire(self, scheduler: AsyncIOScheduler) -> None:
        inbound = partition_by(
            self.connection.frames.pipe(decode_frames(decode)),
            _route,
            ("response", "job", "cheat", "malformed"),
        )
        responses: reactivex.Observable[Response] = inbound["response"].pipe(ops.map(_message))
        cheat_reports: reactivex.Observable[V0JobCheated] = inbound["cheat"].pipe(ops.map(_message))
        self._messages = MessageManager(self.config, self.connection, responses)
        self._heartbeats = HeartbeatManager(self.config.heartbeat_period, self.connection.state, scheduler)
        self.messages.add_source(self._heartbeats.heartbeats)
        self.messages.add_source(self.specs.updates)
        self.messages.add_source(self.statuses.updates)
        self.monitor.watch(
            connection=self.connection,
            messages=self.messages,
            inbound=inbound.branches.values(),
            jobs=self.jobs,
            cheats=self.cheats,
            cheat_reports=cheat_reports,
        )
        self.monitor.watch_source(self._spec_source)  # e.g. the channel layer's: malformed messages, outages
        self.messages.start()
        self.statuses.start()
        bind = getattr(self.jobs.dispatcher, "bind", None)
        if bind is not None:  # e.g. the Celery dispatcher feeds statuses and needs their acks
            bind(self.statuses, self.messages.acks)
        inbound["job"].pipe(ops.map(_message)).subscribe(self.jobs.submit)
        cheat_reports.subscribe(self.cheats.submit)
        self.specs.start()
        inbound.connect()

    async def _teardown(self, tasks: list[asyncio.Task[None]], drain: float, close_timeout: float) -> None:
        self._phase = _Phase.STOPPING
        self.jobs.stop_accepting()
        if self._messages is not None and self.connection.is_connected and drain > 0:
            drained = await self._messages.drain(drain)
            if not drained:
                log.warning("stopping with %d messages still pending", self._messages.current_depth.pending)
        await self.jobs.stop()
        await self.cheats.stop()
        await self.specs.stop()
        if self._heartbeats is not None:
            self._heartbeats.stop()
        self.statuses.stop()
        try:
            async with asyncio.timeout(close_timeout):
                await self.connection.stop()
        except TimeoutError:
            pass
        self._transport.abort()  # no-op after a clean close; ends a half-closed one at once
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.5):
                await self._transport.wait_closed()  # the websocket's own I/O tasks end too
        if self._messages is not None:
            self._messages.close()
        self.connection.complete()
        self.monitor.close()

    def _spec_source_failed(self, exc: BaseException) -> None:
        self.monitor.emit(
            EventType.SOURCE_FAILED, "spec_updates",
            f"the spec update source failed: {type(exc).__name__}: {exc}",
            exception=type(exc).__name__, message=str(exc)[:500],
        )


def _message(item: Any) -> Any:
    return item.message


__all__ = ["FacilitatorClient"]
