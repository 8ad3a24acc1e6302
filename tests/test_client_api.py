"""The public surface: construction errors, async with, spec sources, status streams, misuse."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import reactivex

from streams import ClientConfig, ConfigError, ConnectionState, FacilitatorClient, SimulatedDispatcher
from streams.devtools.simulator import FacilitatorSimulator
from streams.protocol import JobStatus, V0MachineSpecsUpdate
from tests.helpers import ALICE, fast_config, running_client, wait_until

pytestmark = pytest.mark.timeout(30)


def spec(n: int) -> V0MachineSpecsUpdate:
    return V0MachineSpecsUpdate(
        miner_hotkey="5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty",
        validator_hotkey=ALICE.ss58_address,
        specs={"os": "Ubuntu", "n": n, "cpu": {"count": 8}, "ram": {}, "hard_disk": {}},
        batch_id=f"b{n}",
    )


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match="ws:// or wss://"):
        ClientConfig(url="127.0.0.1:8765")
    with pytest.raises(ConfigError, match=r"heartbeat_period must be a finite number in \[0.05, 120\] \(s"):
        ClientConfig(url="ws://h/ws/v0/", heartbeat_period=0)
    with pytest.raises(ConfigError, match="backoff_base"):
        ClientConfig(url="ws://h/ws/v0/", backoff_base=10, backoff_cap=1)
    assert ClientConfig(url="ws://h/", validator_version="1.2").headers == {"X-Validator-Version": "1.2"}


def test_constructor_rejects_a_bad_signer_or_dispatcher() -> None:
    config = ClientConfig(url="ws://127.0.0.1:1/ws/v0/")
    with pytest.raises(TypeError, match="signer needs"):
        FacilitatorClient(config, signer=object(), dispatcher=SimulatedDispatcher())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="dispatcher must"):
        FacilitatorClient(config, signer=ALICE, dispatcher=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="spec_updates must"):
        FacilitatorClient(config, signer=ALICE, dispatcher=SimulatedDispatcher(), spec_updates=[1])  # type: ignore[arg-type]


async def test_async_with_runs_the_client_in_the_background_and_states_are_observable() -> None:
    states: list[ConnectionState] = []
    async with FacilitatorSimulator(seed=31) as sim:
        client = FacilitatorClient(fast_config(sim.url), signer=ALICE, dispatcher=SimulatedDispatcher(0))
        client.state.subscribe(states.append)
        async with client:
            await wait_until(lambda: client.is_connected, 5, "connected")
            with pytest.raises(RuntimeError, match="called once"):
                await client.start()
        assert states[:4] == [
            ConnectionState.DISCONNECTED,
            ConnectionState.CONNECTING,
            ConnectionState.AUTHENTICATING,
            ConnectionState.CONNECTED,
        ]
        assert states[-1] is ConnectionState.DISCONNECTED


async def test_spec_updates_from_an_observable_an_async_iterable_and_publish_before_start() -> None:
    async def updates() -> AsyncIterator[V0MachineSpecsUpdate]:
        for n in (10, 11):
            yield spec(n)

    async with FacilitatorSimulator(seed=32) as sim:
        client = FacilitatorClient(
            fast_config(sim.url), signer=ALICE, dispatcher=SimulatedDispatcher(0), spec_updates=updates()
        )
        client.publish_specs(spec(0))  # before start: kept and sent first
        async with client:
            await sim.wait_for(lambda: len(sim.spec_updates) == 3, 5, "three spec updates")
            client.publish_specs(spec(1))
            await sim.wait_for(lambda: len(sim.spec_updates) == 4, 5, "four spec updates")
        assert [s["batch_id"] for s in sim.spec_updates] == ["b0", "b10", "b11", "b1"]

        observable = FacilitatorClient(
            fast_config(sim.url), signer=ALICE, dispatcher=SimulatedDispatcher(0),
            spec_updates=reactivex.from_iterable([spec(20), spec(21)]),
        )
        async with observable:
            await sim.wait_for(lambda: len(sim.spec_updates) == 6, 5, "observable spec updates")
        assert [s["batch_id"] for s in sim.spec_updates[4:]] == ["b20", "b21"]


async def test_a_failing_spec_source_is_reported_not_fatal() -> None:
    async def broken() -> AsyncIterator[V0MachineSpecsUpdate]:
        yield spec(1)
        raise OSError("sensor unreachable")

    async with FacilitatorSimulator(seed=33) as sim:
        async with running_client(fast_config(sim.url), spec_updates=broken()) as run:
            await wait_until(lambda: run.events_of("SOURCE_FAILED"), 5, "source failure reported")
            assert "sensor unreachable" in run.events_of("SOURCE_FAILED")[0].description
            await sim.wait_for(lambda: len(sim.spec_updates) == 1, 5, "the update before the failure")
            assert run.client.is_connected


async def test_a_job_status_stream_ends_at_its_first_final_status() -> None:
    async with FacilitatorSimulator(seed=34) as sim:
        async with running_client(fast_config(sim.url)) as run:
            job_uuid = "8d3f2f0e-3c1e-4c61-9d6b-1e2f3a4b5c6d"
            sim.register_job(job_uuid)
            report = run.client._statuses.open(job_uuid)
            assert report(JobStatus.RECEIVED)
            assert report(JobStatus.REJECTED, {"job_rejection_details": {"rejected_by": "miner", "reason": "busy",
                                                                          "message": "no executor"}})
            assert not report(JobStatus.ACCEPTED), "after a final status the stream has ended"
            assert not run.client._statuses.is_open(job_uuid)
            other = "9d3f2f0e-3c1e-4c61-9d6b-1e2f3a4b5c6d"
            sim.register_job(other)
            stop = run.client._statuses.open(other)
            run.client._statuses.stop_listener(other)
            assert not stop(JobStatus.ACCEPTED)
            # The outbox keeps order: once an update enqueued after the refused one is stored, the refused
            # one would have been stored too.
            marker = "ad3f2f0e-3c1e-4c61-9d6b-1e2f3a4b5c6d"
            sim.register_job(marker)
            assert run.client._statuses.open(marker)(JobStatus.RECEIVED)
            await sim.wait_for(lambda: sim.stored[marker] == ["sent", "received"], 5, "the later update stored")
            assert sim.stored[job_uuid] == ["sent", "received", "rejected"]
            assert sim.stored[other] == ["sent"]


async def test_dispatcher_failures_become_events_and_metrics() -> None:
    from reactivex.subject import Subject

    class Flaky(SimulatedDispatcher):
        """A dispatcher with a `failures` observable, like the Celery one (Redis trouble)."""

        def __init__(self) -> None:
            super().__init__(0)
            self.failures: Subject[Exception] = Subject()

    class Failure(Exception):
        operation = "read"
        retry_in = 0.25
        error = ConnectionError("redis down")

    dispatcher = Flaky()
    async with FacilitatorSimulator(seed=35) as sim:
        async with running_client(fast_config(sim.url), dispatcher) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            dispatcher.failures.on_next(Failure("read: ConnectionError: redis down"))
            event = run.events_of("DISPATCHER_FAILED")[0]
            assert event.subtype == "read"
            assert event.data == {"operation": "read", "exception": "ConnectionError",
                                  "message": "read: ConnectionError: redis down", "retry_in": 0.25}
            assert run.counters["dispatcher.failures.read"] == 1


async def test_enqueue_sends_in_order_and_retry_goes_to_the_front() -> None:
    from streams.message_manager import envelope_of
    from streams.protocol import JobStatusUpdate

    async with FacilitatorSimulator(seed=36, accept_unknown_jobs=True) as sim:
        async with running_client(fast_config(sim.url, backoff_cap=0.2)) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            sim.refuse_next_auth("signature_invalid", times=2)
            await sim.drop()
            await wait_until(lambda: not run.client.is_connected, 5, "disconnected")
            jobs = [f"00000000-0000-4000-8000-00000000000{n}" for n in range(3)]
            run.client._messages.enqueue(JobStatusUpdate(uuid=jobs[0], status=JobStatus.RECEIVED))
            run.client._messages.enqueue(JobStatusUpdate(uuid=jobs[1], status=JobStatus.RECEIVED))
            urgent = envelope_of(JobStatusUpdate(uuid=jobs[2], status=JobStatus.RECEIVED), 0.0)
            run.client._messages.retry(urgent)
            await sim.wait_for(lambda: len(sim.frames_of("V0JobStatusUpdate")) == 3, 10, "three updates")
            assert [f["uuid"] for f in sim.frames_of("V0JobStatusUpdate")] == [jobs[2], jobs[0], jobs[1]]
