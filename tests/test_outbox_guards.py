"""What the client refuses to send, and the stuck update it reports (issue 13).

- An update whose frame is over ``max_outbound_frame_bytes`` is refused at enqueue: the caller gets
  MessageTooLarge, an event and a metric say so, and the facilitator never sees it.
- Machine specs that do not fit the facilitator's hardware schema are refused the same way
  (InvalidSpecs, MESSAGE_DROPPED reason ``invalid_specs`` with the field errors).
- A status update that stays the oldest unanswered one over N connections that each ended without
  answering it is reported (SUSPECTED_POISON, ``outbox.head_age``) and never dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from reactivex.subject import Subject

from streams import ClientConfig
from streams.devtools.simulator import SUCCESS, FacilitatorSimulator
from streams.dispatchers.base import Report, StatusAck, StatusFeed
from streams.exceptions import InvalidSpecs, MessageRefused, MessageTooLarge, TransportClosed
from streams.message_manager import refusal
from streams.protocol import JobStatus, JobStatusUpdate, V0MachineSpecsUpdate, V2JobRequest, validate_specs
from streams.transport import MemoryPeer, memory_transport_pair
from tests.helpers import ALICE, fast_config, running_client, wait_until

pytestmark = pytest.mark.timeout(30)

CAPTURE = Path(__file__).resolve().parent.parent / "notebooks" / "data" / "real-facilitator-session.jsonl"
LIMIT = 64 * 1024
GOOD_SPECS: dict[str, Any] = {"os": "Ubuntu 24.04", "cpu": {"count": 8}, "ram": {"total": 1}, "hard_disk": {}}


def specs_update(specs: Any, batch_id: str) -> V0MachineSpecsUpdate:
    return V0MachineSpecsUpdate(
        miner_hotkey="5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty",
        validator_hotkey=ALICE.ss58_address,
        specs=specs,
        batch_id=batch_id,
    )


def received_batches(sim: FacilitatorSimulator) -> list[str]:
    return [frame["batch_id"] for frame in sim.frames_of("V0MachineSpecsUpdate")]


def largest_frame(sim: FacilitatorSimulator) -> int:
    return max(len(r.frame) for r in sim.received)


# -- the frame size limit ---------------------------------------------------------------------


def test_the_default_limit_is_productions_16_mib_and_the_check_counts_utf8_bytes() -> None:
    assert ClientConfig(url="ws://127.0.0.1:1/ws/v0/").max_outbound_frame_bytes == 16 * 2**20
    update = JobStatusUpdate(uuid=str(uuid.uuid4()), status=JobStatus.ACCEPTED)
    frame = '{"x":"' + "a" * 94 + '"}'
    assert len(frame) == 102
    assert refusal(update, frame, 102) is None, "exactly at the limit passes"
    too_large = refusal(update, frame, 101)
    assert isinstance(too_large, MessageTooLarge) and (too_large.size, too_large.limit) == (102, 101)
    assert too_large.kind == "V0JobStatusUpdate"
    wide = '"' + "é" * 50 + '"'  # 52 characters, 102 UTF-8 bytes
    error = refusal(update, wide, 101)
    assert isinstance(error, MessageTooLarge) and error.size == 102
    assert "102 bytes" in str(error) and "101 byte limit" in str(error)
    assert isinstance(error, ValueError), "a ValueError, as a bad argument should be"


async def test_an_oversized_status_update_is_refused_at_the_call_and_never_reaches_the_facilitator() -> None:
    refused: list[MessageTooLarge] = []

    async def handle(job: V2JobRequest, report: Report) -> None:
        huge = {"miner_response": {"docker_process_stdout": "x" * (2 * LIMIT), "docker_process_stderr": ""}}
        try:
            report(JobStatus.COMPLETED, huge)
        except MessageTooLarge as exc:
            refused.append(exc)
        small = {"miner_response": {"docker_process_stdout": "truncated", "docker_process_stderr": ""}}
        assert report(JobStatus.COMPLETED, small), "the job's stream is still open after a refusal"

    async with FacilitatorSimulator(seed=31) as sim:
        async with running_client(fast_config(sim.url, max_outbound_frame_bytes=LIMIT), handle) as run:
            await sim.wait_for_validator()
            job = await sim.send_job_request()
            await sim.wait_for(lambda: sim.stored[job["uuid"]][-1] == "completed", 5, "the small completed stored")
            await wait_until(lambda: run.client.pending.pending == 0, 5, "outbox empty")

            assert len(refused) == 1
            assert refused[0].size > 2 * LIMIT and refused[0].limit == LIMIT
            assert sim.stored[job["uuid"]] == ["sent", "received", "completed"]
            assert sim.stored_metadata[job["uuid"]][-1]["miner_response"]["docker_process_stdout"] == "truncated"
            assert largest_frame(sim) < LIMIT, "the oversized frame never reached the wire"
            [event] = run.events_of("MESSAGE_DROPPED")
            assert event.data["reason"] == "too_large"
            assert (event.data["frame_bytes"], event.data["limit"]) == (refused[0].size, LIMIT)
            assert event.data["job_uuid"] == job["uuid"] and event.data["status"] == "completed"
            assert str(LIMIT) in event.description
            assert run.counters["messages.refused.too_large"] == 1
            assert run.counters["messages.dropped.V0JobStatusUpdate"] == 1


async def test_oversized_specs_raise_from_publish_specs_and_are_only_reported_from_a_source() -> None:
    big = {**GOOD_SPECS, "notes": "y" * (2 * LIMIT)}  # extra top-level keys are allowed: only the size is wrong
    source: Subject[V0MachineSpecsUpdate] = Subject()
    async with FacilitatorSimulator(seed=32) as sim:
        config = fast_config(sim.url, max_outbound_frame_bytes=LIMIT)
        async with running_client(config, spec_updates=source) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            with pytest.raises(MessageTooLarge, match="over the 65536 byte limit"):
                run.client.publish_specs(specs_update(big, "direct-big"))
            source.on_next(specs_update(big, "source-big"))  # does not raise into the source
            source.on_next(specs_update(GOOD_SPECS, "source-good"))  # the source keeps working
            run.client.publish_specs(specs_update(GOOD_SPECS, "direct-good"))
            await sim.wait_for(lambda: len(received_batches(sim)) == 2, 5, "the two good spec updates")
            assert received_batches(sim) == ["source-good", "direct-good"]
            assert largest_frame(sim) < LIMIT
            dropped = run.events_of("MESSAGE_DROPPED")
            assert [e.data["reason"] for e in dropped] == ["too_large", "too_large"]
            assert [e.data["excerpt"][-12:] for e in dropped] == [dropped[0].data["excerpt"][-12:]] * 2
            assert run.counters["messages.refused.too_large"] == 2
            assert not run.events_of("SOURCE_FAILED")


class FeedOnly:
    """A FeedingDispatcher (like Celery's): statuses come through the feed it is bound to."""

    def __init__(self) -> None:
        self.feed: StatusFeed | None = None
        self.acks: list[StatusAck] = []

    def bind(self, feed: StatusFeed) -> None:
        self.feed = feed
        feed.acks.subscribe(self.acks.append)

    async def handle(self, job: V2JobRequest, report: Report) -> None:
        return None


async def test_an_oversized_update_from_a_status_feed_is_answered_refused_not_raised() -> None:
    dispatcher = FeedOnly()
    async with FacilitatorSimulator(seed=33) as sim:
        async with running_client(fast_config(sim.url, max_outbound_frame_bytes=LIMIT), dispatcher) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            job_uuid = sim.register_job(str(uuid.uuid4()))
            feed = dispatcher.feed
            assert feed is not None
            huge = {"job_failure_details": {"reason": "timeout", "stage": "execution", "message": "z" * 2 * LIMIT}}
            assert feed.report(job_uuid, "failed", huge) is False
            assert dispatcher.acks == [StatusAck(job_uuid, "failed", "refused")], "the feed may forget it"
            assert feed.report(job_uuid, "failed", {"job_failure_details": {
                "reason": "timeout", "stage": "execution", "message": "too long to report"}}) is True
            await sim.wait_for(lambda: sim.stored[job_uuid] == ["sent", "failed"], 5, "the small failure stored")
            assert largest_frame(sim) < LIMIT
            assert [e.data["reason"] for e in run.events_of("MESSAGE_DROPPED")] == ["too_large"]


# -- machine specs --------------------------------------------------------------------------------


def test_the_real_captured_specs_fit_the_schema() -> None:
    found = 0
    for line in CAPTURE.read_text().splitlines():
        record = orjson.loads(line)
        frame = record.get("frame")
        if isinstance(frame, str) and '"V0MachineSpecsUpdate"' in frame:
            found += 1
            assert validate_specs(orjson.loads(frame)["specs"]) == []
    assert found >= 1


@pytest.mark.parametrize(
    ("specs", "errors"),
    [
        (GOOD_SPECS, []),
        ({**GOOD_SPECS, "anything": {"else": 1}}, []),  # top level: extra keys allowed
        ({"cpu": {"count": "8", "frequency": "2.5", "clocks": [1, 2.5]}, "ram": {"total": "", "swap_used": ""},
          "hard_disk": {"total": "", "read_speed": "1.5"}, "gpu": None, "has_docker": True}, []),
        ({**GOOD_SPECS, "gpu": {"count": 1, "details": [{"name": "A6000", "power_limit": "[N/A]"}]}}, []),
        ({"ram": {}, "hard_disk": {}}, ["cpu: Field required"]),
        ({"cpu": {"count": 8}}, ["hard_disk: Field required", "ram: Field required"]),
        ({**GOOD_SPECS, "cpu": {}}, ["cpu.count: Field required"]),
        ({**GOOD_SPECS, "cpu": {"count": 8, "cores": 4}}, ["cpu.cores: Extra inputs are not permitted"]),
        ({**GOOD_SPECS, "cpu": {"count": 2.5}}, ["cpu.count: Input should be a valid integer"]),
        # "" is null only in ram and hard_disk
        ({**GOOD_SPECS, "cpu": {"count": ""}}, ["cpu.count: Input should be a valid integer"]),
        ({**GOOD_SPECS, "cpu": {"count": 1, "frequency": "fast"}}, ["cpu.frequency: Input should be a valid decimal"]),
        ({**GOOD_SPECS, "ram": {"size": 1}}, ["ram.size: Extra inputs are not permitted"]),
        ({**GOOD_SPECS, "ram": {"total": "lots"}}, ["ram.total: Input should be a valid number"]),
        ({**GOOD_SPECS, "hard_disk": {"model": "x"}}, ["hard_disk.model: Extra inputs are not permitted"]),
        ({**GOOD_SPECS, "gpu": {"vendor": "x"}}, ["gpu.vendor: Extra inputs are not permitted"]),
        ({**GOOD_SPECS, "gpu": {"details": [{"capacity": 1}]}}, ["gpu.details.0.name: Field required"]),
        ({**GOOD_SPECS, "gpu": {"details": [{"name": "A", "fan": 1}]}},
         ["gpu.details.0.fan: Extra inputs are not permitted"]),
        ({**GOOD_SPECS, "has_docker": "maybe"}, ["has_docker: Input should be a valid boolean"]),
        ({**GOOD_SPECS, "os": 24}, ["os: Input should be a valid string"]),
    ],
)
def test_specs_schema(specs: dict[str, Any], errors: list[str]) -> None:
    found = validate_specs(specs)
    assert len(found) == len(errors), found
    for problem, expected in zip(sorted(found), sorted(errors), strict=True):
        assert problem.startswith(expected), (problem, expected)


async def test_invalid_specs_never_reach_the_facilitator_and_are_reported_with_their_field_errors() -> None:
    bad = {"os": "Ubuntu", "cpu": {"count": 8, "cores": 4}, "ram": {"total": "lots"}}
    source: Subject[V0MachineSpecsUpdate] = Subject()
    async with FacilitatorSimulator(seed=34) as sim:
        async with running_client(fast_config(sim.url), spec_updates=source) as run:
            early = specs_update(bad, "early-bad")
            run.client.publish_specs(early)  # before the client runs: checked at start, only reported
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            with pytest.raises(InvalidSpecs) as caught:
                run.client.publish_specs(specs_update(bad, "direct-bad"))
            assert isinstance(caught.value, ValueError) and isinstance(caught.value, MessageRefused)
            assert caught.value.kind == "V0MachineSpecsUpdate"
            assert "cpu.cores: Extra inputs are not permitted" in str(caught.value)
            source.on_next(specs_update(bad, "source-bad"))
            source.on_next(specs_update(GOOD_SPECS, "source-good"))
            run.client.publish_specs(specs_update(GOOD_SPECS, "direct-good"))
            await sim.wait_for(lambda: len(received_batches(sim)) == 2, 5, "the two good updates")

            assert received_batches(sim) == ["source-good", "direct-good"]
            assert not [r for r in sim.received if r.parsed and "bad" in str(r.parsed.get("batch_id"))]
            dropped = run.events_of("MESSAGE_DROPPED")
            assert [e.data["reason"] for e in dropped] == ["invalid_specs"] * 3
            for event in dropped:
                assert event.data["message_type"] == "V0MachineSpecsUpdate"
                errors = event.data["errors"]
                assert len(errors) == 3, errors
                assert "cpu.cores: Extra inputs are not permitted" in errors
                assert "hard_disk: Field required" in errors
                assert any(e.startswith("ram.total: Input should be a valid number") for e in errors)
            assert run.counters["messages.refused.invalid_specs"] == 3
            assert not run.events_of("SOURCE_FAILED")


# -- head-of-line watch ---------------------------------------------------------------------------

AUTH_SUCCESS = SUCCESS


class Facilitator:
    """A scripted facilitator on the in-memory transport: it drops the connection whenever the
    ``poison`` job's status arrives, for the first ``drops`` connections, and answers the rest."""

    def __init__(self, peer: MemoryPeer, poison: str, drops: int) -> None:
        self.peer = peer
        self.poison = poison
        self.drops = drops
        self.statuses: list[tuple[int, str, str]] = []
        """(connection number, job uuid, status) of every status update received."""

    async def run(self) -> None:
        number = 0
        while True:
            number = await self.peer.wait_connected(number + 1, timeout=20)
            with contextlib.suppress(TransportClosed):
                auth = orjson.loads(await self.peer.recv())
                assert auth["message_type"] == "V0AuthenticationRequest"
                await self.peer.send(AUTH_SUCCESS)
                while True:
                    message = orjson.loads(await self.peer.recv())
                    if message["message_type"] != "V0JobStatusUpdate":
                        continue
                    self.statuses.append((number, message["uuid"], message["status"]))
                    if message["uuid"] == self.poison and number <= self.drops:
                        await self.peer.drop()  # the real one's handler crashes: no Response, TCP drop
                        break
                    await self.peer.send(AUTH_SUCCESS)


@contextlib.asynccontextmanager
async def facilitator(peer: MemoryPeer, poison: str, drops: int) -> AsyncIterator[Facilitator]:
    script = Facilitator(peer, poison, drops)
    task = asyncio.create_task(script.run(), name="scripted-facilitator")
    try:
        yield script
    finally:
        task.cancel()
        await asyncio.wait([task])


async def test_a_stuck_head_of_line_update_is_reported_after_n_connections_and_never_dropped() -> None:
    poison, behind = str(uuid.uuid4()), str(uuid.uuid4())
    transport, peer = memory_transport_pair()
    config = fast_config("ws://127.0.0.1:1/ws/v0/", poison_after_connections=3)
    async with facilitator(peer, poison, drops=4) as script:
        async with running_client(config, transport=transport) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            run.client._statuses.open(poison)("accepted")
            run.client._statuses.open(behind)("accepted")
            await wait_until(lambda: run.events_of("SUSPECTED_POISON"), 10, "the suspected poison reported")
            first = run.events_of("SUSPECTED_POISON")[0]
            assert first.data["connections"] == 3 and first.data["sends"] == 3
            assert first.data["job_uuid"] == poison and first.data["status"] == "accepted"
            assert poison in first.data["excerpt"]
            assert first.data["message_type"] == "V0JobStatusUpdate"
            assert first.data["age"] > 0
            assert run.client.pending.pending == 2, "kept, with the update behind it"
            order = [str(e.type) for e in run.events if e.type in ("DISCONNECTED", "SUSPECTED_POISON")]
            assert order[:4] == ["DISCONNECTED"] * 3 + ["SUSPECTED_POISON"], "reported when the third one ended"

            await wait_until(lambda: run.client.pending.pending == 0, 10, "answered on the fifth connection")
            assert [e.data["connections"] for e in run.events_of("SUSPECTED_POISON")] == [3, 4]
            assert not run.events_of("MESSAGE_DROPPED"), "never dropped"
            assert run.counters["outbox.suspected_poison"] == 2
            assert run.client.metrics.snapshot()["gauges"]["outbox.head_age"] == 0.0, "reset once answered"
        sent_poison = [conn for conn, job, _ in script.statuses if job == poison]
        assert sent_poison == [1, 2, 3, 4, 5], "resent first on every connection until answered"
        last = [job for conn, job, _ in script.statuses if conn == 5]
        assert last == [poison, behind], "order kept: the update behind it waited"


async def test_head_age_is_a_gauge_and_an_update_answered_in_time_is_not_suspected() -> None:
    poison = str(uuid.uuid4())
    transport, peer = memory_transport_pair()
    config = fast_config("ws://127.0.0.1:1/ws/v0/", poison_after_connections=3)
    async with facilitator(peer, poison, drops=2) as script:
        async with running_client(config, transport=transport) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            assert "outbox.head_age" not in run.client.metrics.snapshot()["gauges"]
            reported = time.monotonic()
            run.client._statuses.open(poison)("accepted")
            await wait_until(lambda: len(run.events_of("DISCONNECTED")) >= 1, 5, "first drop")
            gauges = run.client.metrics.snapshot()["gauges"]
            # (in ms precision: on a fast machine the drop may come within a millisecond of the report)
            assert "outbox.head_age" in gauges, "the head's age is published when a connection ends unanswered"
            assert 0 <= gauges["outbox.head_age"] <= time.monotonic() - reported + 0.001
            await wait_until(lambda: run.client.pending.pending == 0, 10, "answered on the third connection")
            assert run.client.metrics.snapshot()["gauges"]["outbox.head_age"] == 0.0
            assert not run.events_of("SUSPECTED_POISON"), "two connections are below the threshold of three"
        assert [conn for conn, job, _ in script.statuses if job == poison] == [1, 2, 3]
