"""Replay recorded traffic: load it, play it on any scheduler, analyse it, or serve it to a client.

Why: a recording (``streams.recording``, or a capture of the real facilitator: the same format)
is only useful if it can be looked at and re-run. This module

- loads a recording strictly (:func:`load_recording`): a damaged file is a :class:`ReplayError`
  naming the file, the line and what is wrong, never a half-read analysis;
- turns it into an observable (:func:`replay`) that emits each record at its time offset on the
  scheduler given: virtual time (``TestScheduler``, ``HistoricalScheduler``) for instant analysis
  and marble-style tests, ``AsyncIOScheduler`` for real time, optionally sped up;
- summarises it (:func:`summarize`) and analyses it through the client's own operators in
  virtual time (:func:`analyze`: message mix, rates, connection timeline, outbox depth, ack
  latencies), for the CLI and the notebooks;
- plays the recorded inbound frames to a connecting client (:class:`ReplayServer`, and
  ``python -m streams replay FILE --serve``) to reproduce an incident locally.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import dataclasses
import logging
import math
import statistics
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal

import orjson
from reactivex import Observable, abc
from reactivex import operators as ops
from reactivex.disposable import CompositeDisposable, SerialDisposable
from reactivex.scheduler import HistoricalScheduler
from reactivex.subject import BehaviorSubject, Subject

from operators import (
    Acked,
    AckEvent,
    Decoded,
    Dropped,
    HoldPolicy,
    Malformed,
    Unacked,
    UnexpectedResponse,
    decode_frames,
    hold_while_disconnected,
    match_acks,
    partition_by,
)
from streams.protocol import (
    DecodeError,
    InboundMessage,
    Response,
    V0AuthenticationRequest,
    V0Heartbeat,
    V0MachineSpecsUpdate,
    decode,
    decode_outbound,
    json_kind,
    message_kind,
)
from streams.recording import FORMAT, VERSION

__all__ = [
    "FORMAT",
    "SUPPORTED_VERSIONS",
    "Ack",
    "Analysis",
    "ConnectionEvent",
    "ConnectionSummary",
    "Frame",
    "Header",
    "OtherEvent",
    "Outage",
    "Pairing",
    "Record",
    "Recording",
    "ReplayError",
    "ReplayServer",
    "Summary",
    "analyze",
    "inbound_kind",
    "load_recording",
    "match_responses",
    "playback_frames",
    "register_cli",
    "replay",
    "summarize",
]

log = logging.getLogger(__name__)

SUPPORTED_VERSIONS = (VERSION,)
AUTH_KIND = "V0AuthenticationRequest"
SUCCESS_FRAME = '{"status":"success","errors":[]}'
"""The real facilitator's success Response, byte for byte."""
NOT_AUTHENTICATED_FRAME = (
    '{"status":"error","errors":[{"msg":"Not authenticated","type":"auth.not_authenticated",'
    '"help":"Please send authentication request first"}]}'
)

# --------------------------------------------------------------------------- the records


class ReplayError(Exception):
    """A recording that cannot be used: says which file, which line and what is wrong."""

    def __init__(self, path: str | Path | None, line: int | None, problem: str) -> None:
        where = str(path) if path is not None else "recording"
        if line is not None:
            where += f": line {line}"
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.line = line
        self.problem = problem


@dataclass(frozen=True, slots=True)
class Header:
    """The first line: what the recording is. ``fields`` holds every header key, unknown ones too."""

    format: str
    version: int
    captured_at: str | None
    source: str | None
    client_version: str | None
    fields: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Frame:
    """One frame, exactly as it went over the wire; ``direction`` is ``"in"`` (facilitator →
    validator) or ``"out"``; ``frame`` is bytes for a binary frame."""

    t: float
    conn: int
    direction: Literal["in", "out"]
    frame: str | bytes
    line: int = 0


@dataclass(frozen=True, slots=True)
class ConnectionEvent:
    """A connection opened (``event="open"``) or ended (``"close"``, with code and reason)."""

    t: float
    conn: int
    event: Literal["open", "close"]
    code: int | None = None
    reason: str = ""
    line: int = 0


@dataclass(frozen=True, slots=True)
class OtherEvent:
    """Any other event (e.g. the recorder's ``"gap"``): kept, not interpreted by the analysis."""

    t: float
    event: str
    fields: Mapping[str, Any]
    line: int = 0


Record = Frame | ConnectionEvent | OtherEvent


@dataclass(frozen=True, slots=True)
class Recording:
    """A loaded recording: its header and its records in file (= time) order."""

    header: Header
    records: tuple[Record, ...]
    path: Path | None = None

    @property
    def start(self) -> float:
        """``t`` of the first record (0 if there is none)."""
        return self.records[0].t if self.records else 0.0

    @property
    def end(self) -> float:
        """``t`` of the last record (0 if there is none)."""
        return self.records[-1].t if self.records else 0.0

    @property
    def duration(self) -> float:
        return self.end - self.start

    def frames(self, direction: Literal["in", "out"] | None = None) -> list[Frame]:
        """The frame records, of one direction or both."""
        return [r for r in self.records if isinstance(r, Frame) and (direction is None or r.direction == direction)]


# --------------------------------------------------------------------------- loading


def _header(obj: dict[str, Any], fail: Callable[[str], ReplayError]) -> Header:
    if "format" not in obj:
        if "t" in obj or "dir" in obj or "event" in obj:
            raise fail(
                "missing header: the first line is a record; a recording starts with a header line "
                f'like {{"format": "{FORMAT}", "version": 1, ...}}'
            )
        raise fail(f'missing header: the first line has no "format" field (expected "{FORMAT}")')
    if obj["format"] != FORMAT:
        raise fail(f"not a recording: format is {obj['format']!r}, expected {FORMAT!r}")
    version = obj.get("version")
    if version is None:
        raise fail('header has no "version" field')
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        known = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        raise fail(f"unsupported version {version!r} (this reader knows version {known})")

    def text(key: str) -> str | None:
        value = obj.get(key)
        return None if value is None else str(value)

    return Header(FORMAT, int(version), text("captured_at"), text("source"), text("client_version"), obj)


def _record(obj: dict[str, Any], line: int, fail: Callable[[str], ReplayError]) -> Record:
    if "t" not in obj:
        raise fail('missing field "t" (the time offset in seconds)')
    t = obj["t"]
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t):
        raise fail(f'"t" must be a number of seconds, got {json_kind(t)}: {t!r}')
    if t < 0:
        raise fail(f'negative time: "t" is {t}')
    t = float(t)
    if "dir" in obj:
        direction = obj["dir"]
        if direction not in ("in", "out"):
            raise fail(f'"dir" must be "in" or "out", got {direction!r}')
        conn = _conn(obj, fail)
        if "frame" in obj:
            frame: str | bytes = obj["frame"]
            if not isinstance(frame, str):
                raise fail(f'"frame" must be a string, got {json_kind(frame)}')
        elif "frame_b64" in obj:
            encoded = obj["frame_b64"]
            if not isinstance(encoded, str):
                raise fail(f'"frame_b64" must be a base64 string, got {json_kind(encoded)}')
            try:
                frame = base64.b64decode(encoded, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise fail(f'"frame_b64" is not valid base64 ({exc})') from None
        else:
            raise fail('missing field "frame" (or "frame_b64") in a frame record')
        return Frame(t, conn, direction, frame, line)
    if "event" in obj:
        event = obj["event"]
        if not isinstance(event, str):
            raise fail(f'"event" must be a string, got {json_kind(event)}')
        if event == "open":
            return ConnectionEvent(t, _conn(obj, fail), "open", line=line)
        if event == "close":
            conn = _conn(obj, fail)
            if "code" not in obj:
                raise fail('missing field "code" in a close event (null if there was none)')
            code = obj["code"]
            if code is not None and (isinstance(code, bool) or not isinstance(code, int)):
                raise fail(f'"code" must be an integer or null, got {json_kind(code)}: {code!r}')
            reason = obj.get("reason", "")
            if not isinstance(reason, str):
                raise fail(f'"reason" must be a string, got {json_kind(reason)}')
            return ConnectionEvent(t, conn, "close", code, reason, line)
        return OtherEvent(t, event, obj, line)
    raise fail('a record needs "dir" (a frame) or "event" (a connection change)')


def _conn(obj: dict[str, Any], fail: Callable[[str], ReplayError]) -> int:
    if "conn" not in obj:
        raise fail('missing field "conn" (the connection number)')
    conn = obj["conn"]
    if isinstance(conn, bool) or not isinstance(conn, int) or conn < 0:
        raise fail(f'"conn" must be a connection number (an integer >= 0), got {conn!r}')
    return conn


def load_recording(path: str | Path, *, allow_truncated: bool = False) -> Recording:
    """Read and validate a recording; raises :class:`ReplayError` naming the line at fault.

    Checked: every line is a JSON object; the first is a header of a known format and version;
    every record has its fields with the right types; times are not negative and never go
    backwards. A last line without its newline that is not valid JSON is reported as truncated
    (a recorder killed mid-write); ``allow_truncated=True`` drops it instead (with a warning).
    Blank lines are ignored.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ReplayError(path, None, f"cannot read the recording: {exc.strerror or exc}") from None
    lines = data.split(b"\n")
    truncated_last = not data.endswith(b"\n")  # then lines[-1] is the unterminated last line
    header: Header | None = None
    records: list[Record] = []
    previous: Record | None = None
    for index, raw in enumerate(lines):
        number = index + 1
        if not raw.strip():
            continue

        def fail(problem: str, number: int = number) -> ReplayError:
            return ReplayError(path, number, problem)

        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if truncated_last and index == len(lines) - 1:
                if allow_truncated:
                    log.warning("%s: line %d: dropped a truncated last line", path, number)
                    break
                raise fail(
                    "truncated last line: not valid JSON and no newline at the end "
                    "(was the recorder stopped mid-write?)"
                ) from None
            raise fail(f"not JSON ({exc})") from None
        if not isinstance(obj, dict):
            raise fail(f"expected a JSON object, got {json_kind(obj)}")
        if header is None:
            header = _header(obj, fail)
            continue
        record = _record(obj, number, fail)
        if previous is not None and record.t < previous.t:
            raise fail(f"time goes backwards: t={record.t} after t={previous.t} on line {previous.line}")
        records.append(record)
        previous = record
    if header is None:
        raise ReplayError(path, 1, "empty recording: no header line")
    return Recording(header, tuple(records), path)


# --------------------------------------------------------------------------- replay in time


def _default_scheduler() -> abc.SchedulerBase:
    from reactivex.scheduler.eventloop import AsyncIOScheduler

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise ValueError(
            "replay() needs a scheduler outside an event loop: pass e.g. HistoricalScheduler() "
            "(virtual time) or AsyncIOScheduler(loop) (real time)"
        ) from None
    return AsyncIOScheduler(loop)


def replay(
    recording: Recording | Iterable[Record],
    scheduler: abc.SchedulerBase | None = None,
    speed: float = 1.0,
) -> Observable[Record]:
    """Emit every record at ``t / speed`` seconds after subscription, then complete.

    Cold: each subscription replays from the start. The scheduler is ``scheduler``, else the
    one given to ``subscribe``, else an ``AsyncIOScheduler`` on the running loop. Records with
    the same time are emitted in file order in one scheduled action. ``speed=math.inf`` emits
    everything at once, in order.
    """
    if not speed > 0:
        raise ValueError(f"speed must be > 0, got {speed}")
    records = recording.records if isinstance(recording, Recording) else tuple(recording)

    def subscribe(
        observer: abc.ObserverBase[Record], sub_scheduler: abc.SchedulerBase | None = None
    ) -> abc.DisposableBase:
        sched = scheduler or sub_scheduler or _default_scheduler()
        origin = sched.now
        serial = SerialDisposable()
        position = 0

        def due(record: Record) -> timedelta:
            return timedelta(seconds=record.t / speed)

        def emit(_: abc.SchedulerBase, __: Any = None) -> None:
            nonlocal position
            if position < len(records):
                batch_due = due(records[position])
                while position < len(records) and due(records[position]) == batch_due:
                    if serial.is_disposed:
                        return
                    record = records[position]
                    position += 1
                    observer.on_next(record)
            if serial.is_disposed:
                return
            if position < len(records):
                serial.disposable = sched.schedule_absolute(origin + due(records[position]), emit)
            else:
                observer.on_completed()

        first = origin + due(records[0]) if records else origin
        serial.disposable = sched.schedule_absolute(first, emit)
        return serial

    return Observable(subscribe)


# --------------------------------------------------------------------------- response pairing


@dataclass(frozen=True, slots=True)
class Ack:
    """A frame that expected a Response, and the Response (FIFO per connection) if one came."""

    conn: int
    kind: str
    """message_type of the sent frame ("malformed" if it was not JSON)."""
    sent: Frame
    response: Frame | None
    status: str | None = None
    """"success" or "error" (None when unanswered, or if the answer did not decode)."""
    error_types: tuple[str, ...] = ()

    @property
    def latency(self) -> float | None:
        return None if self.response is None else self.response.t - self.sent.t


def _expects_response(frame: str | bytes, authenticated: bool) -> bool:
    """Whether the facilitator answers this outbound frame (PROTOCOL.md).

    Before auth succeeds it answers everything. After: auth requests, status updates and any
    frame it cannot parse are answered; valid heartbeats and spec updates are not.
    """
    if not authenticated:
        return True
    try:
        message = decode_outbound(frame)
    except DecodeError:
        return True
    return not isinstance(message, V0Heartbeat | V0MachineSpecsUpdate)


def _decode_response(frame: str | bytes) -> Response | None:
    try:
        message = decode(frame)
    except DecodeError:
        return None
    return message if isinstance(message, Response) else None


@dataclass(frozen=True, slots=True)
class Pairing:
    """The result of :func:`match_responses`."""

    acks: tuple[Ack, ...]
    """Every frame that expected a Response, in send order; ``response`` None if none came."""
    unexpected: tuple[Frame, ...]
    """Responses that arrived with nothing in flight."""
    auth: Mapping[int, Ack]
    """Per connection, its first auth request and answer."""


def match_responses(recording: Recording) -> Pairing:
    """Pair each inbound Response with the outbound frame it answers (FIFO per connection).

    Plain Python (no Rx): the CLI summary uses it; :func:`analyze` computes the same pairs with
    the client's ``match_acks`` operator. A connection's frames still unanswered when it
    closes (or when the recording ends) stay unanswered: the next connection starts afresh.
    """
    in_flight: dict[int, deque[Frame]] = {}
    authenticated: dict[int, bool] = {}
    answers: dict[int, Ack] = {}  # by id() of the sent frame
    order: list[Frame] = []
    unexpected: list[Frame] = []
    auth: dict[int, Ack] = {}
    for record in recording.records:
        if isinstance(record, ConnectionEvent):
            if record.event == "close":
                in_flight.pop(record.conn, None)
                authenticated[record.conn] = False
            continue
        if not isinstance(record, Frame):
            continue
        conn = record.conn
        if record.direction == "out":
            if _expects_response(record.frame, authenticated.get(conn, False)):
                in_flight.setdefault(conn, deque()).append(record)
                order.append(record)
            continue
        response = _decode_response(record.frame)
        if response is None:
            continue  # a job request, a cheat report or garbage: not an answer
        queue = in_flight.get(conn)
        if not queue:
            unexpected.append(record)
            continue
        sent = queue.popleft()
        ack = Ack(conn, message_kind(sent.frame), sent, record, response.status, response.error_types)
        answers[id(sent)] = ack
        if ack.kind == AUTH_KIND:
            auth.setdefault(conn, ack)
            if response.is_success:
                authenticated[conn] = True
    acks = tuple(answers.get(id(sent)) or Ack(sent.conn, message_kind(sent.frame), sent, None) for sent in order)
    return Pairing(acks, tuple(unexpected), auth)


def playback_frames(recording: Recording, *, include_auth_responses: bool = False) -> list[Frame]:
    """The inbound frames a :class:`ReplayServer` plays, in order.

    By default without the recorded answers to auth requests: the server answers the live
    client's auth itself, and a second copy would only be an unexpected Response.
    """
    inbound = recording.frames("in")
    if include_auth_responses:
        return inbound
    auth_answers = {
        id(ack.response) for ack in match_responses(recording).acks if ack.kind == AUTH_KIND and ack.response
    }
    return [frame for frame in inbound if id(frame) not in auth_answers]


# --------------------------------------------------------------------------- summary


def inbound_kind(frame: str | bytes) -> str:
    """Response / V2JobRequest / V0JobCheated, or "malformed" if the client could not decode it."""
    try:
        message = decode(frame)
    except DecodeError:
        return "malformed"
    return _message_name(message)


def _message_name(message: InboundMessage) -> str:
    if isinstance(message, Response):
        return "Response"
    return message.message_type


@dataclass(frozen=True, slots=True)
class ConnectionSummary:
    conn: int
    opened_at: float | None
    closed_at: float | None
    close_code: int | None = None
    close_reason: str = ""
    auth: str | None = None
    """"success", the error type(s) of a rejected auth, or None if no auth was answered."""
    authenticated_at: float | None = None
    auth_answered_at: float | None = None
    """When the answer to the first auth request arrived (success or not)."""
    frames_in: int = 0
    frames_out: int = 0

    @property
    def lifetime(self) -> float | None:
        if self.opened_at is None or self.closed_at is None:
            return None
        return self.closed_at - self.opened_at


@dataclass(frozen=True, slots=True)
class Outage:
    """Time with no open connection, between ``after_conn`` closing and ``next_conn`` opening
    (``next_conn`` None: the recording ended first)."""

    start: float
    end: float
    after_conn: int
    next_conn: int | None

    @property
    def duration(self) -> float:
        return self.end - self.start


def _quantile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


@dataclass(frozen=True, slots=True)
class Summary:
    """What happened in a recording, in numbers; ``render()`` is the CLI's timeline."""

    path: Path | None
    header: Header
    start: float
    end: float
    records: int
    connections: tuple[ConnectionSummary, ...]
    outages: tuple[Outage, ...]
    frames_in: Mapping[str, int]
    frames_out: Mapping[str, int]
    responses: Mapping[str, int]
    """Responses by status ("success" / "error")."""
    response_errors: Mapping[str, int]
    """Error Responses by error type (one Response may carry several)."""
    acks: tuple[Ack, ...]
    unexpected_responses: int
    gaps: int
    """Records the recorder reported as dropped ("gap" events)."""

    @property
    def duration(self) -> float:
        return self.end - self.start

    @property
    def answered(self) -> tuple[Ack, ...]:
        return tuple(a for a in self.acks if a.response is not None)

    @property
    def unanswered(self) -> tuple[Ack, ...]:
        return tuple(a for a in self.acks if a.response is None)

    @property
    def ack_latencies(self) -> list[float]:
        """Latencies of the answered frames, in send order."""
        return [a.latency for a in self.acks if a.latency is not None]

    def render(self, *, max_timeline: int = 40) -> str:
        """A readable multi-line summary with a timeline of connections and outages."""
        h = self.header
        name = self.path.name if self.path is not None else "recording"
        lines = [f"{name}: {h.format} v{h.version}, captured {h.captured_at or '?'}"]
        if h.source:
            lines.append(f"  source: {h.source}")
        lines.append(
            f"  {self.records} records over {self.duration:.3f} s (t {self.start:.3f} → {self.end:.3f}), "
            f"{len(self.connections)} connection(s), {len(self.outages)} outage(s)"
        )
        if self.gaps:
            lines.append(f"  WARNING: the recorder dropped {self.gaps} record(s) (gap events)")
        lines.append(f"  frames out: {_counts(self.frames_out)}")
        lines.append(f"  frames in:  {_counts(self.frames_in)}")
        if self.responses:
            lines.append(f"  responses:  {_counts(self.responses)}")
        if self.response_errors:
            lines.append(f"  errors:     {_counts(self.response_errors)}")
        latencies = self.ack_latencies
        if latencies:
            lines.append(
                f"  acks: {len(latencies)} answered, {len(self.unanswered)} unanswered, "
                f"{self.unexpected_responses} unexpected; latency median {statistics.median(latencies) * 1000:.1f} ms, "
                f"p95 {_quantile(latencies, 0.95) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
            )
        lines.append("timeline:")
        events: list[tuple[float, int, str]] = []
        for c in self.connections:
            if c.opened_at is not None:
                events.append((c.opened_at, 0, f"conn {c.conn} open"))
            if c.authenticated_at is not None:
                events.append((c.authenticated_at, 1, f"conn {c.conn} authenticated"))
            elif c.auth is not None and c.auth_answered_at is not None:
                events.append((c.auth_answered_at, 1, f"conn {c.conn} auth rejected: {c.auth}"))
            if c.closed_at is not None:
                lived = f"lived {c.lifetime:.3f} s, " if c.lifetime is not None else ""
                reason = f" {c.close_reason}" if c.close_reason else ""
                events.append(
                    (
                        c.closed_at,
                        2,
                        f"conn {c.conn} closed: {c.close_code}{reason} ({lived}{c.frames_out} out, {c.frames_in} in)",
                    )
                )
        for o in self.outages:
            until = f"conn {o.next_conn} opened" if o.next_conn is not None else "end of recording"
            events.append((o.start, 3, f"outage {o.duration * 1000:.1f} ms until {until}"))
        events.sort(key=lambda e: (e[0], e[1]))
        shown = events if len(events) <= max_timeline else events[: max_timeline // 2] + events[-max_timeline // 2 :]
        for index, (t, _, text) in enumerate(shown):
            if len(shown) < len(events) and index == max_timeline // 2:
                lines.append(f"  ... {len(events) - len(shown)} more ...")
            lines.append(f"  {t:9.3f}  {text}")
        return "\n".join(lines)


def _counts(counts: Mapping[str, int]) -> str:
    total = sum(counts.values())
    parts = ", ".join(f"{kind} {n}" for kind, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))
    return f"{total} ({parts})" if parts else "0"


def _connections(recording: Recording, pairing: Pairing) -> tuple[list[ConnectionSummary], list[Outage]]:
    info: dict[int, dict[str, Any]] = {}
    for record in recording.records:
        if isinstance(record, OtherEvent):
            continue
        entry = info.setdefault(
            record.conn, {"conn": record.conn, "opened_at": None, "closed_at": None, "frames_in": 0, "frames_out": 0}
        )
        if isinstance(record, ConnectionEvent):
            if record.event == "open" and entry["opened_at"] is None:
                entry["opened_at"] = record.t
            elif record.event == "close" and entry["closed_at"] is None:
                entry.update(closed_at=record.t, close_code=record.code, close_reason=record.reason)
        else:
            entry["frames_in" if record.direction == "in" else "frames_out"] += 1
            if entry["opened_at"] is None:  # no open event recorded: the first frame will do
                entry["opened_at"] = record.t
    for conn, ack in pairing.auth.items():
        if conn in info and ack.response is not None:
            info[conn]["auth_answered_at"] = ack.response.t
            if ack.status == "success":
                info[conn].update(auth="success", authenticated_at=ack.response.t)
            else:
                info[conn]["auth"] = ", ".join(ack.error_types) or "error"
    connections = sorted(
        (ConnectionSummary(**entry) for entry in info.values()),
        key=lambda c: (c.opened_at if c.opened_at is not None else math.inf, c.conn),
    )
    outages = []
    followers: list[ConnectionSummary | None] = [*connections[1:], None] if connections else []
    for previous, following in zip(connections, followers, strict=True):
        if previous.closed_at is None:
            continue
        if following is not None and following.opened_at is not None:
            if following.opened_at >= previous.closed_at:
                outages.append(Outage(previous.closed_at, following.opened_at, previous.conn, following.conn))
        elif following is None and recording.end > previous.closed_at:
            outages.append(Outage(previous.closed_at, recording.end, previous.conn, None))
    return connections, outages


def summarize(recording: Recording) -> Summary:
    """Count and pair everything in a recording (no scheduler involved: one pass)."""
    frames_in: Counter[str] = Counter()
    frames_out: Counter[str] = Counter()
    responses: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    gaps = 0
    for record in recording.records:
        if isinstance(record, Frame):
            if record.direction == "out":
                frames_out[message_kind(record.frame)] += 1
                continue
            kind = inbound_kind(record.frame)
            frames_in[kind] += 1
            if kind == "Response":
                response = _decode_response(record.frame)
                if response is not None:
                    responses[response.status] += 1
                    errors.update(response.error_types)
        elif isinstance(record, OtherEvent) and record.event == "gap":
            dropped = record.fields.get("dropped")
            gaps += dropped if isinstance(dropped, int) else 1
    pairing = match_responses(recording)
    connections, outages = _connections(recording, pairing)
    return Summary(
        recording.path,
        recording.header,
        recording.start,
        recording.end,
        len(recording.records),
        tuple(connections),
        tuple(outages),
        dict(frames_in),
        dict(frames_out),
        dict(responses),
        dict(errors),
        pairing.acks,
        len(pairing.unexpected),
        gaps,
    )


# --------------------------------------------------------------------------- analysis (Rx)

_POLICIES: dict[str, HoldPolicy] = {
    "V0Heartbeat": HoldPolicy.KEEP_LATEST,
    "V0MachineSpecsUpdate": HoldPolicy.KEEP_BOUNDED,
}


@dataclass(frozen=True, slots=True)
class _Sent:
    """An outbound frame as the analysis pipeline carries it."""

    t: float
    conn: int
    kind: str
    frame: str | bytes
    requeued: bool = False


@dataclass(slots=True)
class Analysis:
    """Plain lists and dicts (JSON-able, pandas-free) for plots; see :func:`analyze`."""

    start: float
    end: float
    bin_seconds: float
    message_mix: dict[str, dict[str, int]]
    """{"in": {kind: count}, "out": {kind: count}}."""
    rate_bins: list[float]
    """Start time of each rate bin."""
    rates: dict[str, dict[str, list[float]]]
    """{"in"|"out": {kind: [frames per second in each bin]}}."""
    connections: list[dict[str, Any]]
    outages: list[dict[str, Any]]
    outbox_depth: list[tuple[float, int]]
    """Step points (t, items held): frames waiting to be resent after a disconnect."""
    in_flight: list[tuple[float, int]]
    """Step points (t, frames sent and not yet answered)."""
    acks: list[dict[str, Any]]
    """One per answered frame: conn, kind, sent_at, answered_at, latency, status, error_types."""
    unanswered: list[dict[str, Any]]
    """Frames left without an answer: conn, kind, sent_at, frame, cut_by ("disconnect" or "end of recording")."""
    unexpected_responses: list[float]
    """Times of Responses that arrived with nothing in flight."""
    resent: list[dict[str, Any]]
    """Unanswered frames as the outbox releases them for resending: released_at, kind, frame."""
    dropped: list[dict[str, Any]] = field(default_factory=list)
    malformed: list[dict[str, Any]] = field(default_factory=list)

    def latencies(self, kind: str | None = None) -> list[float]:
        return [a["latency"] for a in self.acks if kind is None or a["kind"] == kind]


def _top_key(record: Record) -> str:
    if isinstance(record, Frame):
        return record.direction
    return "event" if isinstance(record, ConnectionEvent) else "other"


Inbound = Decoded[InboundMessage] | Malformed


def _route(item: Inbound) -> str:
    return "malformed" if isinstance(item, Malformed) else _message_name(item.message)


def analyze(recording: Recording, *, bin_seconds: float = 1.0) -> Analysis:
    """Replay ``recording`` in virtual time through the client's own operators and measure it.

    ``partition_by`` splits the records by direction and the decoded inbound frames by type
    (``decode_frames``); ``match_acks`` pairs Responses with the frames expecting one, per
    connection; frames left unanswered by a disconnect are fed, as the client requeues them,
    through ``hold_while_disconnected`` gated by the recorded "connected and authenticated"
    state, which gives the outbox depth over time and when they were released for resending.
    Runs on a ``HistoricalScheduler``: no waiting, whatever the recording's length.
    """
    if not bin_seconds > 0:
        raise ValueError(f"bin_seconds must be > 0, got {bin_seconds}")
    scheduler = HistoricalScheduler()
    origin = scheduler.now

    def now() -> float:
        return round((scheduler.now - origin).total_seconds(), 6)

    first_bin = math.floor(recording.start / bin_seconds) * bin_seconds
    n_bins = max(1, math.floor((recording.end - first_bin) / bin_seconds) + 1)
    mix: dict[str, Counter[str]] = {"in": Counter(), "out": Counter()}
    rates: dict[str, dict[str, list[float]]] = {"in": {}, "out": {}}

    def count(direction: str, kind: str) -> None:
        mix[direction][kind] += 1
        series = rates[direction].setdefault(kind, [0.0] * n_bins)
        index = min(n_bins - 1, max(0, math.floor((now() - first_bin) / bin_seconds)))
        series[index] += 1 / bin_seconds

    conn = 0
    authenticated = False
    in_flight_count = 0
    in_flight: list[tuple[float, int]] = [(recording.start, 0)]
    depth: list[tuple[float, int]] = [(recording.start, 0)]
    acks: list[dict[str, Any]] = []
    unanswered: list[dict[str, Any]] = []
    unexpected: list[float] = []
    resent: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    malformed: list[dict[str, Any]] = []

    sent: Subject[_Sent] = Subject()
    connected: Subject[bool] = Subject()
    ready: BehaviorSubject[bool] = BehaviorSubject(False)
    outbox: Subject[_Sent] = Subject()

    top = partition_by(replay(recording, scheduler), _top_key, ["in", "out", "event", "other"])
    inbound = top["in"].pipe(
        ops.map(lambda record: record.frame if isinstance(record, Frame) else b""),
        decode_frames(decode),
    )
    routes = partition_by(inbound, _route, ["Response", "V2JobRequest", "V0JobCheated", "malformed"])

    def on_out(record: Record) -> None:
        nonlocal in_flight_count, conn, authenticated
        if not isinstance(record, Frame):
            return
        if record.conn != conn:  # a connection whose "open" was not recorded
            conn, authenticated = record.conn, False
        kind = message_kind(record.frame)
        count("out", kind)
        item = _Sent(now(), record.conn, kind, record.frame)
        if _expects_response(record.frame, authenticated):
            in_flight_count += 1
            in_flight.append((item.t, in_flight_count))
            sent.on_next(item)
        if kind != AUTH_KIND and ready.value:
            outbox.on_next(item)  # passes straight through: the gate is open

    def on_event(record: Record) -> None:
        nonlocal conn, authenticated
        if not isinstance(record, ConnectionEvent):
            return
        authenticated = False
        ready.on_next(False)  # before match_acks requeues: requeued frames must be held
        if record.event == "open":
            conn = record.conn
            connected.on_next(True)
        else:
            connected.on_next(False)

    def on_ack(event: AckEvent[_Sent, Inbound]) -> None:
        nonlocal in_flight_count, authenticated
        t = now()
        if isinstance(event, Acked):
            decoded = event.response
            assert isinstance(decoded, Decoded) and isinstance(decoded.message, Response)
            response = decoded.message
            item = event.item
            in_flight_count -= 1
            in_flight.append((t, in_flight_count))
            acks.append(
                {
                    "conn": item.conn,
                    "kind": item.kind,
                    "sent_at": item.t,
                    "answered_at": t,
                    "latency": round(t - item.t, 6),
                    "status": response.status,
                    "error_types": list(response.error_types),
                }
            )
            if item.kind == AUTH_KIND and response.is_success and item.conn == conn:
                authenticated = True
                ready.on_next(True)  # the outbox releases what the last disconnect left
        elif isinstance(event, Unacked):
            in_flight_count -= len(event.items)
            in_flight.append((t, in_flight_count))
            disconnected = not ready.value  # else the recording ended with the connection up
            for item in event.items:
                unanswered.append(
                    {
                        "conn": item.conn,
                        "kind": item.kind,
                        "sent_at": item.t,
                        "frame": item.frame,
                        "cut_by": "disconnect" if disconnected else "end of recording",
                    }
                )
                if item.kind != AUTH_KIND and disconnected:
                    outbox.on_next(_Sent(item.t, item.conn, item.kind, item.frame, requeued=True))
        elif isinstance(event, UnexpectedResponse):
            unexpected.append(t)

    def on_released(item: _Sent) -> None:
        if item.requeued:
            resent.append({"released_at": now(), "kind": item.kind, "frame": item.frame, "sent_at": item.t})

    def on_dropped(d: Dropped[_Sent]) -> None:
        dropped.append({"t": now(), "kind": d.item.kind, "reason": d.reason, "frame": d.item.frame})

    def on_depth(items: int, _bytes: int) -> None:
        depth.append((now(), items))

    def on_malformed(item: Inbound) -> None:
        if isinstance(item, Malformed):
            malformed.append({"t": now(), "error": str(item.error), "frame": item.frame})

    responses = routes["Response"]
    subscriptions = CompositeDisposable(
        top["out"].subscribe(on_out, on_completed=sent.on_completed),
        top["event"].subscribe(on_event),
        match_acks(sent, responses, connected).subscribe(on_ack),
        outbox.pipe(
            hold_while_disconnected(
                ready,
                lambda item: _POLICIES.get(item.kind, HoldPolicy.KEEP_ALL),
                on_dropped=on_dropped,
                on_depth=on_depth,
            )
        ).subscribe(on_released),
        routes["malformed"].subscribe(on_malformed),
        *(
            routes[kind].subscribe(_counter("in", kind, count))
            for kind in ("Response", "V2JobRequest", "V0JobCheated", "malformed")
        ),
    )
    subscriptions.add(routes.connect())
    subscriptions.add(top.connect())
    try:
        scheduler.start()
    finally:
        subscriptions.dispose()

    summary_pairing = match_responses(recording)
    connections, outages = _connections(recording, summary_pairing)
    return Analysis(
        start=recording.start,
        end=recording.end,
        bin_seconds=bin_seconds,
        message_mix={direction: dict(counter) for direction, counter in mix.items()},
        rate_bins=[round(first_bin + i * bin_seconds, 9) for i in range(n_bins)],
        rates=rates,
        connections=[_as_dict(c) | {"lifetime": c.lifetime} for c in connections],
        outages=[_as_dict(o) | {"duration": o.duration} for o in outages],
        outbox_depth=depth,
        in_flight=in_flight,
        acks=acks,
        unanswered=unanswered,
        unexpected_responses=unexpected,
        resent=resent,
        dropped=dropped,
        malformed=malformed,
    )


def _counter(direction: str, kind: str, count: Callable[[str, str], None]) -> Callable[[Inbound], None]:
    def on_next(_: Inbound) -> None:
        count(direction, kind)

    return on_next


def _as_dict(value: ConnectionSummary | Outage) -> dict[str, Any]:
    return dataclasses.asdict(value)


# --------------------------------------------------------------------------- serving


class ReplayServer:
    """A websocket server that plays a recording's inbound frames to a connecting client.

    It answers the client's auth request with success (no signature check), then sends the
    recorded inbound frames (of all recorded connections, in order; see :func:`playback_frames`)
    with their original spacing divided by ``speed``, the first one at once. What the client
    sends is kept in ``received``, not answered: the recorded Responses are played instead.
    One client at a time: a new connection takes over from the current one (closed with 1001)
    and resumes the playback where it stopped; so does a reconnect after a disconnect. After the
    last frame (and ``linger`` seconds) it closes the connection with 1000 and :meth:`wait_done`
    returns.
    """

    def __init__(
        self,
        recording: Recording,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        speed: float = 1.0,
        include_auth_responses: bool = False,
        linger: float = 0.0,
    ) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        if linger < 0:
            raise ValueError(f"linger must be >= 0, got {linger}")
        self.recording = recording
        self.frames = playback_frames(recording, include_auth_responses=include_auth_responses)
        self.host = host
        self._requested_port = port
        self.speed = speed
        self.linger = linger
        self.delivered = 0
        """Frames sent so far (also the resume position)."""
        self.connections = 0
        self.received: list[str | bytes] = []
        """Every frame the client(s) sent, in order."""
        self._server: Any = None
        self._active: Any = None
        self._player: asyncio.Task[None] | None = None
        self._done: asyncio.Event | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the server is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws/v0/"

    @property
    def done(self) -> bool:
        return self._done is not None and self._done.is_set()

    async def start(self) -> None:
        """Listen (``port=0``: any free port, see ``.port``); OSError if the port is taken."""
        from websockets.asyncio.server import serve

        if self._server is not None:
            raise RuntimeError("the server is already started")
        self._done = asyncio.Event()
        self._server = await serve(self._handle, self.host, self._requested_port, max_size=None, close_timeout=2.0)

    async def wait_done(self) -> None:
        """Wait until every frame was played and the connection closed."""
        if self._done is None:
            raise RuntimeError("start() the server first")
        await self._done.wait()

    async def aclose(self, timeout: float = 1.0) -> None:
        """Stop listening and close any connection (1001), waiting at most ``timeout`` seconds."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        try:
            async with asyncio.timeout(timeout):
                await server.wait_closed()
        except TimeoutError:
            log.warning("replay server connections did not close within %g s", timeout)

    async def __aenter__(self) -> ReplayServer:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def _handle(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        self.connections += 1
        previous, previous_player = self._active, self._player
        self._active, self._player = ws, None
        if previous_player is not None:
            await self._reap(previous_player, stop=True)
        if previous is not None:
            await previous.close(1001, "superseded by a new connection")
        player: asyncio.Task[None] | None = None
        try:
            await self._authenticate(ws)
            if self._active is ws and not self.done:
                player = self._player = asyncio.create_task(self._play(ws), name="replay-player")
            async for message in ws:
                self.received.append(message)
        except ConnectionClosed:
            pass
        finally:
            if self._active is ws:
                self._active = None
            if player is not None:
                if self._player is player:
                    self._player = None
                await self._reap(player, stop=not self.done)

    async def _reap(self, player: asyncio.Task[None], *, stop: bool) -> None:
        """Wait for a player to end (cancelling it first if ``stop``); log it if it failed."""
        from websockets.exceptions import ConnectionClosed

        if stop:
            player.cancel()
        try:
            await asyncio.wait([player])
        finally:
            if not player.done():  # we are being cancelled ourselves
                player.cancel()
        if not player.cancelled():
            exc = player.exception()
            if exc is not None and not isinstance(exc, ConnectionClosed):
                log.error("replay player failed", exc_info=exc)

    async def _authenticate(self, ws: Any) -> None:
        while True:
            message = await ws.recv()
            self.received.append(message)
            try:
                request = decode_outbound(message)
            except DecodeError:
                request = None
            if isinstance(request, V0AuthenticationRequest):
                await ws.send(SUCCESS_FRAME)
                return
            await ws.send(NOT_AUTHENTICATED_FRAME)

    async def _play(self, ws: Any) -> None:
        loop = asyncio.get_running_loop()
        frames = self.frames
        if self.delivered < len(frames):
            base_t = frames[self.delivered].t
            base = loop.time()
            while self.delivered < len(frames):
                frame = frames[self.delivered]
                delay = base + (frame.t - base_t) / self.speed - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await ws.send(frame.frame)
                self.delivered += 1
        if self.linger:
            await asyncio.sleep(self.linger)
        assert self._done is not None
        self._done.set()  # before closing: the handler must not cancel a finished playback
        await ws.close(1000, "replay finished")


# --------------------------------------------------------------------------- CLI


def _speed(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be > 0 (inf: as fast as possible)")
    return number


def _port(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (0 picks a free one)")
    return int(value)


def _non_negative(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be >= 0")
    return number


def register_cli(sub: Any) -> dict[str, Callable[[argparse.Namespace], Awaitable[None]]]:
    """Add ``replay`` to the ``python -m streams`` subcommands (called by streams.cli)."""
    parser = sub.add_parser(
        "replay",
        help="summarise a recording, or --serve it to a client as a facilitator",
        description="Print a timeline summary of a recording (or a capture of the real facilitator). With "
        "--serve, act as a facilitator that answers a client's auth and plays the recorded inbound frames "
        "to it, to reproduce an incident locally.",
    )
    parser.add_argument("file", type=Path, help="a recording (JSONL, facilitator-capture format)")
    parser.add_argument("--serve", action="store_true", help="play the inbound frames to a connecting client")
    parser.add_argument("--host", default="127.0.0.1", help="--serve: address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=_port, default=8765, help="--serve: port (default 8765; 0 = any free port)")
    parser.add_argument("--speed", type=_speed, default=1.0, help="--serve: time factor, e.g. 10 = ten times faster")
    parser.add_argument(
        "--linger",
        type=_non_negative,
        default=0.0,
        help="--serve: seconds to keep the connection open after the last frame",
    )
    parser.add_argument(
        "--all-frames", action="store_true", help="--serve: also play the recorded answers to auth requests"
    )
    parser.add_argument(
        "--allow-truncated", action="store_true", help="ignore a truncated last line (a recorder killed mid-write)"
    )
    parser.add_argument("--timeline", type=int, default=40, metavar="N", help="show at most N timeline lines")
    parser.add_argument("--log-level", default=argparse.SUPPRESS, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return {"replay": _replay_command}


async def _replay_command(args: argparse.Namespace) -> None:
    from streams.cli import CliError, run_until_signalled

    try:
        recording = load_recording(args.file, allow_truncated=args.allow_truncated)
    except ReplayError as exc:
        raise CliError(str(exc)) from None
    if not args.serve:
        print(summarize(recording).render(max_timeline=max(2, args.timeline)))
        return
    server = ReplayServer(
        recording,
        host=args.host,
        port=args.port,
        speed=args.speed,
        include_auth_responses=args.all_frames,
        linger=args.linger,
    )
    try:
        await server.start()
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None

    async def announce_and_wait() -> None:
        # Printed once SIGINT is handled: a script that signals right after reading it is safe.
        print(
            f"replaying {len(server.frames)} inbound frames of {args.file} at {server.url} "
            f"(speed {args.speed:g}); waiting for a client",
            flush=True,
        )
        await server.wait_done()

    try:
        await run_until_signalled(announce_and_wait)
    finally:
        await server.aclose()
    state = "done" if server.done else "interrupted"
    print(
        f"{state}: played {server.delivered} of {len(server.frames)} frames over "
        f"{server.connections} connection(s); the client sent {len(server.received)} frames",
        flush=True,
    )
