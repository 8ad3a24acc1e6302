"""A protocol-faithful facilitator simulator: a websocket server that behaves like the real one.

It answers exactly as the real facilitator does (PROTOCOL.md and captures/real-facilitator-session.jsonl),
including its sharp edges, and by default it is as strict as production: the server pings (20 s, a late
pong closes 1011), inbound frames are limited to 16 MiB (1009), permessage-deflate is negotiated, a job
is created only for a validator with a fresh heartbeat and goes to every channel of that validator
(stale ones included), channels are evicted by heartbeat age (3001), specs and status metadata are
validated by the facilitator's own schemas (a spec that does not fit crashes the handler), and job
and cheat signatures are made the way real traffic makes them. ``lenient=True`` (``simulate
--lenient``) keeps the kinder behaviour of earlier versions where a demo or benchmark needs it.

It is an independent implementation on purpose, an oracle for the client: it shares no code with
``streams`` (its own models, its own signing).

Tests script it (job requests, cheat reports, raw frames), inject faults (drops, close codes, stalls
that never answer pings, slow acks, chaos), and inspect what arrived (``received``, ``stored``,
``channels``, ``violations``), waiting on conditions with :meth:`FacilitatorSimulator.wait_for`.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import json
import random
import re
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from enum import Enum, StrEnum
from http import HTTPStatus
from typing import Annotated, Any, Literal
from uuid import UUID

import orjson
from bittensor_wallet import Keypair
from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter, ValidationError, field_validator
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

__all__ = [
    "AuthMode",
    "Channel",
    "ConnectionRecord",
    "FacilitatorSimulator",
    "JobNotCreated",
    "Received",
    "serve_forever",
    "sign_cheat_report",
    "sign_job_request",
]

WS_PATH = "/ws/v0/"
PYDANTIC_DOCS_VERSION = "2.10"
"""The real facilitator's pydantic: error URLs are rewritten to it, so frames match the capture."""
METAGRAPH_SYNC_PERIOD = "0:05:00"
"""Appears in the real facilitator's validator_not_found help text."""
MiB = 2**20
PRODUCTION_MAX_SIZE = 16 * MiB
"""uvicorn's default ws_max_size, what the real facilitator accepts per inbound frame."""
LENIENT_MAX_SIZE = 50 * MiB
DEFAULT_JOB_SIGNER_URI = "//Bob"
"""The dev key that signed the job requests and the cheat report in the real capture."""
HEADER_AUTH_MAX_AGE = 60.0
HEADER_AUTH_MAX_SKEW = 5.0

IN_PROGRESS_STATUSES = frozenset(
    {"sent", "received", "accepted", "executor_ready", "streaming_ready", "volumes_ready", "execution_done"}
)
FINAL_STATUSES = frozenset({"completed", "rejected", "failed", "horde_failed"})
KNOWN_STATUSES = IN_PROGRESS_STATUSES | FINAL_STATUSES

FaultKind = Literal["drop", "close", "stall"]
AuthRefusal = Literal["validator_not_found", "signature_invalid"]
AuthMode = Literal["message", "headers"]


class JobNotCreated(RuntimeError):
    """The facilitator refused to create a job: its validator has no channel with a fresh heartbeat."""


class _Unset(Enum):
    UNSET = 0


_UNSET = _Unset.UNSET


# --- the facilitator's inbound models (shaped like compute_horde's validator requests) ---------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class V0Heartbeat(_Strict):
    message_type: Literal["V0Heartbeat"] = "V0Heartbeat"


class V0AuthenticationRequest(_Strict):
    message_type: Literal["V0AuthenticationRequest"] = "V0AuthenticationRequest"
    public_key: str
    signature: str


class V0MachineSpecsUpdate(_Strict):
    message_type: Literal["V0MachineSpecsUpdate"] = "V0MachineSpecsUpdate"
    miner_hotkey: str
    validator_hotkey: str
    specs: dict[str, Any]
    batch_id: str


class _LenientEnum(StrEnum):
    """A value the facilitator does not know is stored as ``unknown`` (its enums' ``_missing_``)."""

    @classmethod
    def _missing_(cls, value: object) -> Any:
        return cls("unknown")


class Participant(_LenientEnum):
    UNKNOWN = "unknown"
    SDK = "sdk"
    FACILITATOR = "facilitator"
    VALIDATOR = "validator"
    MINER = "miner"
    EXECUTOR = "executor"


class JobStage(_LenientEnum):
    UNKNOWN = "unknown"
    EXECUTOR_STARTUP = "executor_startup"
    VOLUME_DOWNLOAD = "volume_download"
    STREAMING_STARTUP = "streaming_startup"
    EXECUTION = "execution"
    RESULT_UPLOAD = "result_upload"


class RejectionReason(_LenientEnum):
    UNKNOWN = "unknown"
    BUSY = "busy"
    INVALID_SIGNATURE = "invalid_signature"
    NO_MINER_FOR_JOB = "no_miner_for_job"
    VALIDATOR_BLACKLISTED = "validator_blacklisted"


class FailureReason(_LenientEnum):
    UNKNOWN = "unknown"
    TIMEOUT = "timeout"
    NONZERO_RETURN_CODE = "nonzero_return_code"
    DOWNLOAD_FAILED = "download_failed"
    UPLOAD_FAILED = "upload_failed"


class HordeFailureReason(_LenientEnum):
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


_Context = dict[str, JsonValue] | None
"""A JSON object or null: anything else is pydantic's ``dict_type`` error."""


class JobResultDetails(BaseModel, extra="allow"):
    docker_process_stderr: str
    docker_process_stdout: str
    artifacts: dict[str, str] | None = None
    upload_results: dict[str, str] | None = None


class JobRejectionDetails(BaseModel):
    rejected_by: Participant
    reason: RejectionReason
    message: str
    context: _Context = None


class JobFailureDetails(BaseModel):
    reason: FailureReason
    stage: JobStage
    message: str
    context: _Context = None
    docker_process_exit_status: int | None = None
    docker_process_stdout: str | None = None
    docker_process_stderr: str | None = None


class HordeFailureDetails(BaseModel):
    reported_by: Participant
    reason: HordeFailureReason
    message: str
    context: _Context = None


class StreamingServerDetails(_Strict):
    streaming_server_cert: str | None = None
    streaming_server_address: str | None = None
    streaming_server_port: int | None = None


class JobStatusMetadata(BaseModel, extra="allow"):
    miner_response: JobResultDetails | None = None
    job_rejection_details: JobRejectionDetails | None = None
    job_failure_details: JobFailureDetails | None = None
    horde_failure_details: HordeFailureDetails | None = None
    streaming_details: StreamingServerDetails | None = None


class JobStatusUpdate(_Strict):
    message_type: Literal["V0JobStatusUpdate"] = "V0JobStatusUpdate"
    uuid: str
    status: str  # the real one maps strings it does not know to "unknown"
    metadata: JobStatusMetadata | None = None


class _LooseMetadata(BaseModel, extra="allow"):
    """Lenient mode: any object (the simulator's old, kinder metadata check)."""


class _LooseJobStatusUpdate(_Strict):
    message_type: Literal["V0JobStatusUpdate"] = "V0JobStatusUpdate"
    uuid: str
    status: str
    metadata: _LooseMetadata | None = None


_Inbound = V0AuthenticationRequest | JobStatusUpdate | V0MachineSpecsUpdate | V0Heartbeat
_LooseInbound = V0AuthenticationRequest | _LooseJobStatusUpdate | V0MachineSpecsUpdate | V0Heartbeat
_INBOUND: TypeAdapter[_Inbound] = TypeAdapter(Annotated[_Inbound, Field(discriminator="message_type")])
_LOOSE_INBOUND: TypeAdapter[_LooseInbound] = TypeAdapter(Annotated[_LooseInbound, Field(discriminator="message_type")])


# --- the facilitator's hardware schema (machine specs); what does not fit crashes its handler ----------


class CpuSpec(_Strict):
    count: int
    model: str | None = None
    frequency: Decimal | None = None
    clocks: list[float] | None = None


class GpuDetails(_Strict):
    name: str
    capacity: int | float | None = None
    cuda: str | None = None
    driver: str | None = None
    graphics_speed: int | None = None
    memory_speed: int | None = None
    power_limit: float | None = None
    uuid: str | None = None
    serial: str | None = None

    @field_validator("power_limit", mode="before")
    @classmethod
    def _unparsable_is_null(cls, value: object) -> float | None:
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None


class GpuSpec(_Strict):
    capacity: int | float | None = None
    count: int | None = None
    details: list[GpuDetails] = []
    graphics_speed: int | None = None
    memory_speed: int | None = None


class HardDiskSpec(_Strict):
    total: int | float | None = None
    free: int | float | None = None
    used: int | float | None = None
    read_speed: Decimal | None = None
    write_speed: Decimal | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_null(cls, value: object) -> object:
        return None if value == "" else value


class RamSpec(_Strict):
    total: int | float | None = None
    free: int | float | None = None
    available: int | float | None = None
    used: int | float | None = None
    read_speed: Decimal | None = None
    write_speed: Decimal | None = None
    swap_free: int | None = None
    swap_total: int | None = None
    swap_used: int | None = None

    @field_validator("*", mode="before")
    @classmethod
    def _blank_is_null(cls, value: object) -> object:
        return None if value == "" else value


class HardwareSpec(BaseModel, extra="allow"):
    cpu: CpuSpec
    gpu: GpuSpec | None = None
    hard_disk: HardDiskSpec
    has_docker: bool | None = None
    ram: RamSpec
    virtualization: str | None = None
    os: str | None = None


# --- the facilitator's Response (compute_horde's facilitator requests) ---------------------------------


class _Error(BaseModel, extra="allow"):
    msg: str
    type: str
    help: str = ""


class _Response(BaseModel, extra="forbid"):
    status: Literal["error", "success"]
    errors: list[_Error] = []


def _error(msg: str, type_: str, help_: str) -> str:
    return _Response(status="error", errors=[_Error(msg=msg, type=type_, help=help_)]).model_dump_json()


SUCCESS = _Response(status="success").model_dump_json()
NOT_AUTHENTICATED = _error("Not authenticated", "auth.not_authenticated", "Please send authentication request first")
ALREADY_AUTHENTICATED = _error(
    "Already authenticated",
    "auth.already_authenticated",
    "You are already authenticated, please do not send authentication request again.",
)
SIGNATURE_INVALID = _error(
    "Invalid signature", "auth.signature_invalid", "The signature provided does not match the public key"
)
JOB_NOT_FOUND = _error("Job not found", "job.not_found", "Job with this UUID was not found")
INTEGRITY_ERROR = _error(
    "Integrity error", "job.integrity_error", "Probably you are trying to set the same status twice?"
)


def validator_not_found(ss58_address: str) -> str:
    """The real facilitator's validator_not_found Response for a hotkey."""
    return _error(
        "Validator not found",
        "auth.validator_not_found",
        f"Validator with hotkey {ss58_address} was not found. "
        "If you are sure that the key belongs to an active validator, "
        f"please wait at least {METAGRAPH_SYNC_PERIOD} "
        "for the list of active validators to be updated and then retry.",
    )


_DOCS_URL = re.compile(r"(https://errors\.pydantic\.dev/)[^/]+/")


def _parse_error(exc: ValidationError) -> str:
    """pydantic's errors wrapped the way the real facilitator does (``Error.parse_obj(error_dict)``)."""
    errors = []
    for detail in exc.errors():
        data = dict(detail)
        url = data.get("url")
        if isinstance(url, str):
            data["url"] = _DOCS_URL.sub(rf"\g<1>{PYDANTIC_DOCS_VERSION}/", url)
        errors.append(_Error.model_validate(data))
    return _Response(status="error", errors=errors).model_dump_json()


def _parse(frame: str | bytes, adapter: TypeAdapter[Any]) -> tuple[BaseModel | None, dict[str, Any] | None, str | None]:
    """(message, parsed object, error Response). Validation runs on the text, like the real one."""
    if isinstance(frame, bytes):
        frame_text: Any = None  # channels hands a binary frame over as text_data=None
        parsed = None
    else:
        frame_text = frame
        try:
            obj = orjson.loads(frame)
        except orjson.JSONDecodeError:
            obj = None
        parsed = obj if isinstance(obj, dict) else None
    try:
        message: BaseModel = adapter.validate_json(frame_text)
    except ValidationError as exc:
        return None, parsed, _parse_error(exc)
    return message, parsed, None


# --- signatures, made the way real traffic makes them (PROTOCOL.md "Signatures") ------------------------

_VOLUME_FIELDS = {
    "inline": ("volume_type", "contents", "relative_path"),
    "zip_url": ("volume_type", "contents", "relative_path"),
    "single_file": ("volume_type", "url", "relative_path"),
    "huggingface_volume": (
        "volume_type",
        "repo_id",
        "repo_type",
        "revision",
        "relative_path",
        "allow_patterns",
        "token",
    ),
}
_UPLOAD_FIELDS = {
    "zip_and_http_post": ("output_upload_type", "url", "form_fields"),
    "zip_and_http_put": ("output_upload_type", "url"),
    "single_file_post": ("output_upload_type", "url", "form_fields", "relative_path", "signed_headers"),
    "single_file_put": ("output_upload_type", "url", "relative_path", "signed_headers"),
}


def _full(item: Any, tag: str, fields: dict[str, tuple[str, ...]]) -> Any:
    """One volume/upload with all of its type's fields in declaration order (null when absent)."""
    if not isinstance(item, dict) or item.get(tag) not in fields:
        return item
    return {name: item.get(name) for name in fields[item[tag]]}


def _items(value: Any, tag: str, multi: str, key: str, fields: dict[str, tuple[str, ...]]) -> list[Any]:
    if value is None:
        return []
    if isinstance(value, dict) and value.get(tag) == multi:
        return [_full(item, tag, fields) for item in value.get(key) or []]
    return [_full(value, tag, fields)]


def signed_fields(job: dict[str, Any]) -> str:
    """The string a job request's signature covers: the compact JSON of its signed fields."""
    streaming = job.get("streaming_details")
    fields = {
        "executor_class": job.get("executor_class"),
        "docker_image": job.get("docker_image"),
        "args": job.get("args"),
        "env": job.get("env"),
        "use_gpu": job.get("use_gpu", True),
        "artifacts_dir": job.get("artifacts_dir") or "",
        "on_trusted_miner": job.get("on_trusted_miner"),
        "download_time_limit": job.get("download_time_limit"),
        "execution_time_limit": job.get("execution_time_limit"),
        "upload_time_limit": job.get("upload_time_limit"),
        "streaming_start_time_limit": job.get("streaming_start_time_limit"),
        "streaming_details": None
        if streaming is None
        else {"public_key": streaming.get("public_key"), "executor_ip": streaming.get("executor_ip")},
        "volumes": _items(job.get("volume"), "volume_type", "multi_volume", "volumes", _VOLUME_FIELDS),
        "uploads": _items(job.get("output_upload"), "output_upload_type", "multi_upload", "uploads", _UPLOAD_FIELDS),
    }
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False)


def _digest(timestamp_ns: int, payload: Any) -> bytes:
    """blake2b(timestamp_ns as 8 bytes big-endian ‖ json.dumps(payload, sort_keys=True))."""
    blob = timestamp_ns.to_bytes(8, "big") + json.dumps(payload, sort_keys=True).encode("utf-8")
    return hashlib.blake2b(blob).digest()


def _signature(signer: Keypair, payload: Any, scope: str, timestamp_ns: int | None) -> dict[str, Any]:
    ts = time.time_ns() if timestamp_ns is None else timestamp_ns
    return {
        "signature_type": "bittensor",
        "signatory": signer.ss58_address,
        "timestamp_ns": ts,
        "signature": base64.b64encode(signer.sign(_digest(ts, payload))).decode("ascii"),
        "signature_scope": scope,
    }


def sign_job_request(job: dict[str, Any], signer: Keypair, timestamp_ns: int | None = None) -> dict[str, Any]:
    """The ``signature`` object an SDK puts on a job request (scope ``SignedFields``)."""
    return _signature(signer, signed_fields(job), "SignedFields", timestamp_ns)


def sign_cheat_report(report: dict[str, Any], signer: Keypair, timestamp_ns: int | None = None) -> dict[str, Any]:
    """The ``signature`` object an SDK puts on a cheat report (``details`` absent is signed as null)."""
    body = {key: report.get(key) for key in ("job_uuid", "trusted_job_uuid", "details")}
    return _signature(signer, json.dumps(body, sort_keys=True), "FullRequest", timestamp_ns)


_SINGLE_FILE_UPLOADS = frozenset({"single_file_post", "single_file_put"})
"""What a multi_upload's ``uploads`` may hold (the SDK's uploads are all single files)."""


def _wrap(value: Any, tag: str, multi: str, key: str, fields: dict[str, tuple[str, ...]]) -> Any:
    """The facilitator's API stores and sends every volume as multi_volume, every upload as multi_upload.

    A zip upload (which the SDK never makes, and which a multi_upload cannot hold) is sent as it is.
    """
    if value is None or (isinstance(value, dict) and value.get(tag) == multi):
        return value
    if multi == "multi_upload" and (not isinstance(value, dict) or value.get(tag) not in _SINGLE_FILE_UPLOADS):
        return _full(value, tag, fields)
    wrapped: dict[str, Any] = {tag: multi, key: [_full(value, tag, fields)]}
    if multi == "multi_upload":
        wrapped["system_output"] = None
    return wrapped


@functools.cache
def _default_job_signer() -> Keypair:
    return Keypair.create_from_uri(DEFAULT_JOB_SIGNER_URI)


def _verify_header_signature(public_key_hex: str, timestamp: str, signature: str) -> str | None:
    """The hotkey's ss58 address when the X-Signature is valid, else None."""
    try:
        keypair = Keypair(public_key=public_key_hex, ss58_format=42)
        if keypair.verify(timestamp.encode(), signature):
            return str(keypair.ss58_address)
    except Exception:
        return None
    return None


# --- inspection records ---


@dataclass(frozen=True, slots=True)
class Received:
    """One frame as the facilitator received it."""

    conn_id: int
    t: float
    """time.monotonic() at receipt."""
    frame: str | bytes
    parsed: dict[str, Any] | None
    """The JSON object, or None if the frame was not a JSON object."""
    authenticated: bool
    """Whether the connection was authenticated when the frame arrived."""


@dataclass(slots=True)
class ConnectionRecord:
    """What the facilitator knows about one connection."""

    conn_id: int
    opened_at: float
    headers: dict[str, str]
    """Request headers, names lower-cased (as the real one reads them)."""
    authenticated_at: float | None = None
    auth_method: AuthMode | None = None
    """How the connection authenticated: a V0AuthenticationRequest or the handshake headers."""
    hotkey: str | None = None
    last_heartbeat: float | None = None
    """Starts at auth time, like the real facilitator's per-connection heartbeat."""
    heartbeats: list[float] = field(default_factory=list)
    """Times of the V0Heartbeats received after auth."""
    pongs: int = 0
    """Pongs received for the server's keepalive pings."""
    closed_at: float | None = None
    close_code: int | None = None
    close_reason: str = ""


@dataclass(slots=True)
class Channel:
    """The facilitator's row for one authenticated connection (its channel-layer channel)."""

    conn_id: int
    hotkey: str
    last_heartbeat: float
    """time.monotonic() of the last V0Heartbeat; auth time until the first one (status updates do not count)."""
    alive: bool = True
    """False once the connection is gone but the row stays (after a handler crash, until eviction)."""


@dataclass(slots=True)
class _Conn:
    record: ConnectionRecord
    ws: ServerConnection
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while the handler may process frames; cleared by a stall."""
    stalled: bool = False
    dead: bool = False
    crashed: bool = False
    """Ended by the simulator aborting it (a handler crash, drop()): its channel row stays."""
    resume: asyncio.TimerHandle | None = None
    acks: asyncio.Queue[tuple[float, str]] | None = None
    writer: asyncio.Task[None] | None = None
    keepalive: asyncio.Task[None] | None = None
    message_auth_done: bool = False
    last_frame: float = 0.0
    """loop.time() of the last frame received (lenient mode's idle timeout)."""
    idle_timer: asyncio.TimerHandle | None = None
    closing: asyncio.Task[None] | None = None
    """A close the server started by itself (eviction, idle timeout); awaited by the handler."""

    def __post_init__(self) -> None:
        self.gate.set()


@dataclass(slots=True)
class _Chaos:
    every: int
    kinds: tuple[FaultKind, ...]
    rng: random.Random
    stall_for: float | None
    countdown: int = 0

    def reset(self) -> None:
        self.countdown = self.rng.randint(max(1, self.every // 2), max(1, self.every + self.every // 2))


@dataclass(slots=True)
class _OnAuth:
    count: int
    each: bool
    overrides: dict[str, Any]
    fired: bool = False


class FacilitatorSimulator:
    """A local facilitator on ws://127.0.0.1:PORT/ws/v0/ for tests, demos and benchmarks."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        allowed_hotkeys: Collection[str] | None = None,
        accept_unknown_jobs: bool = False,
        ack_delay: float = 0.0,
        seed: int | None = None,
        lenient: bool = False,
        max_size: int | _Unset | None = _UNSET,
        ping_interval: float | _Unset | None = _UNSET,
        ping_timeout: float | None = 20.0,
        compression: bool | _Unset = _UNSET,
        job_heartbeat_window: float = 180.0,
        eviction_interval: float | None = 300.0,
        eviction_age: float = 600.0,
        idle_timeout: float | _Unset | None = _UNSET,
        auth_modes: Collection[AuthMode] = ("message", "headers"),
        job_signer: Keypair | None = None,
        close_timeout: float = 2.0,
    ) -> None:
        """Strict (production) behaviour unless ``lenient``; each knob can still be set on its own.

        ``allowed_hotkeys``: ss58 addresses of active validators (None: any validly signed hotkey).
        ``accept_unknown_jobs``: register status updates for job uuids never sent (the real one
        answers job.not_found). ``max_size``: inbound frame limit (16 MiB; lenient 50 MiB).
        ``ping_interval``/``ping_timeout``: the server's keepalive (20 s/20 s, a late pong closes 1011;
        lenient: no pings). ``compression``: negotiate permessage-deflate (lenient: off).
        ``job_heartbeat_window``: a job is created only for a validator with a channel whose last
        heartbeat is younger than this (3 min). ``eviction_interval``/``eviction_age``: every 5 min,
        close (3001) each channel whose last heartbeat is over 10 min old (None: never).
        ``idle_timeout``: lenient mode only: close (3001) a connection silent this long (10 min).
        ``auth_modes``: what authenticates a connection: a V0AuthenticationRequest (``message``,
        production today) and/or the handshake's X-Timestamp/X-Public-Key/X-Signature (``headers``,
        the upstream draft). ``job_signer``: the key that signs job requests and cheat reports
        (default the capture's //Bob).
        """
        modes = frozenset(auth_modes)
        if not modes or not modes <= {"message", "headers"}:
            raise ValueError(f"auth_modes must be a non-empty subset of message/headers, got {sorted(modes)}")
        if not lenient and idle_timeout is not _UNSET:
            raise ValueError(
                "idle_timeout is lenient mode's eviction; strict mode evicts by heartbeat age "
                "(eviction_interval, eviction_age)"
            )
        self._host = host
        self._port = port
        self.allowed_hotkeys = None if allowed_hotkeys is None else frozenset(allowed_hotkeys)
        self.accept_unknown_jobs = accept_unknown_jobs
        self.lenient = lenient
        self.auth_modes: frozenset[AuthMode] = modes
        self._ack_delay = ack_delay
        self._rng = random.Random(seed)
        self._max_size = (LENIENT_MAX_SIZE if lenient else PRODUCTION_MAX_SIZE) if max_size is _UNSET else max_size
        self._ping_interval = (None if lenient else 20.0) if ping_interval is _UNSET else ping_interval
        self._ping_timeout = ping_timeout
        self._compression = (not lenient) if compression is _UNSET else compression
        self._job_heartbeat_window = job_heartbeat_window
        self._eviction_interval = None if lenient else eviction_interval
        self._eviction_age = eviction_age
        self._idle_timeout = (600.0 if idle_timeout is _UNSET else idle_timeout) if lenient else None
        self._close_timeout = close_timeout
        self.job_signer = job_signer if job_signer is not None else _default_job_signer()
        self._adapter: TypeAdapter[Any] = _LOOSE_INBOUND if lenient else _INBOUND
        self._server: Server | None = None
        self._evictor: asyncio.Task[None] | None = None

        self.received: list[Received] = []
        self.sent: list[tuple[int, float, str | bytes]] = []
        """(conn_id, time.monotonic(), frame) for every frame the simulator sent."""
        self.stored: dict[str, list[str]] = {}
        """Job uuid -> statuses stored, in order ("sent" is stored when the job is created)."""
        self.stored_metadata: dict[str, list[dict[str, Any]]] = {}
        self.spec_updates: list[dict[str, Any]] = []
        self.violations: list[str] = []
        self.faults: list[tuple[int, str]] = []
        """(conn_id, description) of every fault injected, scripted or by chaos."""
        self.jobs: dict[str, dict[str, Any]] = {}
        """Job requests created (known job uuids), by uuid."""
        self.job_channels: dict[str, list[int]] = {}
        """Job uuid -> the connections its request (and cheat reports) reached."""
        self.lost: list[tuple[int, str]] = []
        """(conn_id, uuid) of job requests and cheat reports sent to a channel whose connection was gone."""
        self.channels: dict[int, Channel] = {}
        """The facilitator's channel rows by connection id (strict mode's routing table)."""
        self.evictions: list[int] = []
        """Connection ids whose channel the periodic eviction removed."""
        self.keepalive_timeouts: list[int] = []
        """Connection ids the server closed (1011) because a pong was late."""
        self.handshake_refusals: list[str] = []
        """Why each refused handshake (HTTP 403) was refused."""
        self.connections = 0
        self.authenticated_connections = 0
        self.connection_log: dict[int, ConnectionRecord] = {}

        self._live: dict[int, _Conn] = {}
        self._outbox: deque[str] = deque()
        self._refusals: deque[AuthRefusal] = deque()
        self._on_auth: list[_OnAuth] = []
        self._header_auth: weakref.WeakKeyDictionary[ServerConnection, str] = weakref.WeakKeyDictionary()
        """Hotkeys that authenticated in the handshake, until their handler starts."""
        self._chaos: _Chaos | None = None
        self._changed = asyncio.Event()

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("simulator already started")
        self._server = await serve(
            self._handle,
            self._host,
            self._port,
            process_request=self._process_request,
            max_size=self._max_size,
            ping_interval=None,  # our own keepalive: a stalled (frozen) server must not ping either
            close_timeout=self._close_timeout,
            compression="deflate" if self._compression else None,
        )
        self._port = self._server.sockets[0].getsockname()[1]
        if self._eviction_interval is not None:
            self._evictor = asyncio.get_running_loop().create_task(
                self._evict_periodically(self._eviction_interval), name="simulator-eviction"
            )

    async def stop(self) -> None:
        """Close every connection (stalled ones are aborted: they cannot finish a handshake)."""
        server, self._server = self._server, None
        if server is None:
            return
        evictor, self._evictor = self._evictor, None
        if evictor is not None:
            evictor.cancel()
            await asyncio.gather(evictor, return_exceptions=True)
        for conn in list(self._live.values()):
            if conn.stalled:
                self._kill(conn)
        server.close()
        await server.wait_closed()

    async def __aenter__(self) -> FacilitatorSimulator:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("simulator not started")
        return self._port

    @property
    def url(self) -> str:
        return f"ws://{self._host}:{self.port}{WS_PATH}"

    @property
    def job_signer_ss58(self) -> str:
        """The signatory of the job requests and cheat reports this simulator sends (trust it in the client)."""
        return str(self.job_signer.ss58_address)

    # --- inspection ------------------------------------------------------------------------

    @property
    def heartbeats(self) -> dict[int, list[float]]:
        """Heartbeat times per connection id."""
        return {cid: rec.heartbeats for cid, rec in self.connection_log.items()}

    @property
    def request_headers(self) -> dict[int, dict[str, str]]:
        """Request headers per connection id (lower-cased names)."""
        return {cid: rec.headers for cid, rec in self.connection_log.items()}

    @property
    def open_connections(self) -> int:
        return sum(1 for conn in self._live.values() if not conn.dead)

    def frames_of(self, message_type: str) -> list[dict[str, Any]]:
        """Parsed frames of one message_type, in arrival order."""
        frames = (r.parsed for r in self.received)
        return [f for f in frames if f is not None and f.get("message_type") == message_type]

    def has_fresh_channel(self, validator: str | None = None) -> bool:
        """Whether a job for ``validator`` (None: any) would be created now (strict mode's rule)."""
        now = time.monotonic()
        return any(
            now - ch.last_heartbeat < self._job_heartbeat_window
            for ch in self.channels.values()
            if validator is None or ch.hotkey == validator
        )

    def live_channels(self, validator: str | None = None) -> list[Channel]:
        """Channel rows whose connection is still open."""
        return [ch for ch in self.channels.values() if ch.alive and validator in (None, ch.hotkey)]

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float | None,
        what: str | None = None,
    ) -> None:
        """Wait until ``predicate()`` holds, re-checking on every frame and connection change."""
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._changed.wait()
        except TimeoutError:
            name = what or getattr(predicate, "__name__", "condition")
            raise TimeoutError(f"simulator: {name} not met within {timeout} s; {self.summary()}") from None

    async def wait_for_validator(self, timeout: float | None = 10.0, validator: str | None = None) -> None:
        """Wait until a validator has an open, authenticated channel (a job pushed now reaches it)."""
        await self.wait_for(lambda: bool(self.live_channels(validator)), timeout, "an authenticated channel")

    def summary(self) -> str:
        """One line of state, for failure messages."""
        last = self.received[-1].frame if self.received else None
        last_text = None if last is None else (last[:200] if isinstance(last, str) else f"<{len(last)} bytes>")
        return (
            f"connections={self.connections} open={self.open_connections} "
            f"authenticated={self.authenticated_connections} channels={len(self.channels)} "
            f"received={len(self.received)} last_received={last_text!r} jobs={len(self.jobs)} "
            f"violations={self.violations[-5:]} faults={self.faults[-5:]}"
        )

    def forget_dead_channels(self) -> None:
        """Remove the rows of connections that are gone (what eviction does to them eventually).

        For long tests that measure memory; the real facilitator keeps such rows up to 10 minutes.
        """
        for conn_id in [c for c, ch in self.channels.items() if not ch.alive]:
            del self.channels[conn_id]

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # --- scripting -------------------------------------------------------------------------

    def _new_uuid(self) -> str:
        return str(UUID(int=self._rng.getrandbits(128), version=4))

    def job_request(
        self, uuid: str | None = None, *, signed_by: Keypair | None = None, **overrides: Any
    ) -> dict[str, Any]:
        """A V2JobRequest frame as the real facilitator sends it, signed as an SDK signs it.

        Volumes and uploads are wrapped in multi_volume/multi_upload as the facilitator's API does.
        A ``signature`` override is kept as given; ``signed_by`` signs with another key. Strict mode
        also reproduces the facilitator's bug of stripping whitespace around ``args`` items *after*
        the signature was checked, so such a job arrives with a signature that no longer verifies.
        """
        body: dict[str, Any] = {
            "type": "job.new",
            "message_type": "V2JobRequest",
            "uuid": uuid or self._new_uuid(),
            "job_namespace": None,
            "executor_class": "spin_up-4min.gpu-24gb",
            "docker_image": "backenddevelopersltd/compute-horde-job-echo:v0-latest",
            "args": ["--hello", "world"],
            "env": {},
            "use_gpu": False,
            "volume": None,
            "output_upload": None,
            "artifacts_dir": None,
            "on_trusted_miner": False,
            "download_time_limit": 60,
            "execution_time_limit": 60,
            "upload_time_limit": 60,
            "streaming_start_time_limit": 60,
            "streaming_details": None,
        }
        body.update(overrides)
        signature = body.pop("signature", None)
        if signature is None:
            signature = sign_job_request(body, signed_by or self.job_signer)
        body["volume"] = _wrap(body.get("volume"), "volume_type", "multi_volume", "volumes", _VOLUME_FIELDS)
        body["output_upload"] = _wrap(
            body.get("output_upload"), "output_upload_type", "multi_upload", "uploads", _UPLOAD_FIELDS
        )
        if not self.lenient and isinstance(body.get("args"), list):
            body["args"] = [arg.strip() if isinstance(arg, str) else arg for arg in body["args"]]
        return {"signature": signature, **body}  # the real one puts the signature first

    def cheat_report(self, job_uuid: str, *, signed_by: Keypair | None = None, **overrides: Any) -> dict[str, Any]:
        """A V0JobCheated frame as the real facilitator sends it (``details=None`` leaves the key out)."""
        body: dict[str, Any] = {
            "type": "job.cheated",
            "message_type": "V0JobCheated",
            "job_uuid": job_uuid,
            "trusted_job_uuid": self._new_uuid(),
            "details": {"reason": "simulated cheat report"},
        }
        body.update(overrides)
        signature = body.pop("signature", None)
        if signature is None:
            signature = sign_cheat_report(body, signed_by or self.job_signer)
        if body.get("details") is None:
            body.pop("details", None)
        return {"signature": signature, **body}

    def register_job(self, job_uuid: str, request: dict[str, Any] | None = None) -> str:
        """Make a job uuid known (its "sent" status stored), as creating a job does; returns its key."""
        key = str(UUID(job_uuid))
        self.jobs[key] = request if request is not None else self.jobs.get(key, {})
        self.stored.setdefault(key, ["sent"])
        self.stored_metadata.setdefault(key, [{}])
        return key

    async def send_job_request(
        self,
        uuid: str | None = None,
        *,
        validator: str | None = None,
        signed_by: Keypair | None = None,
        **overrides: Any,
    ) -> dict[str, Any]:
        """Create a job for ``validator`` and send its request to every channel of that validator.

        ``validator`` defaults to the hotkey of the newest channel. Strict mode: raises
        :class:`JobNotCreated` (nothing created, nothing queued) unless the validator has a channel
        whose last heartbeat is under ``job_heartbeat_window`` old; stale channels get the request too
        (what goes to a dead connection is lost, see ``lost``). Lenient mode: the newest authenticated
        connection gets it, or the next one to authenticate.
        """
        job = self.job_request(uuid, signed_by=signed_by, **overrides)
        if self.lenient:
            self.register_job(job["uuid"], job)
            await self._deliver(json.dumps(job))
            return job
        hotkey = self._target(validator)
        if not self.has_fresh_channel(hotkey):
            raise JobNotCreated(
                f"validator {hotkey} has no channel with a heartbeat under {self._job_heartbeat_window:g} s old: "
                "the facilitator creates no job (nothing is queued)"
            )
        key = self.register_job(job["uuid"], job)
        self.job_channels[key] = await self._fan_out(hotkey, json.dumps(job), key)
        return job

    async def send_cheat_report(
        self, job_uuid: str, *, validator: str | None = None, signed_by: Keypair | None = None, **overrides: Any
    ) -> dict[str, Any]:
        """Send a V0JobCheated for ``job_uuid`` to every channel of the validator that got the job.

        Strict mode: raises :class:`JobNotCreated` when that validator has no channel at all.
        Lenient mode: the newest authenticated connection gets it, or the next one to authenticate.
        """
        report = self.cheat_report(job_uuid, signed_by=signed_by, **overrides)
        if self.lenient:
            await self._deliver(json.dumps(report))
            return report
        if validator is None:
            validator = self._validator_of(job_uuid)
        hotkey = self._target(validator)
        if not any(ch.hotkey == hotkey for ch in self.channels.values()):
            raise JobNotCreated(f"validator {hotkey} has no channel: the cheat report cannot be sent")
        await self._fan_out(hotkey, json.dumps(report), job_uuid)
        return report

    async def send_raw(self, frame: str | bytes) -> None:
        """Send any frame as is on the current connection (authenticated or not)."""
        conn = self._require_current()
        await self._send(conn, frame)

    def job_requests_on_auth(self, count: int = 1, *, each: bool = False, **overrides: Any) -> None:
        """After the first (``each``: every) successful auth, send ``count`` fresh job requests."""
        self._on_auth.append(_OnAuth(count, each, overrides))

    def refuse_next_auth(self, kind: AuthRefusal, times: int = 1) -> None:
        """Refuse the next ``times`` auth requests as the real one would (then close 3001 / 3000)."""
        self._refusals.extend([kind] * times)

    def set_ack_delay(self, seconds: float) -> None:
        """Delay every Response by ``seconds`` from now on, keeping their order."""
        self._ack_delay = seconds

    def evict(self) -> list[int]:
        """One eviction pass now (the periodic one runs every ``eviction_interval``); returns conn ids.

        Closes (3001) each channel whose last heartbeat is over ``eviction_age`` old, and those of
        validators no longer in ``allowed_hotkeys``; rows of connections already gone are deleted.
        """
        now = time.monotonic()
        evicted = []
        for channel in list(self.channels.values()):
            stale = now - channel.last_heartbeat > self._eviction_age
            departed = self.allowed_hotkeys is not None and channel.hotkey not in self.allowed_hotkeys
            if not (stale or departed):
                continue
            conn = self._live.get(channel.conn_id)
            if conn is None or conn.dead:
                del self.channels[channel.conn_id]
            elif conn.closing is None:
                conn.closing = asyncio.get_running_loop().create_task(self._close(conn, 3001, ""))
            else:
                continue  # already being closed
            evicted.append(channel.conn_id)
        if evicted:
            self.evictions.extend(evicted)
            self._notify()
        return evicted

    async def _evict_periodically(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.evict()

    def _target(self, validator: str | None) -> str:
        if validator is not None:
            return validator
        if not self.channels:
            raise JobNotCreated("no validator has a channel: the facilitator creates no job (nothing is queued)")
        return self.channels[max(self.channels)].hotkey

    def _validator_of(self, job_uuid: str) -> str | None:
        for conn_id in self.job_channels.get(job_uuid, []):
            record = self.connection_log.get(conn_id)
            if record is not None and record.hotkey is not None:
                return record.hotkey
        return None

    async def _fan_out(self, hotkey: str, frame: str, key: str) -> list[int]:
        """Send to every channel of ``hotkey``; a channel whose connection is gone loses the frame."""
        reached = []
        for channel in [ch for ch in self.channels.values() if ch.hotkey == hotkey]:
            conn = self._live.get(channel.conn_id)
            if conn is not None and not conn.dead and await self._send(conn, frame):
                reached.append(channel.conn_id)
            else:
                self.lost.append((channel.conn_id, key))
        self._notify()
        return reached

    # --- fault injection -------------------------------------------------------------------

    def _current(self, *, authenticated: bool = False) -> _Conn | None:
        for conn in reversed(self._live.values()):
            if not conn.dead and (not authenticated or conn.record.authenticated_at is not None):
                return conn
        return None

    def _require_current(self) -> _Conn:
        conn = self._current()
        if conn is None:
            raise RuntimeError("simulator has no open connection")
        return conn

    async def drop(self) -> None:
        """Abort the current connection's TCP connection: no close frame, the client sees 1006.

        Like a handler crash: the connection's channel row stays (until eviction), so job requests
        fan out to it and are lost there.
        """
        conn = self._require_current()
        self.faults.append((conn.record.conn_id, "drop"))
        self._kill(conn)
        self._notify()

    async def close(self, code: int, reason: str = "") -> None:
        """Close the current connection with a close frame carrying ``code`` and ``reason``."""
        conn = self._require_current()
        self.faults.append((conn.record.conn_id, f"close {code}"))
        await self._close(conn, code, reason)

    async def stall(self, duration: float | None = None) -> None:
        """Stop reading the current connection (so pings go unanswered) for ``duration`` s.

        Returns at once. A stalled server is frozen: it does not ping either. ``None`` stalls it for
        good: the simulator aborts it when the same validator authenticates again, on drop()/stop(),
        since a paused socket cannot notice the client leaving.
        """
        conn = self._require_current()
        self.faults.append((conn.record.conn_id, "stall" if duration is None else f"stall {duration:g} s"))
        self._stall(conn, duration)

    def chaos(
        self,
        every: int = 50,
        *,
        kinds: Iterable[FaultKind] = ("drop", "close", "stall"),
        rng: random.Random | None = None,
        stall_for: float | None = None,
    ) -> None:
        """After roughly every ``every`` received frames (uniform in [every/2, 1.5 every]), inject a fault.

        ``stall_for``: how long a chaos stall lasts (None: until the connection is abandoned).
        """
        chaos = _Chaos(every, tuple(kinds), rng or self._rng, stall_for)
        if not chaos.kinds or every < 1:
            self._chaos = None
            return
        chaos.reset()
        self._chaos = chaos

    def _stall(self, conn: _Conn, duration: float | None) -> None:
        if conn.dead:
            return
        conn.stalled = True
        conn.gate.clear()
        conn.ws.transport.pause_reading()
        if conn.resume is not None:
            conn.resume.cancel()
            conn.resume = None
        if duration is not None:
            conn.resume = asyncio.get_running_loop().call_later(duration, self._unstall, conn)

    def _unstall(self, conn: _Conn) -> None:
        conn.resume = None
        if conn.dead or not conn.stalled:
            return
        conn.stalled = False
        if not conn.ws.recv_messages.paused:  # websockets' own flow control may want it paused
            conn.ws.transport.resume_reading()
        conn.gate.set()

    def _kill(self, conn: _Conn) -> None:
        """Abort the TCP connection and release a handler waiting behind a stall (its channel row stays)."""
        conn.dead = conn.crashed = True
        if conn.resume is not None:
            conn.resume.cancel()
            conn.resume = None
        conn.ws.transport.abort()
        conn.gate.set()

    async def _close(self, conn: _Conn, code: int, reason: str) -> None:
        self._unstall(conn)
        await conn.ws.close(code, reason)

    # --- connection handling -------------------------------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        """The path check, then connect-time header auth (the upstream draft): refused is HTTP 403."""
        if request.path.split("?", 1)[0] != WS_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, f"no websocket endpoint here; use {WS_PATH}\n")
        if "headers" not in self.auth_modes:
            return None  # like production today: the headers are not looked at
        values = [request.headers.get(name) for name in ("X-Timestamp", "X-Public-Key", "X-Signature")]
        if not any(values):
            if "message" in self.auth_modes:
                return None
            return self._forbid(connection, "authentication headers X-Timestamp, X-Public-Key, X-Signature required")
        timestamp, public_key, signature = values
        if timestamp is None or public_key is None or signature is None:
            return self._forbid(connection, "incomplete authentication headers")
        try:
            signed_at = int(timestamp)
        except ValueError:
            return self._forbid(connection, f"X-Timestamp is not Unix seconds: {timestamp!r}")
        age = time.time() - signed_at
        if age > HEADER_AUTH_MAX_AGE:
            return self._forbid(connection, f"X-Timestamp is {age:.0f} s old (at most {HEADER_AUTH_MAX_AGE:g} s)")
        if -age > HEADER_AUTH_MAX_SKEW:
            return self._forbid(connection, f"X-Timestamp is {-age:.0f} s in the future")
        hotkey = _verify_header_signature(public_key, timestamp, signature)
        if hotkey is None:
            return self._forbid(connection, "X-Signature does not verify")
        if self.allowed_hotkeys is not None and hotkey not in self.allowed_hotkeys:
            return self._forbid(connection, f"validator {hotkey} not found")
        self._header_auth[connection] = hotkey
        return None

    def _forbid(self, connection: ServerConnection, why: str) -> Response:
        self.handshake_refusals.append(why)
        self._notify()
        return connection.respond(HTTPStatus.FORBIDDEN, why + "\n")

    async def _handle(self, ws: ServerConnection) -> None:
        self.connections += 1
        now = time.monotonic()
        raw_headers = ws.request.headers.raw_items() if ws.request is not None else []
        headers = {name.lower(): value for name, value in raw_headers}
        record = ConnectionRecord(self.connections, now, headers)
        self.connection_log[record.conn_id] = record
        conn = _Conn(record, ws)
        self._live[record.conn_id] = conn
        self._notify()
        loop = asyncio.get_running_loop()
        conn.last_frame = loop.time()
        self._arm_idle(conn)
        if self._ping_interval is not None and self._ping_timeout is not None:
            conn.keepalive = loop.create_task(
                self._keepalive(conn, self._ping_interval, self._ping_timeout), name="simulator-keepalive"
            )
        try:
            hotkey = self._header_auth.pop(ws, None)
            if hotkey is None or await self._authenticated(conn, hotkey, "headers"):
                await self._serve(conn)
        finally:
            conn.dead = True
            for timer in (conn.resume, conn.idle_timer):
                if timer is not None:
                    timer.cancel()
            for task in (conn.writer, conn.keepalive):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            if conn.closing is not None:
                await conn.closing  # ends with the connection it is closing
            killed = conn.ws.transport.is_closing() and ws.close_code is None
            if conn.stalled and not conn.ws.transport.is_closing():
                conn.ws.transport.abort()  # the server's own close handshake could not complete
                killed = conn.crashed = True
            del self._live[record.conn_id]
            channel = self.channels.get(record.conn_id)
            if channel is not None:
                if conn.crashed:
                    channel.alive = False  # the handler never ran its disconnect: the row stays
                else:
                    del self.channels[record.conn_id]
            record.closed_at = time.monotonic()
            record.close_code = 1006 if killed else ws.close_code
            record.close_reason = "dropped by the simulator" if killed else ws.close_reason or ""
            self._notify()

    async def _keepalive(self, conn: _Conn, interval: float, timeout: float) -> None:
        """uvicorn's: ping every ``interval``; a pong ``timeout`` late closes 1011. Frozen while stalled."""
        while not conn.dead:
            await asyncio.sleep(interval)
            if conn.stalled:
                continue
            try:
                async with asyncio.timeout(timeout):
                    pong = await conn.ws.ping()
                    await pong
            except ConnectionClosed:
                return
            except TimeoutError:
                if conn.stalled or conn.dead:
                    continue
                self.keepalive_timeouts.append(conn.record.conn_id)
                self._notify()
                await self._close(conn, 1011, "keepalive ping timeout")
                return
            conn.record.pongs += 1
            self._notify()

    def _arm_idle(self, conn: _Conn) -> None:
        """Lenient mode: one timer per connection (not a timeout per recv: this server also serves benchmarks)."""
        if self._idle_timeout is not None:
            when = conn.last_frame + self._idle_timeout
            conn.idle_timer = asyncio.get_running_loop().call_at(when, self._idle_check, conn)

    def _idle_check(self, conn: _Conn) -> None:
        conn.idle_timer = None
        if conn.dead or self._idle_timeout is None:
            return
        loop = asyncio.get_running_loop()
        if conn.stalled or loop.time() - conn.last_frame < self._idle_timeout:
            self._arm_idle(conn)
            return
        if conn.closing is None:
            conn.closing = loop.create_task(self._close(conn, 3001, ""))

    async def _serve(self, conn: _Conn) -> None:
        ws = conn.ws
        loop = asyncio.get_running_loop()
        while True:
            try:
                frame = await ws.recv()
            except ConnectionClosed:
                return
            conn.last_frame = loop.time()
            if conn.stalled:
                await conn.gate.wait()
            if conn.dead:
                return
            if not await self._on_frame(conn, frame):
                return
            if self._chaos is not None and not await self._maybe_chaos(conn, self._chaos):
                return

    async def _maybe_chaos(self, conn: _Conn, chaos: _Chaos) -> bool:
        chaos.countdown -= 1
        if chaos.countdown > 0 or conn.dead:
            return not conn.dead
        chaos.reset()
        kind = chaos.rng.choice(chaos.kinds)
        if kind == "drop":
            self.faults.append((conn.record.conn_id, "chaos drop"))
            self._kill(conn)
            self._notify()
            return False
        if kind == "close":
            code = chaos.rng.choice((1001, 1011, 1012))
            self.faults.append((conn.record.conn_id, f"chaos close {code}"))
            self._notify()
            await self._close(conn, code, "chaos")
            return False
        self.faults.append((conn.record.conn_id, "chaos stall"))
        self._stall(conn, chaos.stall_for)
        self._notify()
        return True

    async def _on_frame(self, conn: _Conn, frame: str | bytes) -> bool:
        """Handle one frame like the real ValidatorConsumer; False when the connection is over."""
        record = conn.record
        message, parsed, error = _parse(frame, self._adapter)
        authenticated = record.authenticated_at is not None
        self.received.append(Received(record.conn_id, time.monotonic(), frame, parsed, authenticated))
        self._notify()
        cid = record.conn_id
        if error is not None:
            kind = "binary frame" if isinstance(frame, bytes) else "unparseable frame"
            self._violation(cid, f"{kind} answered with a pydantic error: {_error_types(error)}")
            return await self._respond(conn, error)
        if isinstance(message, V0AuthenticationRequest):
            return await self._authenticate(conn, message)
        if not authenticated:
            assert message is not None
            self._violation(cid, f"{getattr(message, 'message_type', '?')} before authentication")
            return await self._respond(conn, NOT_AUTHENTICATED)
        if isinstance(message, JobStatusUpdate | _LooseJobStatusUpdate):
            return await self._job_status_update(conn, message)
        if isinstance(message, V0MachineSpecsUpdate):
            return await self._specs_update(conn, message)
        assert isinstance(message, V0Heartbeat)
        record.last_heartbeat = time.monotonic()
        record.heartbeats.append(record.last_heartbeat)
        channel = self.channels.get(cid)
        if channel is not None:
            channel.last_heartbeat = record.last_heartbeat
        self._notify()
        return True

    async def _authenticate(self, conn: _Conn, message: V0AuthenticationRequest) -> bool:
        record = conn.record
        if record.authenticated_at is not None:
            # Authenticated already, by an earlier request or by the handshake's headers: the
            # consumer answers auth.already_authenticated and keeps the connection. After header auth
            # one such request is how a client in "both" mode works; it is no mistake then.
            if record.auth_method != "headers" or conn.message_auth_done:
                self._violation(record.conn_id, "second V0AuthenticationRequest on an authenticated connection")
            conn.message_auth_done = True
            return await self._respond(conn, ALREADY_AUTHENTICATED)
        conn.message_auth_done = True
        forced = self._refusals.popleft() if self._refusals else None
        try:
            keypair = Keypair(public_key=message.public_key, ss58_format=42)
            ss58_address: str = keypair.ss58_address
        except Exception as exc:
            return await self._crash(conn, f"auth request with an unusable public_key ({exc})")
        allowed = self.allowed_hotkeys
        # The real one looks the validator up before it checks the signature.
        if forced == "validator_not_found" or (allowed is not None and ss58_address not in allowed):
            return await self._refuse(conn, validator_not_found(ss58_address), 3001)
        if forced == "signature_invalid":
            return await self._refuse(conn, SIGNATURE_INVALID, 3000)
        try:
            valid = bool(keypair.verify(bytes.fromhex(message.public_key), message.signature))
        except Exception as exc:
            return await self._crash(conn, f"auth request with a malformed signature ({exc})")
        if not valid:
            return await self._refuse(conn, SIGNATURE_INVALID, 3000)
        return await self._authenticated(conn, ss58_address, "message")

    async def _authenticated(self, conn: _Conn, hotkey: str, method: AuthMode) -> bool:
        """The connection is now the validator's: its channel row, then what waits for an auth."""
        record = conn.record
        record.authenticated_at = record.last_heartbeat = time.monotonic()
        record.auth_method = method
        record.hotkey = hotkey
        self.channels[record.conn_id] = Channel(record.conn_id, hotkey, record.authenticated_at)
        self.authenticated_connections += 1
        for other in list(self._live.values()):
            if other is not conn and other.stalled and other.record.hotkey == hotkey:
                self._kill(other)  # the validator has moved on from its stalled connection
        self._notify()
        # Not delayed by ack_delay: the auth answer comes before anything else on the connection.
        if method == "message" and not await self._send(conn, SUCCESS):
            return False
        while self._outbox:  # lenient mode only: frames held for the next auth
            if not await self._send(conn, self._outbox.popleft()):
                return False
        for script in self._on_auth:
            if script.each or not script.fired:
                script.fired = True
                for _ in range(script.count):
                    await self.send_job_request(validator=hotkey, **script.overrides)
        return not conn.dead

    async def _refuse(self, conn: _Conn, response: str, code: int) -> bool:
        """Error Response first, then the close frame, as the real one does."""
        if await self._respond(conn, response):
            await self._flush(conn)
            await self._close(conn, code, "")
        return False

    async def _specs_update(self, conn: _Conn, message: V0MachineSpecsUpdate) -> bool:
        if not self.lenient:
            try:
                HardwareSpec.model_validate(message.specs)
            except ValidationError as exc:
                fields = ", ".join(".".join(str(p) for p in e["loc"]) + f" ({e['type']})" for e in exc.errors())
                return await self._crash(conn, f"V0MachineSpecsUpdate specs do not fit the hardware schema: {fields}")
        self.spec_updates.append(message.model_dump())
        self._notify()
        return True

    async def _job_status_update(self, conn: _Conn, message: JobStatusUpdate | _LooseJobStatusUpdate) -> bool:
        try:
            job_uuid = str(UUID(message.uuid))
        except ValueError:
            return await self._crash(conn, f"V0JobStatusUpdate with a non-UUID uuid {message.uuid!r}")
        if job_uuid not in self.jobs:
            if not self.accept_unknown_jobs:
                return await self._respond(conn, JOB_NOT_FOUND)
            self.register_job(job_uuid)
        status = message.status if message.status in KNOWN_STATUSES else "unknown"
        statuses = self.stored[job_uuid]
        if status in statuses:
            return await self._respond(conn, INTEGRITY_ERROR)
        statuses.append(status)
        metadata = message.metadata
        stored = metadata.model_dump(mode="json", exclude_none=True) if metadata else {}
        self.stored_metadata[job_uuid].append(stored)
        self._notify()
        if metadata is None and status in ("completed", "streaming_ready"):
            # The real handler reads metadata.miner_response / .streaming_details after storing: it crashes.
            why = f"V0JobStatusUpdate {status} with metadata null for job {job_uuid}"
            return await self._crash(conn, why)
        return await self._respond(conn, SUCCESS)

    async def _crash(self, conn: _Conn, why: str) -> bool:
        """The real handler raised: no Response, and the server drops the TCP connection."""
        self._violation(conn.record.conn_id, f"{why}: crashes the facilitator's handler (connection dropped)")
        await self._flush(conn)
        self._kill(conn)
        self._notify()
        return False

    def _violation(self, conn_id: int, what: str) -> None:
        self.violations.append(f"conn {conn_id}: {what}")
        self._notify()

    # --- sending ---------------------------------------------------------------------------

    async def _send(self, conn: _Conn, frame: str | bytes) -> bool:
        try:
            await conn.ws.send(frame)
        except ConnectionClosed:
            return False
        self.sent.append((conn.record.conn_id, time.monotonic(), frame))
        return True

    async def _deliver(self, frame: str) -> None:
        """Lenient mode: send to the newest authenticated connection, or hold the frame until the next auth."""
        conn = self._current(authenticated=True)
        if conn is None or not await self._send(conn, frame):
            self._outbox.append(frame)

    async def _respond(self, conn: _Conn, frame: str) -> bool:
        """Send a Response, in order, after the configured ack delay."""
        if conn.acks is None and self._ack_delay <= 0:
            return await self._send(conn, frame)
        if conn.acks is None:
            conn.acks = asyncio.Queue()
            conn.writer = asyncio.get_running_loop().create_task(self._ack_writer(conn, conn.acks))
        conn.acks.put_nowait((asyncio.get_running_loop().time() + self._ack_delay, frame))
        return True

    async def _ack_writer(self, conn: _Conn, acks: asyncio.Queue[tuple[float, str]]) -> None:
        loop = asyncio.get_running_loop()
        alive = True
        while True:
            due, frame = await acks.get()
            try:
                if alive:
                    delay = due - loop.time()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    alive = await self._send(conn, frame)
            finally:
                acks.task_done()

    async def _flush(self, conn: _Conn) -> None:
        """Wait until delayed Responses are on the wire (before a close or a crash)."""
        if conn.acks is not None:
            await conn.acks.join()


def _error_types(response: str) -> str:
    return ", ".join(str(e.get("type")) for e in orjson.loads(response)["errors"])


async def serve_forever(
    host: str = "127.0.0.1",
    port: int = 8765,
    jobs: int = 0,
    *,
    job_interval: float = 0.0,
    allowed_hotkeys: Collection[str] | None = None,
    ack_delay: float = 0.0,
    chaos_every: int | None = None,
    seed: int | None = None,
    lenient: bool = False,
    auth_modes: Collection[AuthMode] = ("message", "headers"),
    job_signer: Keypair | None = None,
    on_ready: Callable[[FacilitatorSimulator], Awaitable[None] | None] | None = None,
) -> None:
    """Run a simulator until cancelled (the CLI's ``simulate`` command).

    ``jobs`` job requests go to the first validator that authenticates: all at once, or one every
    ``job_interval`` seconds (a job that cannot be created, the validator having no fresh channel,
    is retried once it has one, as an SDK would). ``on_ready`` is called with the running simulator.
    """
    async with FacilitatorSimulator(
        host=host,
        port=port,
        allowed_hotkeys=allowed_hotkeys,
        ack_delay=ack_delay,
        seed=seed,
        lenient=lenient,
        auth_modes=auth_modes,
        job_signer=job_signer,
    ) as sim:
        if chaos_every:
            sim.chaos(chaos_every)
        if on_ready is not None:
            result = on_ready(sim)
            if result is not None:
                await result
        if job_interval <= 0:
            if jobs:
                sim.job_requests_on_auth(jobs)
        else:
            await sim.wait_for(lambda: sim.authenticated_connections > 0, timeout=None)
            for _ in range(jobs):
                while True:
                    try:
                        await sim.send_job_request()
                        break
                    except JobNotCreated:
                        await sim.wait_for(sim.has_fresh_channel, timeout=None, what="a fresh channel")
                await asyncio.sleep(job_interval)
        await asyncio.get_running_loop().create_future()  # until cancelled
