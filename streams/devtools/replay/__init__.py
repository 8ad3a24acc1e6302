"""Replay recorded traffic: play it on any scheduler, pair and summarise it, analyse it, or serve it.

A recording (:mod:`streams.recording`, or a capture of the real facilitator: the same format) is
only useful if it can be looked at and re-run:

- :mod:`.playback`: :func:`replay` emits each record at its time offset on the scheduler given
  (virtual time for instant analysis and marble-style tests, ``AsyncIOScheduler`` for real time);
- :mod:`.pairing`: :func:`match_responses` pairs each Response with the frame it answers;
- :mod:`.summary`: :func:`summarize`, the timeline the CLI prints;
- :mod:`.analysis`: :func:`analyze` runs the client's own operators over it in virtual time
  (message mix, rates, connection timeline, outbox depth, ack latencies) for the notebooks;
- :mod:`.server`: :class:`ReplayServer` plays the recorded inbound frames to a connecting client.
"""

from streams.devtools.replay.analysis import Analysis, analyze
from streams.devtools.replay.pairing import Ack, Pairing, match_responses, playback_frames
from streams.devtools.replay.playback import replay
from streams.devtools.replay.server import ReplayServer
from streams.devtools.replay.summary import ConnectionSummary, Outage, Summary, inbound_kind, summarize
from streams.exceptions import ReplayError
from streams.recording.format import (
    FORMAT,
    SUPPORTED_VERSIONS,
    ConnectionEvent,
    Frame,
    Header,
    OtherEvent,
    Record,
    Recording,
    load_recording,
)

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
    "replay",
    "summarize",
]
