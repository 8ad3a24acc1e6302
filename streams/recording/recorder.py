"""Record a client's traffic as JSONL, in the same format as the real facilitator captures.

Why: an incident is only debuggable if what went over the wire is known exactly. The recorder
taps the transport (:class:`RecordingTransport`), so it sees every frame and connection change
whatever the layers above do, and writes them in the capture format of the real facilitator's
captures (:mod:`streams.recording.format`; one header line, then one record per line)::

    {"format": "facilitator-capture", "version": 1, "captured_at": "...", "source": "...", "client_version": "..."}
    {"t": 0.0123, "conn": 1, "event": "open"}
    {"t": 0.0124, "conn": 1, "dir": "out", "frame": "<exact text>"}
    {"t": 0.0311, "conn": 1, "dir": "in", "frame": "<exact text>"}      ("frame_b64" for binary frames)
    {"t": 9.5, "conn": 1, "event": "close", "code": 1006, "reason": "..."}
    {"t": 9.6, "event": "gap", "dropped": 12}     (records lost to a backlog, see ``max_backlog_bytes``)

``t`` is seconds since the recorder started (monotonic clock). The event loop only timestamps a
record and appends it to a queue; a writer thread serialises and writes it, so a slow or full disk
never blocks the client. A write error (full disk, read-only file system) is logged once,
counted, passed to ``on_error``, and ends the recording; the client keeps working.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit, urlunsplit

import orjson

from streams.exceptions import RecordingError
from streams.recording.format import FORMAT, VERSION
from streams.transport import CloseInfo, Transport, TransportClosed, WebSocketTransport

if TYPE_CHECKING:
    from streams.config import ClientConfig

__all__ = [
    "Recorder",
    "RecorderStats",
    "RecordingTransport",
    "open_recorder",
]

log = logging.getLogger(__name__)


Direction = Literal["in", "out"]

# Queue items, built on the event loop (a cheap tuple) and serialised by the writer thread:
# ("frame", t, conn, direction, frame), ("open", t, conn, None, None),
# ("close", t, conn, code, reason), ("gap", t, 0, dropped, None).
_Item = tuple[str, float, int, Any, Any]


@dataclass(frozen=True, slots=True)
class RecorderStats:
    """What the recorder did so far."""

    records: int
    """Records written (the header not counted)."""
    bytes: int
    """Bytes written, header included."""
    dropped: int
    """Records not written: backlog over its bound, or after a write error."""
    errors: int
    """Write errors (the first one stops the recording)."""


def _client_version() -> str:
    import streams

    return str(getattr(streams, "__version__", "unknown"))


def _sanitized_url(url: str) -> str:
    """The URL without credentials, query or fragment: a recording may be shared."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def _record_obj(item: _Item) -> dict[str, Any]:
    kind, t, conn, a, b = item
    if kind == "frame":
        if isinstance(b, str):
            return {"t": t, "conn": conn, "dir": a, "frame": b}
        return {"t": t, "conn": conn, "dir": a, "frame_b64": base64.b64encode(b).decode("ascii")}
    if kind == "open":
        return {"t": t, "conn": conn, "event": "open"}
    if kind == "close":
        return {"t": t, "conn": conn, "event": "close", "code": a, "reason": b}
    return {"t": t, "event": "gap", "dropped": a}


def _dumps(obj: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(obj) + b"\n"
    except orjson.JSONEncodeError:
        # orjson refuses lone surrogates in a str; json escapes them (the loader reads them back).
        return json.dumps(obj).encode("ascii") + b"\n"


def _item_size(item: _Item) -> int:
    if item[0] == "frame":
        return len(item[4]) + 64
    return 64


class Recorder:
    """Writes records to a JSONL file from a writer thread; see the module docstring.

    Record methods (``record_open``/``record_close``/``record_frame``) are cheap and never block for long: call them
    from the event loop. ``aclose()`` (or ``close()``) flushes and stops the writer, bounded.
    """

    def __init__(
        self,
        file: str | Path | IO[bytes],
        *,
        header: dict[str, Any] | None = None,
        on_error: Callable[[OSError], None] | None = None,
        max_backlog_bytes: int = 64 * 2**20,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """Open ``file`` (a path, truncated; or a binary file object, closed at the end).

        Args:
            header: extra header fields (they may not override format/version/captured_at).
            on_error: called once with the first write error; on the event loop that created the
                recorder if there was one, else on the writer thread.
            max_backlog_bytes: bound on records queued and not yet written; beyond it records are
                dropped (counted, and a ``gap`` record says how many) instead of eating memory.
            clock: monotonic seconds; ``t`` of each record is ``clock() - clock()_at_start``.

        Raises:
            OSError: the file cannot be opened.
        """
        if max_backlog_bytes <= 0:
            raise ValueError(f"max_backlog_bytes must be > 0, got {max_backlog_bytes}")
        if isinstance(file, str | Path):
            self.path: Path | None = Path(file)
            self._file: IO[bytes] = self.path.open("wb")
        else:
            self.path = None
            self._file = file
        self._clock = clock
        self._start = clock()
        self._on_error = on_error
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._max_backlog = max_backlog_bytes
        self._cond = threading.Condition()
        self._items: deque[_Item] = deque()
        self._backlog = 0
        self._gap = 0
        self._closing = False
        self._finished = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._records = 0
        self._bytes = 0
        self._dropped = 0
        self._errors = 0
        self.error: OSError | None = None
        """The write error that ended the recording, if any."""

        fields: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "captured_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "source": f"facilitator-streams {_client_version()}",
            "client_version": _client_version(),
        }
        for key, value in (header or {}).items():
            if key not in ("format", "version", "captured_at"):
                fields[key] = value
        self.header: dict[str, Any] = fields
        self._thread = threading.Thread(target=self._write_loop, name="streams-recorder", daemon=True)
        self._thread.start()

    # -- recording (event loop side) --------------------------------------------------------

    def now(self) -> float:
        """Seconds since the recording started, as written in ``t``."""
        return round(self._clock() - self._start, 6)

    def record_open(self, conn: int) -> None:
        """Connection ``conn`` opened."""
        self._put(("open", self.now(), conn, None, None))

    def record_close(self, conn: int, code: int | None, reason: str) -> None:
        """Connection ``conn`` ended with ``code`` (1006 for a drop) and ``reason``."""
        self._put(("close", self.now(), conn, code, reason))

    def record_frame(self, conn: int, direction: Direction, frame: str | bytes) -> None:
        """A frame sent (``"out"``) or received (``"in"``) on connection ``conn``."""
        self._put(("frame", self.now(), conn, direction, frame))

    def _put(self, item: _Item) -> None:
        size = _item_size(item)
        with self._cond:
            if self._closing or self.error is not None:
                self._dropped += 1
                return
            if self._backlog + size > self._max_backlog:
                if self._gap == 0:
                    log.warning("recording backlog over %d bytes: dropping records until it drains", self._max_backlog)
                self._gap += 1
                self._dropped += 1
                return
            if self._gap:
                self._items.append(("gap", item[1], 0, self._gap, None))
                self._gap = 0
            self._items.append(item)
            self._backlog += size
            self._cond.notify()

    @property
    def stats(self) -> RecorderStats:
        with self._cond:
            return RecorderStats(self._records, self._bytes, self._dropped, self._errors)

    @property
    def failed(self) -> bool:
        """True once a write error stopped the recording."""
        return self.error is not None

    # -- writer thread ----------------------------------------------------------------------

    def _write_loop(self) -> None:
        try:
            if not self._write_lines([_dumps(self.header)], 0):
                return
            while True:
                with self._cond:
                    while not self._items and not self._closing:
                        self._cond.wait()
                    batch, self._items = self._items, deque()
                    self._backlog = 0
                    closing = self._closing
                    if closing and self._gap:
                        batch.append(("gap", self.now(), 0, self._gap, None))
                        self._gap = 0
                if batch and not self._write(batch):
                    break
                if closing:
                    break
        finally:
            with contextlib.suppress(OSError):
                self._file.close()
            self._finish()

    def _write(self, batch: deque[_Item]) -> bool:
        """Write and flush a batch; False after a write error (the recording stops)."""
        return self._write_lines([_dumps(_record_obj(item)) for item in batch], len(batch))

    def _write_lines(self, lines: list[bytes], records: int) -> bool:
        try:
            self._file.writelines(lines)
            self._file.flush()
        except OSError as exc:
            self._failed(exc, records)
            return False
        with self._cond:
            self._records += records
            self._bytes += sum(map(len, lines))
        return True

    def _failed(self, exc: OSError, lost: int) -> None:
        with self._cond:
            self.error = exc
            self._errors += 1
            self._dropped += lost + len(self._items)
            self._items.clear()
        where = self.path if self.path is not None else "recording file"
        log.error("cannot write %s (%s); recording stopped, the client keeps running", where, exc)
        callback = self._on_error
        if callback is None:
            return
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(callback, exc)
                return
        try:
            callback(exc)
        except Exception:
            log.exception("recorder on_error callback failed")

    def _finish(self) -> None:
        with self._cond:
            self._finished = True
            waiters, self._waiters = self._waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_resolve, future)

    # -- closing ----------------------------------------------------------------------------

    def _begin_close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify()

    async def aclose(self, timeout: float = 5.0) -> bool:
        """Flush what is queued and stop the writer, waiting at most ``timeout`` seconds.

        Returns True if the writer finished in time (False: it is stuck in a write; it is a
        daemon thread and is left behind). Idempotent.
        """
        self._begin_close()
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._cond:
            if self._finished:
                return True
            self._waiters.append((asyncio.get_running_loop(), future))
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(future)
        except TimeoutError:
            log.warning("recording writer did not finish within %g s; giving up on it", timeout)
            return False
        return True

    def close_sync(self, timeout: float = 5.0) -> bool:
        """``aclose()`` for code without an event loop (notebooks, scripts)."""
        self._begin_close()
        self._thread.join(timeout)
        return not self._thread.is_alive()

    async def __aenter__(self) -> Recorder:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class RecordingTransport(Transport):
    """A Transport that records every connection change and frame of the one it wraps.

    Outbound frames are recorded when ``send`` is called (before the wire sees them), so a
    Response can never appear in the recording before the frame it answers; a frame whose send
    fails is still recorded, followed by the connection's close. Each connection ends with one
    ``close`` record, however it ended (peer close, drop, ``close()``, ``abort()``, failed send).
    """

    def __init__(self, inner: Transport, recorder: Recorder) -> None:
        self.inner = inner
        self.recorder = recorder
        self._conn = 0
        self._open: int | None = None

    @property
    def connection_number(self) -> int:
        """The number (``conn``) of the current or last connection; 0 before the first."""
        return self._conn

    def _record_close(self, info: CloseInfo | None) -> None:
        conn = self._open
        if conn is None:
            return
        self._open = None
        if info is None:
            info = CloseInfo(None, "connection ended", None)
        self.recorder.record_close(conn, info.code, info.reason)

    def _sync_state(self) -> None:
        """Record a close the wrapped transport saw without us (e.g. before a reconnect)."""
        if self._open is not None and not self.inner.is_connected():
            self._record_close(self.inner.close_info)

    async def connect(self, *, headers: Mapping[str, str] | None = None) -> None:
        self._sync_state()
        await self.inner.connect(headers=headers)  # not recorded: they carry a signature
        self._conn += 1
        self._open = self._conn
        self.recorder.record_open(self._conn)

    async def send(self, frame: str) -> None:
        conn = self._open
        if conn is not None:
            self.recorder.record_frame(conn, "out", frame)
        try:
            await self.inner.send(frame)
        except TransportClosed as exc:
            self._record_close(exc.info)
            raise

    async def send_many(self, frames: Sequence[str]) -> None:
        conn = self._open
        if conn is not None:
            for frame in frames:
                self.recorder.record_frame(conn, "out", frame)
        try:
            await self.inner.send_many(frames)
        except TransportClosed as exc:
            self._record_close(exc.info)
            raise

    async def recv(self) -> str | bytes:
        try:
            frame = await self.inner.recv()
        except TransportClosed as exc:
            self._record_close(exc.info)
            raise
        if self._open is not None:
            self.recorder.record_frame(self._open, "in", frame)
        return frame

    async def close(self, code: int = 1000, reason: str = "") -> None:
        try:
            await self.inner.close(code, reason)
        finally:
            if not self.inner.is_connected():
                self._record_close(self.inner.close_info)

    def abort(self) -> None:
        self.inner.abort()
        self._record_close(self.inner.close_info)

    async def wait_closed(self) -> None:
        await self.inner.wait_closed()

    def is_connected(self) -> bool:
        return self.inner.is_connected()

    @property
    def close_info(self) -> CloseInfo | None:
        return self.inner.close_info


def open_recorder(
    path: str | Path,
    config: ClientConfig,
    inner: Transport | None = None,
    *,
    on_error: Callable[[OSError], None] | None = None,
) -> tuple[Recorder, RecordingTransport]:
    """For ``--record FILE``: a recorder on ``path`` and a transport that records into it.

    ``inner`` is the transport to tap; by default the client's WebSocketTransport built from
    ``config``. Raises :class:`~streams.exceptions.RecordingError` if the file cannot be opened.
    """
    header: dict[str, Any] = {"url": _sanitized_url(config.url)}
    if config.validator_version is not None:
        header["validator_version"] = config.validator_version
    if config.runner_version is not None:
        header["runner_version"] = config.runner_version
    try:
        recorder = Recorder(path, header=header, on_error=on_error)
    except OSError as exc:
        raise RecordingError(f"cannot open recording file {path}: {exc.strerror or exc}") from None
    if inner is None:
        inner = WebSocketTransport.from_config(config)
    return recorder, RecordingTransport(inner, recorder)
