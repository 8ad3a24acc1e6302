"""Phase 2: jobs through a real Celery worker, statuses back through a real Redis Stream.

simulator → client → Celery (Redis broker) → worker → Redis Stream → client → simulator, with the
client SIGKILLed and restarted mid-run, and with Redis killed and restarted mid-run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Set
from pathlib import Path
from typing import Any

import pytest

try:
    import celery
    import redis  # noqa: F401
except ImportError as exc:  # pragma: no cover - make test installs the extra
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip(f"the celery extra is not installed (make test installs it): {exc}", allow_module_level=True)
    raise

import redis.asyncio as aioredis
from kombu.exceptions import OperationalError
from reactivex.subject import Subject

from streams.cli import main as cli_main
from streams.devtools.simulator import FacilitatorSimulator
from streams.dispatchers.celery import (
    GROUP,
    STREAM_KEY,
    TASK_NAME,
    CeleryDispatcher,
    DispatcherFailure,
    StatusReporter,
    decode_entry,
    encode_entry,
    make_celery_app,
    play_lifecycle,
    reporter_for,
)
from streams.protocol import JobStatus, V2JobRequest, decode
from tests.helpers import BOB, FULL_SEQUENCE, fast_config, running_client, wait_until
from tests.redis_fixtures import ROOT, CeleryWorker, RedisServer, redis_and_worker

pytestmark = pytest.mark.timeout(60)

DONE = ["sent", *FULL_SEQUENCE]
FAILED = ["sent", *FULL_SEQUENCE[:-1], "failed"]
QUEUE = "facilitator-test-jobs"


@pytest.fixture(scope="module")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, CeleryWorker]]:
    """One redis-server and one Celery worker (16 threads, 50 ms per lifecycle step) for the module."""
    with redis_and_worker(tmp_path_factory.mktemp("celery"), QUEUE) as pair:
        yield pair


@pytest.fixture
async def stream(services: tuple[RedisServer, CeleryWorker]) -> AsyncIterator[aioredis.Redis]:
    """A client of the module's Redis; checks afterwards that the status stream was fully acknowledged."""
    client = aioredis.Redis.from_url(services[0].url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def stream_drained(client: aioredis.Redis, key: str = STREAM_KEY, group: str = GROUP) -> bool:
    """Every entry XACKed (and deleted): nothing pending, nothing left in the stream."""
    pending = await client.xpending(key, group)
    return int(pending["pending"]) == 0 and int(await client.xlen(key)) == 0


def finished(sim: FacilitatorSimulator, jobs: list[dict[str, Any]]) -> bool:
    return all(sim.stored[job["uuid"]][-1] in ("completed", "failed") for job in jobs)


def assert_in_order(sim: FacilitatorSimulator, jobs: list[dict[str, Any]], failing: Set[str] = frozenset()) -> None:
    for job in jobs:
        expected = FAILED if job["uuid"] in failing else DONE
        assert sim.stored[job["uuid"]] == expected, (job["uuid"], sim.stored[job["uuid"]])
    assert not sim.violations, sim.violations


# --------------------------------------------------------------------------- no services needed


def test_sample_lifecycle_reports_valid_updates() -> None:
    reported: list[tuple[str, str, Any]] = []

    def report(job_uuid: str, status: JobStatus | str, metadata: Any = None) -> None:
        encode_entry(job_uuid, status, metadata)  # what the worker's reporter validates
        reported.append((job_uuid, str(status), metadata))

    job_uuid = str(uuid.uuid4())
    assert play_lifecycle({"uuid": job_uuid, "env": {}}, report, 0.0, sleep=lambda _: None) is JobStatus.COMPLETED
    assert [status for _, status, _ in reported] == FULL_SEQUENCE[1:]
    assert reported[-1][2]["miner_response"].keys() >= {"docker_process_stdout", "docker_process_stderr"}
    reported.clear()
    assert play_lifecycle({"uuid": job_uuid, "env": {"SIMULATE": "fail"}}, report, 0.0, sleep=lambda _: None) \
        is JobStatus.FAILED
    assert [status for _, status, _ in reported] == [*FULL_SEQUENCE[1:-1], "failed"]
    assert reported[-1][2]["job_failure_details"].keys() >= {"reason", "stage", "message"}


def test_stream_entries_round_trip_and_bad_ones_are_refused() -> None:
    job_uuid = str(uuid.uuid4())
    metadata = {"miner_response": {"docker_process_stdout": "out", "docker_process_stderr": "err", "x": 1}}
    update = decode_entry(encode_entry(job_uuid, "completed", metadata))
    assert (update.uuid, update.status) == (job_uuid, JobStatus.COMPLETED)
    assert update.metadata is not None and update.metadata.model_dump(exclude_none=True) == metadata
    assert decode_entry(encode_entry(job_uuid, JobStatus.ACCEPTED)).metadata is None
    for bad in ({"job_uuid": "not-a-uuid", "status": "accepted"}, {"job_uuid": job_uuid, "status": "bogus"},
                {"status": "accepted"}, {"job_uuid": job_uuid, "status": "accepted", "metadata": "{"},
                {"job_uuid": job_uuid, "status": "completed", "metadata": '{"miner_response": {}}'}):
        with pytest.raises(ValueError):
            decode_entry(bad)
    with pytest.raises(ValueError):
        encode_entry("not-a-uuid", "accepted")  # refused on the worker: never reaches the stream
    with pytest.raises(ValueError):
        encode_entry(job_uuid, "failed", {"job_failure_details": {"reason": "r"}})  # stage, message required


def test_reporter_for_any_celery_app_uses_its_redis_broker() -> None:
    app = celery.Celery("host-app", broker="redis://127.0.0.1:9/3", set_as_current=False)
    reporter = reporter_for(app)
    assert (reporter.redis_url, reporter.stream_key) == ("redis://127.0.0.1:9/3", STREAM_KEY)
    assert reporter_for(app) is reporter
    ours = make_celery_app("redis://127.0.0.1:9/0", "q", stream_key="k", redis_url="redis://127.0.0.1:8/1")
    assert (reporter_for(ours).redis_url, reporter_for(ours).stream_key) == ("redis://127.0.0.1:8/1", "k")
    assert TASK_NAME in ours.tasks and ours.conf.task_default_queue == "q"


def test_celery_app_survives_broker_restarts_by_configuration() -> None:
    """What make_celery_app sets for a Redis restart (the behaviour is shown by the restart tests below)."""
    import ssl

    app = make_celery_app("redis://127.0.0.1:9/0", "q", visibility_timeout=30)
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.broker_connection_retry
    assert conf.broker_connection_max_retries is None and conf.broker_connection_retry_on_startup
    assert conf.broker_transport_options["visibility_timeout"] == 30
    assert conf.broker_transport_options["priority_steps"] == [0]
    assert conf.worker_consumer.endswith("resilience:ResilientConsumer")
    assert app.connection_for_write().transport_cls.endswith("resilience:ResilientRedisTransport")
    secure = make_celery_app("rediss://:pw@127.0.0.1:9/0", "q").connection_for_write()
    assert secure.ssl == {"ssl_cert_reqs": ssl.CERT_REQUIRED}  # kombu's own default for rediss: no checks
    for bad in (0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match="visibility_timeout"):
            make_celery_app("redis://127.0.0.1:9/0", "q", visibility_timeout=bad)


class FakeApp:
    """Stands in for a Celery app: records send_task calls, fails the first ``failures`` of them."""

    def __init__(self, failures: int = 0) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.failures = failures

    def send_task(self, name: str, **kwargs: Any) -> None:
        if self.failures:
            self.failures -= 1
            raise OperationalError("Error 111 connecting to 127.0.0.1:1. Connection refused.")
        self.calls.append((name, kwargs))


async def test_handle_sends_the_untouched_raw_job_by_name_and_retries_an_unavailable_broker() -> None:
    app = FakeApp(failures=2)
    dispatcher = CeleryDispatcher("redis://127.0.0.1:1/0", "jobs-q", app=app, backoff_base=0.001, backoff_cap=0.01)
    failures: list[DispatcherFailure] = []
    dispatcher.failures.subscribe(failures.append)
    raw = FacilitatorSimulator().job_request(env={"K": "V"}, extra_field={"added": "later"})
    job = decode(json.dumps(raw))
    assert isinstance(job, V2JobRequest)
    await dispatcher.handle(job, lambda *a, **k: True)
    assert app.calls == [(TASK_NAME, {"args": [raw], "queue": "jobs-q", "retry": False})]
    assert app.calls[0][1]["args"][0] is job.raw  # the parsed frame itself, not a re-serialisation
    assert [(f.operation, f.attempt) for f in failures] == [("publish", 1), ("publish", 2)]
    await dispatcher.stop()


def test_cli_refuses_bad_celery_flags(capsys: pytest.CaptureFixture[str]) -> None:
    run = ["run", "--url", "ws://127.0.0.1:9/ws/v0/", "--hotkey-uri", "//Alice", "--dispatcher", "celery"]
    assert cli_main(run) == 2
    assert "needs --broker" in capsys.readouterr().err
    assert cli_main([*run, "--broker", "http://127.0.0.1:9/"]) == 2
    assert "needs a Redis URL" in capsys.readouterr().err
    assert cli_main(["worker", "--broker", "redis://127.0.0.1:9/0", "--concurrency", "0"]) == 2
    assert "--concurrency: '0' must be >= 1" in capsys.readouterr().err
    for bad, why in (("nan", "is not a number"), ("inf", "must be a finite number of seconds >= 1"),
                     ("0.5", "must be a finite number of seconds >= 1")):
        assert cli_main(["worker", "--broker", "redis://127.0.0.1:9/0", "--visibility-timeout", bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: argument --visibility-timeout: '{bad}' {why}") and err.count("\n") == 1, err


@pytest.mark.parametrize("dispatcher", [["--dispatcher", "simulated"], ["--dispatcher", "tests.helpers:x"]])
def test_cli_refuses_celery_flags_without_the_celery_dispatcher(
    dispatcher: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    run = ["run", "--url", "ws://127.0.0.1:9/ws/v0/", "--hotkey-uri", "//Alice", *dispatcher]
    assert cli_main([*run, "--broker", "redis://127.0.0.1:9/0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --broker only applies to --dispatcher celery") and err.count("\n") == 1, err
    assert cli_main([*run, "--queue", "q", "--consumer", "me"]) == 2
    assert "error: --queue, --consumer only apply to --dispatcher celery" in capsys.readouterr().err


def test_cli_refuses_step_delay_without_the_simulated_dispatcher(capsys: pytest.CaptureFixture[str]) -> None:
    run = ["run", "--url", "ws://127.0.0.1:9/ws/v0/", "--hotkey-uri", "//Alice", "--step-delay", "1"]
    assert cli_main([*run, "--dispatcher", "celery", "--broker", "redis://127.0.0.1:9/0"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --step-delay applies only to --dispatcher simulated (this run uses --dispatcher celery)\n"


# --------------------------------------------------------------------------- real Redis and Celery


@pytest.mark.timeout(40)
async def test_end_to_end_100_jobs_every_status_in_order(stream: aioredis.Redis, services: Any) -> None:
    redis_server, _worker = services
    async with FacilitatorSimulator(seed=11) as sim:
        dispatcher = CeleryDispatcher(redis_server.url, QUEUE, block_ms=200)
        async with running_client(fast_config(sim.url), dispatcher) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            jobs = [await sim.send_job_request(env={"SIMULATE": "fail"} if i % 10 == 0 else {}) for i in range(100)]
            failing = {job["uuid"] for job in jobs if job["env"]}
            await sim.wait_for(lambda: finished(sim, jobs), 30, "every job completed or failed")
            assert_in_order(sim, jobs, failing)
            await wait_until(lambda: dispatcher.pending == 0, 5, "every stream entry acknowledged")
        assert await stream_drained(stream)
        assert dispatcher.published == 100 and dispatcher.delivered == 500 and dispatcher.acknowledged == 500
        done = sim.stored_metadata[jobs[1]["uuid"]][-1]
        assert done["miner_response"]["docker_process_stdout"] == f"simulated {jobs[1]['uuid']}"
        assert sim.stored_metadata[jobs[0]["uuid"]][-1]["job_failure_details"]["stage"] == "execution"


@pytest.mark.timeout(30)
async def test_unacknowledged_entries_are_resent_in_order_by_the_next_client(
    stream: aioredis.Redis, services: Any
) -> None:
    """The facilitator never answered client A; client B (same consumer name) resends, in order."""
    redis_server, _worker = services
    key, group = f"test-resend-{uuid.uuid4()}", "resend-group"
    reporter = StatusReporter(redis_server.url, key)
    settings: dict[str, Any] = dict(stream_key=key, group=group, consumer="validator-1", block_ms=100)
    async with FacilitatorSimulator(seed=12) as sim:
        first, second = sim.register_job(str(uuid.uuid4())), sim.register_job(str(uuid.uuid4()))
        sim.set_ack_delay(60.0)  # statuses are stored, their Responses never come
        client_a = CeleryDispatcher(redis_server.url, QUEUE, **settings)
        async with running_client(fast_config(sim.url, drain_timeout=0.1), client_a):
            play_lifecycle({"uuid": first}, reporter.report, 0.0, sleep=lambda _: None)
            await sim.wait_for(lambda: sim.stored[first] == DONE[:1] + DONE[2:], 10, "job A's statuses stored")
            assert client_a.pending == 5 and client_a.acknowledged == 0
        assert (await stream.xpending(key, group))["pending"] == 5
        play_lifecycle({"uuid": second}, reporter.report, 0.0, sleep=lambda _: None)  # while no client runs
        sim.set_ack_delay(0.0)
        client_b = CeleryDispatcher(redis_server.url, QUEUE, **settings)
        async with running_client(fast_config(sim.url), client_b):
            await sim.wait_for(lambda: sim.stored[second][-1] == "completed", 10, "job B's statuses stored")
            await wait_until(lambda: client_b.pending == 0, 5, "every entry acknowledged")
        assert client_b.recovered == 5 and client_b.delivered == 10
        resent = [r.parsed for r in sim.received if r.parsed and r.parsed.get("message_type") == "V0JobStatusUpdate"]
        expected = [(first, s) for s in FULL_SEQUENCE[1:]] * 2 + [(second, s) for s in FULL_SEQUENCE[1:]]
        assert [(m["uuid"], m["status"]) for m in resent] == expected  # A's again first, then B's, in order
        assert sim.stored[first] == sim.stored[second] == DONE[:1] + DONE[2:]  # no "received": no dispatch here
        assert await stream_drained(stream, key, group)
    reporter.close()


@pytest.mark.timeout(30)
async def test_entries_left_pending_by_a_vanished_consumer_are_taken_over(
    stream: aioredis.Redis, services: Any
) -> None:
    """A client whose consumer name changed (a new container's host name) still gets them, after claim_idle."""
    redis_server, _worker = services
    key, group = f"test-takeover-{uuid.uuid4()}", "takeover-group"
    reporter = StatusReporter(redis_server.url, key)
    async with FacilitatorSimulator(seed=16) as sim:
        job = sim.register_job(str(uuid.uuid4()))
        await stream.xgroup_create(key, group, id="0", mkstream=True)
        play_lifecycle({"uuid": job}, reporter.report, 0.0, sleep=lambda _: None)
        assert len(_entries_of(await stream.xreadgroup(group, "gone-host", {key: ">"}))) == 5  # read, never acked
        dispatcher = CeleryDispatcher(redis_server.url, QUEUE, stream_key=key, group=group, consumer="new-host",
                                      claim_idle=0.3, block_ms=50)
        async with running_client(fast_config(sim.url), dispatcher):
            await sim.wait_for(lambda: sim.stored[job][-1] == "completed", 10, "the orphaned statuses stored")
            await wait_until(lambda: dispatcher.pending == 0, 5, "every entry acknowledged")
        assert sim.stored[job] == DONE[:1] + DONE[2:] and dispatcher.recovered == 5
        assert await stream_drained(stream, key, group)
    reporter.close()


class _NullFeed:
    """A StatusFeed that takes every report and never answers (the stop test needs no client)."""

    def __init__(self) -> None:
        self.acks: Subject[Any] = Subject()

    def report(self, job_uuid: str, status: Any, metadata: Any = None) -> bool:
        return True

    def release(self, job_uuid: str) -> None:
        pass


@pytest.mark.timeout(30)
async def test_a_job_run_twice_sends_its_statuses_once(stream: aioredis.Redis, services: Any) -> None:
    """acks_late: a job may run again (its worker or its ack lost with Redis). Its statuses come
    through the stream twice; the ones the facilitator already answered are acknowledged, not resent."""
    redis_server, _worker = services
    key = f"test-rerun-{uuid.uuid4()}"
    reporter = StatusReporter(redis_server.url, key)
    async with FacilitatorSimulator(seed=18) as sim:
        job = sim.register_job(str(uuid.uuid4()))
        dispatcher = CeleryDispatcher(redis_server.url, QUEUE, stream_key=key, block_ms=100)
        async with running_client(fast_config(sim.url), dispatcher):
            for _run in range(2):
                play_lifecycle({"uuid": job}, reporter.report, 0.0, sleep=lambda _: None)
                await sim.wait_for(lambda: sim.stored[job][-1] == "completed", 10, "the job's statuses stored")
                await wait_until(lambda: dispatcher.pending == 0 and dispatcher.acknowledged >= 5, 5, "all acked")
            await wait_until(lambda: dispatcher.acknowledged == 10, 5, "the rerun's entries acknowledged")
        sent = [r.parsed for r in sim.received if r.parsed and r.parsed.get("message_type") == "V0JobStatusUpdate"]
        assert [m["status"] for m in sent] == FULL_SEQUENCE[1:]  # each status once
        assert dispatcher.duplicates == 5 and sim.stored[job] == DONE[:1] + DONE[2:]
        assert await stream_drained(stream, key)
    reporter.close()


def _entries_of(reply: Any) -> list[Any]:
    return [entry for _, entries in reply for entry in entries]


@pytest.mark.timeout(30)
async def test_stop_ends_a_blocking_read_at_once_every_time(services: Any) -> None:
    """Cancelling a blocked XREADGROUP must never hang stop() (redis-py can lose that cancellation)."""
    redis_server, _worker = services
    rng = random.Random(17)
    for _ in range(60):
        # Reads block for 60 s: a stop() that waited for the read (instead of ending it) would hit the
        # generous 10 s bound below, which a loaded machine does not.
        dispatcher = CeleryDispatcher(redis_server.url, QUEUE, stream_key=f"test-stop-{uuid.uuid4()}", block_ms=60_000)
        dispatcher.bind(_NullFeed())
        await dispatcher.start()
        await asyncio.sleep(rng.uniform(0.0, 0.03))
        async with asyncio.timeout(10):
            await dispatcher.stop()


@pytest.mark.timeout(30)
async def test_malformed_entries_are_reported_and_dropped(stream: aioredis.Redis, services: Any) -> None:
    redis_server, _worker = services
    key = f"test-malformed-{uuid.uuid4()}"
    async with FacilitatorSimulator(seed=13) as sim:
        job = sim.register_job(str(uuid.uuid4()))
        dispatcher = CeleryDispatcher(redis_server.url, QUEUE, stream_key=key, block_ms=100)
        failures: list[DispatcherFailure] = []
        dispatcher.failures.subscribe(failures.append)
        async with running_client(fast_config(sim.url), dispatcher):
            for fields in ({"foo": "bar"}, {"job_uuid": "not-a-uuid", "status": "accepted"},
                           {"job_uuid": job, "status": "bogus"}, encode_entry(job, "accepted")):
                await stream.xadd(key, fields)  # type: ignore[arg-type]
            await sim.wait_for(lambda: sim.stored[job] == ["sent", "accepted"], 10, "the valid entry stored")
            await wait_until(lambda: dispatcher.pending == 0, 5, "every entry acknowledged")
        assert [f.operation for f in failures] == ["entry"] * 3 and dispatcher.malformed == 3
        assert await stream_drained(stream, key)


@pytest.mark.timeout(45)
async def test_client_sigkilled_mid_run_and_restarted_loses_nothing(
    stream: aioredis.Redis, services: Any, tmp_path: Path
) -> None:
    redis_server, _worker = services
    async with FacilitatorSimulator(seed=14) as sim:
        argv = [sys.executable, "-m", "streams", "--log-level", "INFO", "run", "--url", sim.url,
                "--hotkey-uri", "//Alice", "--trusted-signer", BOB.ss58_address,
                "--backoff-base", "0.05", "--backoff-cap", "0.2",
                "--dispatcher", "celery", "--broker", redis_server.url, "--queue", QUEUE]
        with client_process(argv, tmp_path / "client-1.log") as first:
            await sim.wait_for(lambda: sim.authenticated_connections >= 1, 15, "the first client authenticated")
            jobs = [await sim.send_job_request() for _ in range(48)]
            # Every job published (a worker reported it accepted), the last ones still running.
            await sim.wait_for(lambda: all("accepted" in sim.stored[j["uuid"]] for j in jobs), 20, "all accepted")
            first.send_signal(signal.SIGKILL)
            assert await asyncio.to_thread(first.wait, 5) == -signal.SIGKILL
        unfinished = sum(1 for j in jobs if sim.stored[j["uuid"]][-1] != "completed")
        assert unfinished > 0, "the client was meant to die mid-run"
        with client_process(argv, tmp_path / "client-2.log") as second:
            await sim.wait_for(lambda: finished(sim, jobs), 25, "every job completed after the restart")
            await wait_until_async(lambda: stream_drained(stream), 10, "the stream fully acknowledged")
            second.send_signal(signal.SIGTERM)
            # Exits promptly (bounded generously: the 2 s exit time itself is not a pass/fail matter here).
            assert await asyncio.to_thread(second.wait, 15) == 0
        assert_in_order(sim, jobs)
        resent = [line for line in (tmp_path / "client-2.log").read_text().splitlines() if "resending" in line]
        print(f"killed with {unfinished}/48 jobs unfinished; connections={sim.connections}; {resent}")


@pytest.mark.timeout(45)
async def test_redis_restarted_mid_run_is_reported_and_nothing_is_lost(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="streams.dispatchers.celery")
    queue = "facilitator-restart-jobs"
    with redis_and_worker(tmp_path, queue, persistent=True, step_delay=0.1) as (redis_server, worker):
        async with FacilitatorSimulator(seed=15) as sim:
            dispatcher = CeleryDispatcher(redis_server.url, queue, block_ms=200, backoff_base=0.05, backoff_cap=0.3)
            failures: list[DispatcherFailure] = []
            dispatcher.failures.subscribe(failures.append)
            async with running_client(fast_config(sim.url), dispatcher):
                await sim.wait_for(lambda: sim.authenticated_connections >= 1, 5, "authenticated")
                before = [await sim.send_job_request() for _ in range(16)]
                await sim.wait_for(lambda: all("accepted" in sim.stored[j["uuid"]] for j in before), 10, "running")
                redis_server.kill()
                during = [await sim.send_job_request() for _ in range(8)]  # published once Redis is back
                await wait_until(lambda: {"read", "publish"} <= {f.operation for f in failures}, 10, "outage reported")
                await wait_until(lambda: "not appended yet" in worker.tail(), 10, "a worker's report retried")
                redis_server.start()
                jobs = before + during
                await sim.wait_for(lambda: finished(sim, jobs), 30, "every job finished after the restart")
                assert_in_order(sim, jobs)
                await wait_until(lambda: dispatcher.pending == 0, 10, "every entry acknowledged")
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("streams.dispatchers.celery")]
    assert any(m.startswith("redis unavailable at redis://127.0.0.1") for m in messages), messages
    assert any(m.startswith("broker unavailable at") for m in messages), messages
    assert any(m.startswith("redis reachable again") for m in messages), messages
    assert all(isinstance(f.retry_in, float) for f in failures)


RESTART_SEEDS = range(1201, 1206)
"""One Redis SIGKILL and restart per seed (printed); the seed picks the moment and the outage length."""


@pytest.mark.timeout(75)
async def test_worker_survives_redis_killed_and_restarted_five_times(tmp_path: Path) -> None:
    """Redis (appendonly) SIGKILLed mid-run and restarted, 5 times under one worker and one client.

    The same Celery worker process lives through every restart (never restarted by its
    supervisor), and every job completes, with its statuses in order, within seconds of Redis
    coming back. A job that ran twice is harmless: its duplicates are not sent again.
    """
    queue = "facilitator-restart-loop"
    with redis_and_worker(tmp_path, queue, persistent=True, step_delay=0.05) as (redis_server, worker):
        first_pid = worker.celery_pids()
        async with FacilitatorSimulator(seed=21) as sim:
            dispatcher = CeleryDispatcher(redis_server.url, queue, block_ms=200, backoff_base=0.05, backoff_cap=0.3)
            async with running_client(fast_config(sim.url), dispatcher):
                await sim.wait_for(lambda: sim.authenticated_connections >= 1, 5, "authenticated")
                everything: list[dict[str, Any]] = []
                for seed in RESTART_SEEDS:
                    rng = random.Random(seed)
                    accepted_before_kill, extra_outage = rng.randint(1, 16), rng.uniform(0.0, 1.5)
                    jobs = [await sim.send_job_request() for _ in range(24)]
                    everything += jobs
                    await sim.wait_for(
                        lambda: sum("accepted" in sim.stored[j["uuid"]] for j in jobs) >= accepted_before_kill,  # noqa: B023
                        10, f"{accepted_before_kill} jobs accepted",
                    )
                    unfinished = sum(not finished(sim, [j]) for j in jobs)
                    noticed = outage_lines(worker)
                    redis_server.kill()
                    # The worker notices (a broker reconnect refused, or a status not appended), then the
                    # outage lasts a seeded while longer: a fault's length, nothing is asserted on it.
                    await wait_until(lambda: outage_lines(worker) > noticed, 10,  # noqa: B023
                                     "the worker to notice the outage")
                    await asyncio.sleep(extra_outage)
                    await asyncio.to_thread(redis_server.start)
                    back = time.monotonic()
                    await sim.wait_for(lambda: finished(sim, jobs), 20, f"seed {seed}: every job finished")  # noqa: B023
                    took = time.monotonic() - back
                    print(f"seed {seed}: killed with {unfinished}/24 jobs unfinished ({accepted_before_kill} "
                          f"accepted), down {extra_outage:.2f} s after the worker noticed; all done {took:.1f} s "
                          f"after the restart; duplicates so far {dispatcher.duplicates}")
                    assert took < 15, f"seed {seed}: jobs finished {took:.1f} s after Redis came back"
                    assert unfinished > 0
                    assert worker.proc is not None and worker.proc.poll() is None, worker.tail()
                    assert worker.celery_pids() == first_pid, f"seed {seed}: the Celery worker was restarted"
                assert_in_order(sim, everything)
                await wait_until(lambda: dispatcher.pending == 0, 10, "every entry acknowledged")
                broker = aioredis.Redis.from_url(redis_server.url)
                try:  # nothing left behind: every task acknowledged, nothing stuck on its way to the worker
                    await wait_until_async(lambda: broker_clean(broker), 10, "the broker's bookkeeping to empty")
                finally:
                    await broker.aclose()
    log = worker.text()
    assert "Unrecoverable error" not in log and "Traceback" not in log, log[-3000:]


async def broker_clean(broker: aioredis.Redis) -> bool:
    """No unacknowledged task message (kombu's ``unacked`` hash) and no in-flight list left."""
    inflight = [key async for key in broker.scan_iter("facilitator-streams:inflight:*")]
    return int(await broker.hlen("unacked")) == 0 and not inflight


def outage_lines(worker: CeleryWorker) -> int:
    """Log lines of a worker that met Redis down: its broker reconnects, its status reports retried."""
    text = worker.text()
    return text.count(" unreachable (") + text.count("not appended yet")


@pytest.mark.timeout(45)
async def test_a_worker_process_that_dies_is_restarted_and_its_jobs_are_run_again(tmp_path: Path) -> None:
    """SIGKILL the Celery process itself: ``python -m streams worker`` starts a new one, whose jobs
    (the dead one's, redelivered after the visibility timeout) all complete in order."""
    queue = "facilitator-supervised"
    extra = ["--visibility-timeout", "2"]
    with redis_and_worker(tmp_path, queue, step_delay=0.1, concurrency=8, extra=extra) as (redis_server, worker):
        async with FacilitatorSimulator(seed=22) as sim:
            dispatcher = CeleryDispatcher(redis_server.url, queue, block_ms=200)
            async with running_client(fast_config(sim.url), dispatcher):
                await sim.wait_for(lambda: sim.authenticated_connections >= 1, 5, "authenticated")
                jobs = [await sim.send_job_request() for _ in range(16)]
                await sim.wait_for(lambda: sum("accepted" in sim.stored[j["uuid"]] for j in jobs) >= 4, 10,
                                   "4 jobs accepted")
                (first,) = worker.celery_pids()
                os.kill(first, signal.SIGKILL)
                await wait_until(lambda: len(worker.celery_pids()) == 2, 10, "a new Celery worker started")
                await sim.wait_for(lambda: finished(sim, jobs), 30, "every job finished")
                assert_in_order(sim, jobs)
                assert worker.proc is not None and worker.proc.poll() is None
    assert f"celery worker (pid {first}) exited with status -9; restarting it" in worker.text()


@pytest.mark.timeout(30)
def test_worker_retries_an_unreachable_broker_forever_and_stops_on_sigint(tmp_path: Path) -> None:
    log = tmp_path / "worker.log"
    argv = [sys.executable, "-m", "streams", "worker", "--broker", "redis://127.0.0.1:1/0", "--queue", "nowhere"]
    with client_process(argv, log) as proc:
        deadline = time.monotonic() + 20
        while log.read_text().count("unreachable (") < 4:  # 0.5 + 1.5 + 2.5 s of retries
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, f"no 4 retries within 20 s: {log.read_text()[-3000:]}"
            time.sleep(0.05)
        assert proc.poll() is None, "still alive, still retrying"
        proc.send_signal(signal.SIGINT)
        started = time.monotonic()
        assert proc.wait(10) == 0
        assert time.monotonic() - started < 5, "exits promptly on SIGINT"
    text = log.read_text()
    retries = [line for line in text.splitlines() if "unreachable (" in line]
    assert retries[0].endswith("retry 1 in 0.5 s") and "127.0.0.1:1" in retries[0], retries
    assert all(len(line) < 300 for line in retries), retries  # one concise line per retry
    assert "/100)" not in text and "Trying again" not in text, text[-3000:]  # not Celery's 100 retries


# --------------------------------------------------------------------------- helpers


@contextlib.contextmanager
def client_process(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python -m streams run ...`` as a subprocess, killed and reaped on exit whatever happened."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
    text = log.read_text(errors="replace")
    assert "Task was destroyed" not in text and "Traceback" not in text, text[-3000:]


async def wait_until_async(predicate: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    """Like ``wait_until``, for an async predicate."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.02)
