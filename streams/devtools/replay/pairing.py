"""Pair each Response of a recording with the frame it answers (FIFO per connection, as the facilitator does)."""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from streams.protocol import (
    DecodeError,
    Response,
    V0Heartbeat,
    V0MachineSpecsUpdate,
    decode,
    decode_outbound,
    message_kind,
)
from streams.recording.format import ConnectionEvent, Frame, Recording

__all__ = [
    "AUTH_KIND",
    "Ack",
    "Pairing",
    "decode_response",
    "expects_response",
    "match_responses",
    "playback_frames",
]

log = logging.getLogger(__name__)

AUTH_KIND = "V0AuthenticationRequest"


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


def expects_response(frame: str | bytes, authenticated: bool) -> bool:
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


def decode_response(frame: str | bytes) -> Response | None:
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
            if expects_response(record.frame, authenticated.get(conn, False)):
                in_flight.setdefault(conn, deque()).append(record)
                order.append(record)
            continue
        response = decode_response(record.frame)
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
