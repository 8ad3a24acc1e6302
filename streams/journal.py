"""The journal: a durable SQLite record of the outbox, so a crash or a restart loses nothing.

Why: the outbox lives in memory; ``kill -9`` (OOM killer, reboot, container restart) would lose every
status update still queued or in flight, and the jobs running in this process would stay ``accepted``
at the facilitator forever. The journal keeps, in one SQLite file (WAL mode, stdlib ``sqlite3``):

- ``updates``: every status and spec update accepted into the outbox, in order (``seq``), as the
  encoded frame. A row is deleted once the facilitator answered it (its Response arrived, whatever
  the outcome) or, for a spec update (never answered), once it was written to the wire; so the
  table holds only what is pending and the file stays bounded.
- ``jobs``: every job dispatched in-process and not yet at a final status, with its last status.

"Accepted" means durable: :meth:`Journal.record` assigns the update its ``seq`` at once (on the
event loop), and the send loop writes the frame only once :meth:`Journal.is_durable` says the
transaction holding it committed. Writes never run on the event loop: everything recorded during
one loop iteration is handed, as one batch, to the journal's own writer thread, which commits it
as one transaction (batches that pile up while a commit runs are merged), then reports the highest
committed ``seq`` back to the loop; one commit releases every frame it holds, there is no per-message
round trip.

If a write fails while running (disk full, read-only file system, I/O error) the journal reports it
through ``on_failure``, stops holding frames back (the client keeps working in memory: durability is
off) and retries the whole unwritten backlog every ``retry_interval`` seconds; ``on_restored`` says
when it is durable again. Opening refuses, with a :class:`JournalError` naming the file and the way
out, a file that is not a journal, is corrupt, has a newer schema, or belongs to another hotkey;
and a journal another process holds (a ``flock`` on ``<file>.lock``, which stores the holder's pid).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import fcntl
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from streams.exceptions import JOURNAL_RESET_HINT, JournalError, JournalLocked, UsageError

log = logging.getLogger(__name__)

SCHEMA_VERSION: Final = 1
APPLICATION_ID: Final = 0x46535431
"""``PRAGMA application_id`` of a journal ("FST1"): tells our file from any other SQLite database."""
SQLITE_MAGIC: Final = b"SQLite format 3\x00"
FINAL_STATUSES: Final = frozenset({"completed", "rejected", "failed", "horde_failed"})
RESET_HINT: Final = JOURNAL_RESET_HINT


@dataclass(frozen=True, slots=True)
class PendingUpdate:
    """An update the facilitator had not answered when the journal was last closed (or killed)."""

    seq: int
    kind: str
    frame: str
    job_uuid: str | None
    status: str | None
    recorded_at: float
    """Wall-clock time (``time.time()``) it was accepted into the outbox."""


@dataclass(frozen=True, slots=True)
class OpenJob:
    """A job dispatched in-process that had not reached a final status."""

    uuid: str
    last_status: str | None
    dispatched_at: float
    updated_at: float


@dataclass(frozen=True, slots=True)
class Recovery:
    """What the journal held when it was opened (before anything new was recorded)."""

    updates: tuple[PendingUpdate, ...] = ()
    jobs: tuple[OpenJob, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.updates or self.jobs)


@dataclass(frozen=True, slots=True)
class Commit:
    """One committed batch (reported to ``on_commit`` on the loop)."""

    rows: int
    """Operations written (inserts, deletes, job changes) after merging the batch."""
    seconds: float
    """Time the transaction took on the writer thread, including the commit's fsync."""
    durable_seq: int
    batch: int


@dataclass(frozen=True, slots=True)
class JournalStats:
    path: str
    pending: int
    """Updates recorded and not yet answered (what a crash now would resend)."""
    open_jobs: int
    bytes: int
    """Database plus WAL file size, as of the last size check."""
    durable: bool
    """False while writes fail: the client works in memory until the journal recovers."""
    failures: int
    commits: int
    last_commit_seconds: float


# -- the writer thread's pending work, merged --------------------------------------------------------


@dataclass(slots=True)
class _Work:
    """Operations not yet committed, compacted: an update inserted and deleted before a commit is neither."""

    inserts: dict[int, _Row] = field(default_factory=dict)
    deletes: set[int] = field(default_factory=set)
    jobs: dict[str, tuple[str | None, float, float] | None] = field(default_factory=dict)
    """uuid -> (last_status, dispatched_at, updated_at) to upsert, or None to delete."""
    max_seq: int = 0
    batch: int = 0
    """The last hand-over merged in (committing this work commits every batch up to it)."""

    def __bool__(self) -> bool:
        return bool(self.inserts or self.deletes or self.jobs)

    def merge(self, batch: _Batch) -> None:
        """Fold one hand-over in; a batch's deletes never precede the insert of the same seq."""
        self.batch = max(self.batch, batch.number)
        inserts = self.inserts
        for row in batch.inserts:
            inserts[row[0]] = row
        if batch.inserts:
            self.max_seq = max(self.max_seq, batch.inserts[-1][0])
        deletes = self.deletes
        for seq in batch.deletes:
            inserts.pop(seq, None)  # never written; still deleted, so that deletes form contiguous ranges
            deletes.add(seq)
        self.jobs.update(batch.jobs)

    @property
    def size(self) -> int:
        return len(self.inserts) + len(self.deletes) + len(self.jobs)


_Row = tuple[int, str, str | None, str | None, str, float]
"""(seq, kind, job_uuid, status, frame, recorded_at): an ``updates`` row, in column order."""


@dataclass(slots=True)
class _Batch:
    """What one loop iteration recorded (handed to the writer as a whole)."""

    number: int = 0
    inserts: list[_Row] = field(default_factory=list)
    deletes: list[int] = field(default_factory=list)
    jobs: dict[str, tuple[str | None, float, float] | None] = field(default_factory=dict)
    """uuid -> (last_status, dispatched_at, updated_at), or None to delete; the last change wins."""

    def __bool__(self) -> bool:
        return bool(self.inserts or self.deletes or self.jobs)


_STOP: Final = object()


def _runs(seqs: list[int]) -> list[tuple[int, int]]:
    """Sorted integers as (first, last) runs of consecutive values: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    if not seqs:
        return runs
    first = last = seqs[0]
    for seq in seqs[1:]:
        if seq != last + 1:
            runs.append((first, last))
            first = seq
        last = seq
    runs.append((first, last))
    return runs


# -- opening, checking, migrating --------------------------------------------------------------------

_SCHEMA_V1: Final = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE updates (seq INTEGER PRIMARY KEY, kind TEXT NOT NULL, job_uuid TEXT, status TEXT,"
    " frame TEXT NOT NULL, recorded_at REAL NOT NULL)",
    "CREATE TABLE jobs (uuid TEXT PRIMARY KEY, last_status TEXT, dispatched_at REAL NOT NULL,"
    " updated_at REAL NOT NULL) WITHOUT ROWID",
)

MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {}
"""``MIGRATIONS[v]`` upgrades a journal from schema version ``v`` to ``v + 1`` (inside one transaction).

Version 0 is an empty file: migrating it creates the version-1 schema. A later version adds its
step here, and every existing journal is brought forward when it is opened.
"""


def _create_v1(db: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1:
        db.execute(statement)
    db.execute("INSERT INTO meta VALUES ('created_at', ?)", (_utc_now(),))
    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")


MIGRATIONS[0] = _create_v1


def _utc_now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _read_pid(lock: Path) -> int | None:
    try:
        text = lock.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _acquire_lock(path: Path) -> int:
    lock = _lock_path(path)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise JournalError(
            path, f"cannot create its lock file {lock}: {exc.strerror or exc}",
            "make the directory writable, or pass --journal PATH elsewhere (or --no-journal)",
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise JournalLocked(path, _read_pid(lock)) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _release_lock(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.ftruncate(fd, 0)
    os.close(fd)  # closing the descriptor releases the flock


def _check_header(path: Path) -> None:
    try:
        with path.open("rb") as f:
            head = f.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise JournalError(path, f"cannot be read: {exc.strerror or exc}", "check its permissions") from None
    if head and head != SQLITE_MAGIC:
        raise JournalError(path, "is not a journal (not an SQLite database)")


def _connect(path: Path, owner: str | None, synchronous: str) -> sqlite3.Connection:
    """Open, check and migrate; the caller holds the lock."""
    _check_header(path)
    try:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    except sqlite3.Error as exc:
        raise JournalError(path, f"cannot be opened: {exc}", "check the path and its permissions") from None
    try:
        _prepare(db, path, owner, synchronous)
    except BaseException:
        db.close()
        raise
    return db


def _prepare(db: sqlite3.Connection, path: Path, owner: str | None, synchronous: str) -> None:
    try:
        application_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    except sqlite3.DatabaseError as exc:
        raise JournalError(path, f"is corrupt or not a journal ({exc})") from None
    if application_id != APPLICATION_ID and (tables or version):
        raise JournalError(path, "is an SQLite database but not a facilitator-streams journal")
    if version > SCHEMA_VERSION:
        raise JournalError(
            path,
            f"has schema version {version}, newer than this client's {SCHEMA_VERSION} (written by a newer "
            "facilitator-streams)",
            "upgrade facilitator-streams, or " + RESET_HINT,
        )
    try:
        if version == 0:
            db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # only takes effect before the first table
        if db.execute("PRAGMA journal_mode = WAL").fetchone()[0].lower() != "wal":
            raise JournalError(path, "cannot be switched to WAL mode", "put it on a local file system")
        db.execute(f"PRAGMA synchronous = {synchronous}")
        db.execute("PRAGMA journal_size_limit = 4194304")  # the WAL shrinks back to 4 MiB after checkpoints
        check = db.execute("PRAGMA quick_check").fetchone()[0]
        if check != "ok":
            raise JournalError(path, f"is corrupt (quick_check: {check})")
        if version < SCHEMA_VERSION:
            db.execute("BEGIN IMMEDIATE")
            try:
                while version < SCHEMA_VERSION:
                    MIGRATIONS[version](db)
                    version += 1
                    db.execute(f"PRAGMA user_version = {version}")
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        if owner is not None:
            row = db.execute("SELECT value FROM meta WHERE key = 'owner'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('owner', ?)", (owner,))
            elif row[0] != owner:
                raise JournalError(
                    path, f"belongs to hotkey {row[0]}, not {owner} (its updates must not go out under another key)",
                    "pass --journal PATH for this hotkey's own file",
                )
    except sqlite3.OperationalError as exc:
        if "readonly" in str(exc) or "read-only" in str(exc):
            raise JournalError(
                path, f"is not writable ({exc})", "make it writable, or pass --journal PATH elsewhere (or --no-journal)"
            ) from None
        raise JournalError(path, f"cannot be used: {exc}") from None
    except sqlite3.DatabaseError as exc:
        raise JournalError(path, f"is corrupt ({exc})") from None


def _load(db: sqlite3.Connection) -> Recovery:
    updates = tuple(
        PendingUpdate(*row)
        for row in db.execute("SELECT seq, kind, frame, job_uuid, status, recorded_at FROM updates ORDER BY seq")
    )
    jobs = tuple(
        OpenJob(*row)
        for row in db.execute("SELECT uuid, last_status, dispatched_at, updated_at FROM jobs ORDER BY dispatched_at")
    )
    return Recovery(updates, jobs)


def reset(path: Path | str) -> Path | None:
    """Move a journal (and its WAL/shm files) aside, keeping them; returns the new name (None: no file).

    Refuses (:class:`JournalLocked`) while another process holds it.
    """
    path = Path(path)
    if not path.exists():
        return None
    fd = _acquire_lock(path)
    try:
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        target = path.with_name(f"{path.name}.reset-{stamp}")
        n = 1
        while target.exists():
            n += 1
            target = path.with_name(f"{path.name}.reset-{stamp}-{n}")
        for suffix in ("-wal", "-shm"):
            side = path.with_name(path.name + suffix)
            if side.exists():
                side.rename(target.with_name(target.name + suffix))
        path.rename(target)
        return target
    finally:
        _release_lock(fd)


# -- the journal -------------------------------------------------------------------------------------


class Journal:
    """One client's journal. Open with :meth:`open`; record from the event loop's thread only.

    ``on_failure(exc)``, ``on_restored()`` and ``on_commit(Commit)`` are called on the loop (they are
    plain attributes, set by the client before :meth:`start`).
    """

    def __init__(
        self,
        path: Path,
        db: sqlite3.Connection,
        lock_fd: int,
        recovery: Recovery,
        *,
        retry_interval: float = 5.0,
    ) -> None:
        self.path = path
        self.recovery = recovery
        self.retry_interval = retry_interval
        self.on_failure: Callable[[BaseException], None] | None = None
        self.on_restored: Callable[[], None] | None = None
        self.on_commit: Callable[[Commit], None] | None = None
        self.on_durable: Callable[[], None] | None = None
        """Called after a commit moved the durable mark (the send loop wakes up)."""
        self._db: sqlite3.Connection | None = db
        self._lock_fd: int | None = lock_fd
        self._next_seq = max((u.seq for u in recovery.updates), default=0) + 1
        self._durable_seq = self._next_seq - 1
        self._pending = len(recovery.updates)
        self._open_jobs: dict[str, float] = {job.uuid: job.dispatched_at for job in recovery.jobs}
        self._batch = _Batch()
        self._handover_scheduled = False
        self._queue: queue.SimpleQueue[_Batch | object] = queue.SimpleQueue()
        self._handed = 0
        self._committed_batch = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._healthy = True
        self._failures = 0
        self._commits = 0
        self._last_commit_seconds = 0.0
        self._bytes = self._file_bytes()
        self._closing = False
        self._closed = threading.Event()
        self._durable_changed: asyncio.Event | None = None
        self._closed_async: asyncio.Event | None = None

    @classmethod
    def open(
        cls,
        path: str | os.PathLike[str],
        *,
        owner: str | None = None,
        synchronous: str = "FULL",
        retry_interval: float = 5.0,
    ) -> Journal:
        """Lock, check, migrate and read the journal at ``path`` (created if missing).

        ``owner``: the validator's hotkey (ss58); a journal written under another hotkey is refused.
        ``synchronous``: SQLite's ``synchronous`` in WAL mode: ``FULL`` (default) survives power loss,
        ``NORMAL`` survives a killed process but may lose the last commits on power loss.
        """
        if synchronous.upper() not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be 'FULL' or 'NORMAL', got {synchronous!r}")
        if retry_interval <= 0:
            raise ValueError(f"retry_interval must be > 0, got {retry_interval!r}")
        path = Path(path).expanduser()
        if path.is_dir():
            raise JournalError(path, "is a directory", "pass a file name with --journal PATH")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise JournalError(
                path, f"its directory cannot be created: {exc.strerror or exc}",
                "pass --journal PATH somewhere writable (or --no-journal)",
            ) from None
        fd = _acquire_lock(path)
        try:
            db = _connect(path, owner, synchronous.upper())
            try:
                recovery = _load(db)
            except sqlite3.DatabaseError as exc:
                db.close()
                raise JournalError(path, f"is corrupt ({exc})") from None
        except BaseException:
            _release_lock(fd)
            raise
        return cls(path, db, fd, recovery, retry_interval=retry_interval)

    # -- state ------------------------------------------------------------------------------------------
    @property
    def durable(self) -> bool:
        """False while writes fail (the client keeps working in memory meanwhile)."""
        return self._healthy

    @property
    def durable_seq(self) -> int:
        return self._durable_seq

    @property
    def pending(self) -> int:
        return self._pending

    @property
    def open_jobs(self) -> int:
        return len(self._open_jobs)

    def stats(self) -> JournalStats:
        return JournalStats(
            str(self.path), self._pending, len(self._open_jobs), self._bytes, self._healthy,
            self._failures, self._commits, self._last_commit_seconds,
        )

    def is_durable(self, seq: int) -> bool:
        """May the update recorded as ``seq`` go on the wire? (Committed, or durability is off.)"""
        return seq <= self._durable_seq or not self._healthy

    # -- recording (loop thread) -----------------------------------------------------------------------
    def record(self, kind: str, frame: str, job_uuid: str | None = None, status: str | None = None) -> int:
        """Accept an update into the journal; returns its ``seq`` (durable once :meth:`is_durable`)."""
        self._check_open()
        seq = self._next_seq
        self._next_seq += 1
        now = time.time()
        self._pending += 1
        batch = self._batch
        batch.inserts.append((seq, kind, job_uuid, status, frame, now))
        if job_uuid is not None and status is not None and job_uuid in self._open_jobs:
            if status in FINAL_STATUSES:
                del self._open_jobs[job_uuid]
                batch.jobs[job_uuid] = None
            else:
                batch.jobs[job_uuid] = (status, self._open_jobs[job_uuid], now)
        if not self._handover_scheduled:
            self._schedule_handover()
        return seq

    def answered(self, seq: int) -> None:
        """The update ``seq`` needs no more sending (answered, sent once for specs, or dropped as reported)."""
        if seq <= 0 or self._closing:
            return
        self._pending -= 1
        self._batch.deletes.append(seq)
        if not self._handover_scheduled:
            self._schedule_handover()

    def job_dispatched(self, uuid: str, status: str | None = "received") -> None:
        """A job now runs in this process; ``status``: the one already reported for it."""
        self._check_open()
        if uuid in self._open_jobs:
            return
        now = time.time()
        self._open_jobs[uuid] = now
        self._batch.jobs[uuid] = (status, now, now)
        if not self._handover_scheduled:
            self._schedule_handover()

    def job_closed(self, uuid: str) -> None:
        """Forget a job without a final status recorded (e.g. it was reported elsewhere)."""
        if self._open_jobs.pop(uuid, None) is not None and not self._closing:
            self._batch.jobs[uuid] = None
            if not self._handover_scheduled:
                self._schedule_handover()

    def _check_open(self) -> None:
        if self._closing:
            raise UsageError(f"journal {self.path} is closed")

    def _schedule_handover(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            self._hand_over()
            return
        self._handover_scheduled = True
        loop.call_soon(self._hand_over)

    def _hand_over(self) -> None:
        """Once per loop iteration: everything recorded in it goes to the writer as one batch."""
        self._handover_scheduled = False
        if self._batch:
            batch, self._batch = self._batch, _Batch()
            self._handed += 1
            batch.number = self._handed
            self._queue.put(batch)

    # -- lifecycle -------------------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start the writer thread; callbacks go to ``loop`` (default: the running loop)."""
        if self._thread is not None:
            raise UsageError("Journal.start() can be called once")
        self._check_open()
        self._loop = loop or asyncio.get_running_loop()
        self._durable_changed = asyncio.Event()
        self._closed_async = asyncio.Event()
        self._thread = threading.Thread(target=self._writer, name=f"journal-writer:{self.path.name}", daemon=True)
        self._thread.start()

    async def wait_durable(self, seq: int, timeout: float | None = None) -> bool:
        """Wait until ``seq`` is durable (or durability is off); False on timeout."""
        return await self._wait(lambda: self.is_durable(seq), timeout)

    async def flush(self, timeout: float | None) -> bool:
        """Commit everything recorded so far (answers too), waiting at most ``timeout`` s; False if not done."""
        self._hand_over()
        batch = self._handed
        return await self._wait(lambda: self._committed_batch >= batch or not self._healthy, timeout)

    async def _wait(self, done: Callable[[], bool], timeout: float | None) -> bool:
        if self._durable_changed is None:
            raise UsageError("Journal.start() first")
        event = self._durable_changed
        try:
            async with asyncio.timeout(timeout):
                while not done():
                    event.clear()
                    await event.wait()
        except TimeoutError:
            return False
        return True

    async def aclose(self, timeout: float = 0.25) -> bool:
        """Best-effort: write what is recorded (within ``timeout``), then close the file and release the lock.

        Returns False if the writer had not finished within the timeout (it finishes in the background
        and releases the lock then; the process may exit meanwhile: the journal is consistent).
        """
        if self._closing or self._thread is None:
            return self.close(timeout)
        self._hand_over()
        self._closing = True
        self._queue.put(_STOP)
        closed = self._closed_async
        assert closed is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await closed.wait()
        return self._closed.is_set()

    def close(self, timeout: float = 0.25) -> bool:
        """Synchronous :meth:`aclose` (outside a running loop, or at exit)."""
        if self._closing:
            return self._closed.is_set()
        self._hand_over()
        self._closing = True
        self._queue.put(_STOP)
        if self._thread is None:
            self._writer()  # never started: write what was recorded, here, then close
            return True
        return self._closed.wait(timeout)

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close(timeout=5.0)

    # -- the writer thread -----------------------------------------------------------------------------
    def _writer(self) -> None:
        work = _Work()
        failed = False
        stop = False
        size_checked = 0.0
        try:
            while not stop:
                try:
                    item = self._queue.get(timeout=self.retry_interval if failed else None)
                except queue.Empty:
                    item = None
                while item is not None:
                    if item is _STOP:
                        stop = True
                    else:
                        work.merge(item)  # type: ignore[arg-type]
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        item = None
                if not work:
                    continue
                started = time.perf_counter()
                try:
                    self._write(work)
                except (sqlite3.Error, OSError) as exc:
                    if not failed:
                        failed = True
                        self._failures += 1
                        self._notify(self._failed, exc)
                    if stop:
                        log.warning("journal %s: %d changes not written at exit: %s", self.path, work.size, exc)
                    continue
                seconds = time.perf_counter() - started
                commit = Commit(work.size, seconds, work.max_seq, work.batch)
                work = _Work(max_seq=work.max_seq, batch=work.batch)
                if time.monotonic() - size_checked > 0.5:
                    size_checked = time.monotonic()
                    self._maintain()
                self._notify(self._committed, commit)
                if failed:
                    failed = False
                    self._notify(self._restored, None)
        except BaseException:  # pragma: no cover - a bug in the writer must not leave the client waiting
            log.exception("journal %s: the writer thread failed", self.path)
            self._notify(self._failed, RuntimeError("the journal writer thread failed"))
        finally:
            self._close_files()

    def _write(self, work: _Work) -> None:
        db = self._db
        assert db is not None
        db.execute("BEGIN")
        try:
            if work.inserts:
                db.executemany(
                    "INSERT OR REPLACE INTO updates (seq, kind, job_uuid, status, frame, recorded_at)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    work.inserts.values(),
                )
            if work.deletes:  # answers come mostly in seq order: one statement per contiguous run
                db.executemany("DELETE FROM updates WHERE seq BETWEEN ? AND ?", _runs(sorted(work.deletes)))
            upserts = [(uuid, *row) for uuid, row in work.jobs.items() if row is not None]
            if upserts:
                db.executemany(
                    "INSERT INTO jobs (uuid, last_status, dispatched_at, updated_at) VALUES (?, ?, ?, ?)"
                    " ON CONFLICT(uuid) DO UPDATE SET last_status = excluded.last_status,"
                    " updated_at = excluded.updated_at",
                    upserts,
                )
            gone = [(uuid,) for uuid, row in work.jobs.items() if row is None]
            if gone:
                db.executemany("DELETE FROM jobs WHERE uuid = ?", gone)
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise

    def _maintain(self) -> None:
        """Keep the file bounded: give freed pages back once many are free; measure the size."""
        db = self._db
        assert db is not None
        with contextlib.suppress(sqlite3.Error):
            free = db.execute("PRAGMA freelist_count").fetchone()[0]
            pages = db.execute("PRAGMA page_count").fetchone()[0]
            if free > 256 and free * 2 > pages:
                db.execute("PRAGMA incremental_vacuum")
        self._bytes = self._file_bytes()

    def _file_bytes(self) -> int:
        total = 0
        for name in (self.path.name, self.path.name + "-wal"):
            with contextlib.suppress(OSError):
                total += (self.path.with_name(name)).stat().st_size
        return total

    def _close_files(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            with contextlib.suppress(sqlite3.Error):
                db.close()
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            _release_lock(fd)
        self._closed.set()
        if self._closed_async is not None:
            self._notify(self._set_closed, None)

    # -- back on the loop ------------------------------------------------------------------------------
    def _notify(self, callback: Callable[..., None], arg: object) -> None:
        loop = self._loop
        if loop is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            loop.call_soon_threadsafe(callback, arg)

    def _committed(self, commit: Commit) -> None:
        self._commits += 1
        self._last_commit_seconds = commit.seconds
        self._durable_seq = max(self._durable_seq, commit.durable_seq)
        self._committed_batch = max(self._committed_batch, commit.batch)
        self._wake()
        if self.on_commit is not None:
            self.on_commit(commit)

    def _failed(self, exc: BaseException) -> None:
        self._healthy = False
        log.warning("journal %s: write failed (%s); durability is off until it recovers", self.path, exc)
        self._wake()  # nothing waits for the journal while it is off
        if self.on_failure is not None:
            self.on_failure(exc)

    def _restored(self, _: object) -> None:
        self._healthy = True
        log.warning("journal %s: writes succeed again; durability is back on", self.path)
        if self.on_restored is not None:
            self.on_restored()

    def _set_closed(self, _: object) -> None:
        if self._closed_async is not None:
            self._closed_async.set()

    def _wake(self) -> None:
        if self._durable_changed is not None:
            self._durable_changed.set()
        if self.on_durable is not None:
            self.on_durable()


# -- inspection (``python -m streams journal PATH``) -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Summary:
    path: str
    schema_version: int
    owner: str | None
    bytes: int
    pending_by_kind: dict[str, int]
    pending_by_status: dict[str, int]
    open_jobs: tuple[OpenJob, ...]
    oldest: PendingUpdate | None
    holder_pid: int | None
    """The pid of the client holding the journal now (None: nobody)."""


def summarize(path: Path | str) -> Summary:
    """Read a journal without taking it over (a running client may hold it: WAL readers don't block it)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise JournalError(path, "does not exist", "pass the path of a journal file")
    _check_header(path)
    holder = _holder(path)
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        raise JournalError(path, f"cannot be opened: {exc}", "check its permissions") from None
    try:
        application_id = db.execute("PRAGMA application_id").fetchone()[0]
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if application_id != APPLICATION_ID:
            raise JournalError(path, "is an SQLite database but not a facilitator-streams journal")
        if version > SCHEMA_VERSION:
            raise JournalError(path, f"has schema version {version}, newer than {SCHEMA_VERSION}",
                               "use a newer facilitator-streams to inspect it")
        if version == 0:
            return Summary(str(path), 0, None, path.stat().st_size, {}, {}, (), None, holder)
        owner_row = db.execute("SELECT value FROM meta WHERE key = 'owner'").fetchone()
        by_kind = dict(db.execute("SELECT kind, count(*) FROM updates GROUP BY kind ORDER BY kind").fetchall())
        by_status = dict(db.execute(
            "SELECT status, count(*) FROM updates WHERE status IS NOT NULL GROUP BY status ORDER BY status"
        ).fetchall())
        oldest_row = db.execute(
            "SELECT seq, kind, frame, job_uuid, status, recorded_at FROM updates ORDER BY seq LIMIT 1"
        ).fetchone()
        jobs = tuple(OpenJob(*row) for row in db.execute(
            "SELECT uuid, last_status, dispatched_at, updated_at FROM jobs ORDER BY dispatched_at"
        ))
    except sqlite3.DatabaseError as exc:
        raise JournalError(path, f"is corrupt ({exc})") from None
    finally:
        db.close()
    size = sum(
        p.stat().st_size for p in (path, path.with_name(path.name + "-wal")) if p.exists()
    )
    return Summary(
        str(path), version, owner_row[0] if owner_row else None, size, by_kind, by_status, jobs,
        PendingUpdate(*oldest_row) if oldest_row else None, holder,
    )


def _holder(path: Path) -> int | None:
    lock = _lock_path(path)
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return _read_pid(lock)
    finally:
        os.close(fd)
    return None


def default_path(hotkey_ss58: str, environ: dict[str, str] | None = None) -> Path:
    """``$XDG_STATE_HOME/facilitator-streams/<hotkey>.sqlite3`` (default ``~/.local/state``)."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "facilitator-streams" / f"{hotkey_ss58}.sqlite3"


__all__ = [
    "SCHEMA_VERSION",
    "Commit",
    "Journal",
    "JournalError",
    "JournalLocked",
    "JournalStats",
    "OpenJob",
    "PendingUpdate",
    "Recovery",
    "Summary",
    "default_path",
    "reset",
    "summarize",
]
