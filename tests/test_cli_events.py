"""`python -m streams run --events FILE --statsd HOST:PORT` as a real process against the simulator.

The CLI writes every SystemEvent as one JSON line, sends metrics to statsd over UDP, survives a
dropped connection, and exits 0 within 2 s of SIGINT without asyncio complaints on stderr.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from streams import EventType
from streams.devtools.simulator import FacilitatorSimulator
from tests.helpers import wait_until
from tests.test_monitor import EVENT_FIELDS, StatsdListener

pytestmark = pytest.mark.timeout(60)

REPO = Path(__file__).resolve().parent.parent
BOB_SS58 = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"  # signs the simulator's jobs
FORBIDDEN_ON_STDERR = ("Traceback", "Task was destroyed", "never awaited", "Task exception was never retrieved")


def read_events(path: Path) -> list[dict[str, Any]]:
    """The complete lines of the events file (a line being written is not read yet)."""
    if not path.exists():
        return []
    text = path.read_bytes()
    return [orjson.loads(line) for line in text.split(b"\n")[:-1]]


def types_of(path: Path) -> list[str]:
    return [event["type"] for event in read_events(path)]


async def test_run_writes_events_as_json_lines_sends_statsd_and_exits_on_sigint(tmp_path: Path) -> None:
    events_file = tmp_path / "events.jsonl"
    stdout_file, stderr_file = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    udp = StatsdListener()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        async with FacilitatorSimulator(seed=77) as sim:
            with stdout_file.open("wb") as out, stderr_file.open("wb") as err:
                proc = await asyncio.create_subprocess_exec(
                    # No --trusted-signer: the safe default (own hotkey only) is no CONFIG_WARNING event,
                    # so the file holds only the connection events below.
                    sys.executable, "-m", "streams", "run", "--dispatcher", "simulated",
                    "--url", sim.url,
                    "--hotkey-uri", "//Alice",
                    "--events", str(events_file),
                    "--statsd", f"127.0.0.1:{udp.port}",
                    "--heartbeat-period", "0.2",
                    "--ping-interval", "0.5",
                    "--ping-timeout", "0.5",
                    "--backoff-base", "0.01",
                    "--backoff-cap", "0.05",
                    cwd=REPO, stdout=out, stderr=err, env=env,
                )
            try:
                await sim.wait_for(lambda: sim.authenticated_connections >= 1, 30, "the CLI authenticated")
                await wait_until(lambda: types_of(events_file) == ["CONNECTED"], 5, "CONNECTED in the file")
                await sim.drop()
                await sim.wait_for(lambda: sim.authenticated_connections >= 2, 10, "the CLI reconnected")
                await wait_until(
                    lambda: types_of(events_file) == ["CONNECTED", "DISCONNECTED", "CONNECTED"],
                    5,
                    f"CONNECTED, DISCONNECTED, CONNECTED in the file (have {types_of(events_file)})",
                )
                await sim.wait_for(lambda: len(sim.heartbeats.get(2, [])) >= 2, 5, "heartbeats after reconnect")
                await udp.wait_for(lambda: udp.values("connected") == [0, 1, 0, 1], 5, "the connected gauge")

                proc.send_signal(signal.SIGINT)
                signalled = time.monotonic()
                returncode = await asyncio.wait_for(proc.wait(), 5)
                took = time.monotonic() - signalled
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
            await sim.wait_for(
                lambda: sim.connection_log[2].close_code is not None, 5, "the server saw the close"
            )
            server_close = sim.connection_log[2].close_code

        stderr = stderr_file.read_text(errors="replace")
        assert returncode == 0, stderr
        assert took < 2.0, f"exited {took:.2f} s after SIGINT"
        assert not [bad for bad in FORBIDDEN_ON_STDERR if bad in stderr], stderr
        assert server_close == 1000, "SIGINT closes the connection cleanly"

        events = read_events(events_file)
        assert events_file.read_bytes().endswith(b"\n"), "every line is complete"
        types = [event["type"] for event in events]
        assert types[:3] == ["CONNECTED", "DISCONNECTED", "CONNECTED"]
        assert types[3:] == ["DISCONNECTED"], "the teardown's own close is recorded too"
        for event in events:
            assert set(event) == {"type", "subtype", "description", "data", "timestamp"}
            assert event["type"] in {str(t) for t in EventType}
            assert set(event["data"]) == EVENT_FIELDS[event["type"]], event
            assert isinstance(event["timestamp"], float) and event["description"]
        first, dropped, second, stopped = events
        assert [first["data"]["connection_id"], second["data"]["connection_id"]] == [1, 2]
        assert first["data"]["downtime"] is None and second["data"]["downtime"] > 0
        assert dropped["subtype"] == "1006"
        assert dropped["data"]["close_code"] == 1006
        assert dropped["data"]["close_reason"] == "connection lost without a close frame"
        assert dropped["data"]["exception"] == "ConnectionClosedError"
        assert dropped["data"]["lived"] > 0 and dropped["data"]["retry_in"] is not None
        assert (dropped["data"]["pending_outbox"], dropped["data"]["pending_in_flight"]) == (0, 0)
        assert (stopped["data"]["close_code"], stopped["data"]["retry_in"]) == (1000, None)
        timestamps = [event["timestamp"] for event in events]
        assert timestamps == sorted(timestamps)

        # The same session, as statsd saw it.
        udp.poll()
        assert udp.unparsed == []
        assert all(stat.name.startswith("facilitator_client.") for stat in udp.stats)
        assert udp.total("connect.attempts") == udp.total("connect.successes") == 2
        assert udp.total("disconnects.1006") == 1
        assert udp.total("messages.sent.V0Heartbeat") >= 3
        assert len(udp.values("connect.duration")) == 2 and len(udp.values("downtime")) == 1
        assert {stat.type for stat in udp.of("connect.duration")} == {"ms"}
    finally:
        udp.close()


async def test_run_appends_to_an_existing_events_file_and_rejects_an_unwritable_one(tmp_path: Path) -> None:
    """--events FILE appends (a restart keeps the history); a path that cannot be opened is a usage error."""
    unwritable = tmp_path / "missing-dir" / "events.jsonl"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streams", "run", "--dispatcher", "simulated",
        "--url", "ws://127.0.0.1:9/ws/v0/", "--hotkey-uri", "//Alice", "--events", str(unwritable),
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert stderr.decode().startswith("error: cannot open --events file"), stderr
    assert b"Traceback" not in stderr

    events_file = tmp_path / "events.jsonl"
    events_file.write_bytes(b'{"type": "CONNECTED", "earlier": true}\n')
    async with FacilitatorSimulator(seed=78) as sim:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streams", "run", "--dispatcher", "simulated", "--trusted-signer", BOB_SS58,
            "--url", sim.url, "--hotkey-uri", "//Alice", "--events", str(events_file),
            cwd=REPO, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        try:
            await wait_until(lambda: len(read_events(events_file)) == 2, 30, "the new CONNECTED line")
            proc.send_signal(signal.SIGINT)
            _, stderr = await asyncio.wait_for(proc.communicate(), 5)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, stderr
    events = read_events(events_file)
    assert events[0] == {"type": "CONNECTED", "earlier": True}
    assert [event["type"] for event in events[1:]] == ["CONNECTED", "DISCONNECTED"]
