"""Recording traffic: a transport tap that writes JSONL (:mod:`.recorder`), and the format and its loader."""

from streams.exceptions import RecordingError, ReplayError
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
from streams.recording.recorder import Recorder, RecorderStats, RecordingTransport, open_recorder

__all__ = [
    "FORMAT",
    "SUPPORTED_VERSIONS",
    "ConnectionEvent",
    "Frame",
    "Header",
    "OtherEvent",
    "Record",
    "Recorder",
    "RecorderStats",
    "Recording",
    "RecordingError",
    "RecordingTransport",
    "ReplayError",
    "load_recording",
    "open_recorder",
]
