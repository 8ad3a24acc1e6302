"""docs/MIGRATING.md's worked example is real: it is the file the test runs, against the simulator and a real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("channels_redis", reason="the channels extra is not installed (make test installs it)")
pytest.importorskip("prometheus_client", reason="the prometheus extra is not installed (make test installs it)")

from prometheus_client import generate_latest

from streams.devtools.simulator import FacilitatorSimulator
from tests.helpers import ALICE, FULL_SEQUENCE, fast_config
from tests.redis_fixtures import ROOT, RedisServer, free_port
from tests.test_integrations_channels import Peer, peer
from tests.test_integrations_prometheus import parse, scrape, value

EXAMPLE = ROOT / "docs" / "examples" / "validator_integration.py"
MIGRATING = ROOT / "docs" / "MIGRATING.md"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("validator_integration", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("example")) as server:
        yield server


def test_migrating_md_shows_the_example_file_verbatim() -> None:
    blocks = re.findall(r"```python\n(.*?)```", MIGRATING.read_text(), flags=re.S)
    assert EXAMPLE.read_text() in blocks, "docs/MIGRATING.md must include docs/examples/validator_integration.py as is"


@pytest.mark.timeout(60)
async def test_the_worked_example_runs_against_the_simulator_and_a_real_redis(
    tmp_path: Path, redis_server: RedisServer
) -> None:
    example = load_example()
    events_db = tmp_path / "events.sqlite3"
    port = free_port()
    dispatched = ("facilitator_client_jobs_dispatched_total", frozenset[tuple[str, str]]())
    dispatched_before = parse(generate_latest().decode()).get(dispatched, 0)  # the global REGISTRY: other tests too
    driver = Peer("driver", redis_server.url, "--jobs", "3", "--jobs-channel", example.JOB_DRIVER_CHANNEL)
    try:
        async with FacilitatorSimulator(seed=41) as sim:
            task = asyncio.create_task(
                example.run(fast_config(sim.url), ALICE, redis_server.url, events_db=str(events_db),
                            prometheus_port=port)
            )
            try:
                await sim.wait_for(lambda: sim.authenticated_connections >= 1, 10, "the example connected")
                await peer("specs", redis_server.url, "--first", "0", "--count", "3")
                jobs = [await sim.send_job_request(env={"FAIL": "1"} if i == 1 else {}) for i in range(3)]
                no_miner = await sim.send_job_request(executor_class="unsupported.gpu")
                await sim.send_cheat_report(jobs[0]["uuid"])
                await sim.wait_for(
                    lambda: len(sim.spec_updates) == 3
                    and all(sim.stored[job["uuid"]][-1] in ("completed", "failed", "rejected")
                            for job in [*jobs, no_miner]),
                    20, "specs arrived and every job ended",
                )
                samples = await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics")
                assert value(samples, "jobs_dispatched_total") - dispatched_before == 4
                assert value(samples, "connected") == 1
            finally:
                task.cancel()  # what SIGINT does to asyncio.run(main())
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await driver.finished()
    finally:
        driver.kill()
    assert sim.stored[jobs[0]["uuid"]] == ["sent", *FULL_SEQUENCE]
    assert sim.stored[jobs[1]["uuid"]] == ["sent", *FULL_SEQUENCE[:-1], "failed"]
    assert sim.stored[no_miner["uuid"]] == ["sent", "received", "rejected"]
    assert [update["batch_id"] for update in sim.spec_updates] == ["batch-0", "batch-1", "batch-2"]
    assert {update["validator_hotkey"] for update in sim.spec_updates} == {ALICE.ss58_address}
    with contextlib.closing(sqlite3.connect(events_db)) as db:
        rows = db.execute("SELECT type, subtype, data FROM system_events").fetchall()
    kinds = {(type_, subtype) for type_, subtype, _data in rows}
    assert ("MINER_ORGANIC_JOB_FAILURE", "JOB_CHEATED") in kinds, rows
    assert ("FACILITATOR_CLIENT", "CONNECTED") in kinds and ("FACILITATOR_CLIENT", "DISCONNECTED") in kinds
    cheat = next(data for type_, subtype, data in rows if subtype == "JOB_CHEATED")
    assert jobs[0]["uuid"] in cheat
    with pytest.raises(OSError):  # the metrics server is gone with the client
        await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics")
