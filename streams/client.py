"""FacilitatorClient: wires the components into one pipeline and owns their lifecycle.

    await client.start()   # runs until stop() or cancellation; the teardown is in `finally`

Nothing requires ``async with``; it exists as a convenience that runs ``start()`` in a background
task owned by the context manager.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import functools
import logging
from types import TracebackType
from typing import cast

import reactivex
from reactivex import operators as ops
from reactivex.scheduler.eventloop import AsyncIOScheduler
from reactivex.subject import Subject

from operators import Routed, route_frames
from streams.cheat_handler import CheatHandler, CheatReportHandler
from streams.config import ClientConfig
from streams.connection_manager import ConnectionManager
from streams.dispatchers.base import Dispatcher, FeedingDispatcher, Handler, Metadata, StatusAck
from streams.events import ConnectionState, EventType, SystemEvent
from streams.exceptions import MessageRefused, UsageError
from streams.heartbeat_manager import HeartbeatManager
from streams.job_dispatcher import JobDispatcher
from streams.job_status_update_manager import JobStatusUpdateManager
from streams.journal import Commit, Journal
from streams.lifecycle import Component
from streams.message_manager import AckOutcome, Depth, MessageManager
from streams.metrics import Metrics
from streams.performance_monitor import PerformanceMonitor
from streams.protocol import (
    InboundMessage,
    JobStatus,
    JobStatusUpdate,
    Response,
    Signer,
    V0JobCheated,
    V0MachineSpecsUpdate,
    V2JobRequest,
    decode,
    message_kind,
)
from streams.signatures import SignatureVerifier
from streams.spec_update_manager import SpecSource, SpecUpdateManager
from streams.transport import Transport, WebSocketTransport

__all__ = ["INBOUND_ROUTES", "FacilitatorClient", "route_inbound"]

log = logging.getLogger(__name__)

JOURNAL_EXIT_BUDGET = 0.3
"""With a journal, an exit does not drain (pending updates stay journaled): the close gets at most this long."""

INBOUND_ROUTES = ("Response", "V2JobRequest", "V0JobCheated", "malformed")
"""The branches inbound frames are routed to (replay's analysis uses the same routes)."""


def route_inbound(frames: reactivex.Observable[str | bytes], max_bytes: int) -> Routed[str, InboundMessage]:
    """Decode inbound frames and route them by message kind in one step per frame (the hot path of
    every acknowledgement); a frame that does not decode goes to ``malformed``. ``connect()`` it
    once the branches are wired."""
    return route_frames(
        frames, functools.partial(decode, max_bytes=max_bytes), message_kind, INBOUND_ROUTES, malformed="malformed"
    )


class _Phase(enum.Enum):
    NEW = "new"
    RUNNING = "running"
    STOPPING = "stopping"
    STOPPED = "stopped"


class _StatusFeed:
    """What a FeedingDispatcher (e.g. Celery) gets: report any job's status, learn when it was answered."""

    def __init__(self, statuses: JobStatusUpdateManager, acks: reactivex.Observable[AckOutcome]) -> None:
        self._statuses = statuses
        self._refused: Subject[StatusAck] = Subject()
        answered = acks.pipe(ops.filter(_is_status_ack), ops.map(_status_ack))
        self._acks: reactivex.Observable[StatusAck] = reactivex.merge(answered, self._refused)

    def report(self, job_uuid: str, status: JobStatus | str, metadata: Metadata = None) -> bool:
        """Queue a status from the feed. One the outbox refuses (too large) is reported, not raised
        into the feed, and answered at once as ``refused``: it will never be sent, so the feed may
        forget it (False is returned)."""
        if not self._statuses.is_open(job_uuid):
            self._statuses.open(job_uuid)
        try:
            return self._statuses.report(job_uuid, status, metadata)
        except MessageRefused:
            self._refused.on_next(StatusAck(job_uuid, JobStatus(status).value, "refused"))
            return False

    def release(self, job_uuid: str) -> None:
        self._statuses.stop_listener(job_uuid)

    @property
    def acks(self) -> reactivex.Observable[StatusAck]:
        return self._acks


def _is_status_ack(outcome: AckOutcome) -> bool:
    return outcome.envelope.job_uuid is not None and outcome.envelope.status is not None


def _status_ack(outcome: AckOutcome) -> StatusAck:
    envelope = outcome.envelope
    assert envelope.job_uuid is not None and envelope.status is not None
    return StatusAck(envelope.job_uuid, envelope.status, outcome.outcome)  # type: ignore[arg-type]


class FacilitatorClient:
    """Keeps a validator connected to its facilitator until ``stop()`` or cancellation.

    Heartbeats, spec updates and job statuses are merged into one ordered outbound stream that is
    held while disconnected and resent (unacknowledged status updates first) after each reconnect;
    inbound frames are decoded and partitioned into job requests (to ``dispatcher``), cheat
    reports (to ``on_cheat``) and Responses (acknowledgements). ``events``, ``state`` and
    ``metrics`` say what happens. Every timing and bound is a field of :class:`ClientConfig`.

    Args:
        config: where to connect and every timing/bound (see :class:`ClientConfig`).
        signer: the validator's hotkey: ``.public_key`` (bytes) and ``.sign(bytes) -> bytes``;
            ``bittensor_wallet.Keypair`` fits.
        dispatcher: runs each job: a :class:`~streams.dispatchers.Dispatcher` (``async handle(job,
            report)``) or such an ``async def`` function.
        on_cheat: ``async def on_cheat(report: V0JobCheated)``; None ignores cheat reports.
        spec_updates: an Observable or async iterable of ``V0MachineSpecsUpdate`` (optional; the
            host can also call :meth:`publish_specs`).
        transport: a custom :class:`~streams.transport.Transport` (tests, recording); default a
            WebSocketTransport built from ``config``.

    Raises :class:`~streams.exceptions.UsageError` (a RuntimeError) on misuse: ``start()`` twice,
    ``publish_specs()`` after ``stop()``.
    """

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
        self._config = config
        self._transport = transport or WebSocketTransport.from_config(config)
        self._metrics = Metrics(config.statsd_host, config.statsd_port, config.statsd_prefix)
        self._monitor = PerformanceMonitor(self._metrics)
        self._connection = ConnectionManager(
            config, signer, self._transport, on_subscriber_error=self._monitor.subscriber_failed("state")
        )
        self._statuses = JobStatusUpdateManager()
        self._specs = SpecUpdateManager(spec_updates, on_source_error=self._spec_source_failed)
        self._spec_source = spec_updates
        self._verifier = (
            SignatureVerifier(
                own_hotkey=signer.public_key,
                trusted_signatories=config.trusted_signatories,
                max_age=config.signature_max_age,
            )
            if config.verify_signatures
            else None
        )
        self._jobs = JobDispatcher(
            dispatcher, self._statuses, max_concurrent=config.max_concurrent_jobs, dedup_window=config.dedup_window,
            verifier=self._verifier,
        )
        self._cheats = CheatReportHandler(on_cheat, verifier=self._verifier)
        self._phase = _Phase.NEW
        self._stop_requested = asyncio.Event()
        self._done = asyncio.Event()
        self._background: asyncio.Task[None] | None = None
        self._messages: MessageManager | None = None
        self._signer = signer
        self._journal: Journal | None = None

    # -- public surface -------------------------------------------------------------------------
    @property
    def config(self) -> ClientConfig:
        return self._config

    @property
    def events(self) -> reactivex.Observable[SystemEvent]:
        """Every SystemEvent (connects, disconnects with their cause, drops, failures), as it happens."""
        return self._monitor.events

    @property
    def state(self) -> reactivex.Observable[ConnectionState]:
        """The connection state; the current one is delivered on subscribe."""
        return self._connection.state

    @property
    def metrics(self) -> Metrics:
        """In-memory counters, gauges and timings (``metrics.snapshot()``), also sent to statsd if configured."""
        return self._metrics

    @property
    def is_connected(self) -> bool:
        """True while an authenticated connection is up."""
        return self._connection.is_connected

    @property
    def journal(self) -> Journal | None:
        """The journal (``config.journal_path``) once ``start()`` opened it; ``journal.stats()`` says how it is."""
        return self._journal

    @property
    def pending(self) -> Depth:
        """What the outbox holds now: ``held`` (and ``held_bytes``), ``wire`` (queued to send), ``in_flight``."""
        return self._messages.current_depth if self._messages is not None else Depth(0, 0, 0, 0)

    def publish_specs(self, update: V0MachineSpecsUpdate) -> None:
        """Queue a machine-spec update (sent once, in order; kept while disconnected).

        Raises :class:`~streams.exceptions.InvalidSpecs` when the specs do not fit the facilitator's
        hardware schema and :class:`~streams.exceptions.MessageTooLarge` when the frame is over
        ``max_outbound_frame_bytes`` (both ValueErrors; also reported as ``MESSAGE_DROPPED``): such an
        update is never sent. Updates from ``spec_updates``, and any published before ``start()``, are
        checked the same way and only reported.
        """
        if self._phase in (_Phase.STOPPING, _Phase.STOPPED):
            raise UsageError("publish_specs() called after the client was stopped")
        self._specs.publish(update)

    async def start(self) -> None:
        """Run until ``stop()`` or cancellation; the teardown always runs (in ``finally``).

        Components start in dependency order, each registering its ``stop()`` as it goes, so the
        teardown stops them in reverse: the connection first (after the outbox was drained), the
        monitor last (so the teardown's own events are still reported).
        """
        if self._phase is _Phase.STOPPED and self._messages is None:
            return  # stop() came before start() ran: nothing to do
        if self._phase is not _Phase.NEW:
            raise UsageError(f"FacilitatorClient.start() can be called once; this client is {self._phase.value}")
        self._open_journal()  # a bad journal (JournalError) refuses the start before anything runs
        self._jobs.report_cancelled = self._journal is None
        self._phase = _Phase.RUNNING
        try:
            async with contextlib.AsyncExitStack() as stack:
                self._warn_about_trust()
                await self._start_components(stack)
                await self._run_until_stopped()
                await self._drain(self._config.drain_timeout)  # stop(): drain while still connected
        finally:
            if self._journal is not None:  # closed by its component; here too if the start failed before it
                await self._journal.aclose(timeout=JOURNAL_EXIT_BUDGET / 4)
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
    async def _start_components(self, stack: contextlib.AsyncExitStack) -> None:
        scheduler = AsyncIOScheduler(asyncio.get_running_loop())
        inbound = route_inbound(self._connection.frames, self._config.max_frame_bytes)
        # Each branch holds exactly its kind (routed by message_kind), so these narrowings hold.
        responses = cast(reactivex.Observable[Response], inbound.messages["Response"])
        cheat_reports = cast(reactivex.Observable[V0JobCheated], inbound.messages["V0JobCheated"])
        job_requests = cast(reactivex.Observable[V2JobRequest], inbound.messages["V2JobRequest"])
        journal = self._journal
        messages = self._messages = MessageManager(self._config, self._connection, responses, journal=journal)
        if journal is not None:  # what a previous run left unanswered goes out first, in order
            messages.restore(journal.recovery.updates)
        heartbeats = HeartbeatManager(self._config.heartbeat_period, self._connection.state, scheduler)
        messages.add_source(heartbeats.heartbeats)
        messages.add_source(self._specs.updates)
        messages.add_source(self._statuses.updates)
        self._monitor.watch(
            connection=self._connection,
            messages=messages,
            received={kind: branch for kind, branch in inbound.messages.items() if kind != "malformed"},
            malformed=inbound["malformed"],
            jobs=self._jobs,
            cheats=self._cheats,
            cheat_reports=cheat_reports,
        )
        self._monitor.watch_source(self._spec_source)  # e.g. the channel layer's: outages, malformed messages
        dispatcher = self._jobs.dispatcher
        if isinstance(dispatcher, FeedingDispatcher):  # e.g. Celery: statuses come back from workers
            dispatcher.bind(_StatusFeed(self._statuses, messages.acks))
        components: tuple[Component, ...] = (
            self._monitor, *([_JournalComponent(self, journal)] if journal is not None else []),
            messages, self._statuses, heartbeats, self._specs, self._cheats, self._jobs,
        )
        for component in components:
            stack.push_async_callback(component.stop)
            await component.start()
        job_requests.subscribe(self._jobs.submit)
        cheat_reports.subscribe(self._cheats.submit)
        inbound.connect()
        stack.push_async_callback(self._stop_connection)
        stack.callback(self._jobs.stop_accepting)  # unwound first: no new job once stopping
        await self._connection.start()

    async def _run_until_stopped(self) -> None:
        """Wait for stop(); a component loop that fails ends the client with its exception."""
        loops = [task for task in (self._connection.task, self._messages.task if self._messages else None) if task]
        stop_waiter = asyncio.create_task(self._stop_requested.wait(), name="facilitator-stop-waiter")
        try:
            done, _ = await asyncio.wait([stop_waiter, *loops], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop_waiter.cancel()
        for task in done:
            if task is not stop_waiter and not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _drain(self, timeout: float) -> None:
        self._phase = _Phase.STOPPING
        self._jobs.stop_accepting()
        if self._journal is None:  # (a journal keeps them open: the next start reports them horde_failed)
            await self._jobs.cancel_running()  # their horde_failed statuses go out in this drain
        messages = self._messages
        if self._journal is not None:
            timeout = 0.0  # nothing pending is dropped: it stays journaled for the next start
        if messages is not None and self._connection.is_connected and timeout > 0:
            if not await messages.drain(timeout):
                log.warning("stopping with %d messages still pending", messages.current_depth.pending)

    async def _stop_connection(self) -> None:
        """After stop() the outbox was drained already; cancellation (SIGINT) or a failure gets the
        short budget: drain for at most ``cancel_drain_timeout``, close within 0.5 s."""
        budget = JOURNAL_EXIT_BUDGET / 2 if self._journal is not None else None  # a journal: no waiting
        if self._phase is _Phase.STOPPING:
            await self._connection.stop(close_timeout=budget)
            return
        await self._drain(self._config.cancel_drain_timeout)
        await self._connection.stop(close_timeout=0.5 if budget is None else budget)

    # -- the journal ------------------------------------------------------------------------------------
    def _open_journal(self) -> None:
        if self._config.journal_path is not None:
            self._journal = Journal.open(
                self._config.journal_path, owner=_ss58(self._signer.public_key),
                retry_interval=self._config.journal_retry_interval,
            )

    def _journal_committed(self, commit: Commit) -> None:
        if self._journal is None:
            return
        stats = self._journal.stats()
        self._metrics.timing("journal.write_latency", commit.seconds)
        self._metrics.gauge("journal.pending", stats.pending)
        self._metrics.gauge("journal.bytes", stats.bytes)

    def _journal_failed(self, exc: BaseException) -> None:
        self._metrics.incr("journal.failures")
        self._metrics.gauge("journal.durable", 0)
        path = self._journal.path if self._journal is not None else None
        self._monitor.emit(
            EventType.JOURNAL_FAILED, "write_failed",
            f"journal {path}: write failed ({type(exc).__name__}: {exc}); durability is OFF, the client keeps "
            f"working in memory and retries every {self._config.journal_retry_interval:g} s",
            path=str(path), exception=type(exc).__name__, message=str(exc)[:500],
        )

    def _journal_resumed(self) -> None:
        self._metrics.gauge("journal.durable", 1)
        path = self._journal.path if self._journal is not None else None
        self._monitor.emit(
            EventType.JOURNAL_RESUMED, "durable",
            f"journal {path}: writes succeed again; everything accepted meanwhile is written, durability is back on",
            path=str(path),
        )

    def _warn_about_trust(self) -> None:
        """Once at start: warn loudly when jobs are not checked; say who may sign them when it is only us."""
        if self._verifier is None:
            text = "signature verification is OFF (verify_signatures=False): every job request is run unchecked"
            subtype = "signatures_not_verified"
            log.warning(text)
            self._monitor.emit(EventType.CONFIG_WARNING, subtype, text, setting=subtype)
        elif self._verifier.only_own_hotkey:  # the safe default: information, not a warning or an event
            log.info(
                "no trusted signatories configured: only jobs signed by this validator's own hotkey will run; "
                "to run jobs the facilitator signs, trust its signer (ClientConfig.trusted_signatories, "
                "run --trusted-signer / --trusted-signers-file)"
            )

    def _spec_source_failed(self, exc: BaseException) -> None:
        self._monitor.emit(
            EventType.SOURCE_FAILED, "spec_updates",
            f"the spec update source failed: {type(exc).__name__}: {exc}",
            exception=type(exc).__name__, message=str(exc)[:500],
        )


class _JournalComponent:
    """The journal's part of the lifecycle: started right after the monitor, stopped right before it.

    ``start()`` wires its callbacks, starts its writer thread, tracks in-process jobs and reports
    what the previous run left behind; ``stop()`` (after the MessageManager's, which leaves what is
    pending in the journal) writes the last answers within a short budget and closes the file.
    """

    def __init__(self, client: FacilitatorClient, journal: Journal) -> None:
        self._client = client
        self._journal = journal

    async def start(self) -> None:
        client, journal = self._client, self._journal
        journal.on_failure = client._journal_failed
        journal.on_restored = client._journal_resumed
        journal.on_commit = client._journal_committed
        journal.start()
        if not isinstance(client._jobs.dispatcher, FeedingDispatcher):
            # In-process jobs only: a FeedingDispatcher's (Celery's) statuses come from its workers, and a
            # restart of this process does not interrupt those jobs.
            client._jobs.dispatched.subscribe(lambda job: journal.job_dispatched(job.uuid))
        recovery = journal.recovery
        if not recovery:
            return
        for job in recovery.jobs:  # reported once the status stream starts, after the restored updates
            update = JobStatusUpdate.horde_failed(
                job.uuid, reason="unhandled_exception", message="validator restarted while the job was running",
                context={"last_status": job.last_status, "dispatched_at": job.dispatched_at,
                         "last_status_at": job.updated_at},
            )
            client._statuses.open(job.uuid)(update.status, update.metadata)
        kinds = [update.kind for update in recovery.updates]
        client._metrics.incr("journal.recovered_updates", len(kinds))
        client._metrics.incr("journal.recovered_jobs", len(recovery.jobs))
        client._monitor.emit(
            EventType.JOURNAL_RECOVERED, "restart",
            f"journal {journal.path}: resending {len(kinds)} unanswered updates first, in order; "
            f"{len(recovery.jobs)} interrupted jobs reported horde_failed",
            path=str(journal.path), resent_updates=len(kinds),
            resent_status_updates=kinds.count("V0JobStatusUpdate"),
            resent_spec_updates=kinds.count("V0MachineSpecsUpdate"),
            horde_failed_jobs=len(recovery.jobs), jobs=[job.uuid for job in recovery.jobs][:100],
            oldest_recorded_at=min((update.recorded_at for update in recovery.updates), default=None),
        )

    async def stop(self) -> None:
        client, journal = self._client, self._journal
        kept = client._messages.kept_in_journal if client._messages is not None else 0
        client._metrics.gauge("journal.kept_at_exit", kept)
        if not await journal.aclose(timeout=JOURNAL_EXIT_BUDGET / 4):
            log.warning("journal %s: the last writes did not finish within the exit budget", journal.path)
        if kept:
            log.info("journal %s: %d pending updates kept for the next start", journal.path, kept)


def _ss58(public_key: bytes | None) -> str | None:
    """The hotkey's ss58 address (a journal belongs to one hotkey)."""
    if public_key is None:
        return None
    from bittensor_wallet import Keypair

    address: str = Keypair(public_key=public_key.hex(), ss58_format=42).ss58_address
    return address
