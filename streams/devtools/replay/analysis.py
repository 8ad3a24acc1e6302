"""Analyse a recording through the client's own operators, in virtual time (for the notebooks)."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from reactivex import operators as ops
from reactivex.disposable import CompositeDisposable
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
    hold_while_disconnected,
    match_acks,
    partition_by,
)
from streams.client import INBOUND_ROUTES, route_inbound
from streams.devtools.replay.pairing import AUTH_KIND, expects_response, match_responses
from streams.devtools.replay.playback import replay
from streams.devtools.replay.summary import ConnectionSummary, Outage, connection_summaries
from streams.protocol import (
    MAX_FRAME_BYTES,
    InboundMessage,
    Response,
    message_kind,
)
from streams.recording.format import ConnectionEvent, Frame, Record, Recording

__all__ = ["Analysis", "Inbound", "analyze"]

log = logging.getLogger(__name__)



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




def analyze(recording: Recording, *, bin_seconds: float = 1.0) -> Analysis:
    """Replay ``recording`` in virtual time through the client's own operators and measure it.

    ``partition_by`` splits the records by direction, ``route_inbound`` (the client's) decodes the
    inbound frames and routes them by type; ``match_acks`` pairs Responses with the frames expecting one, per
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
    inbound = top["in"].pipe(ops.map(lambda record: record.frame if isinstance(record, Frame) else b""))
    routes = route_inbound(inbound, MAX_FRAME_BYTES)

    def on_out(record: Record) -> None:
        nonlocal in_flight_count, conn, authenticated
        if not isinstance(record, Frame):
            return
        if record.conn != conn:  # a connection whose "open" was not recorded
            conn, authenticated = record.conn, False
        kind = message_kind(record.frame)
        count("out", kind)
        item = _Sent(now(), record.conn, kind, record.frame)
        if expects_response(record.frame, authenticated):
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
            for kind in INBOUND_ROUTES
        ),
    )
    subscriptions.add(routes.connect())
    subscriptions.add(top.connect())
    try:
        scheduler.start()
    finally:
        subscriptions.dispose()

    summary_pairing = match_responses(recording)
    connections, outages = connection_summaries(recording, summary_pairing)
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
