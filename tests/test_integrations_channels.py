"""The Django Channels adapters against a real redis-server through channels_redis.

The validator's spec producer and job driver run as a separate process (tests/channels_peer.py) and send
exactly what the validator sends; the facilitator is the simulator.
"""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

try:
    import channels_redis  # noqa: F401
except ImportError as exc:  # pragma: no cover - make test installs the extra
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip(f"the channels extra is not installed (make test installs it): {exc}", allow_module_level=True)
    raise

from streams.devtools.simulator import FacilitatorSimulator
from streams.dispatchers import Report
from streams.integrations.channels import (
    ChannelLayer,
    ChannelsDispatcher,
    ChannelSpecSource,
    MetadataRejected,
    parse_spec_message,
    parse_status_message,
    redis_channel_layer,
    status_channel,
)
from streams.protocol import JobStatus, V2JobRequest
from tests.channels_peer import JOBS_CHANNEL, spec_message, status_message
from tests.helpers import ALICE, FULL_SEQUENCE, fast_config, running_client, wait_until
from tests.redis_fixtures import ROOT, RedisServer

pytestmark = pytest.mark.timeout(60)

DONE = ["sent", *FULL_SEQUENCE]
FAILED = ["sent", *FULL_SEQUENCE[:-1], "failed"]


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("channels")) as server:
        yield server


@pytest.fixture
async def layer(redis_server: RedisServer) -> AsyncIterator[ChannelLayer]:
    """The validator's channel layer (for what the test itself sends); every channel emptied before and after."""
    channel_layer = redis_channel_layer(redis_server.url)
    await channel_layer.flush()  # type: ignore[attr-defined]
    try:
        yield channel_layer
    finally:
        await channel_layer.flush()  # type: ignore[attr-defined]  # also closes its connections


class Peer:
    """``python -m tests.channels_peer ...``: the validator's producer or driver, in its own process."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.channels_peer", *args], cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
        )

    async def finished(self, timeout: float = 20) -> None:
        try:
            out, err = await asyncio.to_thread(self.proc.communicate, timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the channels peer did not finish within {timeout} s") from None
        assert self.proc.returncode == 0 and b"done" in out, f"peer failed ({self.proc.returncode}): {err.decode()}"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=10)


async def peer(*args: str, timeout: float = 20) -> None:
    process = Peer(*args)
    try:
        await process.finished(timeout)
    finally:
        process.kill()


def operations(run: Any, event_type: str) -> list[str]:
    return [event.data.get("operation") for event in run.events_of(event_type)]


# --------------------------------------------------------------------------- message parsing


def test_spec_messages_are_checked_and_get_our_hotkey() -> None:
    update = parse_spec_message({**spec_message(7), "validator_hotkey": "5SomeoneElse"}, ALICE.ss58_address)
    assert update.validator_hotkey == ALICE.ss58_address and update.batch_id == "batch-7"
    assert update.miner_hotkey == "5Miner0007" and update.specs == spec_message(7)["specs"]
    cases = [
        ("not a dict", "must be a dict, got a string"),
        ({"specs": {}, "miner_hotkey": "5M"}, "lacks batch_id"),
        ({"specs": [], "miner_hotkey": "5M", "batch_id": "b"}, "specs must be an object, got an array"),
        ({"specs": {}, "miner_hotkey": "", "batch_id": "b"}, "miner_hotkey must be a non-empty string"),
        ({"specs": {}, "miner_hotkey": "5M", "batch_id": 3}, "batch_id must be a non-empty string"),
    ]
    for message, expected in cases:
        with pytest.raises(ValueError, match=expected):
            parse_spec_message(message, ALICE.ss58_address)


def test_status_messages_are_checked_against_their_job() -> None:
    job = str(uuid.uuid4())
    update = parse_status_message(status_message(job, "accepted"), job)
    assert (update.uuid, update.status, update.metadata) == (job, JobStatus.ACCEPTED, None)
    as_text = {"type": "job_status_update", "payload": orjson.dumps({"uuid": job.upper(), "status": "completed"})}
    assert parse_status_message(as_text, job).status is JobStatus.COMPLETED  # JSON text, any uuid spelling
    cases = [
        ([1], "must be a dict, got an array"),
        ({"type": "job.new", "payload": {}}, "type must be 'job_status_update'"),
        ({"type": "job_status_update", "payload": "{"}, "payload is not valid JSON"),
        ({"type": "job_status_update"}, "payload must be a JobStatusUpdate object, got null"),
        (status_message(str(uuid.uuid4()), "accepted"), "is for job"),
        (status_message(job, "bogus"), "unknown status 'bogus'"),
    ]
    for message, expected in cases:
        with pytest.raises(ValueError, match=expected):
            parse_status_message(message, job)
    with pytest.raises(MetadataRejected, match="failed metadata the facilitator would refuse") as caught:
        parse_status_message(status_message(job, "failed", {"job_failure_details": {"reason": "x"}}), job)
    assert caught.value.update.status is JobStatus.FAILED and caught.value.update.metadata is None
    with pytest.raises(ValueError, match="not a UUID"):
        status_channel("job-1")
    assert status_channel(job.upper()) == f"job_status_updates__{job}"


def test_bad_arguments_say_what_is_wrong() -> None:
    with pytest.raises(ValueError, match="needs a Redis URL"):
        redis_channel_layer("http://127.0.0.1:6379")
    with pytest.raises(ValueError, match="validator_hotkey must be"):
        ChannelSpecSource("redis://127.0.0.1:1/0", "")
    with pytest.raises(TypeError, match="channel layer with async receive"):
        ChannelSpecSource(object(), ALICE.ss58_address)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="idle_timeout must be > 0"):
        ChannelsDispatcher(lambda job, report: asyncio.sleep(0), "redis://127.0.0.1:1/0", idle_timeout=0)


# --------------------------------------------------------------------------- machine specs


async def test_specs_from_a_separate_process_reach_the_facilitator_in_order_across_a_disconnect(
    redis_server: RedisServer, layer: ChannelLayer
) -> None:
    source = ChannelSpecSource(redis_server.url, ALICE.ss58_address)
    first = FacilitatorSimulator(seed=31)
    await first.start()
    second = FacilitatorSimulator(port=first.port, seed=32)
    try:
        async with running_client(fast_config(first.url), spec_updates=source) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            await peer("specs", redis_server.url, "--first", "0", "--count", "10", "--malformed-after", "5")
            await first.wait_for(lambda: len(first.spec_updates) == 10, 10, "the first 10 spec updates")
            await wait_until(lambda: "message" in operations(run, "SOURCE_FAILED"), 5, "the malformed one reported")

            await first.stop()  # the facilitator goes away; the producer keeps sending
            await wait_until(lambda: not run.client.is_connected, 5, "disconnected")
            await peer("specs", redis_server.url, "--first", "10", "--count", "10")
            await wait_until(lambda: source.received == 20, 10, "the next 10 received while disconnected")
            assert run.client.pending.pending == 10, "held in the outbox"
            await second.start()  # back, on the same address
            await second.wait_for(lambda: len(second.spec_updates) == 10, 10, "the held spec updates")
    finally:
        await first.stop()
        await second.stop()
    arrived = first.spec_updates + second.spec_updates
    assert [update["batch_id"] for update in arrived] == [f"batch-{i}" for i in range(20)]
    assert all(update["validator_hotkey"] == ALICE.ss58_address for update in arrived)
    sent = spec_message(13)
    assert arrived[13] == {"message_type": "V0MachineSpecsUpdate", "validator_hotkey": ALICE.ss58_address, **sent}
    failure = next(e for e in run.events_of("SOURCE_FAILED") if e.data["operation"] == "message")
    assert failure.subtype == "spec_updates" and "lacks batch_id" in failure.data["message"]
    assert source.malformed == 1 and run.counters["source.failures.message"] == 1
    assert not first.violations and not second.violations


async def test_a_channel_layer_outage_is_reported_and_retried(tmp_path: Path) -> None:
    with RedisServer(tmp_path) as server:
        source = ChannelSpecSource(server.url, ALICE.ss58_address, backoff_base=0.05, backoff_cap=0.2)
        async with FacilitatorSimulator(seed=33) as sim:
            async with running_client(fast_config(sim.url), spec_updates=source) as run:
                await wait_until(lambda: run.client.is_connected, 5, "connected")
                await peer("specs", server.url, "--first", "0", "--count", "3")
                await sim.wait_for(lambda: len(sim.spec_updates) == 3, 10, "3 spec updates")
                server.kill()
                await wait_until(lambda: "receive" in operations(run, "SOURCE_FAILED"), 15, "the outage reported")
                server.start()
                await peer("specs", server.url, "--first", "3", "--count", "3")
                await sim.wait_for(lambda: len(sim.spec_updates) == 6, 15, "3 more after Redis came back")
                assert run.client.is_connected, "the outage never touched the facilitator connection"
        assert [update["batch_id"] for update in sim.spec_updates] == [f"batch-{i}" for i in range(6)]
        outage = next(e for e in run.events_of("SOURCE_FAILED") if e.data["operation"] == "receive")
        assert outage.data["retry_in"] is not None and outage.data["exception"]
        assert run.counters["source.failures.receive"] >= 1


# --------------------------------------------------------------------------- job statuses


@pytest.mark.timeout(90)
async def test_100_jobs_statuses_from_a_separate_process_arrive_complete_and_in_order_through_chaos(
    redis_server: RedisServer, layer: ChannelLayer
) -> None:
    seed = 20261203
    print(f"chaos seed {seed}")

    async def route_job(job: V2JobRequest, report: Report) -> None:
        """The host's job routing: hand the job to the job driver (in the validator: a Celery task)."""
        await layer.send(JOBS_CHANNEL, {"job_uuid": job.uuid, "fail": "FAIL" in job.env, "malformed": "BAD" in job.env})

    dispatcher = ChannelsDispatcher(route_job, redis_server.url)
    driver = Peer("driver", redis_server.url, "--jobs", "100", "--step-delay", "0.05", "--stagger", "0.015")
    try:
        async with FacilitatorSimulator(seed=seed) as sim:
            config = fast_config(sim.url, ping_interval=0.2, ping_timeout=0.2, close_timeout=0.3, send_timeout=1.0)
            async with running_client(config, dispatcher) as run:
                await sim.wait_for_validator()
                env = [{"FAIL": "1"} if i % 10 == 3 else {"BAD": "1"} if i % 25 == 7 else {} for i in range(100)]
                jobs = [await sim.send_job_request(env=env[i]) for i in range(100)]
                await wait_until(lambda: run.counters.get("jobs.dispatched", 0) == 100, 10, "every job dispatched")
                sim.chaos(every=60, kinds=("drop", "close", "stall"), rng=random.Random(seed))
                await sim.wait_for(
                    lambda: all(sim.stored[job["uuid"]][-1] in ("completed", "failed") for job in jobs),
                    60, "every job finished",
                )
                sim.chaos(every=0)
                await wait_until(lambda: run.client.pending.pending == 0, 10, "outbox empty")
                faults = len(sim.faults)
            await driver.finished()
    finally:
        driver.kill()
    failing = {job["uuid"] for job in jobs if "FAIL" in job["env"]}
    for job in jobs:
        assert sim.stored[job["uuid"]] == (FAILED if job["uuid"] in failing else DONE), job["uuid"]
    done = jobs[0]["uuid"]
    assert sim.stored_metadata[done][-1]["miner_response"]["docker_process_stdout"] == f"done {done}"
    assert sim.stored_metadata[jobs[3]["uuid"]][-1]["job_failure_details"]["reason"] == "nonzero_return_code"
    assert faults >= 3, f"chaos injected only {faults} faults"
    assert run.counters.get("messages.resent.V0JobStatusUpdate", 0) > 0, "the faults hit statuses in flight"
    assert dispatcher.forwarded == 500 and dispatcher.malformed == 4
    assert operations(run, "DISPATCHER_FAILED").count("message") == 4
    assert not sim.violations, sim.violations
    print(f"faults={faults} connections={sim.connections}")


async def test_the_host_reporting_a_final_status_itself_ends_the_listening(
    redis_server: RedisServer, layer: ChannelLayer
) -> None:
    """No miner for the job: the host rejects it at once; nothing waits for the driver."""

    async def route_job(job: V2JobRequest, report: Report) -> None:
        report(JobStatus.REJECTED, {"job_rejection_details": {"rejected_by": "validator", "reason": "no_miner_for_job",
                                                              "message": "no miner"}})

    dispatcher = ChannelsDispatcher(route_job, redis_server.url)
    async with FacilitatorSimulator(seed=34) as sim:
        async with running_client(fast_config(sim.url), dispatcher) as run:
            await sim.wait_for_validator()
            job = await sim.send_job_request()
            await sim.wait_for(lambda: sim.stored[job["uuid"]][-1] == "rejected", 10, "rejected")
            await wait_until(lambda: run.client.metrics.gauge_value("jobs.active") == 0, 5, "the job task ended")
    assert sim.stored[job["uuid"]] == ["sent", "received", "rejected"]


async def test_bad_metadata_is_dropped_a_driver_received_is_skipped_and_silence_times_out(
    redis_server: RedisServer, layer: ChannelLayer
) -> None:
    async def route_job(job: V2JobRequest, report: Report) -> None:
        channel = f"job_status_updates__{job.uuid}"
        if job.env.get("MODE") == "silent":
            return  # the driver never answers
        await layer.send(channel, status_message(job.uuid, "received"))  # the client reported it already
        await layer.send(channel, status_message(job.uuid, "accepted"))
        await layer.send(channel, status_message(job.uuid, "failed", {"job_failure_details": {"reason": "x"}}))

    dispatcher = ChannelsDispatcher(route_job, redis_server.url, idle_timeout=0.5)
    async with FacilitatorSimulator(seed=35) as sim:
        async with running_client(fast_config(sim.url), dispatcher) as run:
            await sim.wait_for_validator()
            bad = await sim.send_job_request()
            silent = await sim.send_job_request(env={"MODE": "silent"})
            await sim.wait_for(
                lambda: sim.stored[bad["uuid"]][-1] == "failed" and sim.stored[silent["uuid"]][-1] == "horde_failed",
                10, "both jobs ended",
            )
    assert sim.stored[bad["uuid"]] == ["sent", "received", "accepted", "failed"]
    assert sim.stored_metadata[bad["uuid"]][-1] in ({}, None)
    horde = sim.stored_metadata[silent["uuid"]][-1]["horde_failure_details"]
    assert horde["reason"] == "unhandled_timeout" and "no status on job_status_updates__" in horde["message"]
    assert sorted(operations(run, "DISPATCHER_FAILED")) == ["metadata", "timeout"]
    assert run.counters["dispatcher.failures.metadata"] == 1 and run.counters["dispatcher.failures.timeout"] == 1


async def test_a_channel_layer_outage_while_a_job_runs_is_reported_and_its_statuses_still_arrive(
    tmp_path: Path,
) -> None:
    with RedisServer(tmp_path) as server:
        handed_over: asyncio.Queue[str] = asyncio.Queue()

        async def route_job(job: V2JobRequest, report: Report) -> None:
            handed_over.put_nowait(job.uuid)

        dispatcher = ChannelsDispatcher(route_job, server.url, backoff_base=0.05, backoff_cap=0.2)
        async with FacilitatorSimulator(seed=36) as sim:
            async with running_client(fast_config(sim.url), dispatcher) as run:
                await sim.wait_for_validator()
                job = await sim.send_job_request()
                job_uuid = await asyncio.wait_for(handed_over.get(), 10)
                before = redis_channel_layer(server.url)
                await before.send(status_channel(job_uuid), status_message(job_uuid, "accepted"))
                await before.close_pools()  # type: ignore[attr-defined]
                await sim.wait_for(lambda: sim.stored[job_uuid][-1] == "accepted", 10, "accepted")
                server.kill()
                await wait_until(lambda: "receive" in operations(run, "DISPATCHER_FAILED"), 15, "the outage reported")
                server.start()
                after = redis_channel_layer(server.url)
                for status in ("executor_ready", "volumes_ready", "execution_done"):
                    await after.send(status_channel(job_uuid), status_message(job_uuid, status))
                await after.send(status_channel(job_uuid), status_message(job_uuid, "completed", {
                    "miner_response": {"docker_process_stdout": "ok", "docker_process_stderr": ""}}))
                await after.close_pools()  # type: ignore[attr-defined]
                await sim.wait_for(lambda: sim.stored[job_uuid][-1] == "completed", 15, "the job completed")
        assert sim.stored[job["uuid"]] == DONE
        outage = next(e for e in run.events_of("DISPATCHER_FAILED") if e.data["operation"] == "receive")
        assert outage.data["retry_in"] is not None
        assert dispatcher.forwarded == 5
