"""Typed outbound metadata and machine specs: what a host reports is checked at the call, never on the wire.

The facilitator's own models (PROTOCOL.md "Typed status metadata") are mirrored here, independently of
streams.protocol, so that "report() accepted it" can be checked against "the facilitator would store it".
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Literal

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, JsonValue

from streams.job_status_update_manager import JobStatusUpdateManager, build_update
from streams.protocol import (
    EncodedStatusUpdate,
    HordeFailureReason,
    JobFailureReason,
    JobRejectionReason,
    JobStage,
    JobStatus,
    JobStatusMetadata,
    JobStatusUpdate,
    Participant,
    encode,
    validate_specs,
)

JOB = "2dcdf287-e485-408f-b2d2-ad0d3c8f9237"

# ----------------------------------------------------------------------------- the facilitator's models

F_PARTICIPANT = Literal["unknown", "sdk", "facilitator", "validator", "miner", "executor"]
F_STAGE = Literal["unknown", "executor_startup", "volume_download", "streaming_startup", "execution", "result_upload"]
F_REJECTION = Literal["unknown", "busy", "invalid_signature", "no_miner_for_job", "validator_blacklisted"]
F_FAILURE = Literal["unknown", "timeout", "nonzero_return_code", "download_failed", "upload_failed"]
F_HORDE = Literal[
    "unknown", "generic_error", "unhandled_exception", "unhandled_timeout", "streaming_failed",
    "miner_connection_failed", "initial_response_timed_out", "executor_readiness_response_timed_out",
    "volumes_timed_out", "streaming_job_ready_timed_out", "execution_timed_out", "final_response_timed_out",
    "executor_spinup_failed", "executor_disconnected", "security_check_failed",
]
F_STATUS = Literal[
    "sent", "received", "accepted", "executor_ready", "streaming_ready", "volumes_ready", "execution_done",
    "completed", "rejected", "failed", "horde_failed",
]


class FMinerResponse(BaseModel, extra="allow"):
    docker_process_stdout: str
    docker_process_stderr: str
    artifacts: dict[str, str] | None = None
    upload_results: dict[str, str] | None = None


class FRejection(BaseModel):
    rejected_by: F_PARTICIPANT
    reason: F_REJECTION
    message: str
    context: dict[str, JsonValue] | None = None


class FFailure(BaseModel):
    reason: F_FAILURE
    stage: F_STAGE
    message: str
    context: dict[str, JsonValue] | None = None
    docker_process_exit_status: int | None = None
    docker_process_stdout: str | None = None
    docker_process_stderr: str | None = None


class FHorde(BaseModel):
    reported_by: F_PARTICIPANT
    reason: F_HORDE
    message: str
    context: dict[str, JsonValue] | None = None


class FStreaming(BaseModel, extra="forbid"):
    streaming_server_cert: str | None = None
    streaming_server_address: str | None = None
    streaming_server_port: int | None = None


class FMetadata(BaseModel, extra="allow"):
    miner_response: FMinerResponse | None = None
    job_rejection_details: FRejection | None = None
    job_failure_details: FFailure | None = None
    horde_failure_details: FHorde | None = None
    streaming_details: FStreaming | None = None


class FUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    message_type: Literal["V0JobStatusUpdate"]
    uuid: uuid.UUID
    status: F_STATUS
    metadata: FMetadata | None


def facilitator_stores(frame: str) -> FUpdate:
    """What the real facilitator does with the frame: parse it (raises if it would answer an error)."""
    update = FUpdate.model_validate(orjson.loads(frame))
    # It crashes (no Response, TCP drop) on these with metadata null.
    assert not (update.status in ("completed", "streaming_ready") and update.metadata is None)
    return update


def test_enums_are_exactly_the_facilitators() -> None:
    assert set(Participant) == set(F_PARTICIPANT.__args__)
    assert set(JobStage) == set(F_STAGE.__args__)
    assert set(JobRejectionReason) == set(F_REJECTION.__args__)
    assert set(JobFailureReason) == set(F_FAILURE.__args__)
    assert set(HordeFailureReason) == set(F_HORDE.__args__)
    assert set(JobStatus) == set(F_STATUS.__args__)


# ----------------------------------------------------------------------------- report() at the call


def _reporter() -> tuple[JobStatusUpdateManager, list[JobStatusUpdate], Any]:
    manager = JobStatusUpdateManager()
    queued: list[JobStatusUpdate] = []
    manager.updates.subscribe(queued.append)
    asyncio.run(manager.start())
    return manager, queued, manager.open(JOB)


FAILURE = {"reason": "timeout", "stage": "execution", "message": "m"}
REJECTION = {"rejected_by": "validator", "reason": "busy", "message": "m"}
HORDE = {"reported_by": "validator", "reason": "generic_error", "message": "m"}
MINER = {"docker_process_stdout": "o", "docker_process_stderr": "e"}

INVALID_REPORTS: list[tuple[str, Any, str]] = [
    ("finished", None, "status 'finished' is not a job status"),
    ("unknown", None, "status 'unknown' is not a job status"),
    ("failed", ["not", "a", "mapping"], "metadata must be a mapping"),
    ("failed", "text", "metadata must be a mapping"),
    ("failed", {"job_failure_details": {**FAILURE, "reason": "nonzero_exit_code"}}, "job_failure_details.reason"),
    ("failed", {"job_failure_details": {**FAILURE, "stage": "upload"}}, "job_failure_details.stage"),
    ("failed", {"job_failure_details": {"reason": "timeout", "stage": "execution"}}, "job_failure_details.message"),
    ("failed", {"job_failure_details": {**FAILURE, "context": "why"}}, "job_failure_details.context"),
    ("failed", {"job_failure_details": {**FAILURE, "context": [1]}}, "job_failure_details.context"),
    ("failed", {"job_failure_details": {**FAILURE, "docker_process_exit_status": "one"}},
     "job_failure_details.docker_process_exit_status"),
    ("failed", {"job_failure_details": {**FAILURE, "mesage": "typo"}}, "job_failure_details.mesage"),
    ("rejected", {"job_rejection_details": {**REJECTION, "rejected_by": "alice"}}, "job_rejection_details.rejected_by"),
    ("rejected", {"job_rejection_details": {**REJECTION, "reason": "signature"}}, "job_rejection_details.reason"),
    ("rejected", {"job_rejection_details": {**REJECTION, "message": None}}, "job_rejection_details.message"),
    ("horde_failed", {"horde_failure_details": {**HORDE, "reason": "oops"}}, "horde_failure_details.reason"),
    ("horde_failed", {"horde_failure_details": {**HORDE, "reported_by": "me"}}, "horde_failure_details.reported_by"),
    ("horde_failed", {"horde_failure_details": {**HORDE, "context": 5}}, "horde_failure_details.context"),
    ("completed", {"miner_response": {"docker_process_stdout": "o"}}, "miner_response.docker_process_stderr"),
    ("completed", {"miner_response": {**MINER, "artifacts": {"a": 1}}}, "miner_response.artifacts.a"),
    ("completed", {"miner_response": {**MINER, "extra": object()}}, "miner_response.extra"),
    ("streaming_ready", {"streaming_details": {"streaming_server_port": 1, "public_key": "k"}},
     "streaming_details.public_key: Extra inputs are not permitted"),
    ("streaming_ready", {"streaming_details": {"streaming_server_port": "port"}},
     "streaming_details.streaming_server_port"),
    ("accepted", {"comment": {1, 2}}, "metadata.comment"),
]


@pytest.mark.parametrize(("status", "metadata", "names"), INVALID_REPORTS, ids=[n for _, _, n in INVALID_REPORTS])
def test_every_invalid_report_raises_value_error_at_the_call_naming_the_field(
    status: str, metadata: Any, names: str
) -> None:
    manager, queued, report = _reporter()
    with pytest.raises(ValueError, match="report\\(\\)") as info:
        report(status, metadata)
    assert names in str(info.value)
    assert queued == []  # nothing invalid is queued
    assert manager.is_open(JOB)  # and the job can still report a corrected status
    assert report(JobStatus.ACCEPTED)


def test_an_invalid_report_raises_even_after_the_jobs_stream_ended() -> None:
    _, _, report = _reporter()
    assert report("completed", {"miner_response": MINER})
    with pytest.raises(ValueError, match="status 'done'"):
        report("done")
    assert report("accepted") is False  # valid but late: ignored, as before


@pytest.mark.parametrize("status", ["completed", "streaming_ready"])
def test_completed_and_streaming_ready_always_carry_a_metadata_object(status: str) -> None:
    _, queued, report = _reporter()
    report(status)
    assert orjson.loads(encode(queued[0]))["metadata"] == {}
    facilitator_stores(encode(queued[0]))


def test_valid_reports_encode_to_what_the_facilitator_stores() -> None:
    _, queued, report = _reporter()
    report("accepted")
    report("streaming_ready", {"streaming_details": {"streaming_server_port": 8443, "streaming_server_address": "h"}})
    report("failed", {"job_failure_details": {**FAILURE, "context": {"trace": ["a", None]},
                                              "docker_process_exit_status": 1}})
    for update in queued:
        facilitator_stores(encode(update))
    assert orjson.loads(encode(queued[2]))["metadata"]["job_failure_details"]["context"] == {"trace": ["a", None]}


# ----------------------------------------------------------------------------- property

json_leaf = st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(max_size=8)
json_value = st.recursive(
    json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
anything = json_value | st.just(object()) | st.floats(allow_nan=False)


def _enum_or_junk(values: tuple[str, ...]) -> st.SearchStrategy[Any]:
    return st.sampled_from(values) | st.text(max_size=10) | st.integers() | st.none()


def _section(required: dict[str, st.SearchStrategy[Any]], optional: dict[str, st.SearchStrategy[Any]]) -> Any:
    """A details object: each key present or not, valid values or junk, sometimes an unknown key."""
    keys = {**required, **optional}
    return st.fixed_dictionaries(
        {}, optional={k: v for k, v in keys.items()} | {"extra_key": anything}
    ) | st.just("not an object") | st.none()


metadata_strategy = st.fixed_dictionaries(
    {},
    optional={
        "miner_response": _section(
            {"docker_process_stdout": st.text(max_size=5) | st.none(), "docker_process_stderr": st.text(max_size=5)},
            {"artifacts": st.dictionaries(st.text(max_size=3), st.text(max_size=3) | st.integers(), max_size=2)
             | st.none(), "upload_results": st.none()},
        ),
        "job_rejection_details": _section(
            {"rejected_by": _enum_or_junk(F_PARTICIPANT.__args__), "reason": _enum_or_junk(F_REJECTION.__args__),
             "message": st.text(max_size=5) | st.none()},
            {"context": json_value},
        ),
        "job_failure_details": _section(
            {"reason": _enum_or_junk(F_FAILURE.__args__), "stage": _enum_or_junk(F_STAGE.__args__),
             "message": st.text(max_size=5)},
            {"context": json_value, "docker_process_exit_status": st.integers() | st.text(max_size=3) | st.none(),
             "docker_process_stdout": st.text(max_size=3) | st.none()},
        ),
        "horde_failure_details": _section(
            {"reported_by": _enum_or_junk(F_PARTICIPANT.__args__), "reason": _enum_or_junk(F_HORDE.__args__),
             "message": st.text(max_size=5)},
            {"context": json_value},
        ),
        "streaming_details": _section(
            {}, {"streaming_server_cert": st.text(max_size=3) | st.none(),
                 "streaming_server_port": st.integers(0, 65535) | st.text(max_size=3),
                 "streaming_server_address": st.text(max_size=3) | st.integers()},
        ),
        "comment": anything,
    },
) | st.none()


@settings(max_examples=400, deadline=None)
@given(status=st.sampled_from([*F_STATUS.__args__, "bogus"]), metadata=metadata_strategy)
def test_whatever_report_accepts_the_facilitators_models_store(status: str, metadata: Any) -> None:
    _, queued, report = _reporter()
    try:
        report(status, metadata)
    except ValueError:
        assert queued == []
        return
    (update,) = queued
    stored = facilitator_stores(encode(update))
    assert stored.status == status


def test_a_metadata_object_built_in_code_is_checked_the_same_way() -> None:
    _, _, report = _reporter()
    with pytest.raises(ValueError, match="job_failure_details"):
        report("failed", {"job_failure_details": JobStatusMetadata})
    report("completed", JobStatusMetadata(miner_response={"docker_process_stdout": "", "docker_process_stderr": ""}))


# ----------------------------------------------------------------------------- machine specs

GOOD_SPECS: dict[str, Any] = {
    "os": "Ubuntu 24.04",
    "cpu": {"count": 8, "model": "Xeon", "frequency": "2.5", "clocks": [2400.0, 2500]},
    "gpu": {"count": 1, "capacity": 49140, "details": [
        {"name": "NVIDIA RTX A6000", "capacity": "49140", "cuda": "12.2", "power_limit": "300 W", "uuid": "GPU-1"},
    ]},
    "ram": {"total": "46236340", "free": 22817068, "swap_total": "", "read_speed": "1.5"},
    "hard_disk": {"total": "", "free": "1", "write_speed": None},
    "has_docker": True,
    "virtualization": None,
    "added_later": {"anything": 1},
}


def test_specs_that_fit_the_hardware_schema_have_no_errors() -> None:
    assert validate_specs(GOOD_SPECS) == []
    assert validate_specs({"cpu": {"count": 1}, "ram": {}, "hard_disk": {}, "gpu": None}) == []


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"cpu": None}, "cpu: Input should be a valid dictionary"),
        ({"cpu": {"model": "x"}}, "cpu.count: Field required"),
        ({"cpu": {"count": "eight"}}, "cpu.count: Input should be a valid integer"),
        ({"cpu": {"count": 1, "cores": 4}}, "cpu.cores: Extra inputs are not permitted"),
        ({"cpu": {"count": 1, "clocks": ["fast"]}}, "cpu.clocks.0: Input should be a valid number"),
        ({"cpu": {"count": 1, "frequency": "high"}}, "cpu.frequency: Input should be a valid decimal"),
        ({"ram": {"size": 1}}, "ram.size: Extra inputs are not permitted"),
        ({"ram": {"total": "lots"}}, "ram.total: Input should be a valid number"),
        ({"ram": {"swap_used": 1.5}}, "ram.swap_used: Input should be a valid integer"),
        ({"hard_disk": {"total": [1]}}, "hard_disk.total: Input should be a valid number"),
        ({"hard_disk": {"model": "ssd"}}, "hard_disk.model: Extra inputs are not permitted"),
        ({"gpu": {"details": [{"capacity": 1}]}}, "gpu.details.0.name: Field required"),
        ({"gpu": {"details": [{"name": "x", "fan": 1}]}}, "gpu.details.0.fan: Extra inputs are not permitted"),
        ({"gpu": {"vendor": "x"}}, "gpu.vendor: Extra inputs are not permitted"),
        ({"gpu": {"count": "one"}}, "gpu.count: Input should be a valid integer"),
        ({"has_docker": "maybe"}, "has_docker: Input should be a valid boolean"),
        ({"os": 24}, "os: Input should be a valid string"),
    ],
)
def test_specs_that_do_not_fit_name_each_field(change: dict[str, Any], error: str) -> None:
    errors = validate_specs({**GOOD_SPECS, **change})
    assert any(e.startswith(error) for e in errors), errors


def test_missing_parts_and_non_objects_are_errors() -> None:
    missing = ["cpu: Field required", "hard_disk: Field required", "ram: Field required"]
    assert sorted(validate_specs({"os": "x"})) == missing
    assert validate_specs([1]) == ["specs: must be a JSON object, got an array"]
    assert validate_specs(None) == ["specs: must be a JSON object, got null"]


# ----------------------------------------------------------------------------- the metadata-less fast path


def _model_or_error(job_uuid: Any, status: Any) -> JobStatusUpdate | str:
    try:
        return JobStatusUpdate(uuid=job_uuid, status=status)
    except ValueError as exc:
        return type(exc).__name__


@pytest.mark.parametrize("status", [*JobStatus, *(s.value for s in JobStatus)])
@pytest.mark.parametrize(
    "job_uuid", ["2dcdf287-e485-408f-b2d2-ad0d3c8f9237", "2DCDF287E485408FB2D2AD0D3C8F9237"]
)
def test_a_report_without_metadata_is_encoded_exactly_as_the_model_would_be(status: Any, job_uuid: str) -> None:
    update = build_update(job_uuid, status)
    model = JobStatusUpdate(uuid=job_uuid, status=status)
    assert isinstance(update, EncodedStatusUpdate)  # no pydantic model on the hot path
    assert encode(update) == encode(model)
    assert update == model and update.metadata == model.metadata and update.status is model.status
    facilitator_stores(encode(update))


@given(job_uuid=st.one_of(st.text(max_size=40), st.uuids().map(str), st.integers(), st.none()),
       status=st.one_of(st.sampled_from([s.value for s in JobStatus]), st.text(max_size=15), st.integers()))
@settings(max_examples=300, deadline=None)
def test_the_fast_path_accepts_exactly_what_the_model_accepts(job_uuid: Any, status: Any) -> None:
    expected = _model_or_error(job_uuid, status)
    try:
        update = build_update(job_uuid, status)
    except ValueError as exc:
        assert isinstance(expected, str), f"{job_uuid!r}/{status!r} refused but the model takes it: {exc}"
        assert "report()" in str(exc)
        return
    assert isinstance(expected, JobStatusUpdate), f"{job_uuid!r}/{status!r} accepted but the model refuses it"
    assert encode(update) == encode(expected)


def test_an_unparseable_uuid_still_raises_at_the_call_naming_the_field() -> None:
    with pytest.raises(ValueError, match=r"uuid: .*not a valid UUID"):
        build_update("not-a-uuid", "accepted")


@given(job_uuid=st.one_of(st.text(max_size=40), st.uuids().map(str)),
       status=st.one_of(st.sampled_from([s.value for s in JobStatus]), st.text(max_size=15)))
@settings(max_examples=200, deadline=None)
def test_a_jobs_reporter_checks_its_uuid_once_and_accepts_exactly_what_the_model_accepts(
    job_uuid: str, status: str
) -> None:
    manager = JobStatusUpdateManager()  # not started: what is reported is kept for start()
    report = manager.open(job_uuid)
    expected = _model_or_error(job_uuid, status)
    for _ in range(2):  # the uuid is checked when the reporter is made: the second report takes that path too
        try:
            report(status)
        except ValueError as exc:
            assert isinstance(expected, str), f"{job_uuid!r}/{status!r} refused but the model takes it: {exc}"
            assert "report()" in str(exc)
            continue
        assert isinstance(expected, JobStatusUpdate), f"{job_uuid!r}/{status!r} accepted but the model refuses it"
        assert encode(manager._early[-1]) == encode(expected)
        if expected.status.is_final:
            break  # the job's stream ended
