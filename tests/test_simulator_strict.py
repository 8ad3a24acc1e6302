"""The simulator is as strict as production by default (PROTOCOL.md: "Production transport", "Job routing
and eviction", "Machine specs", "Typed status metadata", "Signatures", "Connect-time auth"), shown against
real websocket clients on 127.0.0.1; ``lenient=True`` keeps the kinder behaviour."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from bittensor_wallet import Keypair
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from streams.devtools.simulator import SUCCESS, FacilitatorSimulator, JobNotCreated, serve_forever
from streams.transport import WebSocketTransport
from tests.signed_fields import job_payload, verifies

AuthFrame = Callable[..., str]
pytestmark = pytest.mark.timeout(30)
MiB = 2**20
HEARTBEAT = '{"message_type": "V0Heartbeat"}'
CAPTURE = Path(__file__).resolve().parents[1] / "notebooks" / "data" / "real-facilitator-session.jsonl"
CAPTURE_SPECS = {
    "os": "Ubuntu 24.04",
    "cpu": {"count": 8, "model": "Xeon"},
    "gpu": {"count": 1, "details": [{"name": "NVIDIA RTX A6000", "capacity": "49140"}]},
    "ram": {"total": "46236340", "free": "22817068"},
    "hard_disk": {"total": "", "free": "1"},
}


@contextlib.asynccontextmanager
async def opened(sim: FacilitatorSimulator, **kwargs: Any) -> AsyncIterator[ClientConnection]:
    """A plain websockets client (it answers pings and offers permessage-deflate by default)."""
    async with connect(sim.url, max_size=None, close_timeout=0.5, **kwargs) as ws:
        yield ws


async def auth(ws: ClientConnection, auth_frame: AuthFrame, keypair: Keypair | None = None) -> None:
    await ws.send(auth_frame() if keypair is None else auth_frame(keypair))
    assert await ws.recv() == SUCCESS


async def ask(ws: ClientConnection, frame: str) -> dict[str, Any]:
    await ws.send(frame)
    reply = await ws.recv()
    assert isinstance(reply, str)
    result: dict[str, Any] = orjson.loads(reply)
    return result


async def close_code(ws: ClientConnection) -> int | None:
    async with asyncio.timeout(10):
        with contextlib.suppress(ConnectionClosed):
            while True:
                await ws.recv()
    return ws.close_code


def status(job_uuid: str, status_: str, metadata: Any = None) -> str:
    return json.dumps({"message_type": "V0JobStatusUpdate", "uuid": job_uuid, "status": status_, "metadata": metadata})


def specs_update(specs: Any) -> str:
    return json.dumps(
        {
            "message_type": "V0MachineSpecsUpdate",
            "miner_hotkey": "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty",
            "validator_hotkey": "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY",
            "specs": specs,
            "batch_id": "61a8d258-533a-4104-86da-35840c7dbe5d",
        }
    )


async def elapsed(since: float, seconds: float) -> None:
    """Wait until ``seconds`` have passed since ``since`` (for behaviour defined by age)."""
    while time.monotonic() - since < seconds:  # noqa: ASYNC110 - waiting for time itself to pass
        await asyncio.sleep(0.01)


# --- production transport ----------------------------------------------------------------------------


async def test_server_pings_and_a_late_pong_closes_1011(auth_frame: AuthFrame) -> None:
    async with FacilitatorSimulator(ping_interval=0.05, ping_timeout=0.5) as sim:
        async with opened(sim) as healthy, opened(sim) as frozen:
            await auth(healthy, auth_frame)
            await auth(frozen, auth_frame)
            await sim.wait_for(lambda: sim.connection_log[1].pongs >= 3, 5, "three pongs from the healthy client")
            frozen.transport.pause_reading()  # its pongs stop: the server's next ping goes unanswered
            await sim.wait_for(lambda: sim.keepalive_timeouts == [2], 5, "the keepalive timeout")
            frozen.transport.resume_reading()
            assert await close_code(frozen) == 1011
            assert frozen.close_reason == "keepalive ping timeout"
            assert healthy.state.name == "OPEN" and sim.connection_log[1].closed_at is None


async def test_inbound_frames_are_limited_to_16_mib(auth_frame: AuthFrame) -> None:
    async with FacilitatorSimulator() as sim:
        async with opened(sim) as ws:
            await auth(ws, auth_frame)
            job = await sim.send_job_request()
            await ws.recv()
            padding = 16 * MiB - len(status(job["uuid"], "completed", {"miner_response": {}})) - 200
            metadata = {"miner_response": {"docker_process_stdout": "x" * padding, "docker_process_stderr": ""}}
            fits = status(job["uuid"], "completed", metadata)
            assert 16 * MiB - 200 < len(fits) <= 16 * MiB
            assert await ask(ws, fits) == {"status": "success", "errors": []}
            over = fits + " " * (16 * MiB + 1 - len(fits))
            await ws.send(over)
            assert await close_code(ws) == 1009


async def test_lenient_limit_is_50_mib(auth_frame: AuthFrame) -> None:
    async with FacilitatorSimulator(lenient=True) as sim:
        async with opened(sim) as ws:
            await auth(ws, auth_frame)
            big = json.dumps({"message_type": "V0Heartbeat"}) + " " * (17 * MiB)
            await ws.send(big)
            await sim.wait_for(lambda: len(sim.heartbeats[1]) == 1, 10, "the 17 MiB heartbeat")


async def test_permessage_deflate_is_negotiated_and_the_client_accepts_it(auth_frame: AuthFrame) -> None:
    async with FacilitatorSimulator() as sim:
        async with opened(sim) as ws:
            assert ws.response is not None
            assert "permessage-deflate" in ws.response.headers.get("Sec-WebSocket-Extensions", "")
        transport = WebSocketTransport(sim.url)
        await transport.connect()
        try:
            assert "permessage-deflate" in sim.request_headers[2].get("sec-websocket-extensions", "")
            await transport.send(auth_frame())
            assert await transport.recv() == SUCCESS
            job = await sim.send_job_request(env={"BIG": "y" * 100_000})
            assert orjson.loads(await transport.recv()) == job
        finally:
            transport.abort()
    async with FacilitatorSimulator(lenient=True) as sim, opened(sim) as ws:
        assert ws.response is not None and "Sec-WebSocket-Extensions" not in ws.response.headers


# --- job routing and eviction -------------------------------------------------------------------------


async def test_no_channel_no_job_and_nothing_queued(auth_frame: AuthFrame) -> None:
    async with FacilitatorSimulator() as sim:
        with pytest.raises(JobNotCreated, match="no validator has a channel"):
            await sim.send_job_request()
        async with opened(sim) as ws:
            await auth(ws, auth_frame)  # the heartbeat time starts at auth: a job can be created at once
            job = await sim.send_job_request()
            assert orjson.loads(await ws.recv()) == job
        assert list(sim.jobs) == [job["uuid"]], "the refused job was neither created nor queued"
        await sim.wait_for(lambda: not sim.channels, 5, "the row removed on a clean disconnect")
        with pytest.raises(JobNotCreated):
            await sim.send_job_request(validator=sim.connection_log[1].hotkey)


async def test_job_needs_a_heartbeat_under_the_window_and_status_updates_do_not_count(
    auth_frame: AuthFrame, alice: Keypair
) -> None:
    async with FacilitatorSimulator(job_heartbeat_window=0.3) as sim:
        async with opened(sim) as ws:
            await auth(ws, auth_frame)
            authed = sim.connection_log[1].authenticated_at
            assert authed is not None
            job = await sim.send_job_request()
            await ws.recv()
            await elapsed(authed, 0.35)
            assert await ask(ws, status(job["uuid"], "received")) == {"status": "success", "errors": []}
            assert not sim.has_fresh_channel(alice.ss58_address)
            with pytest.raises(JobNotCreated, match=r"heartbeat under 0\.3 s"):
                await sim.send_job_request()
            assert len(sim.jobs) == 1
            await ws.send(HEARTBEAT)
            await sim.wait_for(lambda: sim.has_fresh_channel(alice.ss58_address), 5, "fresh after a heartbeat")
            job = await sim.send_job_request()
            assert orjson.loads(await ws.recv()) == job


async def test_heartbeat_time_starts_at_auth_not_at_connect(auth_frame: AuthFrame, alice: Keypair) -> None:
    async with FacilitatorSimulator(job_heartbeat_window=0.3) as sim, opened(sim) as ws:
        await sim.wait_for(lambda: sim.connections == 1, 5, "connected")
        await elapsed(sim.connection_log[1].opened_at, 0.35)  # longer than the window, unauthenticated
        await auth(ws, auth_frame)
        assert sim.has_fresh_channel(alice.ss58_address)
        job = await sim.send_job_request()
        assert orjson.loads(await ws.recv()) == job


async def test_job_goes_to_every_channel_of_its_validator_stale_ones_included(
    auth_frame: AuthFrame, alice: Keypair, bob: Keypair
) -> None:
    async with FacilitatorSimulator(job_heartbeat_window=0.3) as sim:
        async with opened(sim) as stale, opened(sim) as fresh, opened(sim) as other:
            await auth(stale, auth_frame)
            await auth(fresh, auth_frame)
            await auth(other, auth_frame, bob)
            await elapsed(sim.connection_log[3].authenticated_at or 0.0, 0.35)
            await fresh.send(HEARTBEAT)
            await sim.wait_for(lambda: sim.has_fresh_channel(alice.ss58_address), 5, "alice fresh again")
            assert not sim.has_fresh_channel(bob.ss58_address)
            job = await sim.send_job_request(validator=alice.ss58_address)
            assert orjson.loads(await stale.recv()) == job
            assert orjson.loads(await fresh.recv()) == job
            assert sim.job_channels[job["uuid"]] == [1, 2]
            with pytest.raises(JobNotCreated):
                await sim.send_job_request(validator=bob.ss58_address)
            report = await sim.send_cheat_report(job["uuid"])  # to the job's validator, every channel
            assert orjson.loads(await stale.recv()) == report == orjson.loads(await fresh.recv())
            await other.send(HEARTBEAT)
            await sim.wait_for(lambda: sim.has_fresh_channel(bob.ss58_address), 5, "bob fresh")
            for_bob = await sim.send_job_request(validator=bob.ss58_address)
            assert orjson.loads(await other.recv()) == for_bob
            assert sim.job_channels[for_bob["uuid"]] == [3]


async def test_a_crashed_channel_stays_and_swallows_jobs_a_closed_one_is_removed(auth_frame: AuthFrame) -> None:
    async with FacilitatorSimulator() as sim:
        async with opened(sim) as crashing:
            await auth(crashing, auth_frame)
            job = await sim.send_job_request()
            await crashing.recv()
            await crashing.send(status(job["uuid"], "completed"))  # metadata null: the handler crashes
            assert await close_code(crashing) == 1006
        await sim.wait_for(lambda: not sim.channels[1].alive, 5, "the crashed row marked gone")
        lost = await sim.send_job_request()  # still fresh, so the job is created ... and lost
        assert sim.job_channels[lost["uuid"]] == [] and sim.lost == [(1, lost["uuid"])]
        async with opened(sim) as ws:
            await auth(ws, auth_frame)
            job = await sim.send_job_request()
            assert orjson.loads(await ws.recv()) == job
            assert sim.job_channels[job["uuid"]] == [2] and sim.lost[-1] == (1, job["uuid"])
        await sim.wait_for(lambda: 2 not in sim.channels, 5, "the cleanly closed row removed")
        assert list(sim.channels) == [1]


async def test_eviction_by_heartbeat_age_only(auth_frame: AuthFrame, alice: Keypair, bob: Keypair) -> None:
    async with FacilitatorSimulator(eviction_interval=0.05, eviction_age=0.5) as sim:
        async with opened(sim) as beating, opened(sim) as busy, opened(sim) as crashing, opened(sim):
            await auth(beating, auth_frame)
            await auth(busy, auth_frame, bob)
            await auth(crashing, auth_frame)
            await crashing.send(status("not-a-uuid", "accepted"))  # the handler crashes: the row stays
            job = await sim.send_job_request(validator=bob.ss58_address)
            await busy.recv()
            stop = asyncio.Event()

            async def keep_busy() -> None:
                statuses = iter(["received", "accepted", "executor_ready", "volumes_ready", "execution_done"] * 100)
                while not stop.is_set():
                    await beating.send(HEARTBEAT)
                    await busy.send(status(job["uuid"], next(statuses)))  # status updates do not count
                    await asyncio.sleep(0.05)

            task = asyncio.create_task(keep_busy())
            try:
                assert await close_code(busy) == 3001
            finally:
                stop.set()
                await asyncio.gather(task, return_exceptions=True)
            await sim.wait_for(lambda: 3 in sim.evictions and 3 not in sim.channels, 5, "the crashed row evicted")
            assert 2 in sim.evictions and 1 not in sim.evictions
            assert 1 in sim.channels and sim.channels[1].alive
            assert sim.connection_log[4].closed_at is None, "unauthenticated connections are never evicted"
            assert sim.connection_log[2].close_code == 3001
            assert sim.channels[1].hotkey == alice.ss58_address


async def test_channels_of_validators_that_left_are_evicted(auth_frame: AuthFrame, alice: Keypair) -> None:
    async with FacilitatorSimulator(allowed_hotkeys=[alice.ss58_address], eviction_interval=0.05) as sim:
        async with opened(sim) as ws:
            await auth(ws, auth_frame)
            sim.allowed_hotkeys = frozenset()
            assert await close_code(ws) == 3001


# --- specs and metadata, by the facilitator's schemas ----------------------------------------------------


@pytest.mark.parametrize(
    "specs",
    [
        {"ram": {}, "hard_disk": {}},  # no cpu
        {"cpu": {"count": 1}, "hard_disk": {}},  # no ram
        {"cpu": {"count": 1, "cores": 4}, "ram": {}, "hard_disk": {}},  # cpu forbids extra keys
        {"cpu": {"count": "many"}, "ram": {}, "hard_disk": {}},
        {"cpu": {"count": 1}, "ram": {"total": "lots"}, "hard_disk": {}},
        {"cpu": {"count": 1}, "ram": {}, "hard_disk": {}, "gpu": {"details": [{"capacity": 1}]}},  # no name
        {"cpu": {"count": 1}, "ram": {}, "hard_disk": {"size": 1}},
        {"os": "Ubuntu", "n": 1},
    ],
)
async def test_specs_that_do_not_fit_the_hardware_schema_crash_the_handler(
    specs: dict[str, Any], auth_frame: AuthFrame
) -> None:
    async with FacilitatorSimulator() as sim:
        async with opened(sim) as ws:
            await auth(ws, auth_frame)
            await ws.send(specs_update(specs))
            assert await close_code(ws) == 1006
        assert sim.spec_updates == []
        assert len(sim.violations) == 1 and "hardware schema" in sim.violations[0]
        assert not sim.channels[1].alive, "a crash leaves the row behind"


async def test_specs_that_fit_are_stored_and_lenient_takes_anything(auth_frame: AuthFrame) -> None:
    fitting = [
        CAPTURE_SPECS,
        {"cpu": {"count": 1}, "ram": {}, "hard_disk": {}, "kernel": "6.8"},  # extra keys allowed at the top
        {"cpu": {"count": 2}, "ram": {"swap_used": ""}, "hard_disk": {}, "gpu": None},
        {"cpu": {"count": 1}, "ram": {}, "hard_disk": {}, "gpu": {"details": [{"name": "A", "power_limit": "n/a"}]}},
    ]
    async with FacilitatorSimulator() as sim:
        async with opened(sim) as ws:
            await auth(ws, auth_frame)
            for specs in fitting:
                await ws.send(specs_update(specs))
            await sim.wait_for(lambda: len(sim.spec_updates) == len(fitting), 5, "all specs stored")
        assert [u["specs"] for u in sim.spec_updates] == fitting and sim.violations == []
    async with FacilitatorSimulator(lenient=True) as sim:
        async with opened(sim) as ws:
            await auth(ws, auth_frame)
            await ws.send(specs_update({"anything": True}))
            await sim.wait_for(lambda: len(sim.spec_updates) == 1, 5, "stored")


@pytest.mark.parametrize(
    ("metadata", "errors"),
    [
        (
            {"streaming_details": {"streaming_server_port": 1, "extra": 1}},
            [("extra_forbidden", ["metadata", "streaming_details", "extra"])],
        ),
        (
            {"job_rejection_details": {"rejected_by": "validator", "reason": "busy"}},
            [("missing", ["metadata", "job_rejection_details", "message"])],
        ),
        (
            {"job_failure_details": {"reason": "timeout", "stage": "execution", "message": "m", "context": "c"}},
            [("dict_type", ["metadata", "job_failure_details", "context"])],
        ),
        (
            {
                "horde_failure_details": {
                    "reported_by": "miner",
                    "reason": "generic_error",
                    "message": "m",
                    "context": [1],
                }
            },
            [("dict_type", ["metadata", "horde_failure_details", "context"])],
        ),
        (
            {"miner_response": {"docker_process_stdout": "out"}},
            [("missing", ["metadata", "miner_response", "docker_process_stderr"])],
        ),
        (
            {"miner_response": {"docker_process_stdout": "", "docker_process_stderr": "", "artifacts": {"a": 1}}},
            [("string_type", ["metadata", "miner_response", "artifacts", "a"])],
        ),
        (
            {"job_failure_details": {"reason": "timeout", "message": "m"}},
            [("missing", ["metadata", "job_failure_details", "stage"])],
        ),
    ],
)
async def test_metadata_is_checked_with_the_facilitators_models(
    metadata: dict[str, Any], errors: list[tuple[str, list[str]]], auth_frame: AuthFrame
) -> None:
    async with FacilitatorSimulator() as sim:
        async with opened(sim) as ws:
            await auth(ws, auth_frame)
            job = await sim.send_job_request()
            await ws.recv()
            reply = await ask(ws, status(job["uuid"], "failed", metadata))
            assert reply["status"] == "error"
            assert [(e["type"], e["loc"][1:]) for e in reply["errors"]] == errors
            assert all(e["loc"][0] == "V0JobStatusUpdate" for e in reply["errors"])
            assert sim.stored[job["uuid"]] == ["sent"], "not stored"
    async with FacilitatorSimulator(lenient=True) as sim:
        async with opened(sim) as ws:
            await auth(ws, auth_frame)
            job = await sim.send_job_request()
            await ws.recv()
            assert await ask(ws, status(job["uuid"], "failed", metadata)) == {"status": "success", "errors": []}


async def test_unknown_enum_values_and_statuses_are_stored_as_unknown(auth_frame: AuthFrame) -> None:
    metadata = {
        "job_rejection_details": {"rejected_by": "oracle", "reason": "moon_phase", "message": "no", "context": {}},
        "job_failure_details": {"reason": "nonzero_exit_code", "stage": "teardown", "message": "x"},
        "horde_failure_details": {"reported_by": "validator", "reason": "new_reason", "message": "y"},
    }
    async with FacilitatorSimulator() as sim:
        async with opened(sim) as ws:
            await auth(ws, auth_frame)
            job = await sim.send_job_request()
            await ws.recv()
            assert await ask(ws, status(job["uuid"], "rejected", metadata)) == {"status": "success", "errors": []}
            assert await ask(ws, status(job["uuid"], "paused")) == {"status": "success", "errors": []}
        stored = sim.stored_metadata[job["uuid"]][1]
        assert stored["job_rejection_details"] == {
            "rejected_by": "unknown",
            "reason": "unknown",
            "message": "no",
            "context": {},
        }
        assert (stored["job_failure_details"]["reason"], stored["job_failure_details"]["stage"]) == ("unknown",) * 2
        assert stored["horde_failure_details"]["reported_by"] == "validator"
        assert stored["horde_failure_details"]["reason"] == "unknown"
        assert sim.stored[job["uuid"]] == ["sent", "rejected", "unknown"]


@pytest.mark.parametrize("frame_status", ["completed", "streaming_ready"])
async def test_null_metadata_on_completed_and_streaming_ready_crashes_after_storing(
    frame_status: str, auth_frame: AuthFrame
) -> None:
    async with FacilitatorSimulator() as sim:
        async with opened(sim) as ws:
            await auth(ws, auth_frame)
            job = await sim.send_job_request()
            await ws.recv()
            await ws.send(status(job["uuid"], frame_status))
            assert await close_code(ws) == 1006
        assert sim.stored[job["uuid"]] == ["sent", frame_status]


# --- signatures, the way real traffic makes them ------------------------------------------------------






def capture_frames(message_type: str) -> list[str]:
    records = [json.loads(line) for line in CAPTURE.read_text().splitlines()[1:] if line.strip()]
    return [r["frame"] for r in records if r.get("dir") == "in" and f'"message_type": "{message_type}"' in r["frame"]]


def test_the_capture_verifies_with_this_files_scheme() -> None:
    """The test's own verifier is right: every real job request and cheat report passes it."""
    jobs, cheats = capture_frames("V2JobRequest"), capture_frames("V0JobCheated")
    assert len(jobs) == 4 and len(cheats) == 1
    assert all(verifies(json.loads(frame), job_payload(json.loads(frame))) for frame in jobs)
    cheat = json.loads(cheats[0])
    body = {k: cheat.get(k) for k in ("job_uuid", "trusted_job_uuid", "details")}
    assert verifies(cheat, json.dumps(body, sort_keys=True))
    assert {json.loads(f)["signature"]["signatory"] for f in [*jobs, *cheats]} == {
        FacilitatorSimulator().job_signer_ss58
    }


async def test_job_frames_are_shaped_and_signed_like_the_capture(auth_frame: AuthFrame) -> None:
    real = capture_frames("V2JobRequest")[0]
    real_job = json.loads(real)
    async with FacilitatorSimulator() as sim, opened(sim) as ws:
        await auth(ws, auth_frame)
        job = await sim.send_job_request(real_job["uuid"])
        frame = await ws.recv()
    assert isinstance(frame, str)
    unsigned = lambda text: json.dumps({**json.loads(text), "signature": None})  # noqa: E731
    assert unsigned(frame) == unsigned(real) and frame == json.dumps(job)
    assert list(json.loads(frame)["signature"]) == list(real_job["signature"])
    assert verifies(job, job_payload(job))


async def test_volumes_uploads_non_ascii_and_streaming_are_wrapped_escaped_and_signed(auth_frame: AuthFrame) -> None:
    volume = {"volume_type": "inline", "contents": "UEsDBA==", "relative_path": "data"}
    upload = {
        "output_upload_type": "single_file_put",
        "url": "https://example.invalid/put",
        "relative_path": "out.txt",
        "signed_headers": None,
    }
    streaming = {"public_key": "cert", "executor_ip": None}
    async with FacilitatorSimulator() as sim, opened(sim) as ws:
        await auth(ws, auth_frame)
        job = await sim.send_job_request(
            volume=volume,
            output_upload=upload,
            env={"GREETING": "zdravím ☃"},
            artifacts_dir="/out",
            streaming_details=streaming,
        )
        frame = await ws.recv()
    assert isinstance(frame, str)
    assert "\\u2603" in frame and "☃" not in frame, "Python json.dumps: non-ASCII escaped"
    assert json.loads(frame) == job and job["type"] == "job.new"
    assert job["volume"] == {"volume_type": "multi_volume", "volumes": [volume]}
    assert job["output_upload"] == {"output_upload_type": "multi_upload", "uploads": [upload], "system_output": None}
    assert job["signature"]["signature_scope"] == "SignedFields"
    assert verifies(job, job_payload(job))
    assert "☃" in job_payload(job), "the signed fields keep non-ASCII as UTF-8"


def test_a_zip_upload_is_not_wrapped_a_multi_upload_cannot_hold_it() -> None:
    upload = {"output_upload_type": "zip_and_http_post", "url": "https://example.invalid/post"}
    job = FacilitatorSimulator().job_request(output_upload=upload)
    assert job["output_upload"] == {**upload, "form_fields": None}
    assert verifies(
        job,
        job_payload(
            {**job, "output_upload": {"output_upload_type": "multi_upload", "uploads": [job["output_upload"]]}}
        ),
    )


async def test_args_whitespace_is_stripped_after_signing_like_the_real_facilitator(auth_frame: AuthFrame) -> None:
    async with FacilitatorSimulator() as sim, opened(sim) as ws:
        await auth(ws, auth_frame)
        job = await sim.send_job_request(args=[" --x ", "y"])
        assert orjson.loads(await ws.recv())["args"] == ["--x", "y"]
    assert not verifies(job, job_payload(job))
    assert verifies(job, job_payload({**job, "args": [" --x ", "y"]}))
    lenient = FacilitatorSimulator(lenient=True).job_request(args=[" --x "])
    assert lenient["args"] == [" --x "] and verifies(lenient, job_payload(lenient))


async def test_cheat_reports_are_signed_like_the_sdk_and_the_signer_is_configurable(auth_frame: AuthFrame) -> None:
    charlie = Keypair.create_from_uri("//Charlie")
    async with FacilitatorSimulator(job_signer=charlie) as sim, opened(sim) as ws:
        assert sim.job_signer_ss58 == charlie.ss58_address
        await auth(ws, auth_frame)
        job = await sim.send_job_request()
        await ws.recv()
        report = await sim.send_cheat_report(job["uuid"], details=None)
        assert orjson.loads(await ws.recv()) == report
    assert "details" not in report and report["signature"]["signature_scope"] == "FullRequest"
    body = {"job_uuid": job["uuid"], "trusted_job_uuid": report["trusted_job_uuid"], "details": None}
    assert verifies(report, json.dumps(body, sort_keys=True))
    assert not verifies(report, body), "the dict form (the real validator's own check) does not verify"
    assert report["signature"]["signatory"] == job["signature"]["signatory"] == charlie.ss58_address
    untrusted = FacilitatorSimulator().job_request(signed_by=charlie)
    assert untrusted["signature"]["signatory"] == charlie.ss58_address and verifies(untrusted, job_payload(untrusted))


# --- connect-time auth (upstream draft) ------------------------------------------------------------------


def auth_headers(keypair: Keypair, at: float | None = None, *, signed: str | None = None) -> dict[str, str]:
    timestamp = str(int(time.time() if at is None else at))
    public_key = keypair.public_key
    assert public_key is not None
    return {
        "X-Timestamp": timestamp,
        "X-Public-Key": public_key.hex(),
        "X-Signature": "0x" + keypair.sign((signed or timestamp).encode()).hex(),
    }


async def refused(sim: FacilitatorSimulator, headers: dict[str, str] | None) -> int:
    with pytest.raises(InvalidStatus) as caught:
        async with connect(sim.url, additional_headers=headers):
            pass
    return caught.value.response.status_code


async def test_header_auth_authenticates_at_connect(alice: Keypair) -> None:
    async with FacilitatorSimulator(auth_modes=["headers"]) as sim:
        async with opened(sim, additional_headers=auth_headers(alice)) as ws:
            await sim.wait_for(lambda: bool(sim.live_channels()), 5, "the channel")
            job = await sim.send_job_request()  # no V0AuthenticationRequest needed
            assert orjson.loads(await ws.recv()) == job
            await ws.send(HEARTBEAT)
            await sim.wait_for(lambda: len(sim.heartbeats[1]) == 1, 5, "the heartbeat")
        assert sim.connection_log[1].auth_method == "headers"
        assert sim.connection_log[1].hotkey == alice.ss58_address
        assert await refused(sim, None) == 403, "headers required when message auth is off"


@pytest.mark.parametrize(
    ("age", "signed", "why"),
    [
        (61, None, "old"),
        (-6, None, "in the future"),
        (0, "1", "does not verify"),
    ],
)
async def test_header_auth_refusals_are_http_403(age: int, signed: str | None, why: str, alice: Keypair) -> None:
    async with FacilitatorSimulator() as sim:
        assert await refused(sim, auth_headers(alice, time.time() - age, signed=signed)) == 403
        assert sim.connections == 0 and why in sim.handshake_refusals[0]
        headers = auth_headers(alice)
        del headers["X-Signature"]
        assert await refused(sim, headers) == 403


async def test_header_auth_edges_of_the_window_are_accepted(alice: Keypair) -> None:
    async with FacilitatorSimulator() as sim:
        for at in (time.time() - 55, time.time() + 4):
            async with opened(sim, additional_headers=auth_headers(alice, at)):
                await sim.wait_for(lambda: bool(sim.live_channels()), 5, "authenticated by headers")
        assert sim.handshake_refusals == []


async def test_both_modes_headers_then_message_and_message_only_ignores_headers(
    alice: Keypair, bob: Keypair, auth_frame: AuthFrame
) -> None:
    async with FacilitatorSimulator() as sim:
        async with opened(sim, additional_headers=auth_headers(alice)) as ws:
            # "both": authenticated by the headers, the request is answered already_authenticated,
            # the connection stays open, and that is no violation; a second request is one.
            for _ in range(2):
                assert (await ask(ws, auth_frame()))["errors"][0]["type"] == "auth.already_authenticated"
            await ws.send(HEARTBEAT)
            await sim.wait_for(lambda: len(sim.heartbeats[1]) == 1, 5, "the heartbeat")
        assert sim.authenticated_connections == 1
        assert sim.violations == ["conn 1: second V0AuthenticationRequest on an authenticated connection"]
        async with opened(sim) as ws:
            await auth(ws, auth_frame)  # message auth still works
        assert await refused(sim, auth_headers(bob, time.time() - 120)) == 403
    async with FacilitatorSimulator(auth_modes=["message"]) as sim:
        async with opened(sim, additional_headers=auth_headers(alice, time.time() - 120)) as ws:
            assert (await ask(ws, HEARTBEAT))["errors"][0]["type"] == "auth.not_authenticated"
            await auth(ws, auth_frame)
        assert sim.connection_log[1].auth_method == "message"


# --- lenient mode and the CLI switch ----------------------------------------------------------------------


async def test_lenient_queues_jobs_for_the_next_auth(auth_frame: AuthFrame) -> None:
    async with FacilitatorSimulator(lenient=True) as sim:
        queued = await sim.send_job_request()
        async with opened(sim) as ws:
            await ws.send(auth_frame())
            assert await ws.recv() == SUCCESS
            assert orjson.loads(await ws.recv()) == queued


def test_simulate_cli_strict_by_default_and_lenient_on_request() -> None:
    for extra, mode in (([], "strict"), (["--lenient", "--auth-mode", "message"], "lenient")):
        process = subprocess.Popen(
            [sys.executable, "-m", "streams", "simulate", "--port", "0", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert "listening on ws://127.0.0.1:" in line and f"({mode};" in line, line
            assert "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty" in line
        finally:
            process.terminate()
            process.wait(10)


async def test_serve_forever_paces_jobs_to_the_first_validator(auth_frame: AuthFrame) -> None:
    ready: asyncio.Future[FacilitatorSimulator] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve_forever(port=0, jobs=3, job_interval=0.05, seed=3, on_ready=ready.set_result))
    try:
        sim = await asyncio.wait_for(ready, 5)
        async with opened(sim) as ws:
            await auth(ws, auth_frame)
            frames = [orjson.loads(await ws.recv()) for _ in range(3)]
        assert [f["uuid"] for f in frames] == list(sim.jobs)
        assert all(verifies(f, job_payload(f)) for f in frames)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
