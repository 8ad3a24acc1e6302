"""The journal on the command line: `run`'s default file and flags, its refusals, and `journal PATH`."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import orjson
import pytest

from streams.devtools.simulator import FacilitatorSimulator
from streams.journal import Journal, summarize
from tests.helpers import ALICE, BOB

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parents[1]
JOB = "00000000-0000-4000-8000-00000000000a"

RUN_KEYS = ("--hotkey-uri", "//Alice", "--dispatcher", "simulated")
TRUST_SIM = ("--trusted-signer", BOB.ss58_address)
"""The simulator signs its jobs with //Bob: trusted where they must run (by default only own jobs do)."""



async def streams(*args: str, timeout: float = 30) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "streams", *args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Run:
    """`python -m streams run` in the background, stopped by SIGINT."""

    def __init__(self, url: str, *extra: str) -> None:
        self.args = ["run", "--url", url, *RUN_KEYS, *TRUST_SIM, "--step-delay", "0", *extra]
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> Run:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "streams", *self.args, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        return self

    async def stop(self) -> tuple[int, str]:
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
        _, err = await asyncio.wait_for(self.proc.communicate(), 10)
        assert self.proc.returncode is not None
        return self.proc.returncode, err.decode()

    async def __aexit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


def moved_aside(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if ".reset-" in p.name]


def one_error_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


async def test_run_journals_by_default_under_xdg_state_home_and_no_journal_turns_it_off() -> None:
    state = Path(os.environ["XDG_STATE_HOME"])  # the conftest gives each test its own
    default = state / "facilitator-streams" / f"{ALICE.ss58_address}.sqlite3"
    async with FacilitatorSimulator() as sim:
        async with Run(sim.url, "--no-journal") as run:
            await sim.wait_for(lambda: sim.authenticated_connections >= 1, 30, "connected")
            code, err = await run.stop()
        assert code == 0, err
    assert not default.exists(), "--no-journal wrote a journal"
    async with FacilitatorSimulator() as sim:
        sim.job_requests_on_auth(2)
        async with Run(sim.url) as run:
            await sim.wait_for(lambda: any(s[-1:] == ["completed"] for s in sim.stored.values()), 30, "a job done")
            assert run.proc is not None and summarize(default).holder_pid == run.proc.pid
            code, err = await run.stop()
        assert code == 0, err
    summary = summarize(default)
    assert summary.owner == ALICE.ss58_address and summary.holder_pid is None


async def test_run_refuses_a_bad_journal_with_one_error_line_and_journal_reset_moves_it_aside(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    path.write_text("this is not a journal")
    code, _, err = await streams("run", "--url", "ws://127.0.0.1:9/ws/v0/", *RUN_KEYS,
                                 "--journal", str(path))
    assert code == 2
    one_error_line(err, str(path), "not a journal", "--journal-reset")
    assert path.read_text() == "this is not a journal", "refused, untouched"

    async with FacilitatorSimulator() as sim:
        async with Run(sim.url, "--journal", str(path), "--journal-reset") as run:
            await sim.wait_for(lambda: sim.authenticated_connections >= 1, 30, "connected after the reset")
            code, err = await run.stop()
    assert code == 0, err
    assert "moved aside to" in err
    [kept] = moved_aside(tmp_path)
    assert kept.read_text() == "this is not a journal", "the old file is kept"
    assert summarize(path).schema_version >= 1


async def test_a_second_run_on_the_same_journal_is_refused_with_the_holders_pid(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    async with FacilitatorSimulator() as sim:
        async with Run(sim.url, "--journal", str(path)) as first:
            await sim.wait_for(lambda: sim.authenticated_connections >= 1, 30, "the first connected")
            code, _, err = await streams("run", "--url", sim.url, *RUN_KEYS, "--journal", str(path))
            assert first.proc is not None
            one_error_line(err, str(path), f"pid {first.proc.pid}")
            assert code == 2
            code, err = await first.stop()
        assert code == 0, err


async def test_journal_summary_lists_pending_updates_open_jobs_and_the_oldest_item(tmp_path: Path) -> None:
    path = tmp_path / "j.sqlite3"
    journal = Journal.open(path, owner="5Grw-alice")
    journal.job_dispatched(JOB)
    journal.record("V0MachineSpecsUpdate", '{"message_type": "V0MachineSpecsUpdate"}')
    for status in ("accepted", "executor_ready"):
        journal.record("V0JobStatusUpdate", f'{{"uuid": "{JOB}", "status": "{status}"}}', JOB, status)
    journal.close(timeout=5)

    code, out, err = await streams("journal", str(path))
    assert code == 0, err
    assert "pending updates (not answered by the facilitator; the next start sends them first): 3" in out
    assert "V0JobStatusUpdate: 2" in out and "V0MachineSpecsUpdate: 1" in out
    assert f"{JOB}  last status executor_ready" in out
    assert "oldest item: #1 V0MachineSpecsUpdate" in out
    assert "not in use" in out

    code, out, err = await streams("journal", str(path), "--json")
    assert code == 0, err
    data = orjson.loads(out)
    assert data["pending"] == 3 and data["pending_by_status"] == {"accepted": 1, "executor_ready": 1}
    assert [job["uuid"] for job in data["open_jobs"]] == [JOB] and data["oldest"]["seq"] == 1

    code, _, err = await streams("journal", str(tmp_path / "missing.sqlite3"))
    assert code == 2
    one_error_line(err, "missing.sqlite3", "does not exist")
    (tmp_path / "text").write_text("hello")
    code, _, err = await streams("journal", str(tmp_path / "text"))
    assert code == 2
    one_error_line(err, "not a journal")


async def test_journal_reset_with_no_journal_is_a_usage_error() -> None:
    code, _, err = await streams("run", "--url", "ws://127.0.0.1:9/ws/v0/", *RUN_KEYS,
                                 "--no-journal", "--journal-reset")
    assert code == 2
    one_error_line(err, "--journal-reset", "--no-journal")
    code, _, err = await streams("run", "--url", "ws://127.0.0.1:9/ws/v0/", *RUN_KEYS,
                                 "--no-journal", "--journal", "x.sqlite3")
    assert code == 2 and "not allowed with" in err

