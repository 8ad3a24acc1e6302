"""The demo end to end: nothing lost, a recording whose replay matches the live figures."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from streams.devtools.demo import print_summary, run_demo
from streams.devtools.replay import analyze, load_recording, summarize

pytestmark = pytest.mark.timeout(90)
ROOT = Path(__file__).resolve().parents[1]


async def test_demo_with_faults_loses_nothing_and_its_recording_replays_to_the_same_counts(tmp_path: Path) -> None:
    record = tmp_path / "demo.jsonl"
    result = await run_demo(jobs=12, faults=True, seed=3, step_delay=0.05, record=record, live=False)
    assert result.ok, result
    assert result.completed + result.failed == 12
    assert result.lost == 0 and result.reordered == 0
    assert sum(result.disconnects.values()) >= 3  # the injected faults happened and were explained
    counters = result.metrics["counters"]

    recording = load_recording(record)
    summary = summarize(recording)
    # What the recording saw leave and arrive is what the live client counted.
    # (a write the dying connection refused was attempted: recorded, counted as send_failed, retried)
    attempted = counters["messages.sent.V0JobStatusUpdate"] + counters.get("messages.send_failed.V0JobStatusUpdate", 0)
    assert summary.frames_out.get("V0JobStatusUpdate", 0) == attempted
    assert summary.frames_in.get("V2JobRequest", 0) == counters["messages.received.V2JobRequest"]
    assert summary.frames_in.get("V0JobCheated", 0) == counters["cheat.reports"]
    answered = counters.get("acks.success", 0) + counters.get("acks.duplicate", 0)
    assert answered == sum(1 for ack in summary.answered if ack.kind == "V0JobStatusUpdate")
    assert len(summary.connections) == counters["connect.attempts"]
    # The operator-based analysis of the recording agrees with the live counters too.
    analysis = analyze(recording)
    assert analysis.message_mix["out"].get("V0JobStatusUpdate", 0) == attempted
    assert sum(1 for ack in analysis.acks if ack["kind"] == "V0JobStatusUpdate") == answered
    assert len(analysis.connections) == len(summary.connections)

    out = io.StringIO()
    print_summary(result, out)
    text = out.getvalue()
    assert "0 lost" in text and str(record) in text and "OK: nothing lost" in text


def test_make_demo_command_exits_zero_and_prints_the_summary(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "streams", "demo", "--jobs", "8", "--step-delay", "0.05",
         "--record", str(tmp_path / "d.jsonl")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=80,
    )
    assert proc.returncode == 0, proc.stderr
    assert "summary" in proc.stdout and "0 lost" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert (tmp_path / "d.jsonl").stat().st_size > 0


def test_demo_exits_promptly_on_sigint(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "streams", "demo", "--jobs", "200", "--record", str(tmp_path / "d.jsonl")],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # the banner: the demo is running
        proc.send_signal(signal.SIGINT)
        _out, err = proc.communicate(timeout=5)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "was never awaited" not in err and "Task was destroyed" not in err
