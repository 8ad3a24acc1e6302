"""The journal's cost: throughput with it vs without it, and the SIGINT exit time with it.

Throughput: the same client run as ``bench.throughput`` (N status updates, every Response read), once
with ``journal_path`` set (a fresh file in a temporary directory, ``synchronous=FULL``: every commit
is fsync'ed) and once without, alternating; the ratio of the medians is reported (target ≥ 0.8).
Every update is journaled before it is sent and deleted when its Response arrives, so the journal
ends empty (checked).

Shutdown: ``bench.shutdown`` with ``--journal FILE``: SIGINT with 1,000 updates queued against a
facilitator that stalls after auth. With the journal the client does not drain: the updates stay in
the file for the next start (counted there after the exit), and the exit must take ≤ 0.5 s.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from bench.throughput import Run, client_run
from streams.journal import summarize


async def journal_run(count: int) -> Run:
    with tempfile.TemporaryDirectory(prefix="bench-journal-") as tmp:
        path = Path(tmp) / "journal.sqlite3"
        run = await client_run(count, journal_path=path)
        left = summarize(path)
        if left.pending_by_kind:
            raise AssertionError(f"the journal was not emptied by the Responses: {left.pending_by_kind}")
    return Run("journal", run.count, run.seconds, run.cpu_seconds, run.sim_cpu_seconds)


async def journal_compare(count: int, rounds: int) -> tuple[list[Run], list[Run]]:
    """Alternate client runs without and with the journal, ``rounds`` of each."""
    plain: list[Run] = []
    journaled: list[Run] = []
    for _ in range(rounds):
        plain.append(await client_run(count))
        journaled.append(await journal_run(count))
    return plain, journaled
