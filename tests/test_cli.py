"""`python -m streams run`: clean exits on SIGINT/SIGTERM, one-line errors for bad input."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from streams.devtools.simulator import FacilitatorSimulator

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[1]
WARNINGS = ("Traceback", "Task was destroyed but it is pending", "was never awaited", "Exception ignored")


RUN = ["run", "--dispatcher", "simulated"]
BOB_SS58 = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"
"""//Bob signs the simulator's jobs: trusted where a test needs them to run (by default only own jobs do)."""


def streams_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "streams", *args]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONWARNINGS": "default"}


@pytest.mark.parametrize(("sig", "times"), [(signal.SIGINT, 1), (signal.SIGTERM, 1), (signal.SIGINT, 2)])
async def test_run_exits_promptly_on_a_signal_without_warnings(sig: signal.Signals, times: int) -> None:
    async with FacilitatorSimulator(seed=21) as sim:
        sim.job_requests_on_auth(5)
        proc = subprocess.Popen(  # noqa: ASYNC220 - a child process under test, not awaited I/O
            streams_cmd("run", "--url", sim.url, "--hotkey-uri", "//Alice", "--dispatcher", "simulated",
                        "--trusted-signer", BOB_SS58, "--step-delay", "60", "--heartbeat-period", "0.2"),
            cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        try:
            # Running jobs (60 s per step) and a live connection: the teardown has work to do. A teardown
            # that waited for a job step would take a minute; the bound below is generous for a busy machine.
            await sim.wait_for(lambda: len(sim.frames_of("V0JobStatusUpdate")) >= 5, 20, "jobs received")
            assert not any(f["status"] == "rejected" for f in sim.frames_of("V0JobStatusUpdate")), "jobs run"
            sent_at = time.monotonic()
            for _ in range(times):  # a second Ctrl-C does not cut the teardown short
                proc.send_signal(sig)
            await asyncio.to_thread(proc.wait, 20)
            took = time.monotonic() - sent_at
            _out, err = proc.communicate(timeout=5)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err
        assert took < 15.0, f"exited {took:.2f} s after {sig.name}"
        for warning in WARNINGS:
            assert warning not in err, err
        await sim.wait_for(lambda: sim.connection_log[max(sim.connection_log)].close_code is not None, 5, "closed")
        assert sim.connection_log[max(sim.connection_log)].close_code == 1000


LOCAL = ["--url", "ws://127.0.0.1:1/ws/v0/", "--hotkey-uri", "//Alice"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["run", *LOCAL], "--dispatcher is required: `celery`, MODULE:ATTR (your own), channels:MODULE:ATTR or"),
        ([*RUN, *LOCAL, "--trusted-signer", "5Fnot"], "--trusted-signer: '5Fnot' is not a valid ss58 address"),
        ([*RUN, *LOCAL, "--trusted-signers-file", "/nonexistent"], "cannot read --trusted-signers-file /nonexistent"),
        ([*RUN, "--url", "http://example.com", "--hotkey-uri", "//Alice"], "ws:// or wss://"),
        ([*RUN, "--url", "ws://127.0.0.1:99999/ws/v0/", "--hotkey-uri", "//Alice"], "invalid port"),
        ([*RUN, "--url", "ws://127.0.0.1:1/ws/v0/", "--wallet-name", "nope", "--wallet-hotkey", "nope",
          "--wallet-path", "/nonexistent"], "cannot read hotkey"),
        ([*RUN, "--url", "ws://127.0.0.1:1/ws/v0/"], "a hotkey is required"),
        ([*RUN, *LOCAL, "--ping-interval", "-1"], "must be > 0"),
        ([*RUN, *LOCAL, "--bogus"], "unrecognized"),
        ([*RUN, *LOCAL, "--dispatcher", "nomodule:x"], "cannot load dispatcher"),
        ([*RUN, *LOCAL, "--statsd", "nohostport"], "HOST:PORT"),
        ([*RUN, *LOCAL, "--events", "/nonexistent/dir/e.jsonl"], "cannot open --events"),
    ],
)
def test_bad_input_gets_one_line_and_exit_status_2(args: list[str], message: str) -> None:
    proc = subprocess.run(streams_cmd(*args), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]


def test_unreadable_wallet_file_is_a_one_line_error(tmp_path: Path) -> None:
    hotkeys = tmp_path / "w" / "hotkeys"
    hotkeys.mkdir(parents=True)
    (hotkeys / "h").write_text("{this is not a keyfile")
    proc = subprocess.run(
        streams_cmd(*RUN, "--url", "ws://127.0.0.1:1/ws/v0/", "--wallet-name", "w", "--wallet-hotkey", "h",
                    "--wallet-path", str(tmp_path)),
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: cannot read hotkey"), proc.stderr


def test_trusted_signers_file_lines_are_checked_and_named(tmp_path: Path) -> None:
    signers = tmp_path / "signers.txt"
    signers.write_text(
        "# who may sign jobs\n5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty  # //Bob\n\nnot-an-address\n"
    )
    proc = subprocess.run(
        streams_cmd(*RUN, "--url", "ws://127.0.0.1:1/ws/v0/", "--hotkey-uri", "//Alice",
                    "--trusted-signers-file", str(signers)),
        cwd=ROOT, env=env(), capture_output=True, text=True, timeout=30,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"error: {signers}:4: 'not-an-address' is not a valid ss58 address")
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_trusted_signers_reach_the_client_config(tmp_path: Path) -> None:
    from streams.cli.run import load_trusted_signers

    bob = "5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty"
    charlie = "5FLSigC9HGRKVhB9FiEo4Y3koPsNmBmLJbpXg2mp1hXcS59Y"
    signers = tmp_path / "signers.txt"
    signers.write_text(f"# ops\n{charlie}\n  {bob} # again\n")
    assert load_trusted_signers([bob], signers) == (bob, charlie)
    assert load_trusted_signers([], None) == ()
