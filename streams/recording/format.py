"""The recording format (JSON lines): record types and a strict loader.

A recording written by :mod:`streams.recording.recorder` and a capture of the real facilitator share
this format: a header line, then one record per frame (``dir`` in/out) or connection change
(``event`` open/close), each with a time offset ``t`` and a connection number ``conn``.
:func:`load_recording` reads it strictly: a damaged file is a :class:`ReplayError` naming the file,
the line and what is wrong, never a half-read analysis.
"""

from __future__ import annotations

import base64
import binascii
import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal

import orjson

from streams.exceptions import ReplayError
from streams.protocol import (
    MAX_FRAME_BYTES,
    json_kind,
)

__all__ = [
    "FORMAT",
    "SUPPORTED_VERSIONS",
    "VERSION",
    "ConnectionEvent",
    "Frame",
    "Header",
    "OtherEvent",
    "Record",
    "Recording",
    "load_recording",
]

log = logging.getLogger(__name__)

FORMAT: Final = "facilitator-capture"
VERSION: Final = 1

SUPPORTED_VERSIONS = (VERSION,)

MAX_LINE_BYTES: Final = 2 * MAX_FRAME_BYTES + 2**20
"""The longest line :func:`load_recording` reads: a frame at the 50 MiB limit, JSON-escaped (a
JSON frame's every ``"`` becomes ``\\"``: at most twice as long) or base64'd (4/3), plus the record's
envelope. A longer line is not a record (``replay /dev/zero`` must fail at once, not eat the
machine's memory)."""




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


def load_recording(
    path: str | Path, *, allow_truncated: bool = False, max_line_bytes: int = MAX_LINE_BYTES
) -> Recording:
    """Read and validate a recording; raises :class:`ReplayError` naming the line at fault.

    Checked: every line is a JSON object; the first is a header of a known format and version;
    every record has its fields with the right types; times are not negative and never go
    backwards. A last line without its newline that is not valid JSON is reported as truncated
    (a recorder killed mid-write); ``allow_truncated=True`` drops it instead (with a warning).
    Blank lines are ignored. The file is read line by line, and a line longer than
    ``max_line_bytes`` (default :data:`MAX_LINE_BYTES`) is an error: memory stays bounded by
    one line whatever the file (``/dev/zero``, a binary file, a huge single line).
    """
    path = Path(path)
    try:
        with path.open("rb") as file:
            return _load(file, path, allow_truncated, max_line_bytes)
    except OSError as exc:
        raise ReplayError(path, None, f"cannot read the recording: {exc.strerror or exc}") from None


def _lines(file: BinaryIO, path: Path, max_line_bytes: int) -> Iterator[tuple[int, bytes, bool]]:
    """(line number, line without its newline, whether it had one), refusing overlong lines."""
    number = 0
    while True:
        raw = file.readline(max_line_bytes + 1)
        if not raw:
            return
        number += 1
        terminated = raw.endswith(b"\n")
        if len(raw) - terminated > max_line_bytes:
            raise ReplayError(
                path, number, f"line longer than {max_line_bytes:,} bytes: not a recording record "
                "(is this a recording of facilitator traffic?)"
            )
        yield number, raw[:-1] if terminated else raw, terminated


def _load(file: BinaryIO, path: Path, allow_truncated: bool, max_line_bytes: int) -> Recording:
    header: Header | None = None
    records: list[Record] = []
    previous: Record | None = None
    for number, raw, terminated in _lines(file, path, max_line_bytes):
        if not raw.strip():
            continue

        def fail(problem: str, number: int = number) -> ReplayError:
            return ReplayError(path, number, problem)

        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if not terminated:  # only the last line can lack its newline
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
