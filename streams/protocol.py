"""Wire models and codec for facilitator protocol v0 (see docs/PROTOCOL.md).

Outbound models are strict (frozen, extra fields forbidden, the facilitator's enums) because the real
facilitator answers an unparseable frame with an error Response, which shifts FIFO ack matching, stores
an enum value it does not know as `unknown`, and crashes on some inputs (PROTOCOL.md "Typed status
metadata"). Machine specs are checked against its hardware schema by `validate_specs` (its handler
crashes on specs that do not fit). Inbound models are typed like upstream's (volume/upload unions,
required time limits) but keep unknown fields, because the facilitator adds fields over time; the
raw object is kept for the host.

`decode` is the single entry point for inbound frames: it raises `DecodeError` and nothing else.
"""

from __future__ import annotations

import enum
import re
from decimal import Decimal
from typing import Annotated, Any, Final, Literal, Protocol, TypeAlias, TypeVar, runtime_checkable

import orjson
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    PrivateAttr,
    ValidationError,
    field_validator,
)
from pydantic_core.core_schema import ValidationInfo

from streams.exceptions import DecodeError

__all__ = [
    "FINAL_STATUSES",
    "IN_PROGRESS_STATUSES",
    "MAX_FRAME_BYTES",
    "CpuSpecs",
    "DecodeError",
    "EncodedStatusUpdate",
    "GpuDetailsSpecs",
    "GpuSpecs",
    "HardDiskSpecs",
    "HordeFailureDetails",
    "HordeFailureReason",
    "HuggingfaceVolume",
    "InboundMessage",
    "InlineVolume",
    "JobFailureDetails",
    "JobFailureReason",
    "JobRejectionDetails",
    "JobRejectionReason",
    "JobStage",
    "JobStatus",
    "JobStatusMetadata",
    "JobStatusUpdate",
    "JobStreamingDetails",
    "JsonObject",
    "MachineSpecs",
    "MinerResponse",
    "MultiUpload",
    "MultiVolume",
    "OutboundMessage",
    "OutputUpload",
    "Participant",
    "RamSpecs",
    "Response",
    "ResponseError",
    "Signer",
    "SingleFilePostUpload",
    "SingleFilePutUpload",
    "SingleFileVolume",
    "StreamingDetails",
    "V0AuthenticationRequest",
    "V0Heartbeat",
    "V0JobCheated",
    "V0MachineSpecsUpdate",
    "V2JobRequest",
    "Volume",
    "ZipAndHttpPostUpload",
    "ZipAndHttpPutUpload",
    "ZipUrlVolume",
    "decode",
    "decode_outbound",
    "encode",
    "encoded_status_update",
    "excerpt",
    "is_facilitator_uuid",
    "message_kind",
    "status_frame",
    "status_frame_length",
    "validate_specs",
]

MAX_FRAME_BYTES: int = 50 * 1024 * 1024
"""Largest frame accepted (PROTOCOL.md: a job request with a long env or script may be big)."""

_EXCERPT_CHARS: Final = 200
_MAX_ERRORS_SHOWN: Final = 3


class JobStatus(enum.StrEnum):
    """Job status strings as the facilitator stores them."""

    SENT = "sent"
    RECEIVED = "received"
    ACCEPTED = "accepted"
    EXECUTOR_READY = "executor_ready"
    STREAMING_READY = "streaming_ready"
    VOLUMES_READY = "volumes_ready"
    EXECUTION_DONE = "execution_done"
    COMPLETED = "completed"
    REJECTED = "rejected"
    FAILED = "failed"
    HORDE_FAILED = "horde_failed"

    @property
    def is_final(self) -> bool:
        """A job's status stream ends at its first final status."""
        return self._value_ in _FINAL_VALUES  # a str lookup: hashing the member itself runs Enum.__hash__


FINAL_STATUSES: frozenset[JobStatus] = frozenset(
    {JobStatus.COMPLETED, JobStatus.REJECTED, JobStatus.FAILED, JobStatus.HORDE_FAILED}
)
IN_PROGRESS_STATUSES: frozenset[JobStatus] = frozenset(JobStatus) - FINAL_STATUSES
_FINAL_VALUES: Final = frozenset(status.value for status in FINAL_STATUSES)

# The real facilitator crashes (drops the connection) on these statuses sent with `metadata: null`.
_METADATA_REQUIRED: Final = frozenset({JobStatus.COMPLETED, JobStatus.STREAMING_READY})
# What the facilitator's UUID lookup accepts, restricted to ASCII hex (int() would take other digits).
_UUID_RE: Final = re.compile(
    r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}"
)


@runtime_checkable
class Signer(Protocol):
    """The hotkey that authenticates the validator; `bittensor_wallet.Keypair` fits.

    `public_key` may be None because Keypair's stubs say so (a keypair built from an address alone);
    `from_signer` refuses such a signer.
    """

    @property
    def public_key(self) -> bytes | None: ...

    def sign(self, data: bytes) -> bytes: ...


# --------------------------------------------------------------------------- outbound


class _Outbound(BaseModel):
    """Strict base: an invalid outbound message must fail at construction, never on the wire."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class V0AuthenticationRequest(_Outbound):
    """First message on every connection; nothing else may be sent before its success Response."""

    message_type: Literal["V0AuthenticationRequest"] = "V0AuthenticationRequest"
    public_key: str
    signature: str

    @classmethod
    def from_signer(cls, signer: Signer) -> V0AuthenticationRequest:
        """Sign the raw public-key bytes, as the facilitator verifies them (sr25519, `0x` hex)."""
        if signer.public_key is None:
            raise ValueError("the signer has no public key, so it cannot authenticate")
        public_key = bytes(signer.public_key)
        return cls.signed(public_key, signer.sign(public_key))

    @classmethod
    def signed(cls, public_key: bytes, signature: object) -> V0AuthenticationRequest:
        """The request from a signer's result; a result that is not bytes is a TypeError naming it.

        (``bytes(result)`` would turn a list of ints into bytes and fail on a str with an
        unrelated message: a signer that returns the wrong type is a bug to be told about.)
        """
        if not isinstance(signature, bytes | bytearray):
            raise TypeError(
                f"signer.sign() must return bytes (the sr25519 signature), got {type(signature).__name__}"
            )
        return cls(public_key=public_key.hex(), signature="0x" + bytes(signature).hex())


class V0Heartbeat(_Outbound):
    """Liveness: the facilitator offers jobs only to validators that sent one in the last 3 minutes."""

    message_type: Literal["V0Heartbeat"] = "V0Heartbeat"


class V0MachineSpecsUpdate(_Outbound):
    """A miner's machine specs snapshot; no Response on success."""

    message_type: Literal["V0MachineSpecsUpdate"] = "V0MachineSpecsUpdate"
    miner_hotkey: str
    validator_hotkey: str
    # Declared before `specs` so the encoded key order matches the captured real traffic.
    batch_id: str
    specs: dict[str, Any]


class Participant(enum.StrEnum):
    """Who rejected a job or reported a horde failure (the facilitator's JobParticipantType)."""

    UNKNOWN = "unknown"
    SDK = "sdk"
    FACILITATOR = "facilitator"
    VALIDATOR = "validator"
    MINER = "miner"
    EXECUTOR = "executor"


class JobStage(enum.StrEnum):
    """Where an accepted job failed."""

    UNKNOWN = "unknown"
    EXECUTOR_STARTUP = "executor_startup"
    VOLUME_DOWNLOAD = "volume_download"
    STREAMING_STARTUP = "streaming_startup"
    EXECUTION = "execution"
    RESULT_UPLOAD = "result_upload"


class JobRejectionReason(enum.StrEnum):
    UNKNOWN = "unknown"
    BUSY = "busy"
    INVALID_SIGNATURE = "invalid_signature"
    NO_MINER_FOR_JOB = "no_miner_for_job"
    VALIDATOR_BLACKLISTED = "validator_blacklisted"


class JobFailureReason(enum.StrEnum):
    UNKNOWN = "unknown"
    TIMEOUT = "timeout"
    NONZERO_RETURN_CODE = "nonzero_return_code"
    DOWNLOAD_FAILED = "download_failed"
    UPLOAD_FAILED = "upload_failed"


class HordeFailureReason(enum.StrEnum):
    UNKNOWN = "unknown"
    GENERIC_ERROR = "generic_error"
    UNHANDLED_EXCEPTION = "unhandled_exception"
    UNHANDLED_TIMEOUT = "unhandled_timeout"
    STREAMING_FAILED = "streaming_failed"
    MINER_CONNECTION_FAILED = "miner_connection_failed"
    INITIAL_RESPONSE_TIMED_OUT = "initial_response_timed_out"
    EXECUTOR_READINESS_RESPONSE_TIMED_OUT = "executor_readiness_response_timed_out"
    VOLUMES_TIMED_OUT = "volumes_timed_out"
    STREAMING_JOB_READY_TIMED_OUT = "streaming_job_ready_timed_out"
    EXECUTION_TIMED_OUT = "execution_timed_out"
    FINAL_RESPONSE_TIMED_OUT = "final_response_timed_out"
    EXECUTOR_SPINUP_FAILED = "executor_spinup_failed"
    EXECUTOR_DISCONNECTED = "executor_disconnected"
    SECURITY_CHECK_FAILED = "security_check_failed"


JsonObject: TypeAlias = dict[str, JsonValue]
"""A JSON object: what the facilitator takes as a `context` (anything else is a `dict_type` error)."""


class _Metadata(BaseModel):
    """Base for status metadata: as strict as the facilitator's models (PROTOCOL.md "Typed status
    metadata"), and stricter in one way: unknown keys are refused where the facilitator would
    silently drop them, so a host's typo is an error at `report(...)`, not a lost detail."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class _OpenMetadata(_Metadata):
    """Where the facilitator keeps unknown keys: they are allowed, but must be JSON values."""

    model_config = ConfigDict(extra="allow")
    __pydantic_extra__: dict[str, JsonValue] = Field(init=False)


class MinerResponse(_OpenMetadata):
    """What the miner's job printed and produced."""

    # stdout before stderr: the key order of the captured real traffic. Both are required, as the
    # facilitator's own model requires them: an update it cannot parse would shift FIFO ack matching.
    docker_process_stdout: str
    docker_process_stderr: str
    artifacts: dict[str, str] | None = None
    upload_results: dict[str, str] | None = None


class JobRejectionDetails(_Metadata):
    """Why a job was rejected, and by whom."""

    rejected_by: Participant
    reason: JobRejectionReason
    message: str
    context: JsonObject | None = None


class JobFailureDetails(_Metadata):
    """Why and where an accepted job failed."""

    reason: JobFailureReason
    stage: JobStage
    message: str
    context: JsonObject | None = None
    docker_process_exit_status: int | None = None
    docker_process_stdout: str | None = None
    docker_process_stderr: str | None = None


class HordeFailureDetails(_Metadata):
    """A failure of the horde itself (validator, facilitator), not of the job."""

    reported_by: Participant
    reason: HordeFailureReason
    message: str
    context: JsonObject | None = None


class StreamingDetails(_Metadata):
    """Where the job's streaming server listens (sent with `streaming_ready`); no other key allowed."""

    streaming_server_cert: str | None = None
    streaming_server_address: str | None = None
    streaming_server_port: int | None = None


class JobStatusMetadata(_OpenMetadata):
    """Optional details of a status update; unset keys are omitted on the wire."""

    miner_response: MinerResponse | None = None
    job_rejection_details: JobRejectionDetails | None = None
    job_failure_details: JobFailureDetails | None = None
    horde_failure_details: HordeFailureDetails | None = None
    streaming_details: StreamingDetails | None = None


class JobStatusUpdate(_Outbound):
    """One status of one job; every one is answered by exactly one Response."""

    message_type: Literal["V0JobStatusUpdate"] = "V0JobStatusUpdate"
    uuid: str
    status: JobStatus
    metadata: JobStatusMetadata | None = Field(default=None, validate_default=True)

    @field_validator("uuid")
    @classmethod
    def _uuid_must_parse(cls, value: str) -> str:
        """The real facilitator crashes on a job uuid it cannot parse."""
        if _UUID_RE.fullmatch(value) is None:
            raise ValueError(f"not a valid UUID: {value[:64]!r}")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_where_required(
        cls, value: JobStatusMetadata | None, info: ValidationInfo
    ) -> JobStatusMetadata | None:
        """`completed`/`streaming_ready` with `metadata: null` crash the real facilitator: send `{}`."""
        if value is None and info.data.get("status") in _METADATA_REQUIRED:
            return JobStatusMetadata()
        return value

    @classmethod
    def horde_failed(
        cls,
        uuid: str,
        reason: HordeFailureReason | str,
        message: str = "",
        reported_by: Participant | str = Participant.VALIDATOR,
        context: JsonObject | None = None,
    ) -> JobStatusUpdate:
        """The final status a validator reports when it, not the job, failed."""
        details = HordeFailureDetails(
            reported_by=Participant(reported_by), reason=HordeFailureReason(reason), message=message,
            context=context,
        )
        return cls(
            uuid=uuid,
            status=JobStatus.HORDE_FAILED,
            metadata=JobStatusMetadata(horde_failure_details=details),
        )

    @classmethod
    def rejected(
        cls,
        uuid: str,
        reason: JobRejectionReason | str,
        message: str,
        rejected_by: Participant | str = Participant.VALIDATOR,
        context: JsonObject | None = None,
    ) -> JobStatusUpdate:
        """The final status of a job that is not run (e.g. its signature did not verify)."""
        details = JobRejectionDetails(
            rejected_by=Participant(rejected_by), reason=JobRejectionReason(reason), message=message,
            context=context,
        )
        return cls(
            uuid=uuid,
            status=JobStatus.REJECTED,
            metadata=JobStatusMetadata(job_rejection_details=details),
        )


_EMPTY_METADATA: Final = JobStatusMetadata()
_STATUS_OF: Final[dict[str, JobStatus]] = {status.value: status for status in JobStatus}


def status_frame(uuid: str, status: str) -> str:
    """The frame of the metadata-less status update of job ``uuid`` (``status`` a JobStatus value).

    Byte for byte what `encode` writes for the equal JobStatusUpdate. A pure function of its two
    arguments, so the outbox keeps those rather than the frame (see ``Envelope``). The uuid is ASCII
    hex and dashes (checked by `encoded_status_update`) and the status an enum value: nothing in
    either needs escaping.
    """
    metadata = "{}" if status in _METADATA_REQUIRED_VALUES else "null"
    return f'{{"message_type":"V0JobStatusUpdate","uuid":"{uuid}","status":"{status}","metadata":{metadata}}}'


_METADATA_REQUIRED_VALUES: Final = frozenset(status.value for status in _METADATA_REQUIRED)
_STATUS_FRAME_FIXED: Final[dict[str, int]] = {
    status.value: len(status_frame("", status.value)) for status in JobStatus
}


def status_frame_length(uuid: str, status: str) -> int:
    """``len(status_frame(uuid, status))`` without building it (the frame is ASCII: chars = bytes)."""
    return len(uuid) + _STATUS_FRAME_FIXED[status]


class EncodedStatusUpdate:
    """A status update without metadata, checked once, without a pydantic model.

    The common case of ``report(status)`` (no metadata): the hot path builds no model for it, and
    its frame (`status_frame`, built on demand) is byte-for-byte what `encode` writes for the equal
    JobStatusUpdate. Build it with `encoded_status_update`, which checks what JobStatusUpdate's
    validators check.
    """

    __slots__ = ("status", "uuid")
    message_type: Final = "V0JobStatusUpdate"

    def __init__(self, uuid: str, status: JobStatus) -> None:
        self.uuid = uuid
        self.status = status

    @property
    def frame(self) -> str:
        return status_frame(self.uuid, self.status.value)

    @property
    def metadata(self) -> JobStatusMetadata | None:
        """As on the equal JobStatusUpdate: `{}` where the facilitator needs metadata, else None."""
        return _EMPTY_METADATA if self.status in _METADATA_REQUIRED else None

    def to_model(self) -> JobStatusUpdate:
        return JobStatusUpdate(uuid=self.uuid, status=self.status, metadata=self.metadata)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, EncodedStatusUpdate):
            return self.uuid == other.uuid and self.status is other.status
        if isinstance(other, JobStatusUpdate):
            return self.to_model() == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.uuid, self.status))

    def __repr__(self) -> str:
        return f"EncodedStatusUpdate(uuid={self.uuid!r}, status={self.status.value!r})"


def encoded_status_update(uuid: object, status: object, *, uuid_checked: bool = False) -> EncodedStatusUpdate | None:
    """The metadata-less update of job ``uuid``, or None when ``uuid``/``status`` need the full
    validation (which then gives the error): a str uuid the facilitator can parse, a JobStatus value.

    ``uuid_checked``: ``is_facilitator_uuid(uuid)`` is already known to be true (a job's reporter
    checks its uuid once, not per status)."""
    member = _STATUS_OF.get(status) if isinstance(status, str) else None
    if member is None or not (uuid_checked or is_facilitator_uuid(uuid)):
        return None
    return EncodedStatusUpdate(uuid, member)  # type: ignore[arg-type]  # a str: checked either way


def is_facilitator_uuid(uuid: object) -> bool:
    """A str the facilitator's UUID lookup accepts (ASCII hex, dashes optional)."""
    return type(uuid) is str and _UUID_RE.fullmatch(uuid) is not None


OutboundMessage: TypeAlias = (
    V0AuthenticationRequest | V0Heartbeat | V0MachineSpecsUpdate | JobStatusUpdate | EncodedStatusUpdate
)

# --------------------------------------------------------------------------- inbound


class ResponseError(BaseModel, extra="allow"):
    """One error of a Response; pydantic parse errors carry more keys (loc, input, url), kept."""

    msg: str = ""
    type: str
    help: str = ""


class Response(BaseModel):
    """The facilitator's answer; it has no id: the n-th Response answers the n-th message expecting one.

    Frozen: the success Response is one shared instance (see `decode`).
    """

    model_config = ConfigDict(frozen=True)

    status: Literal["success", "error"]
    errors: list[ResponseError] = Field(default_factory=list)

    @property
    def is_success(self) -> bool:
        return self.status == "success"

    @property
    def error_types(self) -> tuple[str, ...]:
        """E.g. `("job.integrity_error",)`: what ack handling branches on."""
        return tuple(error.type for error in self.errors)

    def describe(self) -> str:
        """The facilitator's own error text, for events and logs."""
        if not self.errors:
            return self.status
        return "; ".join(f"{e.type}: {e.msg}" if e.msg else e.type for e in self.errors)


class _Inbound(BaseModel):
    """Loose base for facilitator requests: unknown fields are kept, and so is the original object."""

    model_config = ConfigDict(extra="allow")

    _raw: dict[str, Any] | None = PrivateAttr(default=None)

    @property
    def raw(self) -> dict[str, Any]:
        """The untouched parsed frame: the host re-validates it and verifies its signature."""
        if self._raw is None:  # built in code rather than decoded: the dump is the best we have
            self._raw = self.model_dump(mode="json")
        return self._raw


class _Tagged(BaseModel):
    """Base of the volume and upload specs: typed like upstream, new keys tolerated (and kept).

    Field declaration order is part of the wire contract: the job signature covers each spec
    written with its declared fields in this order (see streams.signatures).
    """

    model_config = ConfigDict(extra="allow")


class InlineVolume(_Tagged):
    volume_type: Literal["inline"]
    contents: str
    relative_path: str | None = None


class ZipUrlVolume(_Tagged):
    volume_type: Literal["zip_url"]
    contents: str
    relative_path: str | None = None


class SingleFileVolume(_Tagged):
    volume_type: Literal["single_file"]
    url: str
    relative_path: str


class HuggingfaceVolume(_Tagged):
    volume_type: Literal["huggingface_volume"]
    repo_id: str
    repo_type: str | None = None
    revision: str | None = None
    relative_path: str | None = None
    allow_patterns: str | list[str] | None = None
    token: str | None = None


SingleVolume: TypeAlias = Annotated[
    InlineVolume | ZipUrlVolume | SingleFileVolume | HuggingfaceVolume, Field(discriminator="volume_type")
]


class MultiVolume(_Tagged):
    """What the facilitator's API wraps every volume in."""

    volume_type: Literal["multi_volume"]
    volumes: list[SingleVolume]


Volume: TypeAlias = Annotated[
    InlineVolume | ZipUrlVolume | SingleFileVolume | HuggingfaceVolume | MultiVolume,
    Field(discriminator="volume_type"),
]


class ZipAndHttpPostUpload(_Tagged):
    output_upload_type: Literal["zip_and_http_post"]
    url: str
    form_fields: dict[str, str] | None = None


class ZipAndHttpPutUpload(_Tagged):
    output_upload_type: Literal["zip_and_http_put"]
    url: str


class SingleFilePostUpload(_Tagged):
    output_upload_type: Literal["single_file_post"]
    url: str
    form_fields: dict[str, str] | None = None
    relative_path: str
    signed_headers: dict[str, str] | None = None


class SingleFilePutUpload(_Tagged):
    output_upload_type: Literal["single_file_put"]
    url: str
    relative_path: str
    signed_headers: dict[str, str] | None = None


SingleFileUpload: TypeAlias = Annotated[
    SingleFilePostUpload | SingleFilePutUpload, Field(discriminator="output_upload_type")
]
ZipUpload: TypeAlias = Annotated[
    ZipAndHttpPostUpload | ZipAndHttpPutUpload, Field(discriminator="output_upload_type")
]


class MultiUpload(_Tagged):
    """What the facilitator's API wraps every upload in; `system_output` is not signed."""

    output_upload_type: Literal["multi_upload"]
    uploads: list[SingleFileUpload]
    system_output: ZipUpload | None = None


OutputUpload: TypeAlias = Annotated[
    ZipAndHttpPostUpload | ZipAndHttpPutUpload | SingleFilePostUpload | SingleFilePutUpload | MultiUpload,
    Field(discriminator="output_upload_type"),
]


class JobStreamingDetails(BaseModel):
    """Inbound: the key the executor's streaming server must trust, and where the job runs."""

    model_config = ConfigDict(extra="allow")

    public_key: str
    executor_ip: str | None = None


class V2JobRequest(_Inbound):
    """A job for this validator to run, typed as upstream's model (PROTOCOL.md): the four time
    limits, `args` and `env` are required, `use_gpu` defaults to true (deprecated, no effect).
    Keys the facilitator adds later are kept (`model_extra`) and `raw` is the untouched frame."""

    # Declaration order follows the real facilitator's key order (signature first).
    signature: Any = None
    """Kept as sent (any JSON): streams.signatures says precisely what is wrong with a malformed one."""
    type: Literal["job.new"] = "job.new"
    message_type: Literal["V2JobRequest"] = "V2JobRequest"
    uuid: str
    job_namespace: str | None = None
    executor_class: str
    """One of PROTOCOL.md's known classes, or a newer one: data, not an error."""
    docker_image: str
    args: list[str]
    env: dict[str, str]
    use_gpu: bool = True
    volume: Volume | None = None
    output_upload: OutputUpload | None = None
    artifacts_dir: str | None = None
    on_trusted_miner: bool = False
    download_time_limit: int
    execution_time_limit: int
    upload_time_limit: int
    streaming_start_time_limit: int
    streaming_details: JobStreamingDetails | None = None


class V0JobCheated(_Inbound):
    """A report that a finished job was cheated on by its miner."""

    signature: Any = None
    type: Literal["job.cheated"] = "job.cheated"
    message_type: Literal["V0JobCheated"] = "V0JobCheated"
    job_uuid: str
    trusted_job_uuid: str
    details: Any = None
    """Any JSON value (parsed from the frame, so JSON by construction; typed Any so that deep nesting
    is data, not a validation error); absent (the SDK had none) is None, which is also what was signed."""


InboundMessage: TypeAlias = Response | V2JobRequest | V0JobCheated

# --------------------------------------------------------------------------- machine specs
# The facilitator's hardware schema (PROTOCOL.md "Machine specs"). Its handler crashes on specs that
# do not fit (no Response, TCP drop, again on every later connection carrying them), so specs are
# checked with `validate_specs` before they are queued. Lax parsing ("3" is an int) as upstream's.


def _blank_is_none(value: object) -> object:
    return None if value == "" else value


_Blank = BeforeValidator(_blank_is_none)
_Strict = ConfigDict(extra="forbid")


class CpuSpecs(BaseModel):
    model_config = _Strict

    count: int
    model: str | None = None
    frequency: Decimal | None = None
    clocks: list[float] | None = None


class GpuDetailsSpecs(BaseModel):
    model_config = _Strict

    name: str
    capacity: float | None = None
    cuda: str | None = None
    driver: str | None = None
    graphics_speed: int | None = None
    memory_speed: int | None = None
    power_limit: Any = None
    """Upstream turns anything it cannot parse into null: never an error."""
    uuid: str | None = None
    serial: str | None = None


class GpuSpecs(BaseModel):
    model_config = _Strict

    capacity: float | None = None
    count: int | None = None
    details: list[GpuDetailsSpecs] = Field(default_factory=list)
    graphics_speed: int | None = None
    memory_speed: int | None = None


class RamSpecs(BaseModel):
    model_config = _Strict

    total: Annotated[float | None, _Blank] = None
    free: Annotated[float | None, _Blank] = None
    available: Annotated[float | None, _Blank] = None
    used: Annotated[float | None, _Blank] = None
    read_speed: Annotated[Decimal | None, _Blank] = None
    write_speed: Annotated[Decimal | None, _Blank] = None
    swap_free: Annotated[int | None, _Blank] = None
    swap_total: Annotated[int | None, _Blank] = None
    swap_used: Annotated[int | None, _Blank] = None


class HardDiskSpecs(BaseModel):
    model_config = _Strict

    total: Annotated[float | None, _Blank] = None
    free: Annotated[float | None, _Blank] = None
    used: Annotated[float | None, _Blank] = None
    read_speed: Annotated[Decimal | None, _Blank] = None
    write_speed: Annotated[Decimal | None, _Blank] = None


class MachineSpecs(BaseModel):
    """The top level of `V0MachineSpecsUpdate.specs`: extra keys allowed, the parts below are not."""

    model_config = ConfigDict(extra="allow")

    cpu: CpuSpecs
    gpu: GpuSpecs | None = None
    hard_disk: HardDiskSpecs
    has_docker: bool | None = None
    ram: RamSpecs
    os: str | None = None
    virtualization: str | None = None


def validate_specs(specs: object) -> list[str]:
    """Field errors that make the facilitator's handler crash on these specs; [] when they fit.

    Each error is ``"<dotted path>: <problem>"``, e.g. ``"cpu.count: Field required"`` or
    ``"ram.size: Extra inputs are not permitted"``. Call it before queueing a V0MachineSpecsUpdate.
    """
    if not isinstance(specs, dict):
        return [f"specs: must be a JSON object, got {json_kind(specs)}"]
    try:
        MachineSpecs.model_validate(specs)
    except ValidationError as exc:
        return [
            f"{'.'.join(str(p) for p in e['loc']) or 'specs'}: {e['msg']}"
            for e in exc.errors(include_url=False, include_input=False, include_context=False)
        ]
    return []


# --------------------------------------------------------------------------- codec


def _decode_error(reason: str, frame: object) -> DecodeError:
    """A DecodeError with the excerpt of `frame` (str or bytes), cheap even for huge frames."""
    return DecodeError(reason, excerpt(frame))


def excerpt(frame: object) -> str:
    """The start of a frame (str or bytes) and how much was left out; never raises (it runs in error handlers)."""
    try:
        if isinstance(frame, str):
            head, rest = frame[:_EXCERPT_CHARS], len(frame) - _EXCERPT_CHARS
        elif isinstance(frame, (bytes, bytearray, memoryview)):
            data = bytes(frame[:_EXCERPT_CHARS])
            head, rest = data.decode("utf-8", "backslashreplace"), len(frame) - _EXCERPT_CHARS
        else:
            head, rest = _short(frame), 0
    except Exception:
        return f"<unprintable {type(frame).__name__}>"
    return f"{head}…(+{rest} more)" if rest > 0 else head


_M = TypeVar("_M", bound=BaseModel)
_OutboundModel: TypeAlias = V0AuthenticationRequest | V0Heartbeat | V0MachineSpecsUpdate | JobStatusUpdate
_OUTBOUND_TYPES: Final[dict[str, type[_OutboundModel]]] = {
    "V0AuthenticationRequest": V0AuthenticationRequest,
    "V0Heartbeat": V0Heartbeat,
    "V0MachineSpecsUpdate": V0MachineSpecsUpdate,
    "V0JobStatusUpdate": JobStatusUpdate,
}
_INBOUND_TYPES: Final[dict[str, type[V2JobRequest | V0JobCheated]]] = {
    "V2JobRequest": V2JobRequest,
    "V0JobCheated": V0JobCheated,
}
_HEARTBEAT_FRAME: Final = orjson.dumps({"message_type": "V0Heartbeat"}).decode()


def encode(message: OutboundMessage | InboundMessage) -> str:
    """Serialise one message to a compact JSON text frame, keys in declaration order.

    Runs for every outbound message, so status updates and heartbeats take a hand-built fast path.
    Inside status metadata, unset (None) keys are omitted; a top-level `"metadata": null` stays.
    Inbound types are accepted too, for the simulator and replay.
    """
    if isinstance(message, EncodedStatusUpdate):
        return message.frame
    if isinstance(message, JobStatusUpdate):
        metadata = message.metadata
        return orjson.dumps(
            {
                "message_type": message.message_type,
                "uuid": message.uuid,
                "status": message.status.value,
                "metadata": None if metadata is None else metadata.model_dump(mode="json", exclude_none=True),
            }
        ).decode()
    if isinstance(message, V0Heartbeat):
        return _HEARTBEAT_FRAME
    return orjson.dumps(message.model_dump(mode="json")).decode()


_SUCCESS_FRAME: Final = '{"status":"success","errors":[]}'
"""The success Response exactly as the real facilitator writes it (notebooks/data/real-facilitator-session.jsonl)."""
_SUCCESS_FRAME_BYTES: Final = _SUCCESS_FRAME.encode()
_SUCCESS: Final = Response(status="success")
"""Shared by every decoded success frame: Response is frozen, and nothing appends to its empty ``errors``."""


def decode(frame: str | bytes, max_bytes: int = MAX_FRAME_BYTES) -> InboundMessage:
    """Parse a facilitator frame into a Response, V2JobRequest or V0JobCheated.

    Raises DecodeError, and nothing else, for any input: a malformed frame is counted and
    reported by the caller, never allowed to end the client. ``max_bytes`` is the client's
    ``ClientConfig.max_frame_bytes`` (the transport enforces it too).
    """
    if frame == _SUCCESS_FRAME or frame == _SUCCESS_FRAME_BYTES:
        # The overwhelming case (one per status update): an exact compare instead of JSON parsing
        # and validation. Any other spelling of success takes the general path below.
        return _SUCCESS
    try:
        obj = _load_object(frame, max_bytes)
        message_type = obj.get("message_type")
        if message_type is None:
            if "status" not in obj:
                raise _decode_error("JSON object has neither `message_type` nor `status`", frame)
            return _validate(Response, obj, frame)
        model = _INBOUND_TYPES.get(message_type) if isinstance(message_type, str) else None
        if model is None:
            raise _decode_error(f"unknown inbound message_type {_short(message_type)}", frame)
        request = _validate(model, obj, frame)
        request._raw = obj
        return request
    except DecodeError:
        raise
    except Exception as exc:  # the contract: nothing but DecodeError escapes, whatever the input
        raise _unexpected(exc, frame) from exc


def decode_outbound(frame: str | bytes) -> OutboundMessage:
    """Parse a validator frame (simulator, replay, tests) with the same rules as `decode`."""
    try:
        obj = _load_object(frame)
        message_type = obj.get("message_type")
        model = _OUTBOUND_TYPES.get(message_type) if isinstance(message_type, str) else None
        if model is None:
            what = "missing" if message_type is None else f"unknown: {_short(message_type)}"
            raise _decode_error(f"outbound message_type {what}", frame)
        return _validate(model, obj, frame)
    except DecodeError:
        raise
    except Exception as exc:
        raise _unexpected(exc, frame) from exc


def message_kind(frame_or_message: object) -> str:
    """A low-cardinality name for metrics: the message_type, "Response", "unknown" or "malformed"."""
    if isinstance(frame_or_message, Response):
        return "Response"
    if isinstance(frame_or_message, BaseModel):
        kind = getattr(frame_or_message, "message_type", None)
        return kind if isinstance(kind, str) else type(frame_or_message).__name__
    try:
        obj = orjson.loads(frame_or_message)  # type: ignore[arg-type]  # anything else is malformed
    except Exception:
        return "malformed"
    if not isinstance(obj, dict):
        return "malformed"
    kind = obj.get("message_type")
    if kind is None:
        return "Response" if "status" in obj else "unknown"
    return kind if kind in _OUTBOUND_TYPES or kind in _INBOUND_TYPES else "unknown"


def _load_object(frame: object, max_bytes: int = MAX_FRAME_BYTES) -> dict[str, Any]:
    """Size check, UTF-8 check and JSON parse; the result is always a JSON object."""
    if isinstance(frame, str):
        size = len(frame)
        if size > max_bytes // 4 and not frame.isascii():  # only then can bytes exceed chars*4
            size = len(frame.encode("utf-8", "surrogatepass"))
    elif isinstance(frame, (bytes, bytearray, memoryview)):
        size = len(frame)
    else:
        raise _decode_error(f"frame must be str or bytes, not {type(frame).__name__}", frame)
    if size > max_bytes:
        reason = f"frame is {size} bytes, larger than the {max_bytes} byte limit"
        raise _decode_error(reason, frame)
    try:
        obj = orjson.loads(frame)
    except orjson.JSONDecodeError as exc:
        raise _decode_error(_why_not_json(frame, exc), frame) from None
    if not isinstance(obj, dict):
        raise _decode_error(f"frame is JSON but not an object (got {json_kind(obj)})", frame)
    return obj


def _why_not_json(frame: str | bytes | bytearray | memoryview, exc: orjson.JSONDecodeError) -> str:
    try:
        if isinstance(frame, str):
            frame.encode("utf-8")
        else:
            bytes(frame).decode("utf-8")
    except (UnicodeDecodeError, UnicodeEncodeError) as bad:
        return f"frame is not valid UTF-8 ({bad.reason} at position {bad.start})"
    if "depth" in exc.msg or "recursion" in exc.msg.lower():
        return f"frame is nested too deeply to parse ({exc})"
    return f"frame is not valid JSON ({exc})"


def _validate(model: type[_M], obj: dict[str, Any], frame: object) -> _M:
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise _decode_error(f"invalid {model.__name__}: {_summarise(exc)}", frame) from None


def _summarise(exc: ValidationError) -> str:
    """Field and problem per error, short: pydantic's default text is long and repeats the input."""
    errors = exc.errors(include_url=False, include_input=False, include_context=False)
    parts = [
        f"{'.'.join(str(p) for p in e['loc']) or '(object)'}: {e['msg']}" for e in errors[:_MAX_ERRORS_SHOWN]
    ]
    if len(errors) > _MAX_ERRORS_SHOWN:
        parts.append(f"(+{len(errors) - _MAX_ERRORS_SHOWN} more errors)")
    return "; ".join(parts)


def _unexpected(exc: Exception, frame: object) -> DecodeError:
    """Last resort, for failures no check above foresaw (e.g. RecursionError, MemoryError)."""
    try:
        detail = str(exc)[:_EXCERPT_CHARS]
    except Exception:
        detail = "?"
    return _decode_error(f"frame could not be decoded ({type(exc).__name__}: {detail})", frame)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"


def json_kind(value: object) -> str:
    """JSON's name for a parsed value, as the sender would think of it."""
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    return "null" if value is None else type(value).__name__
