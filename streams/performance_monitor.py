"""PerformanceMonitor: subscribes to the client's streams and turns them into metrics and events.

Components never call it; it watches what they publish (connection changes and state, outbox
sends/drops/acks/depth, inbound frames, job and cheat outcomes). Every disconnect becomes a
DISCONNECTED event that says why: close code and reason, exception, lifetime, what was pending.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Mapping

import reactivex
from reactivex.disposable import CompositeDisposable

from operators import Decoded, Dropped, Malformed
from streams.cheat_handler import CheatHandlerFailure, CheatRejected, CheatReportHandler
from streams.connection_manager import (
    AuthRejected,
    ConnectAttempt,
    Connected,
    ConnectFailed,
    ConnectionChange,
    ConnectionManager,
    Disconnected,
    SignerFailed,
)
from streams.dispatchers.base import FailureReporting
from streams.events import ConnectionState, EventType, SystemEvent
from streams.exceptions import DecodeError, DispatcherError, InvalidSpecs, MessageTooLarge
from streams.job_dispatcher import JobDispatcher, JobFailure, JobRejected
from streams.message_manager import (
    AckOutcome,
    Depth,
    Envelope,
    HeadOfLine,
    MessageManager,
    Refused,
    Requeued,
    Sent,
)
from streams.metrics import Metrics
from streams.protocol import InboundMessage, Response, V0JobCheated, V2JobRequest, excerpt
from streams.safe_subject import SafeSubject
from streams.transport import CloseInfo

__all__ = ["PerformanceMonitor"]


def _close_data(info: CloseInfo | None) -> dict[str, object]:
    if info is None:
        return {"close_code": None, "close_reason": "", "exception": None, "exception_message": None}
    exc = info.exception
    return {
        "close_code": info.code,
        "close_reason": info.reason,
        "exception": None if exc is None else type(exc).__name__,
        "exception_message": None if exc is None else str(exc),
    }


class _DisposedSummary:
    """What the outbox still held of one message type when it stopped."""

    __slots__ = ("count", "first_job", "frame_bytes", "last_job")

    def __init__(self) -> None:
        self.count = 0
        self.frame_bytes = 0
        self.first_job: str | None = None
        self.last_job: str | None = None

    def add(self, job_uuid: str | None, frame: str) -> None:
        self.count += 1
        self.frame_bytes += _utf8_len(frame)
        if job_uuid is not None:
            if self.first_job is None:
                self.first_job = job_uuid
            self.last_job = job_uuid


def _utf8_len(frame: str) -> int:
    return len(frame) if frame.isascii() else len(frame.encode("utf-8", "surrogatepass"))


def _drop_data(envelope: Envelope, reason: str) -> dict[str, object]:
    """MESSAGE_DROPPED's fields, the same for every reason (``limit`` and ``errors`` for refusals;
    ``first_job_uuid``/``last_job_uuid`` say more for the one summary per type at stop)."""
    return {
        "message_type": envelope.kind, "reason": reason, "count": 1,
        "job_uuid": envelope.job_uuid, "status": envelope.status,
        "first_job_uuid": envelope.job_uuid, "last_job_uuid": envelope.job_uuid,
        "frame_bytes": _utf8_len(envelope.frame), "limit": None, "errors": [], "excerpt": excerpt(envelope.frame),
    }


class PerformanceMonitor:
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._tally = metrics.tally()  # the per-message counts and timings (sent, acknowledged, received)
        self._events: SafeSubject[SystemEvent] = SafeSubject(on_subscriber_error=self.subscriber_failed("events"))
        self._subscriptions = CompositeDisposable()
        self._depth = Depth(0, 0, 0, 0)
        self._messages: MessageManager | None = None
        self._active_jobs = 0
        self._emitting = 0
        self._failed_subscribers: set[tuple[str, str]] = set()
        self._pending: deque[SystemEvent] = deque()
        self._disposed: dict[str, _DisposedSummary] = {}

    @property
    def events(self) -> reactivex.Observable[SystemEvent]:
        return self._events

    def emit(self, type_: EventType, subtype: str, description: str, **data: object) -> None:
        self._pending.append(SystemEvent(type_, subtype, description, dict(data)))
        self._flush()

    def _flush(self) -> None:
        """Deliver queued events one at a time, so every subscriber sees them in the same order."""
        if self._emitting:
            return  # an event is being delivered: the queued ones follow it
        self._emitting += 1
        try:
            while self._pending:
                self._events.on_next(self._pending.popleft())
        finally:
            self._emitting -= 1

    def subscriber_failed(self, stream: str) -> Callable[[BaseException], None]:
        """A host subscriber raised: count it always; one SUBSCRIBER_FAILED per stream and exception type."""

        def report(exc: BaseException) -> None:
            self.metrics.incr(f"{stream}.subscriber_errors")
            key = (stream, type(exc).__name__)
            if key in self._failed_subscribers:
                return
            self._failed_subscribers.add(key)
            self.emit(
                EventType.SUBSCRIBER_FAILED, stream,
                f"a subscriber of client.{stream} raised {type(exc).__name__}: {exc} "
                f"(further {type(exc).__name__}s only count in {stream}.subscriber_errors)",
                stream=stream, exception=type(exc).__name__, message=str(exc)[:500],
            )

        return report

    # -- wiring ---------------------------------------------------------------------------------
    def watch(
        self,
        *,
        connection: ConnectionManager,
        messages: MessageManager,
        received: Mapping[str, reactivex.Observable[InboundMessage]],
        malformed: reactivex.Observable[Decoded[InboundMessage] | Malformed],
        jobs: JobDispatcher,
        cheats: CheatReportHandler,
        cheat_reports: reactivex.Observable[V0JobCheated],
    ) -> None:
        self._messages = messages
        add = self._subscriptions.add
        add(connection.changes.subscribe(self._on_change))
        add(connection.state.subscribe(self._on_state))
        add(messages.sent.subscribe(self._on_sent))
        add(messages.dropped.subscribe(self._on_dropped, on_completed=self._report_disposed))
        add(messages.acks.subscribe(self._on_ack))
        add(messages.requeued.subscribe(self._on_requeued))
        add(messages.refused.subscribe(self._on_refused))
        add(messages.head_of_line.subscribe(self._on_head_of_line))
        add(messages.send_failures.subscribe(lambda e: self.metrics.incr(f"messages.send_failed.{e.kind}")))
        add(messages.unexpected_responses.subscribe(self._on_unexpected))
        add(messages.depth.subscribe(self._on_depth))
        # Counted per route: each subscription knows its kind, so a frame costs one counter call.
        for kind, branch in received.items():
            add(branch.subscribe(functools.partial(self._on_received, f"messages.received.{kind}")))
        add(malformed.subscribe(self._on_malformed))
        add(jobs.dispatched.subscribe(self._on_dispatched))
        add(jobs.finished.subscribe(self._on_job_finished))
        add(jobs.duplicates.subscribe(lambda job: self.metrics.incr("jobs.duplicates")))
        add(jobs.failures.subscribe(self._on_job_failure))
        add(jobs.rejected.subscribe(self._on_job_rejected))
        add(cheats.rejected.subscribe(self._on_cheat_rejected))
        add(cheat_reports.subscribe(lambda _report: self.metrics.incr("cheat.reports")))
        add(cheats.failures.subscribe(self._on_cheat_failure))
        if isinstance(jobs.dispatcher, FailureReporting):  # e.g. CeleryDispatcher: Redis/broker trouble
            add(jobs.dispatcher.failures.subscribe(self._on_dispatcher_failure))

    def watch_source(self, source: object) -> None:
        """A spec source with a ``failures`` observable (e.g. the channel layer's): SOURCE_FAILED events."""
        if isinstance(source, FailureReporting):
            self._subscriptions.add(source.failures.subscribe(self._on_source_failure))

    async def start(self) -> None:
        """Nothing to start: ``watch()`` wired the subscriptions (before any component started)."""

    async def stop(self) -> None:
        """Last to stop: dispose the subscriptions, complete ``events``, flush and close the metrics."""
        self._subscriptions.dispose()
        self._events.on_completed()
        self.metrics.close()

    # -- connection -----------------------------------------------------------------------------
    def _on_state(self, state: ConnectionState) -> None:
        self.metrics.gauge("connected", 1 if state is ConnectionState.CONNECTED else 0)

    def _on_change(self, change: ConnectionChange) -> None:
        m = self.metrics
        if isinstance(change, ConnectAttempt):
            m.incr("connect.attempts")
        elif isinstance(change, ConnectFailed):
            m.incr("connect.failures")
            self.emit(
                EventType.CONNECT_FAILED, "connect", f"connect failed: {change.info.describe()}",
                attempt=change.attempt, retry_in=round(change.retry_in, 3), **_close_data(change.info),
            )
        elif isinstance(change, AuthRejected):
            m.incr("connect.failures")
            m.incr("auth.failures")
            self.emit(
                EventType.AUTH_FAILED, "auth", change.description,
                errors=[] if change.response is None else [e.model_dump() for e in change.response.errors],
                http_status=None if change.info is None else change.info.http_status,
                retry_in=round(change.retry_in, 3), **_close_data(change.info),
            )
        elif isinstance(change, SignerFailed):
            m.incr("connect.failures")
            m.incr("auth.failures")
            error = change.error
            self.emit(
                EventType.AUTH_FAILED, "signer",
                f"the signer failed: {type(error).__name__}: {error}",
                # AUTH_FAILED's fields, as for a refused auth: no Response, no connection was opened.
                errors=[], http_status=None, retry_in=round(change.retry_in, 3), close_code=None, close_reason="",
                exception=type(error).__name__, exception_message=str(error)[:500],
            )
        elif isinstance(change, Connected):
            m.incr("connect.successes")
            m.timing("connect.duration", change.connect_duration)
            if change.downtime is not None:
                m.timing("downtime", change.downtime)
            self.emit(
                EventType.CONNECTED, "connected", f"connected and authenticated (connection {change.connection_id})",
                connection_id=change.connection_id, connect_duration=round(change.connect_duration, 4),
                downtime=None if change.downtime is None else round(change.downtime, 4),
            )
        elif isinstance(change, Disconnected):
            code = change.info.code
            m.incr(f"disconnects.{code if code is not None else 'none'}")
            # Exact, not the last published depth (published at most once per loop iteration).
            depth = self._depth if self._messages is None else self._messages.current_depth
            self.emit(
                EventType.DISCONNECTED, str(code) if code is not None else "no_close_frame",
                f"disconnected after {change.lived:.1f} s: {change.info.describe()}",
                connection_id=change.connection_id, lived=round(change.lived, 4),
                pending_outbox=depth.held + depth.wire, pending_in_flight=depth.in_flight,
                retry_in=None if change.retry_in is None else round(change.retry_in, 3),
                **_close_data(change.info),
            )

    # -- outbound -------------------------------------------------------------------------------
    def _on_sent(self, sent: Sent) -> None:
        envelope = sent.envelope
        tally = self._tally
        tally.incr(f"messages.sent.{envelope.kind}")
        if sent.resend:
            tally.incr(f"messages.resent.{envelope.kind}")
        else:
            tally.timing("latency.enqueue_to_wire", sent.at - envelope.enqueued_at)

    def _on_dropped(self, dropped: Dropped[Envelope]) -> None:
        envelope = dropped.item
        if envelope.kind == "V0Heartbeat" and dropped.reason in ("superseded", "stale"):
            self.metrics.incr("messages.coalesced.V0Heartbeat")
            return
        if dropped.reason == "disposed":
            # At stop the outbox may hold 100,000 messages: one event per message type, not per message.
            summary = self._disposed.get(envelope.kind)
            if summary is None:
                summary = self._disposed[envelope.kind] = _DisposedSummary()
            summary.add(envelope.job_uuid, envelope.frame)
            return
        self.metrics.incr(f"messages.dropped.{envelope.kind}")
        self.emit(
            EventType.MESSAGE_DROPPED, envelope.kind,
            f"{envelope.kind} dropped ({dropped.reason})"
            + (f" for job {envelope.job_uuid} status {envelope.status}" if envelope.job_uuid else ""),
            **_drop_data(envelope, dropped.reason),
        )

    def _on_refused(self, refused: Refused) -> None:
        """Refused at enqueue (the caller got the error too): a MESSAGE_DROPPED the operator can see."""
        envelope, error = refused.envelope, refused.error
        self.metrics.incr(f"messages.dropped.{envelope.kind}")
        self.metrics.incr(f"messages.refused.{error.reason}")
        data = _drop_data(envelope, error.reason)
        if isinstance(error, MessageTooLarge):
            data.update(frame_bytes=error.size, limit=error.limit)
        elif isinstance(error, InvalidSpecs):
            data.update(errors=error.errors)
        self.emit(EventType.MESSAGE_DROPPED, envelope.kind, str(error), **data)

    def _on_head_of_line(self, head: HeadOfLine) -> None:
        """``outbox.head_age``: how long the oldest unanswered status update has waited (0 once answered)."""
        envelope = head.envelope
        self.metrics.gauge("outbox.head_age", 0.0 if head.answered else round(head.age, 3))
        if not head.suspected:
            return
        self.metrics.incr("outbox.suspected_poison")
        self.emit(
            EventType.SUSPECTED_POISON, envelope.kind,
            f"{envelope.kind}" + (f" for job {envelope.job_uuid} status {envelope.status}" if envelope.job_uuid else "")
            + f" is still unanswered after {head.connections} connections in a row ended without answering it "
            f"(waiting {head.age:.1f} s, sent {envelope.sends} times): it may be what breaks the connection, "
            "or the facilitator is down. It is kept and resent first; everything behind it waits.",
            message_type=envelope.kind, job_uuid=envelope.job_uuid, status=envelope.status,
            connections=head.connections, sends=envelope.sends, age=round(head.age, 3),
            frame_bytes=_utf8_len(envelope.frame), excerpt=excerpt(envelope.frame),
        )

    def _report_disposed(self) -> None:
        """The outbox stopped: one MESSAGE_DROPPED per message type it still held, with the count."""
        summaries, self._disposed = self._disposed, {}
        for kind, summary in summaries.items():
            self.metrics.incr(f"messages.dropped.{kind}", summary.count)
            jobs = ""
            if summary.first_job is not None:
                jobs = f" (jobs {summary.first_job} … {summary.last_job})" if summary.count > 1 else (
                    f" (job {summary.first_job})"
                )
            self.emit(
                EventType.MESSAGE_DROPPED, kind,
                f"{summary.count} {kind} dropped at stop, never sent (disposed){jobs}",
                message_type=kind, reason="disposed", count=summary.count, job_uuid=None, status=None,
                frame_bytes=summary.frame_bytes, limit=None, errors=[], excerpt="",
                first_job_uuid=summary.first_job, last_job_uuid=summary.last_job,
            )

    def _on_ack(self, ack: AckOutcome) -> None:
        m = self.metrics
        self._tally.timing("latency.ack", ack.latency)
        if ack.outcome == "error":
            for error_type in ack.response.error_types or ("unknown",):
                m.incr(f"acks.error.{error_type}")
            self.emit(
                EventType.ERROR_RESPONSE, ",".join(ack.response.error_types) or "unknown",
                f"facilitator refused {ack.envelope.status} for job {ack.envelope.job_uuid}: {ack.response.describe()}",
                job_uuid=ack.envelope.job_uuid, status=ack.envelope.status,
                errors=[e.model_dump() for e in ack.response.errors],
            )
        else:
            self._tally.incr(f"acks.{ack.outcome}")

    def _on_requeued(self, requeued: Requeued) -> None:
        self.metrics.incr("messages.requeued", len(requeued.envelopes))

    def _on_unexpected(self, response: Response) -> None:
        self.metrics.incr("messages.unexpected_responses")
        self.emit(
            EventType.UNEXPECTED_RESPONSE, response.status,
            f"a Response with nothing in flight: {response.describe() or response.status}",
            errors=[e.model_dump() for e in response.errors],
        )

    def _on_depth(self, depth: Depth) -> None:
        self._depth = depth
        self.metrics.gauge("outbox.depth", depth.held + depth.wire)
        self.metrics.gauge("outbox.bytes", depth.held_bytes)
        self.metrics.gauge("inflight.depth", depth.in_flight)

    # -- inbound --------------------------------------------------------------------------------
    def _on_received(self, name: str, _message: InboundMessage) -> None:
        self._tally.incr(name)

    def _on_malformed(self, item: Decoded[InboundMessage] | Malformed) -> None:
        if not isinstance(item, Malformed):  # the malformed route carries nothing else
            return
        self.metrics.incr("messages.malformed")
        reason = item.error.reason if isinstance(item.error, DecodeError) else str(item.error)
        self.emit(
            EventType.MALFORMED_MESSAGE, type(item.error).__name__,
            f"malformed frame from the facilitator: {reason}",
            excerpt=excerpt(item.frame), error=reason[:500],
        )

    def _on_dispatched(self, job: V2JobRequest) -> None:
        self.metrics.incr("jobs.dispatched")
        self._active_jobs += 1
        self.metrics.gauge("jobs.active", self._active_jobs)

    def _on_job_finished(self, job_uuid: str) -> None:
        self._active_jobs -= 1
        self.metrics.gauge("jobs.active", self._active_jobs)

    def _on_job_failure(self, failure: JobFailure) -> None:
        if failure.kind != "raised":  # returned or cancelled without a final status: horde_failed sent
            self.metrics.incr("jobs.unfinished")
            self.emit(
                EventType.JOB_UNFINISHED, failure.kind,
                f"job {failure.job_uuid}: {failure.error}; reported horde_failed (generic_error)",
                job_uuid=failure.job_uuid, reason="generic_error", message=str(failure.error),
            )
            return
        self.metrics.incr("jobs.failed")
        self.emit(
            EventType.JOB_DISPATCH_FAILED, type(failure.error).__name__,
            f"dispatcher raised for job {failure.job_uuid}: {type(failure.error).__name__}: {failure.error}",
            job_uuid=failure.job_uuid, exception=type(failure.error).__name__, message=str(failure.error)[:500],
        )

    def _on_job_rejected(self, rejected: JobRejected) -> None:
        self.metrics.incr("jobs.rejected")
        check = rejected.verification
        self.emit(
            EventType.JOB_REJECTED, str(check.failure),
            f"job {rejected.job.uuid} rejected (invalid_signature): {check.message}",
            job_uuid=rejected.job.uuid, reason="invalid_signature", failure=str(check.failure),
            message=check.message, signatory=check.signatory, timestamp_ns=check.timestamp_ns,
        )

    def _on_cheat_rejected(self, rejected: CheatRejected) -> None:
        self.metrics.incr("cheat.rejected")
        check = rejected.verification
        self.emit(
            EventType.CHEAT_REJECTED, str(check.failure),
            f"cheat report for job {rejected.report.job_uuid} ignored: {check.message}",
            job_uuid=rejected.report.job_uuid, trusted_job_uuid=rejected.report.trusted_job_uuid,
            failure=str(check.failure), message=check.message, signatory=check.signatory,
            timestamp_ns=check.timestamp_ns,
        )

    def _on_dispatcher_failure(self, failure: DispatcherError) -> None:
        operation = failure.operation
        self.metrics.incr(f"dispatcher.failures.{operation}")
        retry_in = failure.retry_in
        self.emit(
            EventType.DISPATCHER_FAILED, operation, f"dispatcher {operation} failed: {failure}",
            operation=operation, exception=type(failure.error).__name__,
            message=str(failure)[:500], retry_in=None if retry_in is None else round(float(retry_in), 3),
        )

    def _on_source_failure(self, failure: DispatcherError) -> None:
        operation = failure.operation
        self.metrics.incr(f"source.failures.{operation}")
        retry_in = failure.retry_in
        self.emit(
            EventType.SOURCE_FAILED, "spec_updates", f"the spec update source: {operation} failed: {failure}",
            operation=operation, exception=type(failure.error).__name__,
            message=str(failure)[:500], retry_in=None if retry_in is None else round(float(retry_in), 3),
        )

    def _on_cheat_failure(self, failure: CheatHandlerFailure) -> None:
        self.metrics.incr("cheat.handler_failures")
        self.emit(
            EventType.CHEAT_HANDLER_FAILED, type(failure.error).__name__,
            f"on_cheat raised for job {failure.report.job_uuid}: {type(failure.error).__name__}: {failure.error}",
            job_uuid=failure.report.job_uuid, exception=type(failure.error).__name__,
            message=str(failure.error)[:500],
        )

