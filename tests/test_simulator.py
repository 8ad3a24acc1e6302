"""The facilitator simulator answers exactly like the real facilitator (PROTOCOL.md and the capture)."""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from bittensor_wallet import Keypair
from websockets.asyncio.client import connect

from streams.devtools.simulator import SUCCESS, FacilitatorSimulator
from streams.transport import CloseInfo, Transport, TransportClosed, WebSocketTransport
from tests.signed_fields import job_payload, verifies

AuthFrame = Callable[..., str]  # the auth_frame fixture
CAPTURE = Path(__file__).resolve().parents[1] / "notebooks" / "data" / "real-facilitator-session.jsonl"
pytestmark = pytest.mark.timeout(20)

NOT_AUTHENTICATED = (
    '{"status":"error","errors":[{"msg":"Not authenticated","type":"auth.not_authenticated",'
    '"help":"Please send authentication request first"}]}'
)
INTEGRITY_ERROR = (
    '{"status":"error","errors":[{"msg":"Integrity error","type":"job.integrity_error",'
    '"help":"Probably you are trying to set the same status twice?"}]}'
)
JOB_NOT_FOUND = (
    '{"status":"error","errors":[{"msg":"Job not found","type":"job.not_found",'
    '"help":"Job with this UUID was not found"}]}'
)
HEARTBEAT = '{"message_type": "V0Heartbeat"}'
BOB_SS58 = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"
"""//Bob: the signatory of the capture's job requests and cheat report."""




@pytest.fixture
async def transports() -> AsyncIterator[list[Transport]]:
    made: list[Transport] = []
    yield made
    for transport in made:
        transport.abort()


async def connected(sim: FacilitatorSimulator, made: list[Transport], **options: Any) -> WebSocketTransport:
    transport = WebSocketTransport(sim.url, **options)
    made.append(transport)
    await transport.connect()
    return transport


async def authenticated(
    sim: FacilitatorSimulator, auth_frame: AuthFrame, made: list[Transport], **options: Any
) -> WebSocketTransport:
    transport = await connected(sim, made, **options)
    await transport.send(auth_frame())
    assert await transport.recv() == SUCCESS
    return transport


async def ask(transport: Transport, frame: str) -> str:
    await transport.send(frame)
    reply = await transport.recv()
    assert isinstance(reply, str)
    return reply


def status(job_uuid: str, status_: str, metadata: Any = None, **extra: Any) -> str:
    body = {"message_type": "V0JobStatusUpdate", "uuid": job_uuid, "status": status_, "metadata": metadata}
    return json.dumps({**body, **extra})


async def closed(transport: Transport) -> CloseInfo:
    async with asyncio.timeout(5):
        with pytest.raises(TransportClosed) as caught:
            while True:
                await transport.recv()
    return caught.value.info


def capture() -> tuple[dict[str, Any], list[dict[str, Any]]]:
    header, *records = (json.loads(line) for line in CAPTURE.read_text().splitlines() if line.strip())
    return header, records


async def test_replaying_the_real_session_gives_the_real_responses(alice: Keypair, transports: list[Transport]) -> None:
    """Every Response of the captured session, byte for byte, and the same stored statuses."""
    header, records = capture()
    async with FacilitatorSimulator(allowed_hotkeys=[alice.ss58_address]) as sim:
        for record in records:  # the jobs the real facilitator created during the session
            frame = orjson.loads(record["frame"]) if record.get("dir") == "in" else {}
            if frame.get("message_type") == "V2JobRequest":
                sim.register_job(frame["uuid"])
        by_conn: dict[int, list[dict[str, Any]]] = {}
        for record in records:
            by_conn.setdefault(record["conn"], []).append(record)
        responses = [r for r in records if r.get("dir") == "in" and "message_type" not in orjson.loads(r["frame"])]
        compared = 0
        for conn_records in by_conn.values():
            transport = await connected(sim, transports)
            for record in conn_records:
                if record.get("dir") == "out":
                    await transport.send(record["frame"])
                elif record.get("dir") == "in" and "message_type" not in orjson.loads(record["frame"]):
                    assert await transport.recv() == record["frame"]
                    compared += 1
                elif record.get("event") == "close" and record["code"] == 1006:
                    # The client aborted right after its last frame: wait for it to be stored first.
                    last = orjson.loads(conn_records[-2]["frame"])
                    stored = sim.stored[last["uuid"]]
                    await sim.wait_for(lambda: last["status"] in stored, 2.0)  # noqa: B023
                    transport.abort()
                elif record.get("event") == "close" and record["code"] in (3000, 3001):
                    assert (await closed(transport)).code == record["code"]
                elif record.get("event") == "close":
                    await transport.close(record["code"])
        assert compared == len(responses) > 30
        assert sim.stored == header["stored_statuses"]
        assert sim.connections == 4 and sim.authenticated_connections == 2


async def test_message_before_auth_is_not_authenticated_and_a_violation(
    simulator: FacilitatorSimulator, auth_frame: AuthFrame, transports: list[Transport]
) -> None:
    transport = await connected(simulator, transports)
    assert await ask(transport, HEARTBEAT) == NOT_AUTHENTICATED
    assert await ask(transport, status("7b0f3c1e-0000-4000-8000-000000000000", "accepted")) == NOT_AUTHENTICATED
    assert simulator.violations == [
        "conn 1: V0Heartbeat before authentication",
        "conn 1: V0JobStatusUpdate before authentication",
    ]
    assert [r.authenticated for r in simulator.received] == [False, False]
    assert await ask(transport, auth_frame()) == SUCCESS  # the connection stays usable
    assert simulator.heartbeats[1] == []


async def test_parse_errors_have_the_capture_shape(
    simulator: FacilitatorSimulator, auth_frame: AuthFrame, transports: list[Transport]
) -> None:
    _, records = capture()
    expected = {r["frame"] for r in records if '"json_invalid"' in r.get("frame", "")}
    transport = await connected(simulator, transports)
    assert await ask(transport, "{not json") in expected  # before auth too
    await transport.send(auth_frame())
    assert await transport.recv() == SUCCESS
    job = await simulator.send_job_request()
    await transport.recv()

    extra = orjson.loads(await ask(transport, status(job["uuid"], "failed", extra=1)))
    assert extra["errors"] == [
        {
            "msg": "Extra inputs are not permitted",
            "type": "extra_forbidden",
            "help": "",
            "loc": ["V0JobStatusUpdate", "extra"],
            "input": 1,
            "url": "https://errors.pydantic.dev/2.10/v/extra_forbidden",
        }
    ]
    missing = orjson.loads(await ask(transport, '{"message_type": "V0JobStatusUpdate", "uuid": "x"}'))
    assert [(e["type"], e["loc"]) for e in missing["errors"]] == [("missing", ["V0JobStatusUpdate", "status"])]
    untagged = orjson.loads(await ask(transport, '{"uuid": "x"}'))
    assert [e["type"] for e in untagged["errors"]] == ["union_tag_not_found"]
    assert len(simulator.violations) == 4


async def test_binary_frame_is_json_type_error(simulator: FacilitatorSimulator) -> None:
    async with connect(simulator.url) as ws:
        await ws.send(b'{"message_type": "V0Heartbeat"}')
        assert await ws.recv() == (
            '{"status":"error","errors":[{"msg":"JSON input should be string, bytes or bytearray",'
            '"type":"json_type","help":"","loc":[],"input":null,'
            '"url":"https://errors.pydantic.dev/2.10/v/json_type"}]}'
        )
    assert simulator.received[0].frame == b'{"message_type": "V0Heartbeat"}'
    assert simulator.violations == ["conn 1: binary frame answered with a pydantic error: json_type"]


async def test_status_updates_success_duplicate_unknown_job_unknown_status(
    simulator: FacilitatorSimulator, auth_frame: AuthFrame, transports: list[Transport]
) -> None:
    transport = await authenticated(simulator, auth_frame, transports)
    job = await simulator.send_job_request()
    await transport.recv()
    assert await ask(transport, status(job["uuid"], "received")) == SUCCESS
    assert await ask(transport, status(job["uuid"], "received")) == INTEGRITY_ERROR
    assert await ask(transport, status("7af26a4b-2b2e-4dbc-b74e-7adb184eea50", "received")) == JOB_NOT_FOUND
    assert await ask(transport, status(job["uuid"], "no_such_status")) == SUCCESS
    assert await ask(transport, status(job["uuid"], "another_new_status")) == INTEGRITY_ERROR  # both "unknown"
    metadata = {"miner_response": {"docker_process_stdout": "hi", "docker_process_stderr": ""}}
    assert await ask(transport, status(job["uuid"], "completed", metadata)) == SUCCESS
    assert simulator.stored[job["uuid"]] == ["sent", "received", "unknown", "completed"]
    assert simulator.stored_metadata[job["uuid"]][-1] == metadata
    assert simulator.violations == []


async def test_accept_unknown_jobs_stores_them(auth_frame: AuthFrame, transports: list[Transport]) -> None:
    async with FacilitatorSimulator(accept_unknown_jobs=True) as sim:
        transport = await authenticated(sim, auth_frame, transports)
        job_uuid = "7af26a4b-2b2e-4dbc-b74e-7adb184eea50"
        assert await ask(transport, status(job_uuid, "accepted")) == SUCCESS
        assert sim.stored[job_uuid] == ["sent", "accepted"]


@pytest.mark.parametrize(
    ("frame_status", "uuid_valid"),
    [("completed", True), ("streaming_ready", True), ("accepted", False)],
)
async def test_crashing_updates_drop_the_connection(
    frame_status: str,
    uuid_valid: bool,
    simulator: FacilitatorSimulator,
    auth_frame: AuthFrame,
    transports: list[Transport],
) -> None:
    transport = await authenticated(simulator, auth_frame, transports)
    job = await simulator.send_job_request()
    await transport.recv()
    await transport.send(status(job["uuid"] if uuid_valid else "not-a-uuid", frame_status))
    info = await closed(transport)
    assert info.code == 1006  # no Response, no close frame
    assert simulator.stored[job["uuid"]] == (["sent", frame_status] if uuid_valid else ["sent"])
    assert len(simulator.violations) == 1
    assert "crashes the facilitator" in simulator.violations[0]
    await simulator.wait_for(lambda: simulator.connection_log[1].close_code == 1006, 2.0)


async def test_second_auth_is_already_authenticated_and_stays_open(
    simulator: FacilitatorSimulator, auth_frame: AuthFrame, transports: list[Transport]
) -> None:
    transport = await authenticated(simulator, auth_frame, transports)
    reply = orjson.loads(await ask(transport, auth_frame()))
    assert reply["errors"][0]["type"] == "auth.already_authenticated"
    await transport.send(HEARTBEAT)
    await simulator.wait_for(lambda: len(simulator.heartbeats[1]) == 1, 2.0)
    assert transport.is_connected()
    assert simulator.authenticated_connections == 1


async def test_refuse_next_auth_kinds_then_success(
    simulator: FacilitatorSimulator, auth_frame: AuthFrame, alice: Keypair, transports: list[Transport]
) -> None:
    simulator.refuse_next_auth("validator_not_found")
    simulator.refuse_next_auth("signature_invalid", times=2)
    expected = [(3001, "auth.validator_not_found"), (3000, "auth.signature_invalid"), (3000, "auth.signature_invalid")]
    for code, error_type in expected:
        transport = await connected(simulator, transports)
        reply = orjson.loads(await ask(transport, auth_frame()))
        assert reply["errors"][0]["type"] == error_type
        if code == 3001:
            assert alice.ss58_address in reply["errors"][0]["help"]
        assert (await closed(transport)).code == code
    await authenticated(simulator, auth_frame, transports)
    assert simulator.authenticated_connections == 1


async def test_allowed_hotkeys(
    alice: Keypair, bob: Keypair, auth_frame: AuthFrame, transports: list[Transport]
) -> None:
    async with FacilitatorSimulator(allowed_hotkeys=[bob.ss58_address]) as sim:
        transport = await connected(sim, transports)
        # The lookup comes first: an unknown hotkey is 3001 whatever the signature.
        reply = orjson.loads(await ask(transport, auth_frame(alice, signed=b"garbage")))
        assert reply["errors"][0]["type"] == "auth.validator_not_found"
        assert (await closed(transport)).code == 3001
        transport = await connected(sim, transports)
        assert await ask(transport, auth_frame(bob)) == SUCCESS
        assert sim.connection_log[2].hotkey == bob.ss58_address


async def test_slow_acks_keep_order(
    simulator: FacilitatorSimulator, auth_frame: AuthFrame, transports: list[Transport]
) -> None:
    transport = await authenticated(simulator, auth_frame, transports)
    job = await simulator.send_job_request()
    await transport.recv()
    simulator.set_ack_delay(0.05)
    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    statuses = ["received", "accepted", "received", "executor_ready", "no_such", "volumes_ready"]
    for item in statuses:
        await transport.send(status(job["uuid"], item))
    await transport.send(status("7af26a4b-2b2e-4dbc-b74e-7adb184eea50", "accepted"))
    replies = [await transport.recv() for _ in range(len(statuses) + 1)]
    assert loop.time() - sent_at >= 0.05
    assert replies == [SUCCESS, SUCCESS, INTEGRITY_ERROR, SUCCESS, SUCCESS, SUCCESS, JOB_NOT_FOUND]
    simulator.set_ack_delay(0.0)
    assert await ask(transport, status(job["uuid"], "execution_done")) == SUCCESS


async def test_job_requests_on_auth_are_signed_like_real_traffic(
    simulator: FacilitatorSimulator, auth_frame: AuthFrame, transports: list[Transport]
) -> None:
    simulator.job_requests_on_auth(2)
    transport = await authenticated(simulator, auth_frame, transports)
    frames = [orjson.loads(await transport.recv()) for _ in range(2)]
    job = await simulator.send_job_request(use_gpu=True)
    assert orjson.loads(await transport.recv()) == job
    assert [f["message_type"] for f in frames] == ["V2JobRequest"] * 2
    assert len({f["uuid"] for f in [*frames, job]}) == 3
    assert all(simulator.stored[f["uuid"]] == ["sent"] for f in [*frames, job])
    for frame in [*frames, job]:
        assert verifies(frame, job_payload(frame))
        assert frame["signature"]["signatory"] == simulator.job_signer_ss58 == BOB_SS58

    report = await simulator.send_cheat_report(job["uuid"])
    cheat = orjson.loads(await transport.recv())
    assert cheat == report
    assert list(cheat)[:4] == ["signature", "type", "message_type", "job_uuid"]
    assert cheat["type"] == "job.cheated"


async def test_chaos_injects_faults(
    simulator: FacilitatorSimulator, auth_frame: AuthFrame, transports: list[Transport]
) -> None:
    simulator.chaos(every=4, kinds=("drop", "close", "stall"), rng=random.Random(7), stall_for=None)
    seen: list[int | None] = []
    for _ in range(6):
        transport = await authenticated(
            simulator, auth_frame, transports, ping_interval=0.1, ping_timeout=0.1, close_timeout=0.1
        )
        with pytest.raises(TransportClosed) as caught:
            for _ in range(50):
                await transport.send(HEARTBEAT)
                await asyncio.sleep(0.005)
            while True:  # a stall shows up on the next read, through the keepalive
                await transport.recv()
        seen.append(caught.value.info.code)
    assert len(simulator.faults) >= 6
    kinds = {description.split()[1] for _, description in simulator.faults}
    assert kinds == {"drop", "close", "stall"}
    assert 1006 in seen and 1011 in seen


async def test_wait_for_timeout_is_helpful(simulator: FacilitatorSimulator) -> None:
    with pytest.raises(TimeoutError, match=r"two connections not met within 0.05 s; connections=0"):
        await simulator.wait_for(lambda: simulator.connections == 2, 0.05, "two connections")


async def test_lenient_idle_connection_is_closed_3001(auth_frame: AuthFrame, transports: list[Transport]) -> None:
    async with FacilitatorSimulator(lenient=True, idle_timeout=0.2) as sim:
        transport = await authenticated(sim, auth_frame, transports)
        assert (await closed(transport)).code == 3001


async def test_stop_closes_everything(auth_frame: AuthFrame, transports: list[Transport]) -> None:
    sim = FacilitatorSimulator()
    await sim.start()
    stalled = await authenticated(sim, auth_frame, transports)
    await sim.stall()
    healthy = await authenticated(sim, auth_frame, transports)
    async with asyncio.timeout(3):
        await sim.stop()
    assert (await closed(healthy)).code == 1001
    assert (await closed(stalled)).code == 1006
    assert sim.open_connections == 0
    with pytest.raises(RuntimeError, match="not started"):
        _ = sim.url
