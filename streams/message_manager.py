"""MessageManager: the outbox, the send loop and acknowledgement tracking.

    merged sources ─► envelope (encode once) ─┬─ data ─► hold_while_disconnected(gate) ─► wire queue ─┐
                                               │                 ▲ gate = connected, wire not full     ├► send loop
                                               │                 └────────── backpressure ◄───────────┤   ─► transport
                                               └─ heartbeats ─► priority slot (one, the newest) ──────┘
    responses ─► match_acks(sent-for-ack, responses, connected) ─► Acked / Unacked (resend first)

The hold operator is the outbox: it keeps order, applies the per-type policies and the bounds, and
reports every drop. The wire queue is a short hand-off (``wire_queue_size``) to the one task that
writes frames, in batches of what is ready (``send_batch_size``: one websocket write per batch).
Heartbeats (KEEP_LATEST) skip both through a one-slot priority lane: they are liveness, not data,
and must never wait behind a backlog (they are only produced while connected, and one left over
from a dead connection is discarded as stale). Status updates stay in flight until their Response;
the ones a dropped connection leaves unanswered go back to the front of the wire queue, in order.

Nothing the facilitator cannot take is queued: an update whose frame is over
``max_outbound_frame_bytes``, or machine specs that do not fit its hardware schema, is refused where
it enters (``MessageRefused`` raised to the caller, ``refused`` published), never sent. And the oldest
unanswered status update is watched: each connection that ends without answering it is counted
(``head_of_line``), so a frame that breaks the connection every time it is sent gets noticed.
"""

from __future__ import annotations

import asyncio
import enum
import operator
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import reactivex
from reactivex import abc
from reactivex import operators as ops
from reactivex.disposable import CompositeDisposable
from reactivex.subject import BehaviorSubject, Subject

from operators import (
    Acked,
    AckEvent,
    Dropped,
    HoldPolicy,
    Unacked,
    hold_while_disconnected,
    match_acks,
)
from streams.config import ClientConfig
from streams.connection_manager import ConnectionManager
from streams.events import ConnectionState
from streams.exceptions import InvalidSpecs, MessageRefused, MessageTooLarge, TransportClosed, UsageError
from streams.journal import Journal, PendingUpdate
from streams.protocol import (
    EncodedStatusUpdate,
    OutboundMessage,
    Response,
    V0MachineSpecsUpdate,
    encode,
    status_frame,
    status_frame_length,
    validate_specs,
)
from streams.safe_subject import LoopSubject

__all__ = [
    "HEARTBEAT_KIND",
    "POLICIES",
    "SPEC_KIND",
    "STATUS_KIND",
    "AckOutcome",
    "Depth",
    "Envelope",
    "HeadOfLine",
    "MessageManager",
    "Refused",
    "Requeued",
    "Sent",
    "envelope_of",
    "refusal",
]

STATUS_KIND = "V0JobStatusUpdate"
SPEC_KIND = "V0MachineSpecsUpdate"
HEARTBEAT_KIND = "V0Heartbeat"

POLICIES: dict[str, HoldPolicy] = {
    HEARTBEAT_KIND: HoldPolicy.KEEP_LATEST,
    SPEC_KIND: HoldPolicy.KEEP_BOUNDED,
    STATUS_KIND: HoldPolicy.KEEP_ALL,
}


class Envelope:
    """One outbound message, encoded once, as it travels through the outbox.

    A status update without metadata (the bulk of what an outage holds) keeps no frame: its frame is
    a pure function of ``job_uuid`` and ``status`` (`status_frame`), built when it is written. So a
    held one costs this object and its enqueue time, not also a ~170-byte string (bench/memory.py).
    """

    __slots__ = (
        "_frame", "enqueued_at", "job_uuid", "kind", "policy", "sends", "sent_at", "seq", "status", "unanswered",
    )

    def __init__(
        self,
        kind: str,
        frame: str | None,
        policy: HoldPolicy,
        enqueued_at: float,
        job_uuid: str | None = None,
        status: str | None = None,
        *,
        seq: int = 0,
    ) -> None:
        if frame is None and (kind != STATUS_KIND or job_uuid is None or status is None):
            raise ValueError("only a status update with its job_uuid and status can be built without a frame")
        self.kind = kind
        self._frame = frame
        self.policy = policy
        self.enqueued_at = enqueued_at
        self.job_uuid = job_uuid
        self.status = status
        self.sends = 0
        self.sent_at = 0.0
        self.unanswered = 0
        """Connections it was sent on that ended without answering it, as the oldest unanswered status
        update (it stays the oldest until answered, so these are consecutive; a connection that never
        sent it does not count)."""
        self.seq = seq
        """Its row in the journal (0: not journaled); it goes on the wire only once that row is durable."""

    @property
    def frame(self) -> str:
        """The text frame, as written to the wire."""
        frame = self._frame
        if frame is None:
            return status_frame(self.job_uuid, self.status)  # type: ignore[arg-type]
        return frame

    @property
    def size(self) -> int:
        """Length of the frame in characters (what the outbox's byte bound counts)."""
        frame = self._frame
        if frame is None:
            return status_frame_length(self.job_uuid, self.status)  # type: ignore[arg-type]
        return len(frame)

    @property
    def expects_ack(self) -> bool:
        return self.kind == STATUS_KIND

    def __repr__(self) -> str:
        what = f" job_uuid={self.job_uuid!r} status={self.status!r}" if self.job_uuid is not None else ""
        return f"<Envelope {self.kind}{what} sends={self.sends} seq={self.seq}>"


# Sent and AckOutcome are made once per status update: plain slotted dataclasses (read-only by
# convention), because a frozen dataclass's __init__ (object.__setattr__ per field) costs about 3x.
@dataclass(slots=True)
class Sent:
    envelope: Envelope
    at: float
    connection_id: int

    @property
    def resend(self) -> bool:
        return self.envelope.sends > 1


@dataclass(slots=True)
class AckOutcome:
    envelope: Envelope
    response: Response
    outcome: str
    """``success``, ``duplicate`` (``job.integrity_error``: already stored) or ``error``."""
    latency: float
    """Seconds from the (last) send to the Response."""


@dataclass(frozen=True, slots=True)
class Requeued:
    envelopes: tuple[Envelope, ...]
    connection_id: int


@dataclass(frozen=True, slots=True)
class Refused:
    """An outbound message refused at enqueue (never sent); ``error`` says why."""

    envelope: Envelope
    error: MessageRefused


@dataclass(frozen=True, slots=True)
class HeadOfLine:
    """The oldest unanswered status update, after a connection ended without answering it (or once answered)."""

    envelope: Envelope
    connections: int
    """Consecutive connections that ended without answering it."""
    age: float
    """Seconds since it was enqueued."""
    suspected: bool
    """``connections`` reached ``poison_after_connections``: it may be what breaks the connection."""
    answered: bool = False


@dataclass(frozen=True, slots=True)
class Depth:
    held: int
    held_bytes: int
    wire: int
    in_flight: int

    @property
    def pending(self) -> int:
        return self.held + self.wire + self.in_flight


_size_of: Callable[[Envelope], int] = Envelope.size.fget  # type: ignore[attr-defined]
_policy_of: Callable[[Envelope], HoldPolicy] = operator.attrgetter("policy")


def _is_connected(state: ConnectionState) -> bool:
    return state is ConnectionState.CONNECTED


def envelope_of(message: OutboundMessage, now: float) -> Envelope:
    if type(message) is EncodedStatusUpdate:  # the hot path: checked and encoded at report()
        # (``_value_``: the member's own value string, without the ``value`` property's call)
        return Envelope(STATUS_KIND, None, HoldPolicy.KEEP_ALL, now, message.uuid, message.status._value_)
    kind = message.message_type
    policy = POLICIES.get(kind)
    if policy is None:
        raise ValueError(f"{kind} is not sent through the outbox")
    uuid = getattr(message, "uuid", None)
    status = getattr(message, "status", None)
    # The enum's own value string, shared by every envelope (str(status) made a 57-byte copy per
    # buffered update: 12% of the outbox's memory per message, see bench/memory.py).
    text = None if status is None else status.value if isinstance(status, enum.Enum) else str(status)
    return Envelope(kind, encode(message), policy, now, uuid, text)


def refusal(message: OutboundMessage, frame: str, max_bytes: int) -> MessageRefused | None:
    """Why ``message`` (encoded as ``frame``) must not be sent, or None: specs the facilitator's
    handler would crash on, or a frame over ``max_bytes`` (UTF-8 bytes, as the server counts them)."""
    if isinstance(message, V0MachineSpecsUpdate):
        errors = validate_specs(message.specs)
        if errors:
            return InvalidSpecs(message.message_type, errors)
    # Cheap for the common case: a str of n chars is at most 4n UTF-8 bytes, and isascii() is O(1).
    if len(frame) * 4 > max_bytes:
        size = len(frame) if frame.isascii() else len(frame.encode("utf-8", "surrogatepass"))
        if size > max_bytes:
            return MessageTooLarge(message.message_type, size, max_bytes)
    return None


class MessageManager:
    """The outbox and its send loop: ``start()`` wires both, ``drain()`` waits for empty, ``stop()`` ends them."""

    def __init__(
        self,
        config: ClientConfig,
        connection: ConnectionManager,
        responses: reactivex.Observable[Response],
        *,
        clock: Callable[[], float] = time.monotonic,
        journal: Journal | None = None,
    ) -> None:
        self._config = config
        self._journal = journal
        self.kept_in_journal = 0
        """Pending updates left in the journal by ``stop()`` (sent by the next start), not dropped."""
        self._connection = connection
        self._responses = responses
        self._clock = clock
        self._direct: Subject[OutboundMessage] = LoopSubject()
        self._sources: list[reactivex.Observable[OutboundMessage]] = [self._direct]
        self._gate: BehaviorSubject[bool] = BehaviorSubject(False)
        self._for_ack: Subject[Envelope] = LoopSubject()
        self._wire: deque[Envelope] = deque()
        self._heartbeat: Envelope | None = None
        self._writing = False  # a frame is being written: drain() is not done until the write is
        self._in_flight = 0
        self._held = 0
        self._held_bytes = 0
        self._broken_connection = -1
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()
        self._draining = 0  # drain() calls waiting on _changed (set per change only while there are any)
        self._subscriptions = CompositeDisposable()
        self._started = False
        self._task: asyncio.Task[None] | None = None
        self._depth_soon = False
        self._reopen_below = max(1, config.wire_queue_size // 2)
        """The closed gate reopens once the send loop has taken the wire queue below this (hysteresis)."""
        self._window_shut = False
        self._window_reopens_at = config.max_in_flight - min(config.send_batch_size, config.max_in_flight // 2)
        """A full ack window takes status updates again only once this few are in flight (hysteresis):
        the send loop then refills it with one batch, not a frame per Response. The facilitator
        reads one segment per batch (measured: batches of ~49 frames instead of 5-7, the simulator
        up to ~1 µs cheaper per update)."""

        self._sent: Subject[Sent] = LoopSubject()
        self._dropped: Subject[Dropped[Envelope]] = Subject()
        self._acks: Subject[AckOutcome] = LoopSubject()
        self._requeued: Subject[Requeued] = Subject()
        self._unexpected: Subject[Response] = Subject()
        self._send_failed: Subject[Envelope] = Subject()
        self._refused: Subject[Refused] = Subject()
        self._head_of_line: Subject[HeadOfLine] = Subject()
        self._watched: Envelope | None = None
        self._depth: BehaviorSubject[Depth] = BehaviorSubject(Depth(0, 0, 0, 0))

    # -- observables for the monitor and hosts ----------------------------------------------
    @property
    def sent(self) -> reactivex.Observable[Sent]:
        return self._sent

    @property
    def dropped(self) -> reactivex.Observable[Dropped[Envelope]]:
        return self._dropped

    @property
    def acks(self) -> reactivex.Observable[AckOutcome]:
        return self._acks

    @property
    def requeued(self) -> reactivex.Observable[Requeued]:
        return self._requeued

    @property
    def send_failures(self) -> reactivex.Observable[Envelope]:
        """Envelopes whose write failed because the connection died under it (they are retried)."""
        return self._send_failed

    @property
    def refused(self) -> reactivex.Observable[Refused]:
        """Messages refused at enqueue (too large, invalid specs): never sent; the caller got the error too."""
        return self._refused

    @property
    def head_of_line(self) -> reactivex.Observable[HeadOfLine]:
        """The oldest unanswered status update after each connection that ended without answering it,
        and once more when it is finally answered (``answered``)."""
        return self._head_of_line

    @property
    def unexpected_responses(self) -> reactivex.Observable[Response]:
        return self._unexpected

    @property
    def depth(self) -> reactivex.Observable[Depth]:
        return self._depth

    @property
    def current_depth(self) -> Depth:
        """Exact at any moment (the ``depth`` observable may publish up to one loop iteration later)."""
        return Depth(self._held, self._held_bytes, len(self._wire), self._in_flight)

    # -- input ---------------------------------------------------------------------------------
    def add_source(self, source: reactivex.Observable[OutboundMessage]) -> None:
        """Merge another outbound source; all sources are wired before ``start()``."""
        if self._started:
            raise UsageError("add_source() must be called before start()")
        self._sources.append(source)

    def enqueue(self, message: OutboundMessage) -> None:
        """Queue one message (encoded once, here); raises :class:`MessageRefused` if it must not be sent."""
        self._direct.on_next(message)

    def restore(self, updates: Sequence[PendingUpdate]) -> None:
        """Queue what a previous run left unanswered in the journal, first, in its original order.

        Called before ``start()``: these go straight to the front of the wire queue (they are already
        durable), so everything enqueued later, of any kind, goes out after them.
        """
        if self._started:
            raise UsageError("restore() must be called before start()")
        now = self._clock()
        for update in updates:
            policy = POLICIES.get(update.kind)
            if policy is None or policy is HoldPolicy.KEEP_LATEST:
                raise ValueError(f"journal row {update.seq}: {update.kind} is not a journaled message type")
            self._wire.append(
                Envelope(update.kind, update.frame, policy, now, update.job_uuid, update.status, seq=update.seq)
            )

    def retry(self, envelope: Envelope) -> None:
        """Put an envelope back at the front of the wire queue (it goes out next)."""
        self._wire.appendleft(envelope)
        self._publish_depth()
        self._wake.set()

    # -- lifecycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        """Wire the pipeline (before any frame flows) and start the send loop, a task this manager owns."""
        if self._started:
            raise UsageError("MessageManager.start() can be called once")
        self._started = True
        connected: reactivex.Observable[bool] = self._connection.state.pipe(
            ops.map(_is_connected), ops.distinct_until_changed()
        )

        journal = self._journal
        max_outbound = self._config.max_outbound_frame_bytes
        sources = self._sources

        def merged(
            observer: abc.ObserverBase[Envelope], scheduler: abc.SchedulerBase | None = None
        ) -> abc.DisposableBase:
            """The merge of the sources, each message encoded once into its envelope (merge + map in one
            step: all on the loop thread, so the interleaving is arrival order; reactivex.merge would add
            a lock per message). Heartbeats leave here for their priority lane."""
            emit = observer.on_next

            def route(message: OutboundMessage) -> None:
                envelope = envelope_of(message, self._clock())
                if envelope.policy is HoldPolicy.KEEP_LATEST:
                    self._to_priority(envelope)  # liveness, not data: never behind a backlog
                    return
                # Synchronous, so the error reaches whoever emitted the message (report(), publish_specs()).
                # (A frameless status update is ~120 characters, far below any allowed limit.)
                error = None if envelope._frame is None else refusal(message, envelope._frame, max_outbound)
                if error is not None:
                    self._refused.on_next(Refused(envelope, error))
                    raise error
                if journal is not None:  # accepted = journaled; sent once durable (see _next_ready)
                    envelope.seq = journal.record(envelope.kind, envelope.frame, envelope.job_uuid, envelope.status)
                # Once for whatever the emission changes (held, wire queue, evictions); scheduled first,
                # so the depth is published before the send loop (woken by the emission) takes any of it.
                self._publish_depth_soon()
                emit(envelope)
                if not self._depth_soon:  # fed from outside an event loop: nothing was scheduled
                    self._publish_depth()

            return CompositeDisposable(*(source.subscribe(route, scheduler=scheduler) for source in sources))

        outbox = reactivex.Observable(merged).pipe(
            hold_while_disconnected(
                self._gate,
                _policy_of,
                max_count=self._config.outbox_max_messages,
                max_bytes=self._config.outbox_max_bytes,
                max_bounded=self._config.max_pending_specs,
                size_of=_size_of,
                on_dropped=self._on_dropped,
                on_depth=self._on_held_depth,
            ),
        )

        if journal is not None:
            journal.on_durable = self._wake.set

        self._subscriptions.add(connected.subscribe(self._on_connected))
        self._subscriptions.add(
            match_acks(self._for_ack, self._responses, connected).subscribe(self._on_ack_event)
        )
        # Last: subscribing the outbox subscribes the sources, and messages may flow at once.
        self._subscriptions.add(outbox.subscribe(self._to_wire))
        self._task = asyncio.create_task(self._send_loop(), name="facilitator-send-loop")

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The send loop, for an owner that wants to learn when it fails (it never ends by itself)."""
        return self._task

    async def _send_loop(self) -> None:
        """The only writer of frames. Runs until ``stop()`` cancels it.

        Whatever is ready goes out as one batch (up to ``send_batch_size``): taken, counted as sent
        and, for status updates, put in flight in one synchronous step, then written with one
        ``send_many`` (a backlog costs one websocket write per batch, not per frame).
        """
        batch_size = self._config.send_batch_size
        while True:
            envelope = self._next_ready()
            if envelope is None:
                self._wake.clear()
                await self._wake.wait()
                continue
            connection_id = self._connection.connection_id
            now = self._clock()
            batch = [envelope]
            while True:
                envelope.sends += 1
                envelope.sent_at = now
                if envelope.expects_ack:
                    self._in_flight += 1  # before the next _next_ready(): the window counts this one
                    self._for_ack.on_next(envelope)
                if len(batch) == batch_size:
                    break
                envelope = self._next_ready()
                if envelope is None:
                    break
                batch.append(envelope)
            self._writing = True
            try:
                if len(batch) == 1:
                    await self._connection.send(batch[0].frame)
                else:
                    await self._connection.send_many([envelope.frame for envelope in batch])
            except TransportClosed:
                # The connection is dead; its reader will notice. Unacknowledged status updates come
                # back through match_acks; anything else goes back to the front, in order.
                self._broken_connection = connection_id
                for envelope in batch:
                    self._send_failed.on_next(envelope)
                self._take_back(batch)
                self._publish_depth()
                continue
            except asyncio.CancelledError:
                self._take_back(batch)  # stopped mid-write: stop() reports them (or leaves them in the journal)
                raise
            finally:
                self._writing = False
            journal = self._journal
            for envelope in batch:
                if envelope.seq and journal is not None and not envelope.expects_ack:
                    journal.answered(envelope.seq)  # a spec update is never answered: done once written
                self._sent.on_next(Sent(envelope, now, connection_id))
            # A send only shrinks the wire queue: only a closed gate can change, and only below half.
            if len(self._wire) < self._reopen_below and not self._gate.value:
                self._update_gate()
            self._publish_depth_soon()

    async def drain(self, timeout: float) -> bool:
        """Wait until nothing is held, queued or in flight; False if the timeout came first."""
        try:
            async with asyncio.timeout(timeout):
                while self.current_depth.pending or self._heartbeat is not None or self._writing:
                    if not self._connection.is_connected:
                        return False
                    self._changed.clear()
                    self._draining += 1
                    try:
                        await self._changed.wait()
                    finally:
                        self._draining -= 1
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """End the send loop, dispose the pipeline, report what was never sent, complete the observables.

        Unacknowledged status updates are back in the wire queue by now (the connection ended
        first), so reporting the wire queue and the outbox accounts for every pending message.
        """
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        while self._wire:
            self._on_dropped(Dropped(self._wire.popleft(), "disposed"))
        self._subscriptions.dispose()
        self._depth.on_completed()
        for subject in (
            self._sent, self._dropped, self._acks, self._requeued, self._unexpected, self._send_failed,
            self._refused, self._head_of_line,
        ):
            subject.on_completed()

    # -- internals ---------------------------------------------------------------------------------
    def _next_ready(self) -> Envelope | None:
        if not self._connection.is_connected or self._connection.connection_id == self._broken_connection:
            return None
        if self._heartbeat is not None:
            envelope, self._heartbeat = self._heartbeat, None
            return envelope
        if not self._wire:
            return None
        head = self._wire[0]
        if head.expects_ack:
            if self._in_flight >= self._config.max_in_flight:
                self._window_shut = True
                return None
            if self._window_shut:
                if self._in_flight > self._window_reopens_at:
                    return None
                self._window_shut = False
        if head.seq and self._journal is not None and not self._journal.is_durable(head.seq):
            return None  # not yet durable: the journal's next commit wakes the loop (no wait per message)
        return self._wire.popleft()

    def _take_back(self, batch: list[Envelope]) -> None:
        """A write that did not complete: its spec updates go back to the front, in order (its status
        updates are in flight: match_acks gives them back unanswered; a heartbeat is not worth keeping)."""
        back = [e for e in batch if not e.expects_ack and e.policy is not HoldPolicy.KEEP_LATEST]
        for envelope in back:
            envelope.sends -= 1
        self._wire.extendleft(reversed(back))

    def _to_priority(self, envelope: Envelope) -> None:
        """The one-slot lane for KEEP_LATEST messages (heartbeats): at most one, the newest."""
        if self._heartbeat is not None:
            self._dropped.on_next(Dropped(self._heartbeat, "superseded"))
        self._heartbeat = envelope
        self._wake.set()

    def _to_wire(self, envelope: Envelope) -> None:
        wire = self._wire
        wire.append(envelope)
        if len(wire) >= self._config.wire_queue_size:  # the gate is open (the outbox emits only then)
            self._update_gate()
        # No depth publication here: whoever made the outbox release (route, _update_gate) publishes once.
        self._wake.set()

    def _update_gate(self) -> None:
        # Hysteresis: the gate closes at wire_queue_size and reopens only once the send loop has
        # taken the wire queue below half of it, so the outbox releases frames in batches rather
        # than toggling the gate (and re-entering the hold operator) once per frame.
        limit = self._config.wire_queue_size if self._gate.value else self._reopen_below
        is_open = self._connection.is_connected and len(self._wire) < limit
        if is_open != self._gate.value:
            # A release moves frames to the wire queue one by one (publishing nothing): publish the
            # depth once, after the whole synchronous batch.
            self._gate.on_next(is_open)
            self._publish_depth()

    def _on_connected(self, connected: bool) -> None:
        if not connected and self._heartbeat is not None:
            # A heartbeat from a dead connection is stale: the next connection sends a fresh one.
            self._dropped.on_next(Dropped(self._heartbeat, "stale"))
            self._heartbeat = None
        self._update_gate()
        self._publish_depth()
        self._wake.set()

    def _on_ack_event(self, event: AckEvent[Envelope, Response]) -> None:
        if isinstance(event, Acked):
            self._in_flight -= 1
            envelope, response = event.item, event.response
            if envelope.seq and self._journal is not None:
                self._journal.answered(envelope.seq)  # any outcome: an answered update is never resent
            if response.is_success:
                outcome = "success"
            elif "job.integrity_error" in response.error_types:
                outcome = "duplicate"
            else:
                outcome = "error"
            self._acks.on_next(AckOutcome(envelope, response, outcome, self._clock() - envelope.sent_at))
            if envelope is self._watched:
                self._watched = None
                self._report_head(envelope, answered=True)
            self._publish_depth_soon()
            self._wake.set()
            return
        if isinstance(event, Unacked):
            self._in_flight -= len(event.items)
            self._wire.extendleft(reversed(event.items))
            self._requeued.on_next(Requeued(event.items, self._connection.connection_id))
            # Responses come in order, so the first one unanswered is the oldest: the one that stays
            # at the head of the line until it is answered (a poison frame, or an outage).
            head = self._watched = event.items[0]
            head.unanswered += 1
            self._report_head(head)
        else:
            self._unexpected.on_next(event.response)
        self._publish_depth()
        self._wake.set()

    def _report_head(self, envelope: Envelope, *, answered: bool = False) -> None:
        count = envelope.unanswered
        suspected = not answered and count >= self._config.poison_after_connections
        age = self._clock() - envelope.enqueued_at
        self._head_of_line.on_next(HeadOfLine(envelope, count, age, suspected, answered))

    def _on_dropped(self, dropped: Dropped[Envelope]) -> None:
        if dropped.item.seq and self._journal is not None:
            if dropped.reason == "disposed":
                self.kept_in_journal += 1  # not lost: the next start sends it
                return
            self._journal.answered(dropped.item.seq)  # reported dropped: a restart must not resend it
        self._dropped.on_next(dropped)

    def _on_held_depth(self, count: int, size: int) -> None:
        # Stored only: the held depth changes inside route() or a release, and both publish afterwards.
        self._held, self._held_bytes = count, size

    def _publish_depth(self) -> None:
        depth = Depth(self._held, self._held_bytes, len(self._wire), self._in_flight)
        if depth != self._depth.value:
            self._depth.on_next(depth)
        if self._draining:
            self._changed.set()

    def _publish_depth_soon(self) -> None:
        """Sends and acks change the depth once per frame, in bursts: publish once per loop iteration.

        (Publishing per frame, with the monitor's gauges behind it, was ~10% of the CPU per status
        update in the throughput benchmark.) ``current_depth`` and ``drain()`` stay exact meanwhile.
        """
        if self._draining:
            self._changed.set()
        if not self._depth_soon:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # fed from outside the loop (tests): publish at once
                self._publish_depth()
                return
            self._depth_soon = True
            loop.call_soon(self._flush_depth)

    def _flush_depth(self) -> None:
        self._depth_soon = False
        if not self._depth.is_stopped:
            self._publish_depth()
