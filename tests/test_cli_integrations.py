"""`python -m streams run` with the channel layer and Prometheus, as a real process against the simulator and Redis.

Specs from ``machine_spec_sending``, jobs routed by a host function while their statuses come back over
``job_status_updates__{uuid}``, /metrics served on 127.0.0.1 in multiprocess mode (summing another client
process's values), SIGINT exits cleanly; bad flags get one ``error:`` line and exit status 2.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("channels_redis", reason="the channels extra is not installed (make test installs it)")
pytest.importorskip("prometheus_client", reason="the prometheus extra is not installed (make test installs it)")

from streams.devtools.simulator import FacilitatorSimulator
from tests.helpers import ALICE, BOB, FULL_SEQUENCE
from tests.redis_fixtures import ROOT, RedisServer, free_port
from tests.test_integrations_channels import Peer, peer
from tests.test_integrations_prometheus import scrape, value

pytestmark = pytest.mark.timeout(60)
WARNINGS = ("Traceback", "Task was destroyed but it is pending", "was never awaited", "Exception ignored")


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    with RedisServer(tmp_path_factory.mktemp("cli-channels")) as server:
        yield server


def run_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "streams", "run", *args]


async def test_run_with_the_channel_layer_and_prometheus(tmp_path: Path, redis_server: RedisServer) -> None:
    multiproc = tmp_path / "prometheus"
    multiproc.mkdir()
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
           "TEST_CHANNEL_LAYER": redis_server.url}
    earlier = await asyncio.to_thread(  # another client process of this validator, already gone
        subprocess.run, [sys.executable, "-m", "tests.prometheus_peer", "2"], cwd=ROOT, env=env,
        capture_output=True, timeout=30,
    )
    assert earlier.returncode == 0, earlier.stderr.decode()
    port = free_port()
    driver = Peer("driver", redis_server.url, "--jobs", "4")
    stderr_file = tmp_path / "stderr.txt"
    try:
        async with FacilitatorSimulator(seed=51) as sim:
            with stderr_file.open("wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    *run_cmd("--url", sim.url, "--hotkey-uri", "//Alice", "--trusted-signer", BOB.ss58_address,
                             "--backoff-base", "0.01",
                             "--backoff-cap", "0.05", "--channel-layer", redis_server.url, "--spec-source", "channels",
                             "--dispatcher", "channels:tests.channels_host:route_job", "--prometheus-port", str(port)),
                    cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
                )
            try:
                await sim.wait_for(lambda: sim.authenticated_connections >= 1, 30, "the CLI authenticated")
                await peer("specs", redis_server.url, "--first", "0", "--count", "3", "--malformed-after", "1")
                jobs = [await sim.send_job_request(env={"FAIL": "1"} if i == 2 else {}) for i in range(4)]
                await sim.wait_for(
                    lambda: len(sim.spec_updates) == 3
                    and all(sim.stored[job["uuid"]][-1] in ("completed", "failed") for job in jobs),
                    20, "the specs and every job's statuses",
                )
                samples = await asyncio.to_thread(scrape, f"http://127.0.0.1:{port}/metrics")
                proc.send_signal(signal.SIGINT)
                signalled = time.monotonic()
                returncode = await asyncio.wait_for(proc.wait(), 5)
                took = time.monotonic() - signalled
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
        await driver.finished()
    finally:
        driver.kill()
    stderr = stderr_file.read_text(errors="replace")
    assert returncode == 0, stderr
    assert took < 2.0, f"exited {took:.2f} s after SIGINT"
    assert not [warning for warning in WARNINGS if warning in stderr], stderr
    assert [update["batch_id"] for update in sim.spec_updates] == ["batch-0", "batch-1", "batch-2"]
    assert {update["validator_hotkey"] for update in sim.spec_updates} == {ALICE.ss58_address}
    for index, job in enumerate(jobs):
        assert sim.stored[job["uuid"]] == ["sent", *FULL_SEQUENCE[:-1], "failed" if index == 2 else "completed"]
    assert value(samples, "jobs_dispatched_total") == 2 + 4, "this process's jobs and the earlier process's"
    assert value(samples, "messages_sent_total", type="V0JobStatusUpdate") == 2 * 6 + 4 * 6
    assert value(samples, "source_failures_total", operation="message") == 1, "the malformed spec message"
    assert value(samples, "connected") == 1


def _listening_socket() -> tuple[socket.socket, int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port: int = sock.getsockname()[1]
    return sock, port


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--spec-source", "channels"], "--spec-source channels needs --channel-layer"),
        (["--dispatcher", "channels:tests.channels_host:route_job"], "needs --channel-layer"),
        (["--channel-layer", "http://127.0.0.1:6379", "--spec-source", "channels"], "needs a Redis URL"),
        (["--channel-layer", "redis://127.0.0.1:1/0", "--dispatcher", "channels:nomodule:x"],
         "cannot load dispatcher"),
        (["--channel-layer", "redis://127.0.0.1:1/0", "--dispatcher", "channels:"], "channels:MODULE:ATTR"),
        (["--spec-source", "bogus"], "invalid choice"),
        (["--prometheus-port", "70000"], "--prometheus-port"),
        (["--prometheus-port", "PORT_IN_USE"], "cannot serve /metrics on 127.0.0.1:"),
        (["--prometheus-host", "::1"], "--prometheus-host needs --prometheus-port"),
    ],
)
def test_bad_flags_get_one_line_and_exit_status_2(args: list[str], message: str) -> None:
    sock, busy = _listening_socket()
    try:
        extra = [] if "--dispatcher" in args else ["--dispatcher", "simulated"]
        argv = run_cmd("--url", "ws://127.0.0.1:1/ws/v0/", "--hotkey-uri", "//Alice", *extra,
                       *[str(busy) if arg == "PORT_IN_USE" else arg for arg in args])
        proc = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=30)
    finally:
        sock.close()
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
