"""Replay: loading (and refusing damaged files), virtual/real-time replay, summary, analysis, --serve."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
from reactivex.scheduler import HistoricalScheduler
from reactivex.testing import TestScheduler
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from streams.cli import main as cli_main
from streams.devtools.replay import (
    ConnectionEvent,
    Frame,
    Record,
    Recording,
    ReplayError,
    ReplayServer,
    analyze,
    load_recording,
    match_responses,
    playback_frames,
    replay,
    summarize,
)
from streams.devtools.replay.server import SUCCESS_FRAME
from streams.recording import open_recorder
from tests.helpers import fast_config, running_client

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[1]
CAPTURE = ROOT / "notebooks" / "data" / "real-facilitator-session.jsonl"
HEADER = {"format": "facilitator-capture", "version": 1, "captured_at": "2026-01-01T00:00:00+00:00"}


@pytest.fixture(scope="module")
def capture() -> Recording:
    return load_recording(CAPTURE)


def write_lines(path: Path, lines: Sequence[dict[str, Any] | str], *, newline_at_end: bool = True) -> Path:
    text = "\n".join(line if isinstance(line, str) else orjson.dumps(line).decode() for line in lines)
    path.write_text(text + ("\n" if newline_at_end else ""), encoding="utf-8")
    return path


def synthetic(path: Path, inbound: int, spacing: float) -> Recording:
    """One connection: open, auth, its answer, then ``inbound`` frames ``spacing`` seconds apart."""
    auth = '{"message_type": "V0AuthenticationRequest", "public_key": "00", "signature": "0x00"}'
    lines: list[dict[str, Any]] = [
        HEADER,
        {"t": 0.0, "conn": 1, "event": "open"},
        {"t": 0.01, "conn": 1, "dir": "out", "frame": auth},
        {"t": 0.02, "conn": 1, "dir": "in", "frame": SUCCESS_FRAME},
    ]
    lines += [{"t": 1.0 + i * spacing, "conn": 1, "dir": "in", "frame": f'{{"n": {i}}}'} for i in range(inbound)]
    return load_recording(write_lines(path, lines))


# --------------------------------------------------------------------------- the real capture


def test_the_real_capture_summarizes_to_what_is_in_it(capture: Recording) -> None:
    summary = summarize(capture)
    assert summary.records == 87
    assert summary.start == 1.5974 and summary.end == 3.7917
    assert summary.frames_out == {
        "V0JobStatusUpdate": 29,
        "V0AuthenticationRequest": 5,
        "V0Heartbeat": 3,
        "V0MachineSpecsUpdate": 1,
        "malformed": 1,
    }
    assert summary.frames_in == {"Response": 35, "V2JobRequest": 4, "V0JobCheated": 1}
    assert summary.responses == {"success": 26, "error": 9}
    assert summary.response_errors == {
        "auth.not_authenticated": 1,
        "json_invalid": 1,
        "auth.already_authenticated": 1,
        "job.integrity_error": 2,
        "job.not_found": 1,
        "extra_forbidden": 1,
        "auth.validator_not_found": 1,
        "auth.signature_invalid": 1,
    }
    # Every Response pairs with a frame; the one unanswered is the update cut off by the drop.
    assert len(summary.answered) == 35 and summary.unexpected_responses == 0
    (lost,) = summary.unanswered
    assert lost.conn == 1 and lost.sent.t == 3.2735 and '"accepted"' in str(lost.sent.frame)
    assert all(0 < latency < 0.05 for latency in summary.ack_latencies)

    conns = {c.conn: c for c in summary.connections}
    assert [(c.conn, c.close_code, c.auth) for c in summary.connections] == [
        (1, 1006, "success"),
        (2, 1000, "success"),
        (3, 3001, "auth.validator_not_found"),
        (4, 3000, "auth.signature_invalid"),
    ]
    assert conns[1].authenticated_at == 1.6236 and conns[2].authenticated_at == 3.3332
    assert [(o.after_conn, o.next_conn, round(o.duration, 4)) for o in summary.outages] == [
        (1, 2, 0.027),
        (2, 3, 0.0184),
        (3, 4, 0.005),
    ]
    text = summary.render()
    assert "conn 1 closed: 1006 client aborted the TCP connection" in text
    assert "conn 3 auth rejected: auth.validator_not_found" in text


def test_analysis_through_the_operators_agrees_with_the_plain_summary(capture: Recording) -> None:
    summary = summarize(capture)
    analysis = analyze(capture, bin_seconds=0.5)
    assert analysis.message_mix == {"in": dict(summary.frames_in), "out": dict(summary.frames_out)}
    assert [(a["sent_at"], a["answered_at"], a["kind"]) for a in analysis.acks] == [
        (a.sent.t, a.response.t, a.kind) for a in summary.answered if a.response is not None
    ]
    assert [(u["sent_at"], u["cut_by"]) for u in analysis.unanswered] == [(3.2735, "disconnect")]
    # The frame the drop left unanswered is held by the outbox until conn 2 authenticates,
    # and it is exactly the frame the client resent first on conn 2.
    assert analysis.outbox_depth == [(1.5974, 0), (3.2736, 1), (3.3332, 0)]
    (resent,) = analysis.resent
    first_on_conn_2 = next(f for f in capture.frames("out") if f.conn == 2 and "JobStatusUpdate" in str(f.frame))
    assert resent["released_at"] == 3.3332 and resent["frame"] == first_on_conn_2.frame
    assert analysis.in_flight[-1][1] == 0 and max(n for _, n in analysis.in_flight) >= 1
    # Rates: frames per second per bin add up to the counts.
    for direction in ("in", "out"):
        for kind, series in analysis.rates[direction].items():
            assert len(series) == len(analysis.rate_bins)
            assert round(sum(series) * analysis.bin_seconds) == analysis.message_mix[direction][kind]
    assert analysis.rate_bins[0] == 1.5 and analysis.rate_bins[-1] == 3.5
    assert [c["close_code"] for c in analysis.connections] == [1006, 1000, 3001, 3000]
    assert len(analysis.outages) == 3 and not analysis.malformed and not analysis.dropped


def test_playback_frames_leave_out_the_recorded_auth_answers(capture: Recording) -> None:
    inbound = capture.frames("in")
    played = playback_frames(capture)
    auth_answers = [a.response for a in match_responses(capture).acks if a.kind == "V0AuthenticationRequest"]
    assert len(auth_answers) == 5  # 4 connections, one of them authenticated twice
    assert len(played) == len(inbound) - 5
    assert all(frame not in auth_answers for frame in played)
    assert playback_frames(capture, include_auth_responses=True) == inbound


# --------------------------------------------------------------------------- replay in time


def collect(scheduler: Any, observable: Any) -> tuple[list[tuple[float, Record]], list[float]]:
    emitted: list[tuple[float, Record]] = []
    completed: list[float] = []
    origin = scheduler.now

    def now() -> float:
        elapsed: timedelta = scheduler.now - origin
        return elapsed.total_seconds()

    observable.subscribe(lambda r: emitted.append((now(), r)), on_completed=lambda: completed.append(now()))
    scheduler.start()
    return emitted, completed


@pytest.mark.parametrize("scheduler_type", [TestScheduler, HistoricalScheduler])
@pytest.mark.parametrize("speed", [1.0, 4.0])
def test_virtual_time_replay_emits_every_record_at_its_offset(
    capture: Recording, scheduler_type: type, speed: float
) -> None:
    scheduler = scheduler_type()
    started = time.monotonic()
    emitted, completed = collect(scheduler, replay(capture, scheduler, speed=speed))
    # No real waiting: pacing in real time would take the traffic's whole duration (3.8 s) at speed 1.
    assert time.monotonic() - started < capture.end
    assert [r for _, r in emitted] == list(capture.records)
    for at, record in emitted:
        assert at == pytest.approx(record.t / speed, abs=1e-6)
    assert completed == [pytest.approx(capture.end / speed, abs=1e-6)]


def test_replay_uses_the_subscribe_scheduler_and_is_cold(capture: Recording) -> None:
    scheduler = TestScheduler()
    observable = replay(capture)
    first: list[Record] = []
    second: list[Record] = []
    observable.subscribe(first.append, scheduler=scheduler)
    observable.subscribe(second.append, scheduler=scheduler)
    scheduler.start()
    assert first == second == list(capture.records)


def test_disposing_stops_the_replay(capture: Recording) -> None:
    scheduler = TestScheduler()
    emitted: list[Record] = []
    subscription = replay(capture, scheduler).subscribe(emitted.append)
    scheduler.advance_to(2.0)
    subscription.dispose()
    scheduler.start()
    assert emitted == [r for r in capture.records if r.t <= 2.0]


def test_infinite_speed_and_empty_recordings(tmp_path: Path, capture: Recording) -> None:
    scheduler = TestScheduler()
    emitted, completed = collect(scheduler, replay(capture, scheduler, speed=math.inf))
    assert [r for _, r in emitted] == list(capture.records) and {at for at, _ in emitted} == {0.0}
    empty = load_recording(write_lines(tmp_path / "empty.jsonl", [HEADER]))
    emitted, completed = collect(scheduler, replay(empty, scheduler))
    assert emitted == [] and len(completed) == 1
    with pytest.raises(ValueError, match="speed"):
        replay(capture, scheduler, speed=0)


async def test_real_time_replay_on_the_event_loop_with_a_speed_factor(capture: Recording) -> None:
    speed = 40.0  # 3.8 s of traffic in ~95 ms
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    emitted: list[tuple[float, Record]] = []
    started = loop.time()
    replay(capture, speed=speed).subscribe(  # no scheduler: the running loop's
        lambda r: emitted.append((loop.time() - started, r)),
        on_completed=lambda: done.set_result(None),
    )
    async with asyncio.timeout(5):
        await done
    assert [r for _, r in emitted] == list(capture.records)
    for at, record in emitted:
        assert at >= record.t / speed - 0.005  # never early (timer granularity aside)
    assert emitted[-1][0] < capture.end / speed + 1.0


def test_replay_outside_a_loop_without_a_scheduler_says_what_to_do(capture: Recording) -> None:
    errors: list[Exception] = []
    try:
        replay(capture).subscribe(on_error=errors.append)
    except ValueError as exc:
        errors.append(exc)
    assert errors and "needs a scheduler" in str(errors[0])


# --------------------------------------------------------------------------- damaged recordings

OPEN = {"t": 1.0, "conn": 1, "event": "open"}
OUT = {"t": 1.5, "conn": 1, "dir": "out", "frame": "{}"}


@pytest.mark.parametrize(
    ("lines", "line", "message"),
    [
        ([], 1, "empty recording: no header"),
        ([OPEN, OUT], 1, "missing header: the first line is a record"),
        ([{"hello": 1}, OPEN], 1, 'missing header: the first line has no "format"'),
        ([{**HEADER, "format": "pcap"}], 1, "format is 'pcap', expected 'facilitator-capture'"),
        ([{**HEADER, "version": 2}], 1, "unsupported version 2"),
        ([{"format": "facilitator-capture"}], 1, 'no "version"'),
        ([HEADER, OPEN, "{not json", OUT], 3, "not JSON"),
        ([HEADER, OPEN, "[1, 2]"], 3, "expected a JSON object, got an array"),
        ([HEADER, OPEN, {"conn": 1, "dir": "in", "frame": "x"}], 3, 'missing field "t"'),
        ([HEADER, {"t": "soon", "conn": 1, "event": "open"}], 2, '"t" must be a number'),
        ([HEADER, {"t": -0.5, "conn": 1, "event": "open"}], 2, "negative time"),
        ([HEADER, OPEN, OUT, {**OUT, "t": 1.2}], 4, "time goes backwards: t=1.2 after t=1.5 on line 3"),
        ([HEADER, {"t": 1.0, "event": "open"}], 2, 'missing field "conn"'),
        ([HEADER, {"t": 1.0, "conn": "one", "event": "open"}], 2, '"conn" must be a connection number'),
        ([HEADER, OPEN, {"t": 1.0, "conn": 1, "dir": "in"}], 3, 'missing field "frame"'),
        ([HEADER, OPEN, {"t": 1.0, "conn": 1, "dir": "up", "frame": "x"}], 3, '"dir" must be "in" or "out"'),
        ([HEADER, OPEN, {"t": 1.0, "conn": 1, "dir": "in", "frame": 5}], 3, '"frame" must be a string'),
        ([HEADER, OPEN, {"t": 1.0, "conn": 1, "dir": "in", "frame_b64": "!!"}], 3, "not valid base64"),
        ([HEADER, OPEN, {"t": 2.0, "conn": 1, "event": "close"}], 3, 'missing field "code"'),
        ([HEADER, OPEN, {"t": 2.0, "conn": 1, "event": "close", "code": "x"}], 3, '"code" must be an integer'),
        ([HEADER, OPEN, {"t": 2.0, "conn": 1}], 3, 'needs "dir" (a frame) or "event"'),
    ],
)
def test_damaged_recordings_name_the_line_and_the_problem(
    tmp_path: Path, lines: list[Any], line: int, message: str
) -> None:
    path = write_lines(tmp_path / "bad.jsonl", lines) if lines else tmp_path / "bad.jsonl"
    if not lines:
        path.write_bytes(b"")
    with pytest.raises(ReplayError) as info:
        load_recording(path)
    assert info.value.line == line
    assert message in str(info.value)
    assert str(info.value).startswith(f"{path}: line {line}: ")


def test_a_truncated_last_line_is_reported_or_dropped_on_request(tmp_path: Path) -> None:
    text = CAPTURE.read_text(encoding="utf-8")
    path = tmp_path / "cut.jsonl"
    path.write_text(text[: len(text) - 40], encoding="utf-8")  # cut in the middle of the last record
    with pytest.raises(ReplayError, match=r"line 88: truncated last line"):
        load_recording(path)
    recording = load_recording(path, allow_truncated=True)
    assert len(recording.records) == 86
    # A complete last line without its newline is fine.
    path.write_text(text.rstrip("\n"), encoding="utf-8")
    assert len(load_recording(path).records) == 87


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ReplayError, match="cannot read the recording"):
        load_recording(tmp_path / "nope.jsonl")


def test_blank_lines_binary_frames_and_unknown_events_load(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "ok.jsonl",
        [
            HEADER,
            "",
            OPEN,
            {"t": 1.1, "conn": 1, "dir": "in", "frame_b64": "AP8="},
            {"t": 1.2, "event": "gap", "dropped": 3},
        ],
    )
    recording = load_recording(path)
    assert isinstance(recording.records[0], ConnectionEvent) and recording.records[0].line == 3
    frame = recording.records[1]
    assert isinstance(frame, Frame) and frame.frame == b"\x00\xff"
    assert summarize(recording).gaps == 3


def test_cli_prints_the_summary_or_a_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["replay", str(CAPTURE)]) == 0
    out = capsys.readouterr().out
    assert "87 records" in out and "frames in:  40" in out and "outage 27.0 ms" in out
    bad = write_lines(tmp_path / "bad.jsonl", [HEADER, OPEN, "{oops"])
    assert cli_main(["replay", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"error: {bad}: line 3: not JSON (unexpected character: line 1 column 2 (char 1))" or (
        err.startswith(f"error: {bad}: line 3: not JSON") and err.count("\n") == 1
    )


# --------------------------------------------------------------------------- --serve


@pytest.fixture
def auth(capture: Recording) -> str:
    frame = next(f.frame for f in capture.frames("out") if "V0AuthenticationRequest" in str(f.frame))
    assert isinstance(frame, str)
    return frame


async def read_until_closed(ws: ClientConnection) -> list[str | bytes]:
    frames: list[str | bytes] = []
    try:
        async for message in ws:
            frames.append(message)
    except ConnectionClosed:
        pass
    return frames


@pytest.fixture
async def server_for(capture: Recording) -> AsyncIterator[Any]:
    servers: list[ReplayServer] = []

    async def start(recording: Recording = capture, **kwargs: Any) -> ReplayServer:
        server = ReplayServer(recording, **kwargs)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.aclose()


async def test_serve_plays_the_recorded_inbound_frames_to_a_client(
    capture: Recording, auth: str, server_for: Any
) -> None:
    server = await server_for(speed=20.0)
    async with asyncio.timeout(10):
        async with connect(server.url) as ws:
            await ws.send('{"message_type": "V0Heartbeat"}')  # before auth: refused, as the real one does
            assert '"auth.not_authenticated"' in str(await ws.recv())
            started = time.monotonic()
            await ws.send(auth)
            received = await read_until_closed(ws)
            elapsed = time.monotonic() - started
            assert ws.close_code == 1000
        await server.wait_done()
    expected = [f.frame for f in playback_frames(capture)]
    assert received == [SUCCESS_FRAME, *expected]
    span = playback_frames(capture)[-1].t - playback_frames(capture)[0].t
    assert elapsed >= span / 20.0 * 0.9  # the original spacing, sped up 20x
    assert server.received[:2] == ['{"message_type": "V0Heartbeat"}', auth]
    assert server.delivered == len(expected) and server.done


async def test_serve_all_frames_includes_the_recorded_auth_answers(
    capture: Recording, auth: str, server_for: Any
) -> None:
    server = await server_for(speed=math.inf, include_auth_responses=True)
    async with asyncio.timeout(10), connect(server.url) as ws:
        await ws.send(auth)
        received = await read_until_closed(ws)
    assert received == [SUCCESS_FRAME, *(f.frame for f in capture.frames("in"))]


async def test_a_new_connection_takes_over_and_resumes_the_playback(tmp_path: Path, auth: str, server_for: Any) -> None:
    recording = synthetic(tmp_path / "ten.jsonl", inbound=10, spacing=1.0)
    server = await server_for(recording, speed=20.0)  # a frame every 50 ms
    expected = [f.frame for f in playback_frames(recording)]
    assert len(expected) == 10
    async with asyncio.timeout(10):
        first = await connect(server.url)
        await first.send(auth)
        assert await first.recv() == SUCCESS_FRAME
        head = [await first.recv() for _ in range(3)]
        async with connect(server.url) as second:  # the client reconnects (the old link is half-dead)
            await second.send(auth)
            tail = await read_until_closed(second)
        rest_of_first = await read_until_closed(first)
        assert first.close_code == 1001 and second.close_code == 1000
    assert head == expected[:3]
    assert tail[0] == SUCCESS_FRAME
    assert head + rest_of_first + tail[1:] == expected  # nothing lost, nothing twice
    assert server.connections == 2 and server.done


async def test_the_real_client_receives_the_same_inbound_sequence(
    tmp_path: Path, capture: Recording, server_for: Any
) -> None:
    """Replay --serve → the real FacilitatorClient, recording its transport → same inbound frames."""
    server = await server_for(speed=20.0)
    config = fast_config(server.url)
    recorder, transport = open_recorder(tmp_path / "client.jsonl", config)
    try:
        async with asyncio.timeout(20):
            async with running_client(config, transport=transport):
                await server.wait_done()
                await server.aclose()  # its connection tasks are not the client's: end them first
    finally:
        assert await recorder.aclose()
    seen = load_recording(tmp_path / "client.jsonl")
    first_connection = [f.frame for f in seen.frames("in") if f.conn == 1]
    assert first_connection == [SUCCESS_FRAME, *(f.frame for f in playback_frames(capture))]
    assert server.received[0] == next(f.frame for f in seen.frames("out") if f.conn == 1)  # its auth request
    # The client dispatched the recorded job requests and reported on them: their signer (//Bob) is trusted
    # in fast_config; by default (own hotkey only) they would all be reported `rejected`.
    statuses = [orjson.loads(frame) for frame in server.received if '"V0JobStatusUpdate"' in str(frame)]
    assert statuses and "received" in {s["status"] for s in statuses}
    assert not [s for s in statuses if s["status"] == "rejected"], statuses


# --------------------------------------------------------------------------- the CLI as a process


async def start_cli(*args: str) -> tuple[asyncio.subprocess.Process, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "streams",
        "replay",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert process.stdout is not None
    async with asyncio.timeout(20):
        line = (await process.stdout.readline()).decode()
    assert line.startswith("replaying "), line
    url = line.split(" at ", 1)[1].split(" ", 1)[0]
    return process, url


async def test_cli_serve_ends_when_the_frames_are_played(capture: Recording, auth: str) -> None:
    process, url = await start_cli(str(CAPTURE), "--serve", "--port", "0", "--speed", "50")
    try:
        async with asyncio.timeout(20):
            async with connect(url) as ws:
                await ws.send(auth)
                received = await read_until_closed(ws)
            out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        assert received == [SUCCESS_FRAME, *(f.frame for f in playback_frames(capture))]
        assert b"done: played 35 of 35 frames over 1 connection(s)" in out
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_cli_serve_exits_promptly_on_sigint() -> None:
    process, _url = await start_cli(str(CAPTURE), "--serve", "--port", "0")
    try:
        process.send_signal(signal.SIGINT)
        started = time.monotonic()
        async with asyncio.timeout(10):
            out, err = await process.communicate()
        assert time.monotonic() - started < 2.0
        assert process.returncode == 0 and b"Traceback" not in err, err.decode()
        assert b"interrupted: played 0 of 35 frames" in out
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_cli_serve_reports_a_busy_port(tmp_path: Path) -> None:
    blocker = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = blocker.sockets[0].getsockname()[1]
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "streams",
            "replay",
            str(CAPTURE),
            "--serve",
            "--port",
            str(port),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        async with asyncio.timeout(20):
            _out, err = await process.communicate()
        assert process.returncode == 2
        assert err.decode().startswith(f"error: cannot listen on 127.0.0.1:{port}")
    finally:
        blocker.close()
        await blocker.wait_closed()


def test_frames_in_flight_when_the_recording_ends_are_not_resent(tmp_path: Path) -> None:
    update = (
        '{"message_type": "V0JobStatusUpdate", "uuid": "2dcdf287-e485-408f-b2d2-ad0d3c8f9237", "status": "accepted"}'
    )
    auth = '{"message_type": "V0AuthenticationRequest", "public_key": "00", "signature": "0x00"}'
    recording = load_recording(
        write_lines(
            tmp_path / "open-ended.jsonl",
            [
                HEADER,
                {"t": 0.0, "conn": 1, "event": "open"},
                {"t": 0.1, "conn": 1, "dir": "out", "frame": auth},
                {"t": 0.2, "conn": 1, "dir": "in", "frame": SUCCESS_FRAME},
                {"t": 0.3, "conn": 1, "dir": "out", "frame": '{"message_type": "V0Heartbeat"}'},
                {"t": 0.4, "conn": 1, "dir": "out", "frame": update},
            ],
        )
    )
    analysis = analyze(recording)
    assert [(u["sent_at"], u["cut_by"]) for u in analysis.unanswered] == [(0.4, "end of recording")]
    assert analysis.resent == [] and analysis.outbox_depth == [(0.0, 0)]
    assert [a["kind"] for a in analysis.acks] == ["V0AuthenticationRequest"]  # the heartbeat expects nothing
    summary = summarize(recording)
    assert [a.sent.t for a in summary.unanswered] == [0.4] and summary.outages == ()
