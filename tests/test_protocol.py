"""Protocol codec tests: golden frames from the real facilitator, PROTOCOL.md examples, rules, fuzzing."""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Any

import orjson
import pytest
from bittensor_wallet import Keypair
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from streams.protocol import (
    FINAL_STATUSES,
    IN_PROGRESS_STATUSES,
    MAX_FRAME_BYTES,
    DecodeError,
    HordeFailureDetails,
    HuggingfaceVolume,
    JobStatus,
    JobStatusMetadata,
    JobStatusUpdate,
    MinerResponse,
    MultiUpload,
    MultiVolume,
    Response,
    Signer,
    SingleFilePutUpload,
    V0AuthenticationRequest,
    V0Heartbeat,
    V0JobCheated,
    V0MachineSpecsUpdate,
    V2JobRequest,
    decode,
    decode_outbound,
    encode,
    message_kind,
)

CAPTURE = Path(__file__).resolve().parents[1] / "notebooks" / "data" / "real-facilitator-session.jsonl"
"""The real facilitator's capture ships with the repository; a missing capture fails the tests."""
JOB_UUID = "2dcdf287-e485-408f-b2d2-ad0d3c8f9237"
ALICE_PUBLIC_KEY = "d43593c715fdd31c61141abd04a99fd6822c8558854ccde39a5684e7a56da27d"
# Outbound frames the capture shows being rejected by the real facilitator; we must reject them too.
INVALID_OUTBOUND_MARKERS = ("{not json", '"no_such_status"', '"extra": 1')


def _capture_frames(direction: str) -> list[Any]:
    """One param per captured frame (reading fails loudly if the capture is missing)."""
    lines = CAPTURE.read_text(encoding="utf-8").splitlines()[1:]  # line 1 is the header
    records = [json.loads(line) for line in lines if line.strip()]
    return [pytest.param(r["frame"], id=f"t{r['t']}") for r in records if r.get("dir") == direction]


def _ordered(text: str) -> Any:
    """Parsed JSON that also compares key order, at every level."""
    return json.loads(text, object_pairs_hook=list)


# ----------------------------------------------------------------------------- golden: capture


@pytest.mark.parametrize("frame", _capture_frames("in"))
def test_every_captured_inbound_frame_decodes(frame: str) -> None:
    message = decode(frame)
    parsed = json.loads(frame)
    if "message_type" not in parsed:
        assert isinstance(message, Response)
        assert message.status == parsed["status"]
        assert message.error_types == tuple(e["type"] for e in parsed["errors"])
        assert message.is_success == (parsed["status"] == "success")
    elif parsed["message_type"] == "V2JobRequest":
        assert isinstance(message, V2JobRequest)
        assert message.uuid == parsed["uuid"]
        assert message.raw == parsed
    else:
        assert isinstance(message, V0JobCheated)
        assert message.job_uuid == parsed["job_uuid"]
        assert message.raw == parsed
    assert _ordered(encode(message)) == _ordered(frame)


@pytest.mark.parametrize("frame", _capture_frames("out"))
def test_every_captured_outbound_frame_round_trips_or_is_rejected(frame: str) -> None:
    if any(marker in frame for marker in INVALID_OUTBOUND_MARKERS):
        with pytest.raises(DecodeError):
            decode_outbound(frame)
        return
    message = decode_outbound(frame)
    assert _ordered(encode(message)) == _ordered(frame)
    assert decode_outbound(encode(message)) == message


def test_capture_covers_what_the_readme_promises() -> None:
    inbound = [decode(p.values[0]) for p in _capture_frames("in")]
    error_types = {t for m in inbound if isinstance(m, Response) for t in m.error_types}
    assert {
        "auth.not_authenticated",
        "json_invalid",
        "auth.already_authenticated",
        "job.integrity_error",
        "job.not_found",
        "extra_forbidden",
        "auth.validator_not_found",
        "auth.signature_invalid",
    } <= error_types
    assert sum(isinstance(m, V2JobRequest) for m in inbound) == 4
    assert sum(isinstance(m, V0JobCheated) for m in inbound) == 1
    outbound = [p.values[0] for p in _capture_frames("out")]
    rejected = [f for f in outbound if any(marker in f for marker in INVALID_OUTBOUND_MARKERS)]
    assert len(rejected) == len(INVALID_OUTBOUND_MARKERS)


def test_response_describe_gives_the_facilitators_own_text() -> None:
    not_found = decode('{"status":"error","errors":[{"msg":"Job not found","type":"job.not_found"}]}')
    assert isinstance(not_found, Response)
    assert not_found.describe() == "job.not_found: Job not found"
    assert not not_found.is_success
    two = Response.model_validate({"status": "error", "errors": [{"type": "a", "msg": "A"}, {"type": "b"}]})
    assert two.describe() == "a: A; b"
    assert Response(status="success").describe() == "success"


def test_pydantic_error_details_are_kept_on_response_errors() -> None:
    frame = (
        '{"status":"error","errors":[{"msg":"Extra inputs are not permitted","type":"extra_forbidden",'
        '"help":"","loc":["V0JobStatusUpdate","extra"],"input":1}]}'
    )
    response = decode(frame)
    assert isinstance(response, Response)
    assert response.errors[0].model_extra == {"loc": ["V0JobStatusUpdate", "extra"], "input": 1}


# ----------------------------------------------------------------------------- PROTOCOL.md examples

PROTOCOL_OUTBOUND_EXAMPLES: list[dict[str, Any]] = [
    {
        "message_type": "V0AuthenticationRequest",
        "public_key": ALICE_PUBLIC_KEY,
        "signature": "0x" + "ab" * 64,
    },
    {"message_type": "V0Heartbeat"},
    {
        "message_type": "V0MachineSpecsUpdate",
        "miner_hotkey": "5F...",
        "validator_hotkey": "5G...",
        "specs": {"os": "...", "cpu": {}, "gpu": {}, "ram": {}, "hard_disk": {}},
        "batch_id": "...",
    },
    {"message_type": "V0JobStatusUpdate", "uuid": JOB_UUID, "status": "accepted", "metadata": None},
    {
        "message_type": "V0JobStatusUpdate",
        "uuid": JOB_UUID,
        "status": "failed",
        "metadata": {
            "miner_response": {
                "docker_process_stderr": "e",
                "docker_process_stdout": "o",
                "artifacts": {},
                "upload_results": {},
            },
            "job_rejection_details": {
                "rejected_by": "miner",
                "reason": "busy",
                "message": "m",
                "context": {},
            },
            "job_failure_details": {
                "reason": "timeout",
                "stage": "execution",
                "message": "m",
                "context": {"k": 1},
                "docker_process_exit_status": 137,
            },
            "horde_failure_details": {
                "reported_by": "validator",
                "reason": "generic_error",
                "message": "m",
                "context": {},
            },
            "streaming_details": {
                "streaming_server_cert": "PEM",
                "streaming_server_address": "10.0.0.1",
                "streaming_server_port": 8443,
            },
        },
    },
]

PROTOCOL_INBOUND_EXAMPLES: list[dict[str, Any]] = [
    {"status": "success", "errors": []},
    {"status": "error", "errors": [{"msg": "Job not found", "type": "job.not_found", "help": "..."}]},
    {
        "type": "job.new",
        "message_type": "V2JobRequest",
        "uuid": "7b0f...",
        "job_namespace": None,
        "executor_class": "spin_up-4min.gpu-24gb",
        "docker_image": "backenddevelopersltd/compute-horde-job-echo:v0-latest",
        "args": ["--x"],
        "env": {"K": "V"},
        "use_gpu": True,
        "volume": None,
        "output_upload": None,
        "artifacts_dir": None,
        "on_trusted_miner": False,
        "download_time_limit": 60,
        "execution_time_limit": 120,
        "upload_time_limit": 60,
        "streaming_start_time_limit": 30,
        "streaming_details": None,
        "signature": {
            "signature_type": "bittensor",
            "signatory": "5F...",
            "timestamp_ns": 1730000000000000000,
            "signature": "<base64>",
            "signature_scope": "SignedFields",
        },
    },
    {
        "type": "job.cheated",
        "message_type": "V0JobCheated",
        "job_uuid": "...",
        "trusted_job_uuid": "...",
        "details": {},
        "signature": {},
    },
]


@pytest.mark.parametrize("example", PROTOCOL_OUTBOUND_EXAMPLES, ids=lambda e: e["message_type"])
def test_protocol_md_outbound_examples_round_trip(example: dict[str, Any]) -> None:
    message = decode_outbound(orjson.dumps(example))
    frame = encode(message)
    assert json.loads(frame) == example
    assert decode_outbound(frame) == message


@pytest.mark.parametrize(
    "example", PROTOCOL_INBOUND_EXAMPLES, ids=lambda e: e.get("message_type", "Response")
)
def test_protocol_md_inbound_examples_round_trip(example: dict[str, Any]) -> None:
    message = decode(orjson.dumps(example))
    frame = encode(message)
    assert json.loads(frame) == example
    assert decode(frame) == message


# ----------------------------------------------------------------------------- JobStatusUpdate rules


@pytest.mark.parametrize(
    "bad", ["", "not-a-uuid", "7b0f...", JOB_UUID + "0", " " + JOB_UUID, JOB_UUID + "\n", "٣" * 32, "1_" * 16]
)
def test_status_update_rejects_a_non_uuid_at_construction(bad: str) -> None:
    with pytest.raises(ValidationError, match="not a valid UUID"):
        JobStatusUpdate(uuid=bad, status=JobStatus.ACCEPTED)


def test_status_update_accepts_uuid_spellings_the_facilitator_parses() -> None:
    for spelling in (JOB_UUID, JOB_UUID.upper(), JOB_UUID.replace("-", "")):
        assert JobStatusUpdate(uuid=spelling, status=JobStatus.ACCEPTED).uuid == spelling


@pytest.mark.parametrize("status", [JobStatus.COMPLETED, JobStatus.STREAMING_READY])
def test_completed_and_streaming_ready_never_carry_null_metadata(status: JobStatus) -> None:
    for update in (
        JobStatusUpdate(uuid=JOB_UUID, status=status),
        JobStatusUpdate(uuid=JOB_UUID, status=status, metadata=None),
        decode_outbound(
            orjson.dumps({"message_type": "V0JobStatusUpdate", "uuid": JOB_UUID, "status": status})
        ),
    ):
        assert isinstance(update, JobStatusUpdate)
        assert update.metadata == JobStatusMetadata()
        assert json.loads(encode(update))["metadata"] == {}


def test_in_progress_status_without_metadata_keeps_null_on_the_wire() -> None:
    frame = encode(JobStatusUpdate(uuid=JOB_UUID, status=JobStatus.ACCEPTED))
    assert _ordered(frame) == [
        ("message_type", "V0JobStatusUpdate"),
        ("uuid", JOB_UUID),
        ("status", "accepted"),
        ("metadata", None),
    ]


def test_unset_metadata_keys_are_omitted_but_given_ones_kept() -> None:
    update = JobStatusUpdate(
        uuid=JOB_UUID,
        status=JobStatus.COMPLETED,
        metadata=JobStatusMetadata(
            miner_response=MinerResponse(docker_process_stdout="hi", docker_process_stderr=""),
            comment="extra keys are allowed",  # type: ignore[call-arg]
        ),
    )
    assert json.loads(encode(update))["metadata"] == {
        "miner_response": {"docker_process_stdout": "hi", "docker_process_stderr": ""},
        "comment": "extra keys are allowed",
    }


def test_final_and_in_progress_statuses_split_all_statuses() -> None:
    assert FINAL_STATUSES == {"completed", "rejected", "failed", "horde_failed"}
    assert FINAL_STATUSES | IN_PROGRESS_STATUSES == set(JobStatus)
    assert not FINAL_STATUSES & IN_PROGRESS_STATUSES
    assert all(s.is_final for s in FINAL_STATUSES)
    assert not any(s.is_final for s in IN_PROGRESS_STATUSES)
    assert JobStatus("execution_done") is JobStatus.EXECUTION_DONE


def test_horde_failed_constructor() -> None:
    update = JobStatusUpdate.horde_failed(JOB_UUID, "unhandled_exception", message="boom")
    assert update.status is JobStatus.HORDE_FAILED
    assert update.metadata is not None
    assert update.metadata.horde_failure_details == HordeFailureDetails(
        reported_by="validator", reason="unhandled_exception", message="boom"
    )
    assert json.loads(encode(update))["metadata"] == {
        "horde_failure_details": {
            "reported_by": "validator",
            "reason": "unhandled_exception",
            "message": "boom",
        }
    }
    with_context = JobStatusUpdate.horde_failed(
        JOB_UUID, "generic_error", context={"trace": "x"}, reported_by="facilitator"
    )
    assert decode_outbound(encode(with_context)) == with_context


def test_outbound_models_are_strict_and_frozen() -> None:
    with pytest.raises(ValidationError, match="extra"):
        V0Heartbeat(unexpected=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        JobStatusUpdate(uuid=JOB_UUID, status="no_such_status")  # type: ignore[arg-type]
    heartbeat = V0Heartbeat()
    with pytest.raises(ValidationError):
        heartbeat.message_type = "x"  # type: ignore[assignment]


def test_specs_update_encodes_in_the_captured_key_order() -> None:
    update = V0MachineSpecsUpdate(miner_hotkey="5F", validator_hotkey="5G", specs={"os": "x"}, batch_id="b")
    assert [k for k, _ in _ordered(encode(update))] == [
        "message_type",
        "miner_hotkey",
        "validator_hotkey",
        "batch_id",
        "specs",
    ]


# ----------------------------------------------------------------------------- inbound looseness


def test_unknown_job_request_fields_are_kept_in_model_and_raw() -> None:
    example = {
        **PROTOCOL_INBOUND_EXAMPLES[2],
        "new_field": {"a": [1, 2]},
        "executor_class": "always_on.future",
    }
    job = decode(orjson.dumps(example))
    assert isinstance(job, V2JobRequest)
    assert job.executor_class == "always_on.future"
    assert job.model_extra == {"new_field": {"a": [1, 2]}}
    assert job.raw == example
    assert json.loads(encode(job))["new_field"] == {"a": [1, 2]}
    assert "raw" not in job.model_dump() and "_raw" not in job.model_dump()


ESSENTIAL_JOB_FIELDS: dict[str, Any] = {
    "message_type": "V2JobRequest", "uuid": "u", "executor_class": "x", "docker_image": "i", "args": [], "env": {},
    "download_time_limit": 1, "execution_time_limit": 2, "upload_time_limit": 3, "streaming_start_time_limit": 4,
}


def test_job_request_decodes_with_only_the_fields_upstream_requires() -> None:
    job = decode(orjson.dumps(ESSENTIAL_JOB_FIELDS))
    assert isinstance(job, V2JobRequest)
    assert (job.use_gpu, job.volume, job.output_upload, job.signature) == (True, None, None, None)


@pytest.mark.parametrize(
    "missing", ["args", "env", "download_time_limit", "execution_time_limit", "upload_time_limit",
                "streaming_start_time_limit"],
)
def test_a_job_request_without_a_required_field_is_a_decode_error_naming_it(missing: str) -> None:
    frame = orjson.dumps({k: v for k, v in ESSENTIAL_JOB_FIELDS.items() if k != missing})
    assert f"{missing}: Field required" in _decode_error(frame).reason


def test_volumes_and_uploads_are_typed_unions_tagged_by_their_type() -> None:
    job = decode(orjson.dumps({
        **ESSENTIAL_JOB_FIELDS,
        "volume": {"volume_type": "multi_volume", "volumes": [
            {"volume_type": "inline", "contents": "UEsF"},
            {"volume_type": "huggingface_volume", "repo_id": "r", "later_field": 1},
        ]},
        "output_upload": {"output_upload_type": "multi_upload", "uploads": [
            {"output_upload_type": "single_file_put", "url": "https://p", "relative_path": "o"},
        ], "system_output": {"output_upload_type": "zip_and_http_post", "url": "https://s"}},
        "streaming_details": {"public_key": "PK", "executor_ip": "10.0.0.1"},
    }))
    assert isinstance(job, V2JobRequest)
    assert isinstance(job.volume, MultiVolume) and isinstance(job.volume.volumes[1], HuggingfaceVolume)
    assert job.volume.volumes[1].model_extra == {"later_field": 1}
    assert isinstance(job.output_upload, MultiUpload)
    assert isinstance(job.output_upload.uploads[0], SingleFilePutUpload)
    assert job.streaming_details is not None and job.streaming_details.executor_ip == "10.0.0.1"
    bad = {**ESSENTIAL_JOB_FIELDS, "volume": {"volume_type": "floppy"}}
    reason = _decode_error(orjson.dumps(bad)).reason
    assert "volume: Input tag 'floppy' found using 'volume_type' does not match" in reason


def test_raw_of_a_job_request_built_in_code_is_its_dump() -> None:
    job = V2JobRequest.model_validate(ESSENTIAL_JOB_FIELDS)
    assert job.raw == json.loads(encode(job))


# ----------------------------------------------------------------------------- bad input


def _decode_error(frame: Any) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode(frame)
    assert str(info.value).startswith(info.value.reason)
    return info.value


@pytest.mark.parametrize(
    ("frame", "says"),
    [
        ("{not json", "not valid JSON"),
        ("", "not valid JSON"),
        ("[1, 2]", "not an object (got an array)"),
        ('"text"', "not an object (got a string)"),
        ("null", "not an object (got null)"),
        ('{"message_type": "V9Mystery"}', "unknown inbound message_type 'V9Mystery'"),
        ('{"message_type": 5}', "unknown inbound message_type 5"),
        ('{"message_type": "V0Heartbeat"}', "unknown inbound message_type 'V0Heartbeat'"),
        ('{"hello": 1}', "neither `message_type` nor `status`"),
        ('{"status": "maybe"}', "invalid Response: status"),
        (
            '{"status": "error", "errors": [{"msg": "no type"}]}',
            "invalid Response: errors.0.type: Field required",
        ),
        (b"\xff\xfe{}", "frame is not valid UTF-8"),
        (b'{"status": "\xc3\x28"}', "frame is not valid UTF-8"),
        ('{"status": "\ud800"}', "frame is not valid UTF-8"),
        ("[" * 100_000, "nested too deeply"),
        ("NaN", "not valid JSON"),
        (None, "frame must be str or bytes, not NoneType"),
        (42, "frame must be str or bytes, not int"),
    ],
)
def test_bad_frames_give_a_decode_error_saying_what_was_wrong(frame: Any, says: str) -> None:
    assert says in _decode_error(frame).reason


def test_wrong_field_types_are_summarised_per_field() -> None:
    frame = orjson.dumps(
        {**PROTOCOL_INBOUND_EXAMPLES[2], "uuid": 7, "use_gpu": "sometimes", "args": "--x", "env": [1]}
    )
    reason = _decode_error(frame).reason
    assert reason.startswith("invalid V2JobRequest: ")
    assert "uuid: Input should be a valid string" in reason
    assert "args: Input should be a valid list" in reason
    assert "(+1 more errors)" in reason
    assert len(reason) < 400


def test_a_frame_over_the_limit_is_rejected_up_front_with_its_size() -> None:
    size = 60 * 1024 * 1024
    for frame in (b" " * size, " " * size):
        error = _decode_error(frame)
        assert f"frame is {size} bytes, larger than the {MAX_FRAME_BYTES} byte limit" == error.reason
        assert error.excerpt.endswith(f"…(+{size - 200} more)")


def test_a_non_ascii_text_frame_is_measured_in_utf8_bytes() -> None:
    frame = "é" * (MAX_FRAME_BYTES // 2 + 1)  # fewer chars than the limit, more bytes
    assert f"frame is {MAX_FRAME_BYTES + 2} bytes" in _decode_error(frame).reason


def test_deep_but_parseable_nesting_is_data_or_a_decode_error() -> None:
    details = "[" * 1000 + "]" * 1000
    frame = (
        f'{{"message_type":"V0JobCheated","job_uuid":"a","trusted_job_uuid":"b","details":{{"x":{details}}}}}'
    )
    assert isinstance(decode(frame), V0JobCheated)


def test_decode_error_shows_a_short_excerpt_and_survives_pickling() -> None:
    error = _decode_error("{" + "x" * 1000)
    assert error.excerpt == "{" + "x" * 199 + "…(+801 more)"
    assert error.reason in str(error) and error.excerpt in str(error)
    again = pickle.loads(pickle.dumps(error))
    assert (again.reason, again.excerpt) == (error.reason, error.excerpt)


def test_decode_outbound_rejects_what_the_facilitator_would() -> None:
    cases: list[tuple[str | bytes, str]] = [
        ('{"message_type": "V2JobRequest"}', "outbound message_type unknown: 'V2JobRequest'"),
        ('{"status": "success", "errors": []}', "outbound message_type missing"),
        ('{"message_type":"V0JobStatusUpdate","uuid":"x","status":"sent"}', "uuid: Value error, not a valid"),
        (b"\x80", "not valid UTF-8"),
    ]
    for frame, says in cases:
        with pytest.raises(DecodeError) as info:
            decode_outbound(frame)
        assert says in info.value.reason


# ----------------------------------------------------------------------------- properties

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
message_like = st.fixed_dictionaries(
    {"message_type": st.sampled_from(["V2JobRequest", "V0JobCheated", "V0Heartbeat", "x"])},
    optional={
        "type": st.sampled_from(["job.new", "job.cheated"]) | json_values,
        "uuid": st.uuids().map(str) | json_values,
        "executor_class": st.text() | json_values,
        "docker_image": st.text(),
        "args": json_values,
        "env": json_values,
        "job_uuid": st.text(),
        "trusted_job_uuid": st.text(),
        "details": json_values,
        "signature": json_values,
        "status": st.sampled_from(["success", "error"]) | json_values,
        "errors": json_values,
    },
) | st.fixed_dictionaries(
    {"status": st.sampled_from(["success", "error"]) | json_values}, optional={"errors": json_values}
)


def _decodes_or_raises_decode_error(frame: str | bytes) -> None:
    try:
        message = decode(frame)
    except DecodeError:
        return
    assert isinstance(message, Response | V2JobRequest | V0JobCheated)


@settings(max_examples=300, deadline=None, database=None)
@given(st.text())
def test_any_text_decodes_or_raises_decode_error(frame: str) -> None:
    _decodes_or_raises_decode_error(frame)


@settings(max_examples=300, deadline=None, database=None)
@given(st.binary())
def test_any_bytes_decode_or_raise_decode_error(frame: bytes) -> None:
    _decodes_or_raises_decode_error(frame)


@settings(max_examples=300, deadline=None, database=None)
@given(json_values | message_like)
def test_any_json_value_decodes_or_raises_decode_error(value: Any) -> None:
    _decodes_or_raises_decode_error(orjson.dumps(value))
    _decodes_or_raises_decode_error(orjson.dumps(value).decode())


@settings(max_examples=200, deadline=None, database=None)
@given(
    st.uuids().map(str),
    st.sampled_from(JobStatus),
    st.none() | st.builds(MinerResponse, docker_process_stdout=st.text(), docker_process_stderr=st.text()),
)
def test_status_updates_round_trip(
    uuid: str, status: JobStatus, miner_response: MinerResponse | None
) -> None:
    metadata = None if miner_response is None else JobStatusMetadata(miner_response=miner_response)
    update = JobStatusUpdate(uuid=uuid, status=status, metadata=metadata)
    assert decode_outbound(encode(update)) == update


# ----------------------------------------------------------------------------- auth and helpers


def test_authentication_request_from_a_real_keypair_verifies() -> None:
    alice = Keypair.create_from_uri("//Alice")
    auth = V0AuthenticationRequest.from_signer(alice)
    assert auth.public_key == ALICE_PUBLIC_KEY
    assert auth.signature.startswith("0x")
    verifier = Keypair(public_key=auth.public_key, ss58_format=42)
    assert verifier.verify(bytes.fromhex(auth.public_key), auth.signature)
    assert verifier.ss58_address == "5GrwvaEF5zXb26Fz9rcQpDWS57CtERHpNehXCPcNoHGKutQY"
    assert decode_outbound(encode(auth)) == auth


class _FakeSigner:
    def __init__(self, public_key: bytes | None) -> None:
        self._public_key = public_key

    @property
    def public_key(self) -> bytes | None:
        return self._public_key

    def sign(self, data: bytes) -> bytes:
        return b"sig:" + data


def test_authentication_request_from_any_signer() -> None:
    auth = V0AuthenticationRequest.from_signer(_FakeSigner(b"\x01\xab"))
    assert (auth.public_key, auth.signature) == ("01ab", "0x" + (b"sig:\x01\xab").hex())
    assert isinstance(_FakeSigner(None), Signer) and isinstance(Keypair.create_from_uri("//Bob"), Signer)
    with pytest.raises(ValueError, match="no public key"):
        V0AuthenticationRequest.from_signer(_FakeSigner(None))


def test_captured_authentication_matches_ours() -> None:
    first_auth = next(
        m
        for p in _capture_frames("out")
        if "V0AuthenticationRequest" in p.values[0]
        and isinstance(m := decode_outbound(p.values[0]), V0AuthenticationRequest)
    )
    ours = V0AuthenticationRequest.from_signer(Keypair.create_from_uri("//Alice"))
    assert first_auth.public_key == ours.public_key
    verifier = Keypair(public_key=first_auth.public_key, ss58_format=42)
    assert verifier.verify(bytes.fromhex(first_auth.public_key), first_auth.signature)


def test_message_kind_names_frames_and_messages() -> None:
    assert message_kind(V0Heartbeat()) == "V0Heartbeat"
    assert message_kind(JobStatusUpdate(uuid=JOB_UUID, status=JobStatus.SENT)) == "V0JobStatusUpdate"
    assert message_kind(Response(status="success")) == "Response"
    assert message_kind('{"status":"success","errors":[]}') == "Response"
    assert message_kind(orjson.dumps(PROTOCOL_INBOUND_EXAMPLES[2])) == "V2JobRequest"
    assert message_kind('{"message_type": "V0JobCheated"}') == "V0JobCheated"
    assert message_kind('{"message_type": "attacker-chosen"}') == "unknown"
    assert message_kind("{not json") == "malformed"
    assert message_kind("[]") == "malformed"


def test_unforeseen_failures_inside_decode_still_become_decode_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def explode(_: object) -> Any:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(Response, "model_validate", explode)
    with pytest.raises(DecodeError, match="RecursionError"):
        decode('{"status": "success", "errors": []}')
