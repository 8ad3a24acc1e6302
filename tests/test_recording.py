"""Recorder and RecordingTransport: exact records, round trip through load_recording, errors not fatal."""

from __future__ import annotations

import asyncio
import io
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from streams.config import ClientConfig
from streams.devtools.replay import ConnectionEvent, Frame, OtherEvent, load_recording
from streams.recording import FORMAT, Recorder, RecordingError, RecordingTransport, open_recorder
from streams.transport import MemoryPeer, TransportClosed, WebSocketTransport, memory_transport_pair

pytestmark = pytest.mark.timeout(30)

HAVE_DEV_FULL = Path("/dev/full").exists()


def shape(records: Any) -> list[tuple[Any, ...]]:
    """Records without their times: what happened, in order."""
    out: list[tuple[Any, ...]] = []
    for r in records:
        if isinstance(r, Frame):
            out.append((r.conn, r.direction, r.frame))
        elif isinstance(r, ConnectionEvent):
            out.append((r.conn, r.event, r.code) if r.event == "close" else (r.conn, r.event))
        else:
            out.append(("other", r.event))
    return out


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


async def test_records_every_frame_and_connection_change_exactly(tmp_path: Path) -> None:
    path = tmp_path / "rec.jsonl"
    client, peer = memory_transport_pair()
    recorder = Recorder(path, header={"validator_hotkey": "5Grw"})
    transport = RecordingTransport(client, recorder)

    # conn 1: text both ways, a binary frame in, then the peer closes with 3001.
    await transport.connect()
    await transport.send('{"message_type": "V0AuthenticationRequest"}')
    assert await peer.recv() == '{"message_type": "V0AuthenticationRequest"}'
    await peer.send('{"status":"success","errors":[]}')
    await peer.send(b"\x00\xffbinary")
    assert await transport.recv() == '{"status":"success","errors":[]}'
    assert await transport.recv() == b"\x00\xffbinary"
    await peer.close(3001, "")
    with pytest.raises(TransportClosed):
        await transport.recv()
    # conn 2: a batch, each frame recorded in order; the client closes cleanly; a second close records nothing more.
    await transport.connect()
    await transport.send_many(["ü unicode ✓", "second"])
    assert [await peer.recv(), await peer.recv()] == ["ü unicode ✓", "second"]
    await transport.close(1000, "bye")
    await transport.close()
    # conn 3: aborted by the client.
    await transport.connect()
    transport.abort()
    # conn 4: dropped by the peer, noticed only at the next connect (nobody was reading).
    await transport.connect()
    await peer.drop()
    await transport.connect()
    await transport.close()
    assert transport.connection_number == 5
    assert await recorder.aclose()

    recording = load_recording(path)
    assert recording.header.format == FORMAT
    assert recording.header.client_version
    assert recording.header.fields["validator_hotkey"] == "5Grw"
    assert shape(recording.records) == [
        (1, "open"),
        (1, "out", '{"message_type": "V0AuthenticationRequest"}'),
        (1, "in", '{"status":"success","errors":[]}'),
        (1, "in", b"\x00\xffbinary"),
        (1, "close", 3001),
        (2, "open"),
        (2, "out", "ü unicode ✓"),
        (2, "out", "second"),
        (2, "close", 1000),
        (3, "open"),
        (3, "close", 1006),
        (4, "open"),
        (4, "close", 1006),
        (5, "open"),
        (5, "close", 1000),
    ]
    close_2 = recording.records[8]
    assert isinstance(close_2, ConnectionEvent) and close_2.reason == "bye"
    times = [r.t for r in recording.records]
    assert times == sorted(times) and times[0] >= 0
    assert b'"frame_b64"' in path.read_bytes()
    assert recorder.stats.records == 15 and recorder.stats.dropped == 0 and recorder.stats.errors == 0


async def test_failed_send_is_recorded_then_the_close(tmp_path: Path) -> None:
    client, peer = memory_transport_pair()
    recorder = Recorder(tmp_path / "rec.jsonl")
    transport = RecordingTransport(client, recorder)
    await transport.connect()
    await peer.close(1001, "going away")
    with pytest.raises(TransportClosed):
        await transport.send("late")
    await recorder.aclose()
    assert shape(load_recording(tmp_path / "rec.jsonl").records) == [
        (1, "open"),
        (1, "out", "late"),
        (1, "close", 1001),
    ]


async def test_time_offsets_follow_the_clock(tmp_path: Path) -> None:
    clock = FakeClock()
    recorder = Recorder(tmp_path / "rec.jsonl", clock=clock)  # start = 100.001
    recorder.record_open(1)  # t = 0.001
    clock.now += 1.5
    recorder.record_frame(1, "out", "x")  # t = 1.502
    await recorder.aclose()
    records = load_recording(tmp_path / "rec.jsonl").records
    assert [r.t for r in records] == [0.001, 1.502]


@pytest.mark.skipif(not HAVE_DEV_FULL, reason="no /dev/full here")
async def test_write_error_is_reported_once_and_not_fatal(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """/dev/full: every write fails with ENOSPC, like a full disk."""
    errors: list[OSError] = []
    got_error = asyncio.Event()

    def on_error(exc: OSError) -> None:
        errors.append(exc)
        got_error.set()

    client, peer = memory_transport_pair()
    with caplog.at_level(logging.ERROR, logger="streams.recording"):
        recorder = Recorder("/dev/full", on_error=on_error)
        transport = RecordingTransport(client, recorder)
        await transport.connect()
        async with asyncio.timeout(5):
            await got_error.wait()  # the header write already failed
        # The client keeps working, and recording stays stopped.
        for i in range(20):
            await transport.send(f"frame {i}")
            assert await peer.recv() == f"frame {i}"
        await peer.send("answer")
        assert await transport.recv() == "answer"
        assert await recorder.aclose(timeout=5)
    assert len(errors) == 1 and errors[0].errno is not None
    assert recorder.failed and recorder.error is errors[0]
    stats = recorder.stats
    assert stats.errors == 1 and stats.dropped >= 21 and stats.records == 0
    assert len([r for r in caplog.records if "recording stopped" in r.getMessage()]) == 1


class BlockingFile(io.RawIOBase):
    """A file whose writes block until released: a hung disk or NFS mount."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.data = bytearray()
        self._written = threading.Condition()

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.entered.set()
        self.release.wait(10)
        with self._written:
            self.data += bytes(b)
            self._written.notify_all()
        return len(b)

    def wait_for(self, text: bytes, timeout: float = 5.0) -> bool:
        with self._written:
            return self._written.wait_for(lambda: text in self.data, timeout)


async def test_aclose_is_bounded_when_the_writer_hangs() -> None:
    file = BlockingFile()
    recorder = Recorder(file)  # type: ignore[arg-type]  # a raw binary file object
    try:
        recorder.record_open(1)
        # Recording never blocks the caller, even with the writer stuck.
        started = time.monotonic()
        for i in range(1000):
            recorder.record_frame(1, "out", f"frame {i}")
        assert time.monotonic() - started < 0.5
        started = time.monotonic()
        assert await recorder.aclose(timeout=0.2) is False
        assert time.monotonic() - started < 1.0
    finally:
        file.release.set()
        recorder._thread.join(5)
    assert not recorder._thread.is_alive()


async def test_backlog_over_its_bound_drops_and_says_so_with_a_gap_record(tmp_path: Path) -> None:
    file = BlockingFile()
    recorder = Recorder(file, max_backlog_bytes=2000)  # type: ignore[arg-type]
    await asyncio.to_thread(file.entered.wait, 5)  # the writer is stuck on the header
    for i in range(100):
        recorder.record_frame(1, "out", f"frame {i:03d}")
    dropped = recorder.stats.dropped
    assert 0 < dropped < 100  # the first frames were queued, the rest dropped
    file.release.set()
    last_queued = f"frame {99 - dropped:03d}".encode()
    assert await asyncio.to_thread(file.wait_for, last_queued)  # the backlog has drained
    recorder.record_frame(1, "in", "after")  # accepted again: a gap record goes first
    assert await recorder.aclose(timeout=5)
    path = tmp_path / "rec.jsonl"
    path.write_bytes(bytes(file.data))
    records = load_recording(path).records
    gap = [r for r in records if isinstance(r, OtherEvent)]
    assert len(gap) == 1 and gap[0].event == "gap" and gap[0].fields["dropped"] == dropped
    assert isinstance(records[-1], Frame) and records[-1].frame == "after"
    assert records[-2] is gap[0]


async def test_records_after_close_are_dropped_not_raised(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "rec.jsonl")
    assert await recorder.aclose()
    recorder.record_frame(1, "out", "late")
    assert await recorder.aclose()  # idempotent
    assert recorder.stats.dropped == 1
    assert load_recording(tmp_path / "rec.jsonl").records == ()


def test_close_sync_without_an_event_loop(tmp_path: Path) -> None:
    recorder = Recorder(tmp_path / "rec.jsonl")
    recorder.record_open(7)
    assert recorder.close_sync(timeout=5)
    assert shape(load_recording(tmp_path / "rec.jsonl").records) == [(7, "open")]


async def test_open_recorder_taps_a_websocket_transport_built_from_the_config(tmp_path: Path) -> None:
    from websockets.asyncio.server import ServerConnection, serve

    seen_headers: list[str | None] = []

    async def echo(ws: ServerConnection) -> None:
        assert ws.request is not None
        seen_headers.append(ws.request.headers.get("X-Validator-Version"))
        async for message in ws:
            await ws.send(f"echo {message!s}")

    async with serve(echo, "127.0.0.1", 0) as server:
        port = server.sockets[0].getsockname()[1]
        config = ClientConfig(url=f"ws://user:secret@127.0.0.1:{port}/ws/v0/?token=x", validator_version="1.2.3")
        recorder, transport = open_recorder(tmp_path / "rec.jsonl", config)
        assert isinstance(transport.inner, WebSocketTransport)
        await transport.connect()
        await transport.send("hello")
        async with asyncio.timeout(5):
            assert await transport.recv() == "echo hello"
        await transport.close()
        assert await recorder.aclose()
    assert seen_headers == ["1.2.3"]
    recording = load_recording(tmp_path / "rec.jsonl")
    assert recording.header.fields["url"] == f"ws://127.0.0.1:{port}/ws/v0/"  # no credentials or query
    assert recording.header.fields["validator_version"] == "1.2.3"
    assert shape(recording.records) == [(1, "open"), (1, "out", "hello"), (1, "in", "echo hello"), (1, "close", 1000)]


async def test_open_recorder_wraps_a_given_transport_and_reports_unwritable_paths(tmp_path: Path) -> None:
    config = ClientConfig(url="ws://127.0.0.1:9/ws/v0/")
    client, _peer = memory_transport_pair()
    recorder, transport = open_recorder(tmp_path / "rec.jsonl", config, client)
    assert transport.inner is client
    await recorder.aclose()
    with pytest.raises(RecordingError, match="cannot open recording file"):
        open_recorder(tmp_path / "missing-dir" / "rec.jsonl", config)


async def test_recording_transport_delegates_state() -> None:
    client, peer = memory_transport_pair()
    assert isinstance(peer, MemoryPeer)
    recorder = Recorder(io.BytesIO())
    transport = RecordingTransport(client, recorder)
    assert not transport.is_connected() and transport.close_info is None
    await transport.connect()
    assert transport.is_connected()
    await peer.close(3000, "")
    with pytest.raises(TransportClosed):
        await transport.recv()
    assert not transport.is_connected()
    info = transport.close_info
    assert info is not None and info.code == 3000
    await recorder.aclose()
