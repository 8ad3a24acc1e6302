"""The outbox core (MessageManager) against a scripted connection: every path, asserted exactly.

No sockets: a fake connection stands in for ConnectionManager (the four things the MessageManager uses
of it: ``state``, ``is_connected``, ``connection_id``, ``send()``), and a fake clock for ``time``.
That makes the send-failure path, the bounds, the backpressure thresholds and the ack window
deterministic, so these tests can assert exact sequences and counts. They are also the test
selection of ``make mutate`` for ``streams/message_manager.py``, so they must stay fast.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import orjson
import pytest
from reactivex.subject import BehaviorSubject, Subject

from operators import Dropped, HoldPolicy
from streams.config import ClientConfig
from streams.connection_manager import ConnectionManager
from streams.events import ConnectionState
from streams.exceptions import TransportClosed, UsageError
from streams.job_status_update_manager import build_update
from streams.journal import Journal, PendingUpdate
from streams.message_manager import (
    AckOutcome,
    Depth,
    Envelope,
    HeadOfLine,
    MessageManager,
    Requeued,
    Sent,
    envelope_of,
)
from streams.protocol import (
    JobStatus,
    JobStatusUpdate,
    OutboundMessage,
    Response,
    V0AuthenticationRequest,
    V0Heartbeat,
    V0MachineSpecsUpdate,
    encode,
)
from streams.transport import CloseInfo
from tests.helpers import wait_until

URL = "ws://127.0.0.1:9/ws/v0/"
WAIT = 5.0  # generous: a condition that holds at all holds within milliseconds


# -- messages and frames ------------------------------------------------------------------------------


def spec(n: int) -> V0MachineSpecsUpdate:
    return V0MachineSpecsUpdate(
        miner_hotkey="miner", validator_hotkey="validator", batch_id=f"b{n}",
        specs={"cpu": {"count": 1}, "ram": {}, "hard_disk": {}},  # the smallest specs the facilitator takes
    )


def status(n: int, value: JobStatus = JobStatus.RECEIVED) -> JobStatusUpdate:
    return JobStatusUpdate(uuid=f"00000000-0000-4000-8000-{n:012d}", status=value)


def label(frame: str) -> str:
    """``hb``, ``spec<n>`` or ``status<n>``: what a frame is, for readable sequence assertions."""
    message = orjson.loads(frame)
    kind = message["message_type"]
    if kind == "V0Heartbeat":
        return "hb"
    if kind == "V0MachineSpecsUpdate":
        return "spec" + message["batch_id"][1:]
    return "status" + str(int(message["uuid"].rsplit("-", 1)[1]))


SUCCESS = Response(status="success")


def error(*types: str) -> Response:
    return Response.model_validate({"status": "error", "errors": [{"type": t, "msg": "no"} for t in types]})


# -- the fake connection ---------------------------------------------------------------------------------


class FakeConnection:
    """ConnectionManager as the MessageManager sees it; ``up()``/``down()`` script the connection.

    ``dying``: writes fail with TransportClosed although the state still says CONNECTED (the reader has
    not noticed the dead socket yet). ``paused``: writes wait until it is set (a slow socket).
    ``on_write``: called at the start of every write attempt (to record what the outbox looked like).
    ``answer``: status updates written successfully are answered with this Response (None: never).
    """

    def __init__(self, responses: Subject[Response]) -> None:
        self._state = BehaviorSubject(ConnectionState.DISCONNECTED)
        self._responses = responses
        self.connection_id = 0
        self.attempts: list[tuple[int, str]] = []
        self.written: list[tuple[int, str]] = []
        self.dying = False
        self.paused: asyncio.Event | None = None
        self.on_write: Callable[[str], None] | None = None
        self.answer: Response | None = None
        self.batches: list[list[str]] = []
        """The labels of each ``send_many`` call (a batch of two or more frames), in order."""

    @property
    def state(self) -> BehaviorSubject[ConnectionState]:
        return self._state

    @property
    def is_connected(self) -> bool:
        return self._state.value is ConnectionState.CONNECTED

    def up(self) -> None:
        """A new authenticated connection, through the states the real ConnectionManager passes."""
        self._state.on_next(ConnectionState.CONNECTING)
        self._state.on_next(ConnectionState.AUTHENTICATING)
        self.connection_id += 1
        self.dying = False
        self._state.on_next(ConnectionState.CONNECTED)

    def down(self) -> None:
        self._state.on_next(ConnectionState.DISCONNECTED)

    async def send(self, frame: str) -> None:
        await self._write([frame])

    async def send_many(self, frames: Sequence[str]) -> None:
        """One batch: every frame is attempted, then they are written together or the batch fails."""
        self.batches.append([label(frame) for frame in frames])
        await self._write(frames)

    async def _write(self, frames: Sequence[str]) -> None:
        connection_id = self.connection_id
        for frame in frames:
            self.attempts.append((connection_id, frame))
            if self.on_write is not None:
                self.on_write(frame)
        if self.paused is not None:
            await self.paused.wait()
        else:
            await asyncio.sleep(0)  # a real write yields to the loop
        if self.dying or not self.is_connected or connection_id != self.connection_id:
            raise TransportClosed(CloseInfo(1006, "connection lost", None))
        for frame in frames:
            self.written.append((connection_id, frame))
            if self.answer is not None and label(frame).startswith("status"):
                asyncio.get_running_loop().call_soon(self._responses.on_next, self.answer)

    def labels(self, connection_id: int) -> list[str]:
        """What was written on one connection, in order."""
        return [label(frame) for cid, frame in self.written if cid == connection_id]

    def tried(self, connection_id: int) -> list[str]:
        """What the outbox tried to write on one connection (failed writes included), in order."""
        return [label(frame) for cid, frame in self.attempts if cid == connection_id]


@dataclass
class Clock:
    now: float = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Outbox:
    """A started MessageManager with its send loop running, and everything it reported."""

    messages: MessageManager
    connection: FakeConnection
    responses: Subject[Response]
    clock: Clock
    sent: list[Sent] = field(default_factory=list)
    dropped: list[Dropped[Envelope]] = field(default_factory=list)
    acks: list[AckOutcome] = field(default_factory=list)
    requeued: list[Requeued] = field(default_factory=list)
    unexpected: list[Response] = field(default_factory=list)
    failed: list[Envelope] = field(default_factory=list)
    depths: list[Depth] = field(default_factory=list)

    def enqueue(self, *messages: OutboundMessage) -> None:
        for message in messages:
            self.messages.enqueue(message)

    def drops(self) -> list[tuple[str, str]]:
        return [(label(d.item.frame), d.reason) for d in self.dropped]


def make_outbox(**overrides: Any) -> Outbox:
    responses: Subject[Response] = Subject()
    connection = FakeConnection(responses)
    clock = Clock()
    messages = MessageManager(
        ClientConfig(url=URL, **overrides), cast(ConnectionManager, connection), responses, clock=clock
    )
    box = Outbox(messages, connection, responses, clock)
    messages.sent.subscribe(box.sent.append)
    messages.dropped.subscribe(box.dropped.append)
    messages.acks.subscribe(box.acks.append)
    messages.requeued.subscribe(box.requeued.append)
    messages.unexpected_responses.subscribe(box.unexpected.append)
    messages.send_failures.subscribe(box.failed.append)
    messages.depth.subscribe(box.depths.append)
    return box


@contextlib.asynccontextmanager
async def running(**overrides: Any) -> AsyncIterator[Outbox]:
    """A started outbox (its send loop is a task it owns), stopped on exit."""
    box = make_outbox(**overrides)
    await box.messages.start()
    try:
        yield box
    finally:
        await box.messages.stop()


# -- sending -------------------------------------------------------------------------------------------


async def test_frames_go_out_heartbeat_first_then_in_arrival_order_on_the_current_connection() -> None:
    async with running() as box:
        box.clock.now = 5.0
        box.connection.up()
        box.enqueue(spec(1), status(1), V0Heartbeat(), spec(2))
        await wait_until(lambda: len(box.connection.written) == 4, WAIT, "four frames")
        assert box.connection.labels(1) == ["hb", "spec1", "status1", "spec2"]
        assert [(label(s.envelope.frame), s.connection_id, s.resend, s.at) for s in box.sent] == [
            ("hb", 1, False, 5.0), ("spec1", 1, False, 5.0), ("status1", 1, False, 5.0), ("spec2", 1, False, 5.0)
        ]
        assert box.messages.current_depth == Depth(held=0, held_bytes=0, wire=0, in_flight=1)


async def test_nothing_is_written_while_disconnected_and_everything_after_connecting() -> None:
    async with running() as box:
        box.enqueue(spec(1), status(1), spec(2))
        assert box.messages.current_depth.held == 3
        box.connection.up()
        await wait_until(lambda: len(box.connection.written) == 3, WAIT, "three frames")
        assert box.connection.attempts == box.connection.written  # no write was tried before connecting
        assert box.connection.labels(1) == ["spec1", "status1", "spec2"]


async def test_a_source_added_before_start_is_sent_and_one_added_after_is_refused() -> None:
    box = make_outbox()
    source: Subject[OutboundMessage] = Subject()
    box.messages.add_source(source)
    await box.messages.start()
    try:
        with pytest.raises(UsageError, match=r"^add_source\(\) must be called before start\(\)$"):
            box.messages.add_source(Subject())
        with pytest.raises(UsageError, match=r"^MessageManager\.start\(\) can be called once$"):
            await box.messages.start()
        box.connection.up()
        source.on_next(spec(7))
        await wait_until(lambda: box.connection.labels(1) == ["spec7"], WAIT, "the source's spec")
    finally:
        await box.messages.stop()


async def test_retry_puts_an_envelope_at_the_front() -> None:
    async with running() as box:
        box.enqueue(spec(1), spec(2))
        box.messages.retry(envelope_of(spec(0), 0.0))
        assert box.messages.current_depth.wire == 1
        box.connection.up()
        await wait_until(lambda: len(box.connection.written) == 3, WAIT, "three frames")
        assert box.connection.labels(1) == ["spec0", "spec1", "spec2"]


def test_envelope_of_encodes_once_and_refuses_what_the_outbox_does_not_carry() -> None:
    envelope = envelope_of(status(3, JobStatus.ACCEPTED), 4.5)
    assert (envelope.kind, envelope.job_uuid, envelope.status, envelope.enqueued_at) == (
        "V0JobStatusUpdate", "00000000-0000-4000-8000-000000000003", "accepted", 4.5
    )
    assert envelope.expects_ack and label(envelope.frame) == "status3"
    assert not envelope_of(spec(1), 0.0).expects_ack and envelope_of(spec(1), 0.0).status is None
    # The status text is the enum's own string, shared by every envelope (not a copy per message).
    assert envelope.status is JobStatus.ACCEPTED.value is envelope_of(status(4, JobStatus.ACCEPTED), 0.0).status
    auth = V0AuthenticationRequest(public_key="00", signature="0x00")
    with pytest.raises(ValueError, match="V0AuthenticationRequest is not sent through the outbox"):
        envelope_of(auth, 0.0)


@pytest.mark.parametrize("job_status", list(JobStatus))
def test_a_status_update_without_metadata_is_held_without_its_frame_and_written_exactly(
    job_status: JobStatus,
) -> None:
    job = "2dcdf287-e485-408f-b2d2-ad0d3c8f9237"
    update = build_update(job, job_status)
    envelope = envelope_of(update, 0.0)
    expected = encode(JobStatusUpdate(uuid=job, status=job_status))
    assert envelope.frame == expected, "built on demand, byte for byte the model's frame"
    assert envelope.size == len(expected), "the byte bound counts the frame it will write"
    assert envelope._frame is None and envelope.policy is HoldPolicy.KEEP_ALL, "held without a frame string"
    from_model = envelope_of(JobStatusUpdate(uuid=job, status=job_status), 0.0)  # encoded at enqueue, kept
    assert (from_model.frame, from_model.size) == (expected, len(expected))


def test_only_a_status_update_can_be_built_without_a_frame() -> None:
    with pytest.raises(ValueError, match="only a status update with its job_uuid and status"):
        Envelope("V0MachineSpecsUpdate", None, HoldPolicy.KEEP_BOUNDED, 0.0)
    with pytest.raises(ValueError, match="only a status update with its job_uuid and status"):
        Envelope("V0JobStatusUpdate", None, HoldPolicy.KEEP_ALL, 0.0, "x", None)


# -- the send-failure path, per message kind --------------------------------------------------------------


async def test_a_spec_update_whose_write_fails_on_a_dying_connection_is_sent_on_the_next_one() -> None:
    async with running() as box:
        box.connection.up()
        box.connection.dying = True
        box.enqueue(spec(1))
        await wait_until(lambda: len(box.failed) == 1, WAIT, "the failed write")
        assert label(box.failed[0].frame) == "spec1"
        box.enqueue(spec(2))  # the state still says connected: this one must wait for the next connection
        assert box.messages.current_depth.wire == 2
        box.connection.down()
        box.connection.up()
        await wait_until(lambda: len(box.connection.labels(2)) == 2, WAIT, "both specs on connection 2")
        assert box.connection.labels(2) == ["spec1", "spec2"]
        assert box.connection.tried(1) == ["spec1"]  # nothing more was tried on the broken connection
        # a failed write is not a send
        assert [(s.resend, s.envelope.sends) for s in box.sent] == [(False, 1), (False, 1)]
        assert box.dropped == []


async def test_a_status_update_whose_write_fails_comes_back_once_through_the_ack_tracking() -> None:
    async with running() as box:
        box.connection.up()
        box.connection.dying = True
        box.enqueue(status(1))
        await wait_until(lambda: len(box.failed) == 1, WAIT, "the failed write")
        assert box.messages.current_depth == Depth(held=0, held_bytes=0, wire=0, in_flight=1)
        box.connection.down()
        assert [[label(e.frame) for e in r.envelopes] for r in box.requeued] == [["status1"]]
        assert box.requeued[0].connection_id == 1
        box.connection.answer = SUCCESS
        box.connection.up()
        assert await box.messages.drain(WAIT)
        assert box.connection.labels(2) == ["status1"]
        assert [(label(a.envelope.frame), a.outcome) for a in box.acks] == [("status1", "success")]
        assert box.sent[-1].resend  # its first write counted: the facilitator may have read it


async def test_a_heartbeat_whose_write_fails_is_not_resent_on_the_next_connection() -> None:
    async with running() as box:
        box.connection.up()
        box.connection.dying = True
        box.enqueue(V0Heartbeat())
        await wait_until(lambda: len(box.failed) == 1, WAIT, "the failed write")
        box.connection.down()
        box.connection.up()
        box.enqueue(spec(1))
        await wait_until(lambda: box.connection.labels(2) == ["spec1"], WAIT, "the spec on connection 2")
        assert box.connection.tried(2) == ["spec1"]
        assert box.messages.current_depth.pending == 0


@pytest.mark.parametrize("batch", [1, 64], ids=["a-write-per-frame", "one-batch"])
async def test_a_write_failing_after_the_state_changed_is_retried_on_the_next_connection(batch: int) -> None:
    async with running(send_batch_size=batch) as box:
        box.connection.up()
        box.connection.paused = asyncio.Event()
        box.enqueue(spec(1), spec(2))
        in_write = 1 if batch == 1 else 2  # spec1 alone, or both specs in one batch
        await wait_until(lambda: len(box.connection.attempts) == in_write, WAIT, "a write in progress")
        assert box.connection.batches == ([] if batch == 1 else [["spec1", "spec2"]])
        box.connection.down()
        box.connection.paused.set()
        await wait_until(lambda: len(box.failed) == in_write, WAIT, "the failed write")
        assert [label(envelope.frame) for envelope in box.failed] == ["spec1", "spec2"][:in_write]
        box.connection.paused = None
        box.connection.up()
        await wait_until(lambda: len(box.connection.labels(2)) == 2, WAIT, "both specs on connection 2")
        assert box.connection.labels(2) == ["spec1", "spec2"]


# -- bounds --------------------------------------------------------------------------------------------


async def test_the_byte_bound_evicts_the_oldest_and_counts_frame_bytes() -> None:
    size = len(envelope_of(status(1), 0.0).frame)
    async with running(outbox_max_bytes=2 * size + size // 2) as box:
        box.enqueue(status(1), status(2))
        assert box.messages.current_depth == Depth(held=2, held_bytes=2 * size, wire=0, in_flight=0)
        assert box.dropped == []
        box.enqueue(status(3))
        assert box.drops() == [("status1", "outbox_full")]
        assert box.messages.current_depth == Depth(held=2, held_bytes=2 * size, wire=0, in_flight=0)
        box.connection.answer = SUCCESS
        box.connection.up()
        assert await box.messages.drain(WAIT)
        assert box.connection.labels(1) == ["status2", "status3"]


async def test_the_count_bound_and_the_spec_bound_drop_the_oldest_and_report_it() -> None:
    async with running(outbox_max_messages=3, max_pending_specs=2) as box:
        box.enqueue(spec(1), spec(2), spec(3))
        assert box.drops() == [("spec1", "outbox_full")]
        box.enqueue(status(1), status(2))
        # 4 held > 3: the oldest spec goes before any status update
        assert box.drops() == [("spec1", "outbox_full"), ("spec2", "outbox_full")]
        box.enqueue(status(3))
        assert box.drops()[2:] == [("spec3", "outbox_full")]
        box.enqueue(status(4))
        assert box.drops()[3:] == [("status1", "outbox_full")]
        assert box.messages.current_depth.held == 3


# -- drain() --------------------------------------------------------------------------------------------


async def test_drain_is_true_at_once_when_nothing_is_pending() -> None:
    async with running() as box:
        assert await box.messages.drain(0.0)


async def test_drain_is_true_once_everything_was_sent_and_acknowledged() -> None:
    async with running() as box:
        box.connection.answer = SUCCESS
        box.connection.up()
        box.enqueue(*(status(n) for n in range(5)), spec(1))
        assert await box.messages.drain(WAIT)
        assert box.messages.current_depth.pending == 0
        assert len(box.acks) == 5 and len(box.connection.written) == 6


async def test_drain_is_false_when_an_update_stays_unanswered() -> None:
    async with running() as box:
        box.connection.up()
        box.enqueue(status(1))
        assert not await box.messages.drain(0.05)
        assert box.messages.current_depth.in_flight == 1


async def test_drain_is_false_as_soon_as_the_connection_ends() -> None:
    async with running() as box:
        box.connection.up()
        box.enqueue(status(1))
        await wait_until(lambda: len(box.connection.written) == 1, WAIT, "the update written")
        drain = asyncio.create_task(box.messages.drain(60.0))
        await wait_until(lambda: not drain.done() and box.messages.current_depth.in_flight == 1, WAIT, "draining")
        box.connection.down()
        async with asyncio.timeout(WAIT):  # not the 60 s of its own timeout
            assert not await drain


async def test_a_drain_that_times_out_leaves_another_one_waiting_to_see_the_outbox_empty() -> None:
    async with running() as box:
        box.connection.up()
        box.connection.paused = asyncio.Event()  # the write hangs
        box.enqueue(spec(1))
        await wait_until(lambda: len(box.connection.attempts) == 1, WAIT, "a write in progress")
        longer = asyncio.create_task(box.messages.drain(WAIT))
        assert not await box.messages.drain(0.05)  # gives up while the write hangs; `longer` waits on
        assert not longer.done()
        box.connection.paused.set()
        async with asyncio.timeout(WAIT):
            assert await longer, "woken by the write's end although the other drain() had left"


async def test_drain_waits_for_a_write_in_progress() -> None:
    async with running() as box:
        box.connection.up()
        box.connection.paused = asyncio.Event()
        box.enqueue(spec(1))
        await wait_until(lambda: len(box.connection.attempts) == 1, WAIT, "a write in progress")
        assert box.messages.current_depth.pending == 0  # neither held, queued nor awaiting a Response
        assert not await box.messages.drain(0.05)
        box.connection.paused.set()
        assert await box.messages.drain(WAIT)
        assert box.connection.labels(1) == ["spec1"]


async def test_drain_waits_for_a_pending_heartbeat() -> None:
    async with running() as box:
        box.connection.up()
        box.connection.paused = asyncio.Event()
        box.enqueue(spec(1))
        await wait_until(lambda: len(box.connection.attempts) == 1, WAIT, "a write in progress")
        box.enqueue(V0Heartbeat())
        assert box.messages.current_depth.pending == 0  # only the heartbeat is left
        assert not await box.messages.drain(0.05)
        box.connection.paused.set()
        assert await box.messages.drain(WAIT)
        assert box.connection.labels(1) == ["spec1", "hb"]


# -- backpressure: the wire-queue gate -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "count", "expected"),
    [
        # closes when the wire queue is full (4), reopens below half (2): batches of 3
        (4, 10, [(3, 6), (2, 6), (1, 6), (3, 3), (2, 3), (1, 3), (3, 0), (2, 0), (1, 0), (0, 0)]),
        # size 3: half is 1 (rounded down): reopens once the wire queue is empty
        (3, 6, [(2, 3), (1, 3), (0, 3), (2, 0), (1, 0), (0, 0)]),
        # size 2: reopens only once the wire queue is empty (half of 2 is 1: below 1)
        (2, 6, [(1, 4), (0, 4), (1, 2), (0, 2), (1, 0), (0, 0)]),
        # size 1: one frame at a time
        (1, 3, [(0, 2), (0, 1), (0, 0)]),
    ],
)
async def test_the_wire_queue_closes_the_gate_when_full_and_reopens_it_below_half(
    size: int, count: int, expected: list[tuple[int, int]]
) -> None:
    async with running(wire_queue_size=size, send_batch_size=1) as box:  # a write per frame: see each step
        seen: list[tuple[int, int]] = []
        box.connection.on_write = lambda _frame: seen.append(
            (box.messages.current_depth.wire, box.messages.current_depth.held)
        )
        box.connection.up()
        box.enqueue(*(spec(n) for n in range(count)))
        assert box.messages.current_depth.wire == size
        assert box.messages.current_depth.held == count - size
        assert await box.messages.drain(WAIT)
        assert seen == expected
        assert box.connection.labels(1) == [f"spec{n}" for n in range(count)]


async def test_a_connection_opens_the_gate_only_if_the_wire_queue_is_below_half() -> None:
    # Three unanswered updates come back to the wire queue at the drop: at the next connection the
    # gate stays closed (3 >= half of 4) until the send loop has taken the queue below half.
    async with running(wire_queue_size=4) as box:
        box.connection.up()
        box.enqueue(status(1), status(2), status(3))
        await wait_until(lambda: len(box.connection.written) == 3, WAIT, "three updates in flight")
        box.connection.down()
        box.enqueue(*(status(n) for n in range(4, 9)))
        assert box.messages.current_depth == Depth(held=5, held_bytes=5 * len(envelope_of(status(4), 0).frame),
                                                   wire=3, in_flight=0)
        box.connection.up()
        assert (box.messages.current_depth.wire, box.messages.current_depth.held) == (3, 5)
        box.connection.answer = SUCCESS
        assert await box.messages.drain(WAIT)
        assert box.connection.labels(2) == [f"status{n}" for n in range(1, 9)]


async def test_a_backlog_goes_out_in_batches_of_what_is_ready_in_order() -> None:
    # The wire queue holds 4: each batch takes all of it, which reopens the gate for the next 4.
    async with running(wire_queue_size=4) as box:
        box.connection.up()
        box.enqueue(*(spec(n) for n in range(10)))
        assert await box.messages.drain(WAIT)
        assert box.connection.batches == [[f"spec{n}" for n in range(start, min(start + 4, 10))] for start in (0, 4, 8)]
        assert box.connection.labels(1) == [f"spec{n}" for n in range(10)]
        assert len(box.sent) == 10 and [label(sent.envelope.frame) for sent in box.sent] == box.connection.labels(1)


async def test_a_batch_is_at_most_send_batch_size_frames() -> None:
    async with running(send_batch_size=3) as box:
        box.connection.up()
        box.enqueue(*(spec(n) for n in range(7)))
        assert await box.messages.drain(WAIT)
        assert box.connection.batches == [["spec0", "spec1", "spec2"], ["spec3", "spec4", "spec5"]]
        assert box.connection.labels(1) == [f"spec{n}" for n in range(7)]  # spec6 alone: a plain send


async def test_specs_of_a_batch_stopped_mid_write_are_reported_not_forgotten() -> None:
    box = make_outbox()
    await box.messages.start()
    box.connection.up()
    box.connection.paused = asyncio.Event()  # the batch's write never completes
    box.enqueue(spec(1), spec(2), V0Heartbeat())
    await wait_until(lambda: len(box.connection.attempts) == 3, WAIT, "one batch in progress")
    await box.messages.stop()
    assert box.drops() == [("spec1", "disposed"), ("spec2", "disposed")]
    assert box.sent == [] and box.connection.written == []


async def test_a_batch_takes_no_more_status_updates_than_the_ack_window_allows() -> None:
    async with running(max_in_flight=2) as box:
        box.connection.up()
        box.enqueue(status(1), status(2), status(3), spec(1))
        await wait_until(lambda: len(box.connection.written) == 2, WAIT, "two updates written")
        assert box.connection.batches == [["status1", "status2"]]
        assert box.messages.current_depth.in_flight == 2
        assert box.messages.current_depth.wire == 2  # status3 waits for a slot, and spec1 behind it


async def test_a_failed_batch_puts_its_specs_back_in_order_and_its_updates_come_back_unanswered() -> None:
    async with running() as box:
        box.connection.up()
        box.connection.paused = asyncio.Event()
        box.enqueue(spec(1), status(1), spec(2), status(2))
        await wait_until(lambda: len(box.connection.attempts) == 4, WAIT, "one batch in progress")
        box.connection.dying = True
        box.connection.paused.set()
        await wait_until(lambda: len(box.failed) == 4, WAIT, "the failed batch")
        assert [label(envelope.frame) for envelope in box.failed] == ["spec1", "status1", "spec2", "status2"]
        box.connection.paused = None
        box.connection.down()
        box.connection.answer = SUCCESS
        box.connection.up()
        assert await box.messages.drain(WAIT)
        # unanswered status updates first (match_acks), then the specs that were never written
        assert box.connection.labels(2) == ["status1", "status2", "spec1", "spec2"]
        assert [envelope.sends for envelope in box.failed] == [1, 2, 1, 2]


async def test_the_ack_window_holds_status_updates_until_a_response_frees_a_slot() -> None:
    async with running(max_in_flight=2) as box:
        acked_at_write: list[int] = []
        box.connection.on_write = lambda _frame: acked_at_write.append(len(box.acks))
        box.connection.up()
        box.enqueue(status(1), status(2), status(3), spec(1))
        await wait_until(lambda: len(box.connection.written) == 2, WAIT, "two updates written")
        box.responses.on_next(SUCCESS)
        await wait_until(lambda: len(box.connection.written) == 4, WAIT, "the rest written")
        assert acked_at_write == [0, 0, 1, 1]
        assert box.connection.labels(1) == ["status1", "status2", "status3", "spec1"]
        assert box.messages.current_depth.in_flight == 2


async def test_a_full_ack_window_reopens_only_when_a_batch_worth_is_free() -> None:
    # max_in_flight 8, batches of 4: once 8 are in flight, status updates wait until only 4 are
    # (a Response per slot would otherwise send them a frame or two at a time).
    async with running(max_in_flight=8, send_batch_size=4) as box:
        box.connection.up()
        box.enqueue(*(status(n) for n in range(1, 14)))
        await wait_until(lambda: len(box.connection.written) == 8, WAIT, "the window filled")
        for _ in range(3):
            box.responses.on_next(SUCCESS)
        box.enqueue(V0Heartbeat())  # goes regardless of the window: proves the loop ran after the acks
        await wait_until(lambda: len(box.connection.written) == 9, WAIT, "the heartbeat")
        assert box.connection.labels(1)[8:] == ["hb"]
        assert box.messages.current_depth.in_flight == 5
        box.responses.on_next(SUCCESS)  # 4 in flight: a batch's worth free
        await wait_until(lambda: len(box.connection.written) == 13, WAIT, "one refilling batch")
        assert box.connection.batches[-1] == ["status9", "status10", "status11", "status12"]
        assert box.messages.current_depth.in_flight == 8
        for _ in range(4):
            box.responses.on_next(SUCCESS)
        await wait_until(lambda: len(box.connection.written) == 14, WAIT, "the last one")
        assert box.connection.labels(1)[13:] == ["status13"]


async def test_the_window_reopens_at_half_when_a_batch_is_bigger_than_half_of_it() -> None:
    # max_in_flight 5: a batch's worth is capped at 5 // 2 = 2 free slots, so it reopens at 3 in flight
    async with running(max_in_flight=5, send_batch_size=64) as box:
        box.connection.up()
        box.enqueue(*(status(n) for n in range(1, 11)))
        await wait_until(lambda: len(box.connection.written) == 5, WAIT, "the window filled")
        box.responses.on_next(SUCCESS)
        box.enqueue(V0Heartbeat())
        await wait_until(lambda: len(box.connection.written) == 6, WAIT, "the heartbeat")
        assert box.connection.labels(1)[5:] == ["hb"]  # 4 in flight: not yet
        box.responses.on_next(SUCCESS)
        await wait_until(lambda: len(box.connection.written) == 8, WAIT, "the refill")
        assert box.connection.batches[-1] == ["status6", "status7"]
        assert box.messages.current_depth.in_flight == 5


async def test_spec_updates_pass_a_shut_window() -> None:
    async with running(max_in_flight=4, send_batch_size=2) as box:
        box.connection.up()
        box.enqueue(*(status(n) for n in range(1, 5)), spec(1))
        await wait_until(lambda: len(box.connection.written) == 5, WAIT, "window full, then the spec")
        assert box.connection.labels(1)[4:] == ["spec1"]


# -- heartbeats: the priority slot -----------------------------------------------------------------------


async def test_heartbeats_supersede_each_other_and_only_the_newest_is_sent() -> None:
    async with running() as box:
        for t in (1.0, 2.0, 3.0):
            box.clock.now = t
            box.enqueue(V0Heartbeat())
        assert [(d.item.enqueued_at, d.reason) for d in box.dropped] == [(1.0, "superseded"), (2.0, "superseded")]
        box.connection.up()
        box.enqueue(spec(1))
        await wait_until(lambda: len(box.connection.written) == 2, WAIT, "two frames")
        assert box.connection.labels(1) == ["hb", "spec1"]
        assert box.sent[0].envelope.enqueued_at == 3.0
        assert len(box.dropped) == 2


async def test_a_heartbeat_left_from_a_dead_connection_is_dropped_as_stale() -> None:
    async with running() as box:
        box.connection.up()
        box.connection.paused = asyncio.Event()
        box.enqueue(spec(1))
        await wait_until(lambda: len(box.connection.attempts) == 1, WAIT, "a write in progress")
        box.enqueue(V0Heartbeat())
        box.connection.down()
        assert box.drops() == [("hb", "stale")]
        box.connection.paused.set()
        await wait_until(lambda: len(box.failed) == 1, WAIT, "the failed write")
        box.connection.paused = None
        box.connection.up()
        await wait_until(lambda: box.connection.labels(2) == ["spec1"], WAIT, "the spec on connection 2")
        assert box.connection.tried(2) == ["spec1"]
        assert box.drops() == [("hb", "stale")]


# -- acknowledgements ----------------------------------------------------------------------------------


async def test_responses_become_outcomes_with_their_latency() -> None:
    async with running() as box:
        box.connection.up()
        box.clock.now = 10.0
        box.enqueue(status(1), status(2), status(3))
        await wait_until(lambda: len(box.connection.written) == 3, WAIT, "three updates written")
        assert box.messages.current_depth.in_flight == 3
        box.clock.now = 12.5
        box.responses.on_next(SUCCESS)
        box.responses.on_next(error("job.integrity_error"))
        box.clock.now = 13.0
        box.responses.on_next(error("job.unknown", "other"))
        assert [(label(a.envelope.frame), a.outcome, a.latency) for a in box.acks] == [
            ("status1", "success", 2.5), ("status2", "duplicate", 2.5), ("status3", "error", 3.0)
        ]
        assert box.acks[1].response.error_types == ("job.integrity_error",)
        assert box.messages.current_depth.in_flight == 0
        assert box.unexpected == []
        box.responses.on_next(SUCCESS)  # nothing in flight
        assert box.unexpected == [SUCCESS]
        assert len(box.acks) == 3
        assert box.messages.current_depth == Depth(0, 0, 0, 0)


async def test_unanswered_updates_are_requeued_first_in_order_after_a_disconnect() -> None:
    async with running() as box:
        box.connection.up()
        box.enqueue(status(1), status(2), status(3))
        await wait_until(lambda: len(box.connection.written) == 3, WAIT, "three updates written")
        box.responses.on_next(SUCCESS)
        box.connection.down()
        assert [([label(e.frame) for e in r.envelopes], r.connection_id) for r in box.requeued] == [
            (["status2", "status3"], 1)
        ]
        assert box.messages.current_depth == Depth(held=0, held_bytes=0, wire=2, in_flight=0)
        box.enqueue(status(4))
        box.connection.answer = SUCCESS
        box.connection.up()
        assert await box.messages.drain(WAIT)
        assert box.connection.labels(2) == ["status2", "status3", "status4"]
        assert [s.resend for s in box.sent[3:]] == [True, True, False]
        assert [a.outcome for a in box.acks] == ["success"] * 4


# -- depth and close ------------------------------------------------------------------------------------


def test_depth_is_published_at_once_when_fed_outside_the_event_loop() -> None:
    box = make_outbox()
    asyncio.run(box.messages.start())  # the loop ends (and cancels the send loop); the pipeline stays wired
    box.enqueue(spec(1), spec(2))
    size = len(envelope_of(spec(1), 0.0).frame)
    assert box.depths == [Depth(0, 0, 0, 0), Depth(1, size, 0, 0), Depth(2, 2 * size, 0, 0)]
    assert box.messages.task is not None and box.messages.task.cancelled()


async def test_a_release_publishes_the_depth_once_and_it_ends_exact() -> None:
    async with running() as box:
        box.enqueue(*(spec(n) for n in range(5)))
        await wait_until(lambda: box.depths[-1].held == 5, WAIT, "the depth of five held specs")
        published = len(box.depths)
        box.connection.up()  # releases all five to the wire queue, synchronously
        assert box.depths[published:] == [Depth(held=0, held_bytes=0, wire=5, in_flight=0)]
        assert await box.messages.drain(WAIT)
        await wait_until(lambda: box.depths[-1] == Depth(0, 0, 0, 0), WAIT, "the final depth")
        assert all(a != b for a, b in zip(box.depths, box.depths[1:], strict=False))  # changes only


async def test_stop_reports_the_wire_queue_and_the_outbox_as_disposed_and_completes() -> None:
    box = make_outbox(wire_queue_size=2)
    completed: list[str] = []
    box.messages.sent.subscribe(on_completed=lambda: completed.append("sent"))
    box.messages.depth.subscribe(on_completed=lambda: completed.append("depth"))
    await box.messages.start()
    box.connection.up()
    box.enqueue(spec(1), spec(2), spec(3))  # two on the wire queue, one held
    await box.messages.stop()
    assert box.messages.task is not None and box.messages.task.done()
    assert box.messages.task.get_name() == "facilitator-send-loop"  # what a task dump or leak report shows
    assert sorted(box.drops()) == [("spec1", "disposed"), ("spec2", "disposed"), ("spec3", "disposed")]
    assert sorted(completed) == ["depth", "sent"]


async def test_stop_without_start_completes_the_observables() -> None:
    box = make_outbox()
    completed: list[str] = []
    box.messages.dropped.subscribe(on_completed=lambda: completed.append("dropped"))
    await box.messages.stop()
    assert box.messages.task is None
    assert completed == ["dropped"]


# -- the journal: what the outbox tells it, and what it waits for ------------------------------------------


class FakeJournal:
    """The four things the MessageManager uses of a Journal; durability is scripted."""

    def __init__(self) -> None:
        self.records: list[tuple[str, str, str | None, str | None]] = []
        self.answers: list[int] = []
        self.durable_upto = 1_000_000
        self.on_durable: Callable[[], None] | None = None

    def record(self, kind: str, frame: str, job_uuid: str | None = None, status: str | None = None) -> int:
        self.records.append((kind, frame, job_uuid, status))
        return 100 + len(self.records)

    def is_durable(self, seq: int) -> bool:
        return seq <= self.durable_upto

    def answered(self, seq: int) -> None:
        self.answers.append(seq)


def journaled_outbox(**overrides: Any) -> tuple[Outbox, FakeJournal]:
    responses: Subject[Response] = Subject()
    connection = FakeConnection(responses)
    clock = Clock()
    journal = FakeJournal()
    messages = MessageManager(
        ClientConfig(url=URL, **overrides), cast(ConnectionManager, connection), responses, clock=clock,
        journal=cast(Journal, journal),
    )
    box = Outbox(messages, connection, responses, clock)
    messages.sent.subscribe(box.sent.append)
    messages.dropped.subscribe(box.dropped.append)
    messages.acks.subscribe(box.acks.append)
    return box, journal


async def test_every_accepted_update_is_journaled_with_its_fields_and_sent_with_its_row() -> None:
    box, journal = journaled_outbox()
    await box.messages.start()
    try:
        assert box.messages.kept_in_journal == 0
        box.enqueue(status(1), spec(2), V0Heartbeat())
        expected_status = encode(status(1))
        assert journal.records == [
            ("V0JobStatusUpdate", expected_status, "00000000-0000-4000-8000-000000000001", "received"),
            ("V0MachineSpecsUpdate", encode(spec(2)), None, None),
        ], "heartbeats are not journaled"
        box.connection.answer = SUCCESS
        box.connection.up()
        await wait_until(lambda: len(box.acks) == 1 and len(box.sent) == 3, WAIT, "everything sent and answered")
        assert [(label(s.envelope.frame), s.envelope.seq) for s in box.sent] == [
            ("hb", 0), ("status1", 101), ("spec2", 102)
        ]
        # The spec update is done once written, the status update once answered; a heartbeat never was a row.
        assert sorted(journal.answers) == [101, 102]
    finally:
        await box.messages.stop()


async def test_nothing_goes_on_the_wire_before_its_journal_row_is_durable() -> None:
    box, journal = journaled_outbox()
    journal.durable_upto = 0
    await box.messages.start()
    try:
        assert journal.on_durable is not None, "the journal wakes the send loop when a commit lands"
        box.connection.up()
        box.enqueue(status(1))
        box.enqueue(V0Heartbeat())  # not journaled: goes out at once, proving the send loop ran
        await wait_until(lambda: box.connection.labels(1) == ["hb"], WAIT, "the heartbeat")
        assert box.connection.tried(1) == ["hb"], "the status update waits for its row to be durable"
        journal.durable_upto = 101
        journal.on_durable()
        await wait_until(lambda: box.connection.labels(1) == ["hb", "status1"], WAIT, "the durable update")
    finally:
        await box.messages.stop()


async def test_an_ack_of_any_outcome_answers_the_journal_row() -> None:
    box, journal = journaled_outbox()
    await box.messages.start()
    try:
        box.connection.answer = error("job.does_not_exist")
        box.connection.up()
        box.enqueue(status(1))
        await wait_until(lambda: len(box.acks) == 1, WAIT, "the error Response")
        assert box.acks[0].outcome == "error" and journal.answers == [101]
    finally:
        await box.messages.stop()


async def test_a_journaled_update_dropped_is_answered_and_one_left_at_stop_is_kept() -> None:
    box, journal = journaled_outbox(outbox_max_messages=2)
    await box.messages.start()
    box.enqueue(status(1), status(2), status(3))  # disconnected: the bound of two evicts status1
    assert [(label(d.item.frame), d.reason) for d in box.dropped] == [("status1", "outbox_full")]
    assert journal.answers == [101], "reported dropped: a restart must not resend it"
    await box.messages.stop()
    assert [(label(d.item.frame), d.reason) for d in box.dropped] == [("status1", "outbox_full")], (
        "kept in the journal for the next start, not reported dropped"
    )
    assert box.messages.kept_in_journal == 2 and journal.answers == [101]


async def test_restored_rows_go_out_first_in_order_as_they_were_journaled() -> None:
    box, journal = journaled_outbox()
    box.clock.now = 5.0
    frame = encode(status(7, JobStatus.ACCEPTED))
    box.messages.restore([
        PendingUpdate(7, "V0JobStatusUpdate", frame, "00000000-0000-4000-8000-000000000007", "accepted", 1.0),
        PendingUpdate(8, "V0MachineSpecsUpdate", encode(spec(8)), None, None, 2.0),
    ])
    with pytest.raises(ValueError, match=r"^journal row 3: V0Heartbeat is not a journaled message type$"):
        box.messages.restore([PendingUpdate(3, "V0Heartbeat", '{"message_type":"V0Heartbeat"}', None, None, 0.0)])
    with pytest.raises(ValueError, match=r"^journal row 4: Other is not a journaled message type$"):
        box.messages.restore([PendingUpdate(4, "Other", "{}", None, None, 0.0)])
    await box.messages.start()
    try:
        with pytest.raises(UsageError, match=r"^restore\(\) must be called before start\(\)$"):
            box.messages.restore([])
        box.enqueue(status(1))
        box.connection.answer = SUCCESS
        box.connection.up()
        await wait_until(lambda: len(box.sent) == 3, WAIT, "three frames")
        assert [label(s.envelope.frame) for s in box.sent] == ["status7", "spec8", "status1"]
        restored = box.sent[0].envelope
        assert (restored.kind, restored.frame, restored.policy, restored.enqueued_at) == (
            "V0JobStatusUpdate", frame, HoldPolicy.KEEP_ALL, 5.0
        )
        assert (restored.job_uuid, restored.status, restored.seq) == (
            "00000000-0000-4000-8000-000000000007", "accepted", 7
        )
        assert box.sent[1].envelope.policy is HoldPolicy.KEEP_BOUNDED and box.sent[1].envelope.seq == 8
        await wait_until(lambda: 7 in journal.answers and 8 in journal.answers, WAIT, "both restored rows answered")
    finally:
        await box.messages.stop()


def test_a_new_envelope_is_unsent_and_says_what_it_carries() -> None:
    envelope = Envelope("V0JobStatusUpdate", None, HoldPolicy.KEEP_ALL, 2.5, "job-1", "accepted")
    assert (envelope.sends, envelope.sent_at, envelope.unanswered, envelope.seq) == (0, 0.0, 0, 0)
    assert repr(envelope) == "<Envelope V0JobStatusUpdate job_uuid='job-1' status='accepted' sends=0 seq=0>"
    spec_envelope = Envelope("V0MachineSpecsUpdate", "{}", HoldPolicy.KEEP_BOUNDED, 0.0, seq=9)
    assert repr(spec_envelope) == "<Envelope V0MachineSpecsUpdate sends=0 seq=9>"
    frameless_spec = r"^only a status update with its job_uuid and status can be built without a frame$"
    with pytest.raises(ValueError, match=frameless_spec):
        Envelope("V0MachineSpecsUpdate", None, HoldPolicy.KEEP_BOUNDED, 0.0, "job-1", "accepted")


async def test_the_head_of_line_report_carries_its_age_since_enqueue() -> None:
    async with running() as box:
        heads: list[HeadOfLine] = []
        box.messages.head_of_line.subscribe(heads.append)
        box.clock.now = 2.0
        box.enqueue(status(1))
        box.connection.up()
        await wait_until(lambda: box.connection.labels(1) == ["status1"], WAIT, "the write")
        box.clock.now = 5.5
        box.connection.down()  # unanswered: the oldest unanswered update is now the head of the line
        assert [(label(h.envelope.frame), h.connections, h.age, h.suspected, h.answered) for h in heads] == [
            ("status1", 1, 3.5, False, False)
        ]
