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
from streams.journal import Commit, Journal
from streams.message_manager import MessageManager
from streams.metrics import Metrics
from streams.performance_monitor import PerformanceMonitor
from streams.protocol import (
    InboundMessage,
    JobStatusUpdate,
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

JOURNAL_EXIT_BUDGET = 0.4
"""With a journal, a clean exit does not drain: it closes within this many seconds (pending stays journaled)."""

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
        self._signer = signer
        self.journal: Journal | None = None
        """The open journal while running (``config.journal_path``), else None."""

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
        journal = self._open_journal()  # a bad journal refuses the start before anything runs
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
            close_timeout = 0.5 if cancelled else self.config.close_timeout
            if journal is not None:  # nothing pending is dropped: it stays journaled for the next start
                drain, close_timeout = 0.0, min(close_timeout, JOURNAL_EXIT_BUDGET / 2)
            try:
                await self._teardown(tasks, drain, close_timeout=close_timeout)
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
        self._messages = MessageManager(self.config, self.connection, responses, journal=self.journal)
        if self.journal is not None:
            self._messages.restore(self.journal.recovery.updates)
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
        self.messages.start()
        self.statuses.start()
        if self.journal is not None:
            self._start_journal(self.journal)
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
            async with asyncio.timeout(0.5 if self.journal is None else JOURNAL_EXIT_BUDGET / 4):
                await self._transport.wait_closed()  # the websocket's own I/O tasks end too
        if self._messages is not None:
            self._messages.close()
        await self._close_journal()
        self.connection.complete()
        self.monitor.close()

    # -- the journal ------------------------------------------------------------------------------------
    def _open_journal(self) -> Journal | None:
        if self.config.journal_path is None:
            return None
        self.journal = Journal.open(
            self.config.journal_path, owner=_ss58(self._signer.public_key),
            retry_interval=self.config.journal_retry_interval,
        )
        return self.journal

    def _start_journal(self, journal: Journal) -> None:
        """Wire the journal's callbacks, track in-process jobs, report what a previous run left behind."""
        journal.on_failure = self._journal_failed
        journal.on_restored = self._journal_resumed
        journal.on_commit = self._journal_committed
        journal.start()
        if getattr(self.jobs.dispatcher, "bind", None) is None:
            # In-process jobs only: a dispatcher with bind() (Celery) gets its statuses from elsewhere,
            # and a restart of this process does not interrupt its jobs.
            self.jobs.dispatched.subscribe(lambda job: journal.job_dispatched(job.uuid))
        recovery = journal.recovery
        if not recovery:
            return
        for job in recovery.jobs:
            update = JobStatusUpdate.horde_failed(
                job.uuid, reason="unhandled_exception", message="validator restarted while the job was running",
                context={"last_status": job.last_status, "dispatched_at": job.dispatched_at,
                         "last_status_at": job.updated_at},
            )
            self.statuses.open(job.uuid)(update.status, update.metadata)
        kinds = [update.kind for update in recovery.updates]
        oldest = min((update.recorded_at for update in recovery.updates), default=None)
        self.metrics.incr("journal.recovered_updates", len(kinds))
        self.metrics.incr("journal.recovered_jobs", len(recovery.jobs))
        self.monitor.emit(
            EventType.JOURNAL_RECOVERED, "restart",
            f"journal {journal.path}: resending {len(kinds)} unanswered updates first, in order; "
            f"{len(recovery.jobs)} interrupted jobs reported horde_failed",
            path=str(journal.path), resent_updates=len(kinds),
            resent_status_updates=kinds.count("V0JobStatusUpdate"),
            resent_spec_updates=kinds.count("V0MachineSpecsUpdate"),
            horde_failed_jobs=len(recovery.jobs), jobs=[job.uuid for job in recovery.jobs][:100],
            oldest_recorded_at=oldest,
        )

    def _journal_committed(self, commit: Commit) -> None:
        journal = self.journal
        if journal is None:
            return
        self.metrics.timing("journal.write_latency", commit.seconds)
        stats = journal.stats()
        self.metrics.gauge("journal.pending", stats.pending)
        self.metrics.gauge("journal.bytes", stats.bytes)

    def _journal_failed(self, exc: BaseException) -> None:
        self.metrics.incr("journal.failures")
        self.metrics.gauge("journal.durable", 0)
        path = self.journal.path if self.journal is not None else None
        self.monitor.emit(
            EventType.JOURNAL_FAILED, "write_failed",
            f"journal {path}: write failed ({type(exc).__name__}: {exc}); durability is OFF, the client keeps "
            f"working in memory and retries every {self.config.journal_retry_interval:g} s",
            path=str(path), exception=type(exc).__name__, message=str(exc)[:500],
        )

    def _journal_resumed(self) -> None:
        self.metrics.gauge("journal.durable", 1)
        path = self.journal.path if self.journal is not None else None
        self.monitor.emit(
            EventType.JOURNAL_RESUMED, "durable",
            f"journal {path}: writes succeed again; everything accepted meanwhile is written, durability is back on",
            path=str(path),
        )

    async def _close_journal(self) -> None:
        journal = self.journal
        if journal is None:
            return
        kept = self._messages.kept_in_journal if self._messages is not None else 0
        self.metrics.gauge("journal.kept_at_exit", kept)
        if not await journal.aclose(timeout=JOURNAL_EXIT_BUDGET / 4):
            log.warning("journal %s: the last writes did not finish within the exit budget", journal.path)
        if kept:
            log.info("journal %s: %d pending updates kept for the next start", journal.path, kept)

    def _spec_source_failed(self, exc: BaseException) -> None:
        self.monitor.emit(
            EventType.SOURCE_FAILED, "spec_updates",
            f"the spec update source failed: {type(exc).__name__}: {exc}",
            exception=type(exc).__name__, message=str(exc)[:500],
        )


def _message(item: Any) -> Any:
    return item.message


def _ss58(public_key: bytes | None) -> str | None:
    """The hotkey's ss58 address (the journal belongs to one hotkey)."""
    if public_key is None:
        return None
    from bittensor_wallet import Keypair

    address: str = Keypair(public_key=public_key.hex(), ss58_format=42).ss58_address
    return address


__all__ = ["FacilitatorClient"]
