"""The client against the facilitator simulator on 127.0.0.1: delivery, reconnects, lifecycle."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
import uuid
from collections import Counter, defaultdict

import pytest

from streams import FacilitatorClient, SimulatedDispatcher
from streams.devtools.simulator import FacilitatorSimulator
from streams.message_manager import Sent
from streams.protocol import JobStatus, V0MachineSpecsUpdate, V2JobRequest
from tests.helpers import ALICE, FULL_SEQUENCE, fast_config, running_client, server_side, wait_until

pytestmark = pytest.mark.timeout(60)


def status_frames(sim: FacilitatorSimulator) -> list[tuple[int, str, str]]:
    return [
        (r.conn_id, r.parsed["uuid"], r.parsed["status"])
        for r in sim.received
        if r.parsed is not None and r.parsed.get("message_type") == "V0JobStatusUpdate"
    ]


def assert_auth_first(sim: FacilitatorSimulator) -> None:
    """Nothing but the auth request is sent before auth success, on every connection."""
    first: dict[int, str] = {}
    for r in sim.received:
        if r.parsed is not None:
            first.setdefault(r.conn_id, r.parsed.get("message_type", "?"))
        assert r.authenticated or (r.parsed or {}).get("message_type") == "V0AuthenticationRequest", r
    assert set(first.values()) <= {"V0AuthenticationRequest"}, first
    assert not [v for v in sim.violations if "before authentication" in v], sim.violations


async def test_chaos_200_jobs_lose_nothing_and_keep_order() -> None:
    seed = 20261128
    print(f"chaos seed {seed}")
    async with FacilitatorSimulator(seed=seed) as sim:
        config = fast_config(sim.url, ping_interval=0.2, ping_timeout=0.2, close_timeout=0.3, send_timeout=1.0)
        async with running_client(config, SimulatedDispatcher(step_delay=0.05)) as run:
            await wait_until(lambda: sim.authenticated_connections >= 1, 5, "first auth")
            jobs = [await sim.send_job_request() for _ in range(200)]
            sim.chaos(every=50, kinds=("drop", "close", "stall"), rng=random.Random(seed))
            expected = ["sent", *FULL_SEQUENCE]
            await sim.wait_for(
                lambda: all(sim.stored[j["uuid"]] == expected for j in jobs if len(sim.stored[j["uuid"]]) >= 7)
                and all(len(sim.stored[j["uuid"]]) >= 7 for j in jobs),
                45,
                "every status of every job stored",
            )
            sim.chaos(every=0)
            await wait_until(lambda: run.client.pending.pending == 0, 10, "outbox empty")
            faults = len(sim.faults)
        for job in jobs:
            assert sim.stored[job["uuid"]] == expected, (job["uuid"], sim.stored[job["uuid"]])
        # Duplicates only of unacknowledged updates: never twice on one connection.
        copies = Counter(status_frames(sim))
        assert not [key for key, n in copies.items() if n > 1], "a status was sent twice on one connection"
        per_update: defaultdict[tuple[str, str], list[int]] = defaultdict(list)
        for conn_id, job_uuid, status in status_frames(sim):
            per_update[(job_uuid, status)].append(conn_id)
        resent = sum(len(conns) - 1 for conns in per_update.values())
        # Every fault leaves updates in flight, so the client resends some. The facilitator sees a second
        # copy only of those it stored but whose Response was lost (a timing matter: from 0 to hundreds);
        # frames written into a stalled socket never arrive. So it never sees more copies than were resent.
        resends = run.counters.get("messages.resent.V0JobStatusUpdate", 0)
        assert resends > 0 and resent <= resends
        assert faults >= 5, f"chaos injected only {faults} faults"
        assert run.counters["connect.successes"] >= 5
        assert_auth_first(sim)
        print(f"faults={faults} resent={resent} connections={sim.connections}")


async def test_unacked_updates_resent_first_and_integrity_errors_count_as_acks() -> None:
    async with FacilitatorSimulator(seed=2) as sim:
        async with running_client(fast_config(sim.url)) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            sim.set_ack_delay(30.0)  # Responses withheld: the updates stay in flight
            jobs = [str(uuid.uuid4()) for _ in range(3)]
            sent = []
            for job_uuid in jobs:
                sim.register_job(job_uuid)
            for status in ("received", "accepted"):
                for job_uuid in jobs:
                    run.client._statuses.open(job_uuid)(status)
                    sent.append((job_uuid, status))
            await sim.wait_for(lambda: len(status_frames(sim)) == 6, 5, "six updates in flight")
            assert run.client.pending.in_flight == 6
            sim.set_ack_delay(0.0)
            await sim.drop()
            await sim.wait_for(lambda: len(status_frames(sim)) == 12, 5, "six updates resent")
            await wait_until(lambda: run.counters.get("acks.duplicate", 0) == 6, 5, "duplicate acks")
            _first_conn, second_conn = sorted({c for c, _, _ in status_frames(sim)})
            resent = [(u, s) for c, u, s in status_frames(sim) if c == second_conn]
            assert resent == sent, "unacknowledged updates go out first, in their original order"
            assert run.client.pending.in_flight == 0
            assert run.counters["messages.resent.V0JobStatusUpdate"] == 6
            assert run.counters.get("acks.error.job.integrity_error", 0) == 0
        assert_auth_first(sim)


async def test_auth_refused_then_accepted_retries_at_cap_with_the_facilitators_text() -> None:
    async with FacilitatorSimulator(seed=3) as sim:
        sim.refuse_next_auth("validator_not_found")
        async with running_client(fast_config(sim.url, backoff_cap=0.3)) as run:
            await wait_until(lambda: run.events_of("CONNECTED"), 5, "connected after a refusal")
            failed = run.events_of("AUTH_FAILED")
            assert len(failed) == 1
            event = failed[0]
            assert "auth.validator_not_found" in event.description
            assert event.data["close_code"] == 3001
            assert event.data["retry_in"] == pytest.approx(0.3)
            assert event.data["errors"][0]["type"] == "auth.validator_not_found"
            assert event.data["errors"][0]["msg"]  # the facilitator's own text
            gap = run.events_of("CONNECTED")[0].timestamp - event.timestamp
            assert gap >= 0.29, "retries at the backoff cap, not at once"
            assert run.counters["auth.failures"] == 1
        assert_auth_first(sim)


async def test_stall_is_detected_and_the_client_reconnects() -> None:
    async with FacilitatorSimulator(seed=4) as sim:
        # A close timeout far above the wait below: reconnecting in time proves the half-open link was
        # dropped at once, not after a close handshake that cannot complete (no wall-clock assertion).
        config = fast_config(sim.url, ping_interval=0.2, ping_timeout=0.2, close_timeout=60.0)
        async with running_client(config) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            await sim.stall()
            await wait_until(lambda: len(run.events_of("CONNECTED")) >= 2, 20, "reconnected after a stall")
            disconnected = run.events_of("DISCONNECTED")[0]
            assert disconnected.data["close_code"] == 1011
            assert "keepalive" in disconnected.description


async def test_heartbeats_first_after_auth_periodic_and_not_piled_up() -> None:
    async with FacilitatorSimulator(seed=5, accept_unknown_jobs=True) as sim:
        async with running_client(fast_config(sim.url, heartbeat_period=0.2, backoff_cap=0.05)) as run:
            await sim.wait_for(
                lambda: 1 in sim.connection_log and len(sim.connection_log[1].heartbeats) >= 5, 5, "five heartbeats"
            )
            record = sim.connection_log[1]
            first_frame = next(r for r in sim.received if r.conn_id == record.conn_id and r.authenticated)
            assert first_frame.parsed == {"message_type": "V0Heartbeat"}, "the first heartbeat follows auth"
            gaps = [b - a for a, b in itertools.pairwise(record.heartbeats)]
            assert all(gap > 0.1 for gap in gaps), f"heartbeats pile up: {gaps}"  # never closer than half a period

            # Disconnected for a while (refused auths): no heartbeat piles up; a backlog builds.
            heartbeat_waits: list[float] = []
            update_times: list[float] = []

            def on_sent(sent: Sent) -> None:
                if sent.connection_id < 2:
                    return
                if sent.envelope.kind == "V0Heartbeat":
                    heartbeat_waits.append(sent.at - sent.envelope.enqueued_at)
                elif sent.envelope.kind == "V0JobStatusUpdate":
                    update_times.append(sent.at)

            run.client._messages.sent.subscribe(on_sent)
            sim.refuse_next_auth("signature_invalid", times=4)
            await sim.drop()
            await wait_until(lambda: not run.client.is_connected, 5, "disconnected")
            for _ in range(2000):
                job_uuid = str(uuid.uuid4())
                report = run.client._statuses.open(job_uuid)
                for status in FULL_SEQUENCE[:5]:
                    report(status)
            await sim.wait_for(lambda: sim.authenticated_connections >= 2, 10, "reconnected")
            backlog_conn = sim.connection_log[max(sim.connection_log)]
            await sim.wait_for(lambda: len(status_frames(sim)) >= 10_000, 30, "backlog drained")
            first = next(r for r in sim.received if r.conn_id == backlog_conn.conn_id and r.authenticated)
            assert first.parsed == {"message_type": "V0Heartbeat"}, "a fresh heartbeat goes first"
            # Heartbeats keep leaving while 10,000 updates drain, each at once, not behind the backlog: the
            # longest a heartbeat waited is a small fraction of the drain (a ratio, so a loaded machine slows
            # both alike; behind the backlog, a heartbeat would wait for most of the drain).
            drain = max(update_times) - min(update_times)
            assert len(heartbeat_waits) >= 2, "heartbeats kept flowing during the drain"
            assert max(heartbeat_waits) < 0.2 * drain, (heartbeat_waits, drain)
            assert run.counters.get("messages.coalesced.V0Heartbeat", 0) <= 2


async def test_spec_updates_survive_a_disconnect_in_order_and_the_oldest_are_dropped_past_the_bound() -> None:
    async with FacilitatorSimulator(seed=6) as sim:
        async with running_client(fast_config(sim.url, max_pending_specs=3, backoff_cap=0.2)) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            sim.refuse_next_auth("signature_invalid", times=2)
            await sim.drop()
            await wait_until(lambda: not run.client.is_connected, 5, "disconnected")
            for n in range(5):
                run.client.publish_specs(spec(n))
            await sim.wait_for(lambda: len(sim.spec_updates) == 3, 10, "three spec updates")
            assert [s["batch_id"] for s in sim.spec_updates] == [f"batch-{n}" for n in (2, 3, 4)]
            dropped = run.events_of("MESSAGE_DROPPED")
            assert [e.data["message_type"] for e in dropped] == ["V0MachineSpecsUpdate"] * 2
            assert run.counters["messages.dropped.V0MachineSpecsUpdate"] == 2


def spec(n: int) -> V0MachineSpecsUpdate:
    return V0MachineSpecsUpdate(
        miner_hotkey="5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty",
        validator_hotkey=ALICE.ss58_address,
        specs={"os": "Ubuntu 24.04", "cpu": {"count": n}, "ram": {}, "hard_disk": {}},
        batch_id=f"batch-{n}",
    )


async def test_duplicate_jobs_dispatch_once_and_a_raising_dispatcher_reports_horde_failed() -> None:
    calls: Counter[str] = Counter()

    async def handle(job: V2JobRequest, report: object) -> None:
        calls[job.uuid] += 1
        if job.env.get("BOOM"):
            raise RuntimeError("dispatcher exploded")

    async with FacilitatorSimulator(seed=7) as sim:
        async with running_client(fast_config(sim.url), handle) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            job = await sim.send_job_request()
            await sim.send_raw(__import__("json").dumps(job))
            boom = await sim.send_job_request(env={"BOOM": "1"})
            await sim.wait_for(lambda: "horde_failed" in sim.stored[boom["uuid"]], 5, "horde_failed stored")
            await wait_until(lambda: run.counters.get("jobs.duplicates", 0) == 1, 5, "duplicate counted")
            assert calls[job["uuid"]] == 1
            # The handler returned without a final status: the client reported horde_failed for it.
            await sim.wait_for(lambda: "horde_failed" in sim.stored[job["uuid"]], 5, "horde_failed stored")
            assert sim.stored[job["uuid"]] == ["sent", "received", "horde_failed"]
            assert sim.stored[boom["uuid"]] == ["sent", "received", "horde_failed"]
            meta = sim.stored_metadata[boom["uuid"]][-1]["horde_failure_details"]
            assert meta["reason"] == "unhandled_exception"
            assert meta["reported_by"] == "validator"
            assert "dispatcher exploded" in meta["message"]
            failed = run.events_of("JOB_DISPATCH_FAILED")
            assert failed and failed[0].data["job_uuid"] == boom["uuid"]


async def test_one_hundred_concurrent_jobs() -> None:
    release = asyncio.Event()
    running = 0
    peak = 0

    async def handle(job: V2JobRequest, report: object) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await release.wait()
            assert callable(report)
            miner_response = {"docker_process_stdout": "ok", "docker_process_stderr": ""}
            report(JobStatus.COMPLETED, {"miner_response": miner_response})
        finally:
            running -= 1

    async with FacilitatorSimulator(seed=8) as sim:
        async with running_client(fast_config(sim.url, max_concurrent_jobs=100), handle) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            jobs = [await sim.send_job_request() for _ in range(110)]
            await wait_until(lambda: peak == 100, 10, "100 jobs running at once")
            assert run.client._jobs.active == 110  # ten wait for a slot
            release.set()
            await sim.wait_for(lambda: all("completed" in sim.stored[j["uuid"]] for j in jobs), 10, "all completed")
            assert peak == 100


async def test_malformed_and_unknown_frames_are_reported_and_the_client_keeps_working() -> None:
    async with FacilitatorSimulator(seed=9) as sim:
        async with running_client(fast_config(sim.url)) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            await sim.send_raw("{not json")
            await sim.send_raw(b"\x00\xffbinary")
            await sim.send_raw('{"message_type": "V9Unknown", "x": 1}')
            await sim.send_raw('{"type": "job.new", "message_type": "V2JobRequest", "uuid": 5}')
            job = await sim.send_job_request()
            await sim.wait_for(lambda: "completed" in sim.stored[job["uuid"]], 5, "job still runs")
            malformed = run.events_of("MALFORMED_MESSAGE")
            assert len(malformed) == 4
            assert malformed[0].data["excerpt"] == "{not json"
            assert "V9Unknown" in malformed[2].description
            assert run.counters["messages.malformed"] == 4
            assert run.client.is_connected


async def test_cheat_reports_reach_the_handler_and_a_raising_handler_is_reported() -> None:
    seen: list[str] = []

    async def on_cheat(report: object) -> None:
        seen.append(report.job_uuid)  # type: ignore[attr-defined]
        if len(seen) == 2:
            raise ValueError("handler bug")

    async with FacilitatorSimulator(seed=10) as sim:
        async with running_client(fast_config(sim.url), on_cheat=on_cheat) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            first = str(uuid.uuid4())
            second = str(uuid.uuid4())
            await sim.send_cheat_report(first)
            await sim.send_cheat_report(second)
            await wait_until(lambda: run.events_of("CHEAT_HANDLER_FAILED"), 5, "handler failure reported")
            assert seen == [first, second]
            assert run.events_of("CHEAT_HANDLER_FAILED")[0].data["job_uuid"] == second
            assert run.counters["cheat.reports"] == 2
            assert run.client.is_connected


async def test_stop_drains_and_leaves_no_task() -> None:
    async with FacilitatorSimulator(seed=11, accept_unknown_jobs=True) as sim:
        before = asyncio.all_tasks()
        client = FacilitatorClient(fast_config(sim.url), signer=ALICE, dispatcher=SimulatedDispatcher(0))
        task = asyncio.create_task(client.start())
        await wait_until(lambda: client.is_connected, 5, "connected")
        for _ in range(100):
            client._statuses.open(str(uuid.uuid4()))("received")
        async with asyncio.timeout(30):  # generous: a hung drain fails here, a slow machine does not
            await client.stop()
        await task
        assert len(status_frames(sim)) == 100, "stop() drains the outbox while connected"
        last = sim.connection_log[max(sim.connection_log)]
        await sim.wait_for(lambda: last.close_code == 1000, 5, "closed with 1000")
        assert not [t for t in asyncio.all_tasks() - before if not server_side(t)]
        with pytest.raises(RuntimeError, match="called once"):
            await client.start()
        with pytest.raises(RuntimeError, match="after the client was stopped"):
            client.publish_specs(spec(1))


async def test_cancellation_tears_down_within_a_second_plus_drain() -> None:
    async with FacilitatorSimulator(seed=12, accept_unknown_jobs=True) as sim:
        before = asyncio.all_tasks()
        # Draining a stalled connection could take drain_timeout (60 s); cancellation must cap it at
        # cancel_drain_timeout (1 s). The bound below is generous and still tells the two apart.
        config = fast_config(sim.url, drain_timeout=60.0, cancel_drain_timeout=1.0)
        client = FacilitatorClient(config, signer=ALICE, dispatcher=SimulatedDispatcher(10))
        task = asyncio.create_task(client.start())
        await wait_until(lambda: client.is_connected, 5, "connected")
        job = await sim.send_job_request()  # a long-running job task to cancel
        await wait_until(lambda: client._jobs.active == 1, 5, f"job {job['uuid']} running")
        await sim.stall()  # nothing more can be sent: the drain must give up on time
        for _ in range(100):
            client._statuses.open(str(uuid.uuid4()))("received")
        started = time.monotonic()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        took = time.monotonic() - started
        assert took < 20.0, f"the teardown took {took:.1f} s: the cancel drain timeout was not applied"
        assert not [t for t in asyncio.all_tasks() - before if not server_side(t)]


async def test_a_teardown_whose_close_hangs_still_reports_the_disconnect() -> None:
    async with FacilitatorSimulator(seed=13) as sim:
        async with running_client(fast_config(sim.url, close_timeout=0.2)) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            await sim.stall()  # the close handshake will never complete
        disconnected = run.events_of("DISCONNECTED")
        assert len(disconnected) == 1, [e.description for e in run.events]
        assert disconnected[0].data["retry_in"] is None
        assert disconnected[0].data["lived"] > 0
