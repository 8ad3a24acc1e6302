"""The journal on its own: durability, order, pruning, recovery listing, and every bad state it refuses.

Processes are used where the thing under test is per process: the file lock (a holder's pid), a
file-size rlimit (a full disk), and a read-only directory (as root, the child drops to ``nobody``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from streams import journal as journal_module
from streams.exceptions import StreamsError
from streams.journal import (
    APPLICATION_ID,
    Journal,
    JournalError,
    JournalLocked,
    default_path,
    reset,
    summarize,
)

ROOT = Path(__file__).resolve().parent.parent
STATUS = "V0JobStatusUpdate"
SPEC = "V0MachineSpecsUpdate"
JOB_A = "00000000-0000-4000-8000-00000000000a"
JOB_B = "00000000-0000-4000-8000-00000000000b"


def frame(job: str, status: str) -> str:
    return orjson.dumps({"message_type": STATUS, "uuid": job, "status": status, "metadata": None}).decode()


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "journal.sqlite3"


@pytest.fixture
def opened(path: Path) -> Iterator[Journal]:
    journal = Journal.open(path)
    try:
        yield journal
    finally:
        journal.close(timeout=5)


def run_child(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=timeout, check=False,
    )


def file_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists())


# -- durability, order, pruning, recovery ---------------------------------------------------------------


async def test_an_update_is_durable_only_once_its_batch_committed_and_a_reopen_lists_it(path: Path) -> None:
    journal = Journal.open(path)
    journal.start()
    seq = journal.record(STATUS, frame(JOB_A, "received"), JOB_A, "received")
    assert not journal.is_durable(seq), "durable before the writer committed it"
    assert await journal.wait_durable(seq, timeout=10)
    assert journal.stats().commits >= 1
    # Kill-like: the row is on disk although the journal was never closed (another connection reads it).
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT seq, frame FROM updates").fetchall() == [(seq, frame(JOB_A, "received"))]
    assert await journal.aclose(timeout=5)
    again = Journal.open(path)
    try:
        [pending] = again.recovery.updates
        assert (pending.seq, pending.kind, pending.job_uuid, pending.status) == (seq, STATUS, JOB_A, "received")
        assert pending.frame == frame(JOB_A, "received")
        assert again.record(STATUS, frame(JOB_A, "accepted"), JOB_A, "accepted") == seq + 1, "seq restarts after"
    finally:
        again.close(timeout=5)


async def test_one_loop_iteration_is_one_transaction_not_one_per_update(opened: Journal) -> None:
    opened.start()
    seqs = [opened.record(STATUS, frame(JOB_A, "accepted"), JOB_A, "accepted") for _ in range(2_000)]
    assert await opened.wait_durable(seqs[-1], timeout=10)
    assert opened.stats().commits == 1, "2,000 records made in one loop iteration must commit together"
    assert all(opened.is_durable(seq) for seq in seqs)


async def test_recovery_lists_what_was_not_answered_in_record_order_across_many_batches(path: Path) -> None:
    journal = Journal.open(path)
    journal.start()
    recorded: list[tuple[int, str]] = []
    for batch in range(30):
        for i in range(7):
            text = frame(JOB_A if i % 2 else JOB_B, "accepted").replace("accepted", f"accepted-{batch}-{i}")
            recorded.append((journal.record(STATUS if i else SPEC, text, None, None), text))
        await asyncio.sleep(0)  # the next records land in another loop iteration: another batch
    answered = {seq for n, (seq, _) in enumerate(recorded) if n % 3 == 0}
    for seq in answered:
        journal.answered(seq)
    assert await journal.flush(timeout=10)
    assert journal.pending == len(recorded) - len(answered)
    assert await journal.aclose(timeout=5)

    again = Journal.open(path)
    try:
        listed = [(u.seq, u.frame) for u in again.recovery.updates]
        assert listed == [item for item in recorded if item[0] not in answered]
        assert [u.kind for u in again.recovery.updates].count(SPEC) == sum(
            1 for n, _ in enumerate(recorded) if n % 7 == 0 and n % 3 != 0
        )
    finally:
        again.close(timeout=5)


async def test_answered_rows_are_pruned_and_the_file_stays_bounded(path: Path) -> None:
    journal = Journal.open(path)
    journal.start()
    payload = "x" * 2_000
    sizes = []
    for wave in range(8):
        seqs = [journal.record(STATUS, payload, JOB_A, "accepted") for _ in range(1_000)]
        assert await journal.flush(timeout=20)
        for seq in seqs:
            journal.answered(seq)
        assert await journal.flush(timeout=20)
        assert journal.pending == 0, f"wave {wave}"
        with contextlib.closing(sqlite3.connect(path)) as db:
            assert db.execute("SELECT count(*) FROM updates").fetchone()[0] == 0
        sizes.append(file_bytes(path))
    assert journal.stats().bytes > 0
    assert await journal.aclose(timeout=5)
    # Eight waves of 2 MB went through; the file reuses its pages instead of growing with each wave.
    print(f"file sizes after each wave: {sizes}")
    assert max(sizes[2:]) <= 1.5 * max(sizes[:2]), sizes


async def test_jobs_keep_their_last_status_until_a_final_one_and_only_in_process_jobs_are_listed(path: Path) -> None:
    journal = Journal.open(path)
    journal.start()
    journal.job_dispatched(JOB_A)
    journal.job_dispatched(JOB_B)
    for job, status in [(JOB_A, "accepted"), (JOB_B, "accepted"), (JOB_A, "executor_ready"), (JOB_B, "completed")]:
        journal.record(STATUS, frame(job, status), job, status)
    other = "00000000-0000-4000-8000-0000000000cc"  # a Celery job: statuses journaled, never listed as a job
    journal.record(STATUS, frame(other, "accepted"), other, "accepted")
    assert journal.open_jobs == 1
    assert await journal.aclose(timeout=5)
    again = Journal.open(path)
    try:
        assert [(j.uuid, j.last_status) for j in again.recovery.jobs] == [(JOB_A, "executor_ready")]
        assert again.open_jobs == 1
        again.record(STATUS, frame(JOB_A, "horde_failed"), JOB_A, "horde_failed")
        assert again.open_jobs == 0
    finally:
        again.close(timeout=5)
    third = Journal.open(path)
    try:
        assert third.recovery.jobs == ()
    finally:
        third.close(timeout=5)


def test_records_before_start_are_written_by_close(path: Path) -> None:
    journal = Journal.open(path)
    seq = journal.record(SPEC, '{"message_type": "V0MachineSpecsUpdate"}')
    assert journal.close(timeout=5)
    again = Journal.open(path)
    try:
        assert [u.seq for u in again.recovery.updates] == [seq]
    finally:
        again.close(timeout=5)
    with pytest.raises(RuntimeError, match="closed"):
        journal.record(SPEC, "{}")


# -- files it refuses ---------------------------------------------------------------------------------


def assert_actionable(error: JournalError, path: Path, *words: str) -> None:
    text = str(error)
    assert str(path) in text, text
    for word in words:
        assert word in text, text


def test_a_file_that_is_not_sqlite_is_refused_with_the_way_out(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.write_text("hello, I am a shopping list\n" * 100)
    with pytest.raises(JournalError) as caught:
        Journal.open(path)
    assert_actionable(caught.value, path, "not a journal", "--journal-reset")
    assert isinstance(caught.value, StreamsError)
    assert path.read_text().startswith("hello"), "a refused file is never touched"


def test_a_foreign_sqlite_database_is_refused(path: Path) -> None:
    path.parent.mkdir(parents=True)
    with contextlib.closing(sqlite3.connect(path)) as db:
        db.execute("CREATE TABLE recipes (name TEXT)")
    with pytest.raises(JournalError) as caught:
        Journal.open(path)
    assert_actionable(caught.value, path, "not a facilitator-streams journal", "--journal-reset")


def test_a_corrupt_journal_is_refused(path: Path) -> None:
    journal = Journal.open(path)
    for i in range(500):
        journal.record(STATUS, frame(JOB_A, "accepted") + " " * i, JOB_A, "accepted")
    journal.close(timeout=5)
    data = bytearray(path.read_bytes())
    assert len(data) > 8192
    data[4096:] = os.urandom(len(data) - 4096)  # keep the header, scramble every page after the first
    path.write_bytes(bytes(data))
    with pytest.raises(JournalError) as caught:
        Journal.open(path)
    assert_actionable(caught.value, path, "corrupt", "--journal-reset")


def test_a_newer_schema_is_refused_and_an_older_one_is_migrated(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    journal = Journal.open(path)
    seq = journal.record(STATUS, frame(JOB_A, "accepted"), JOB_A, "accepted")
    journal.close(timeout=5)

    # A (pretend) version 2 adds a column: opening the version-1 file migrates it and keeps its rows.
    def to_v2(db: sqlite3.Connection) -> None:
        db.execute("ALTER TABLE updates ADD COLUMN priority INTEGER NOT NULL DEFAULT 0")

    monkeypatch.setattr(journal_module, "SCHEMA_VERSION", 2)
    monkeypatch.setitem(journal_module.MIGRATIONS, 1, to_v2)
    migrated = Journal.open(path)
    try:
        assert [u.seq for u in migrated.recovery.updates] == [seq]
    finally:
        migrated.close(timeout=5)
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == 2
        assert "priority" in [row[1] for row in db.execute("PRAGMA table_info(updates)")]

    monkeypatch.setattr(journal_module, "SCHEMA_VERSION", 1)
    with pytest.raises(JournalError) as caught:
        Journal.open(path)
    assert_actionable(caught.value, path, "schema version 2", "newer", "upgrade", "--journal-reset")


def test_an_empty_file_becomes_a_journal(path: Path) -> None:
    path.parent.mkdir(parents=True)
    path.touch()
    Journal.open(path).close(timeout=5)
    with contextlib.closing(sqlite3.connect(path)) as db:
        assert db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID
        assert db.execute("PRAGMA user_version").fetchone()[0] == journal_module.SCHEMA_VERSION
        assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_a_journal_of_another_hotkey_is_refused(path: Path) -> None:
    Journal.open(path, owner="5GrwvaEF-alice").close(timeout=5)
    with pytest.raises(JournalError) as caught:
        Journal.open(path, owner="5FHneW46-bob")
    assert_actionable(caught.value, path, "5GrwvaEF-alice", "5FHneW46-bob")
    Journal.open(path, owner="5GrwvaEF-alice").close(timeout=5)


def test_reset_moves_the_journal_aside_and_keeps_it(path: Path) -> None:
    journal = Journal.open(path)
    journal.record(STATUS, frame(JOB_A, "accepted"), JOB_A, "accepted")
    journal.close(timeout=5)
    moved = reset(path)
    assert moved is not None and moved.exists() and not path.exists()
    assert moved.parent == path.parent and "reset" in moved.name
    kept = Journal.open(moved)
    try:
        assert len(kept.recovery.updates) == 1, "the moved file is still a readable journal"
    finally:
        kept.close(timeout=5)
    fresh = Journal.open(path)
    try:
        assert fresh.recovery.updates == ()
    finally:
        fresh.close(timeout=5)
    assert reset(path.with_name("missing.sqlite3")) is None


HOLD = """
import sys
from streams.journal import Journal
journal = Journal.open(sys.argv[1])
print("held", flush=True)
sys.stdin.readline()
journal.close(timeout=5)
"""


def test_a_second_client_on_one_journal_is_refused_with_the_holders_pid(path: Path) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        with pytest.raises(JournalLocked) as caught:
            Journal.open(path)
        assert caught.value.pid == holder.pid
        assert_actionable(caught.value, path, f"pid {holder.pid}", "in use")
        with pytest.raises(JournalLocked):
            reset(path)
        assert summarize(path).holder_pid == holder.pid
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=30)
    Journal.open(path).close(timeout=5)  # the holder is gone: the lock is free again
    assert summarize(path).holder_pid is None


def test_two_openers_in_one_process_are_refused_too(opened: Journal, path: Path) -> None:
    with pytest.raises(JournalLocked) as caught:
        Journal.open(path)
    assert caught.value.pid == os.getpid()


READ_ONLY = """
import sys
from streams.journal import Journal, JournalError
try:
    Journal.open(sys.argv[1])
except JournalError as exc:
    print("refused:", exc)
else:
    print("opened")
"""


def test_a_read_only_directory_is_refused_with_the_way_out(tmp_path: Path) -> None:
    locked = tmp_path / "ro"
    locked.mkdir()
    target = locked / "j.sqlite3"
    command = [sys.executable, "-c", READ_ONLY, str(target)]
    if os.getuid() == 0:
        # Root ignores permission bits: make the directory a read-only bind mount in a private mount namespace.
        if shutil.which("unshare") is None:
            pytest.skip("running as root without unshare(1): cannot make a read-only directory")
        remount = 'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" && shift && exec "$@"'
        command = ["unshare", "-m", "sh", "-c", remount, "sh", str(locked), *command]
    else:
        os.chmod(locked, 0o555)
    try:
        child = subprocess.run(
            command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
            timeout=60, check=False,
        )
    finally:
        os.chmod(locked, 0o755)
    if os.getuid() == 0 and child.returncode != 0 and "mount" in child.stderr:
        pytest.skip(f"no mount namespace here: {child.stderr.strip()}")
    assert child.returncode == 0, child.stderr
    out = child.stdout.strip()
    assert out.startswith("refused:"), out
    assert str(target) in out and "--journal PATH" in out, out
    assert not target.exists()


# -- failures while running ------------------------------------------------------------------------


FULL_DISK = """
import asyncio, json, os, resource, signal, sys
from streams.journal import Journal

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing us


async def main() -> None:
    path = sys.argv[1]
    journal = Journal.open(path, retry_interval=0.05)
    events = []
    failed, restored = asyncio.Event(), asyncio.Event()
    journal.on_failure = lambda exc: (events.append(f"failed: {type(exc).__name__}: {exc}"), failed.set())
    journal.on_restored = lambda: (events.append("restored"), restored.set())
    journal.start()
    first = journal.record("V0JobStatusUpdate", "a" * 100, None, None)
    assert await journal.wait_durable(first, 10)
    size = os.path.getsize(path) + os.path.getsize(path + "-wal")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (size + 64 * 1024, hard))
    seqs = [journal.record("V0JobStatusUpdate", "b" * 4000, None, None) for _ in range(200)]
    await asyncio.wait_for(failed.wait(), 20)
    durable_while_failed = journal.durable
    sendable = all(journal.is_durable(s) for s in seqs)  # nothing waits for a failed journal
    journal.answered(seqs[0])  # answers keep coming meanwhile: they are applied once it recovers
    resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
    await asyncio.wait_for(restored.wait(), 20)
    stats = journal.stats()
    await journal.aclose(5)
    again = Journal.open(path)
    rows = [u.seq for u in again.recovery.updates]
    again.close(5)
    print(json.dumps({
        "events": events, "durable_while_failed": durable_while_failed, "sendable": sendable,
        "failures": stats.failures, "durable_after": stats.durable, "rows": rows, "expected": [first] + seqs[1:],
    }))


asyncio.run(main())
"""


def test_a_full_disk_reports_a_failure_keeps_sending_and_catches_up_when_space_returns(path: Path) -> None:
    path.parent.mkdir(parents=True)
    child = run_child(FULL_DISK, str(path))
    assert child.returncode == 0, child.stderr
    result = orjson.loads(child.stdout.strip().splitlines()[-1])
    assert result["events"][0].startswith("failed: "), result["events"]
    assert "full" in result["events"][0] or "I/O" in result["events"][0] or "large" in result["events"][0]
    assert result["events"][-1] == "restored"
    assert result["durable_while_failed"] is False
    assert result["sendable"] is True
    assert result["failures"] == 1 and result["durable_after"] is True
    assert result["rows"] == result["expected"], "the backlog written while the disk was full is all there"


# -- inspection ----------------------------------------------------------------------------------------


async def test_summarize_counts_pending_by_kind_open_jobs_and_the_oldest_item(path: Path) -> None:
    journal = Journal.open(path, owner="5Grw-alice")
    journal.start()
    journal.job_dispatched(JOB_A)
    first = journal.record(SPEC, '{"message_type": "V0MachineSpecsUpdate"}')
    journal.record(STATUS, frame(JOB_A, "received"), JOB_A, "received")
    journal.record(STATUS, frame(JOB_A, "accepted"), JOB_A, "accepted")
    assert await journal.flush(timeout=10)
    summary = summarize(path)
    assert summary.holder_pid == os.getpid()
    assert summary.owner == "5Grw-alice"
    assert summary.pending_by_kind == {SPEC: 1, STATUS: 2}
    assert summary.pending_by_status == {"accepted": 1, "received": 1}
    assert [(j.uuid, j.last_status) for j in summary.open_jobs] == [(JOB_A, "accepted")]
    assert summary.oldest is not None and summary.oldest.seq == first
    assert summary.bytes > 0
    await journal.aclose(timeout=5)
    with pytest.raises(JournalError, match="does not exist"):
        summarize(path.with_name("nothing.sqlite3"))


def test_default_path_follows_xdg_state_home(tmp_path: Path) -> None:
    assert default_path("5Grw", {"XDG_STATE_HOME": str(tmp_path)}) == tmp_path / "facilitator-streams/5Grw.sqlite3"
    assert default_path("5Grw", {}) == Path.home() / ".local/state/facilitator-streams/5Grw.sqlite3"
