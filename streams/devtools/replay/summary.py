"""A recording's timeline summary: connections, outages, message mix, ack latencies."""

from __future__ import annotations

import logging
import math
import statistics
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from streams.devtools.replay.pairing import Ack, Pairing, decode_response, match_responses
from streams.metrics import quantile
from streams.protocol import (
    DecodeError,
    decode,
    message_kind,
)
from streams.recording.format import ConnectionEvent, Frame, Header, OtherEvent, Recording

__all__ = ["ConnectionSummary", "Outage", "Summary", "connection_summaries", "inbound_kind", "summarize"]

log = logging.getLogger(__name__)



def inbound_kind(frame: str | bytes) -> str:
    """Response / V2JobRequest / V0JobCheated, or "malformed" if the client could not decode it."""
    try:
        message = decode(frame)
    except DecodeError:
        return "malformed"
    return message_kind(message)



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
                f"p95 {quantile(sorted(latencies), 0.95) * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
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


def connection_summaries(recording: Recording, pairing: Pairing) -> tuple[list[ConnectionSummary], list[Outage]]:
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
                response = decode_response(record.frame)
                if response is not None:
                    responses[response.status] += 1
                    errors.update(response.error_types)
        elif isinstance(record, OtherEvent) and record.event == "gap":
            dropped = record.fields.get("dropped")
            gaps += dropped if isinstance(dropped, int) else 1
    pairing = match_responses(recording)
    connections, outages = connection_summaries(recording, pairing)
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
