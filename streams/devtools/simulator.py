"""A protocol-faithful facilitator simulator: a websocket server that behaves like the real one.

It answers exactly as the real facilitator does (PROTOCOL.md and captures/real-facilitator-session.jsonl),
including its sharp edges, so tests catch client bugs a friendlier server would hide. It is an
independent implementation on purpose: it never imports ``streams.protocol``.

Tests script it (job requests, cheat reports, raw frames), inject faults (drops, close codes, stalls
that never answer pings, slow acks, chaos), and inspect what arrived (``received``, ``stored``,
``violations``), waiting on conditions with :meth:`FacilitatorSimulator.wait_for`.
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
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Annotated, Any, Literal
from uuid import UUID

import orjson
from bittensor_wallet import Keypair
from pydantic import BaseModel, ConfigDict, Field, JsonValue, TypeAdapter, ValidationError
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

__all__ = [
    "ConnectionRecord",
    "FacilitatorSimulator",
    "Received",
    "serve_forever",
]

WS_PATH = "/ws/v0/"
PYDANTIC_DOCS_VERSION = "2.10"
"""The real facilitator's pydantic: error URLs are rewritten to it, so frames match the capture."""
METAGRAPH_SYNC_PERIOD = "0:05:00"
"""Appears in the real facilitator's validator_not_found help text."""

IN_PROGRESS_STATUSES = frozenset(
    {"sent", "received", "accepted", "executor_ready", "streaming_ready", "volumes_ready", "execution_done"}
)
FINAL_STATUSES = frozenset({"completed", "rejected", "failed", "horde_failed"})
KNOWN_STATUSES = IN_PROGRESS_STATUSES | FINAL_STATUSES

FaultKind = Literal["drop", "close", "stall"]
AuthRefusal = Literal["validator_not_found", "signature_invalid"]


# --- the facilitator's inbound models (shaped like compute_horde.fv_protocol.validator_requests) ---


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


class JobResultDetails(BaseModel, extra="allow"):
    docker_process_stderr: str
    docker_process_stdout: str
    artifacts: dict[str, str] | None = None
    upload_results: dict[str, str] | None = None


class JobRejectionDetails(BaseModel):
    rejected_by: str
    reason: str
    message: str
    context: JsonValue = None


class JobFailureDetails(BaseModel):
    reason: str
    stage: str
    message: str
    context: JsonValue = None
    docker_process_exit_status: int | None = None
    docker_process_stdout: str | None = None
    docker_process_stderr: str | None = None


class HordeFailureDetails(BaseModel):
    reported_by: str
    reason: str
    message: str
    context: JsonValue = None


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


_Inbound = V0AuthenticationRequest | JobStatusUpdate | V0MachineSpecsUpdate | V0Heartbeat
_INBOUND: TypeAdapter[_Inbound] = TypeAdapter(Annotated[_Inbound, Field(discriminator="message_type")])


# --- the facilitator's Response (compute_horde.fv_protocol.facilitator_requests) ---


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


def _parse(frame: str | bytes) -> tuple[_Inbound | None, dict[str, Any] | None, str | None]:
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
        return _INBOUND.validate_json(frame_text), parsed, None
    except ValidationError as exc:
        return None, parsed, _parse_error(exc)


# --- signing job requests like compute_horde.signature (blake2b(timestamp ‖ sorted JSON), sr25519) ---


@functools.cache
def _job_signer() -> Keypair:
    return Keypair.create_from_uri("//Bob")


def _signature(payload: dict[str, Any]) -> dict[str, Any]:
    signer = _job_signer()
    timestamp_ns = time.time_ns()
    digest = hashlib.blake2b(timestamp_ns.to_bytes(8, "big") + json.dumps(payload, sort_keys=True).encode())
    return {
        "signature_type": "bittensor",
        "signatory": signer.ss58_address,
        "timestamp_ns": timestamp_ns,
        "signature": base64.b64encode(signer.sign(digest.digest())).decode(),
        "signature_scope": "FullRequest",
    }


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
    hotkey: str | None = None
    last_heartbeat: float | None = None
    """Starts at auth time, like the real facilitator's per-connection heartbeat."""
    heartbeats: list[float] = field(default_factory=list)
    """Times of the V0Heartbeats received after auth."""
    closed_at: float | None = None
    close_code: int | None = None
    close_reason: str = ""


@dataclass(slots=True)
class _Conn:
    record: ConnectionRecord
    ws: ServerConnection
    gate: asyncio.Event = field(default_factory=asyncio.Event)
    """Set while the handler may process frames; cleared by a stall."""
    stalled: bool = False
    dead: bool = False
    resume: asyncio.TimerHandle | None = None
    acks: asyncio.Queue[tuple[float, str]] | None = None
    writer: asyncio.Task[None] | None = None
    last_frame: float = 0.0
    """loop.time() of the last frame received (for the idle timeout)."""
    idle_timer: asyncio.TimerHandle | None = None
    idle_close: asyncio.Task[None] | None = None

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
        max_size: int = 50 * 2**20,
        idle_timeout: float | None = 600.0,
        close_timeout: float = 2.0,
    ) -> None:
        """``allowed_hotkeys``: ss58 addresses of active validators (None: any validly signed hotkey).

        ``accept_unknown_jobs``: register status updates for job uuids never sent (the real one
        answers job.not_found). ``idle_timeout``: a connection silent this long is closed with 3001
        (the real one: 10 minutes).
        """
        self._host = host
        self._port = port
        self.allowed_hotkeys = None if allowed_hotkeys is None else frozenset(allowed_hotkeys)
        self.accept_unknown_jobs = accept_unknown_jobs
        self._ack_delay = ack_delay
        self._rng = random.Random(seed)
        self._max_size = max_size
        self._idle_timeout = idle_timeout
        self._close_timeout = close_timeout
        self._server: Server | None = None

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
        self.connections = 0
        self.authenticated_connections = 0
        self.connection_log: dict[int, ConnectionRecord] = {}

        self._live: dict[int, _Conn] = {}
        self._outbox: deque[str] = deque()
        self._refusals: deque[AuthRefusal] = deque()
        self._on_auth: list[_OnAuth] = []
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
            process_request=self._check_path,
            max_size=self._max_size,
            ping_interval=None,  # the real one does not ping; a stalled server must not close by itself
            close_timeout=self._close_timeout,
            compression=None,  # frames travel as-is: exact byte counts and real backpressure
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close every connection (stalled ones are aborted: they cannot finish a handshake)."""
        server, self._server = self._server, None
        if server is None:
            return
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

    def summary(self) -> str:
        """One line of state, for failure messages."""
        last = self.received[-1].frame if self.received else None
        last_text = None if last is None else (last[:200] if isinstance(last, str) else f"<{len(last)} bytes>")
        return (
            f"connections={self.connections} open={self.open_connections} "
            f"authenticated={self.authenticated_connections} received={len(self.received)} "
            f"last_received={last_text!r} jobs={len(self.jobs)} violations={self.violations[-5:]} "
            f"faults={self.faults[-5:]}"
        )

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    # --- scripting -------------------------------------------------------------------------

    def _new_uuid(self) -> str:
        return str(UUID(int=self._rng.getrandbits(128), version=4))

    def job_request(self, uuid: str | None = None, **overrides: Any) -> dict[str, Any]:
        """A V2JobRequest like the real one's (signed by //Bob unless ``signature`` is overridden)."""
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
        return self._signed(body)

    @staticmethod
    def _signed(body: dict[str, Any]) -> dict[str, Any]:
        if "signature" in body:
            return body
        payload = {k: v for k, v in body.items() if k not in ("type", "message_type")}
        return {"signature": _signature(payload), **body}  # the real one puts the signature first

    def register_job(self, job_uuid: str, request: dict[str, Any] | None = None) -> str:
        """Make a job uuid known (its "sent" status stored), as creating a job does; returns its key."""
        key = str(UUID(job_uuid))
        self.jobs[key] = request if request is not None else self.jobs.get(key, {})
        self.stored.setdefault(key, ["sent"])
        self.stored_metadata.setdefault(key, [{}])
        return key

    async def send_job_request(self, uuid: str | None = None, **overrides: Any) -> dict[str, Any]:
        """Create a job and send it to the current authenticated connection (queued until one exists)."""
        job = self.job_request(uuid, **overrides)
        self.register_job(job["uuid"], job)
        await self._deliver(json.dumps(job))
        return job

    async def send_cheat_report(self, job_uuid: str, **overrides: Any) -> dict[str, Any]:
        """Send a V0JobCheated for ``job_uuid`` (queued until an authenticated connection exists)."""
        body: dict[str, Any] = {
            "type": "job.cheated",
            "message_type": "V0JobCheated",
            "job_uuid": job_uuid,
            "trusted_job_uuid": self._new_uuid(),
            "details": {"reason": "simulated cheat report"},
        }
        body.update(overrides)
        report = self._signed(body)
        await self._deliver(json.dumps(report))
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
        """Abort the current connection's TCP connection: no close frame, the client sees 1006."""
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

        Returns at once. ``None`` stalls it for good: the simulator aborts it when the same
        validator authenticates again, on drop()/stop(), since a paused socket cannot notice the
        client leaving.
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
        """Abort the TCP connection and release a handler waiting behind a stall."""
        conn.dead = True
        if conn.resume is not None:
            conn.resume.cancel()
            conn.resume = None
        conn.ws.transport.abort()
        conn.gate.set()

    async def _close(self, conn: _Conn, code: int, reason: str) -> None:
        self._unstall(conn)
        await conn.ws.close(code, reason)

    # --- connection handling -------------------------------------------------------------------

    def _check_path(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] != WS_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, f"no websocket endpoint here; use {WS_PATH}\n")
        return None

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
        conn.last_frame = asyncio.get_running_loop().time()
        self._arm_idle(conn)
        try:
            await self._serve(conn)
        finally:
            conn.dead = True
            for timer in (conn.resume, conn.idle_timer):
                if timer is not None:
                    timer.cancel()
            if conn.writer is not None:
                conn.writer.cancel()
                try:
                    await conn.writer
                except asyncio.CancelledError:
                    pass
            if conn.idle_close is not None:
                await conn.idle_close  # ends with the connection it is closing
            killed = conn.ws.transport.is_closing() and ws.close_code is None
            if conn.stalled and not conn.ws.transport.is_closing():
                conn.ws.transport.abort()  # the server's own close handshake could not complete
                killed = True
            del self._live[record.conn_id]
            record.closed_at = time.monotonic()
            record.close_code = 1006 if killed else ws.close_code
            record.close_reason = "dropped by the simulator" if killed else ws.close_reason or ""
            self._notify()

    def _arm_idle(self, conn: _Conn) -> None:
        """One timer per connection (not a timeout per recv: this server also serves benchmarks)."""
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
        # The real one closes a connection silent for 10 minutes with 3001; awaited by the handler.
        conn.idle_close = loop.create_task(self._close(conn, 3001, ""))

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
        message, parsed, error = _parse(frame)
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
            self._violation(cid, f"{message.message_type} before authentication")
            return await self._respond(conn, NOT_AUTHENTICATED)
        if isinstance(message, JobStatusUpdate):
            return await self._job_status_update(conn, message)
        if isinstance(message, V0MachineSpecsUpdate):
            self.spec_updates.append(message.model_dump())
            self._notify()
            return True
        assert isinstance(message, V0Heartbeat)
        record.last_heartbeat = time.monotonic()
        record.heartbeats.append(record.last_heartbeat)
        self._notify()
        return True

    async def _authenticate(self, conn: _Conn, message: V0AuthenticationRequest) -> bool:
        record = conn.record
        if record.authenticated_at is not None:
            self._violation(record.conn_id, "second V0AuthenticationRequest on an authenticated connection")
            return await self._respond(conn, ALREADY_AUTHENTICATED)
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

        record.authenticated_at = record.last_heartbeat = time.monotonic()
        record.hotkey = ss58_address
        self.authenticated_connections += 1
        for other in list(self._live.values()):
            if other is not conn and other.stalled and other.record.hotkey == ss58_address:
                self._kill(other)  # the validator has moved on from its stalled connection
        self._notify()
        # Not delayed by ack_delay: the auth answer comes before anything else on the connection.
        if not await self._send(conn, SUCCESS):
            return False
        while self._outbox:
            if not await self._send(conn, self._outbox.popleft()):
                return False
        for script in self._on_auth:
            if script.each or not script.fired:
                script.fired = True
                for _ in range(script.count):
                    await self.send_job_request(**script.overrides)
        return True

    async def _refuse(self, conn: _Conn, response: str, code: int) -> bool:
        """Error Response first, then the close frame, as the real one does."""
        if await self._respond(conn, response):
            await self._flush(conn)
            await self._close(conn, code, "")
        return False

    async def _job_status_update(self, conn: _Conn, message: JobStatusUpdate) -> bool:
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
        self.stored_metadata[job_uuid].append(metadata.model_dump(exclude_none=True) if metadata else {})
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
        """Send to the current authenticated connection, or hold the frame until the next auth."""
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
    on_ready: Callable[[FacilitatorSimulator], Awaitable[None] | None] | None = None,
) -> None:
    """Run a simulator until cancelled (the CLI's ``simulate`` command).

    ``jobs`` job requests go to the first validator that authenticates: all at once, or one every
    ``job_interval`` seconds. ``on_ready`` is called with the running simulator (e.g. to print its url).
    """
    async with FacilitatorSimulator(
        host=host, port=port, allowed_hotkeys=allowed_hotkeys, ack_delay=ack_delay, seed=seed
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
                await sim.send_job_request()
                await asyncio.sleep(job_interval)
        await asyncio.get_running_loop().create_future()  # until cancelled
