"""The journal on the command line: ``run``'s journal flags, and ``python -m streams journal PATH``.

``run`` keeps a journal by default at ``$XDG_STATE_HOME/facilitator-streams/<hotkey ss58>.sqlite3``
(``~/.local/state`` when unset); ``--journal PATH`` puts it elsewhere, ``--no-journal`` keeps
everything in memory, ``--journal-reset`` moves an unusable journal aside (kept, renamed) first.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any

import orjson

from streams.cli.common import CliError, Command
from streams.exceptions import JournalError
from streams.journal import Summary, default_path, reset, summarize

__all__ = ["add_run_arguments", "format_summary", "journal_path_for", "register"]


def add_run_arguments(run: argparse.ArgumentParser) -> None:
    group = run.add_argument_group("journal (durable outbox; on by default)")
    where = group.add_mutually_exclusive_group()
    where.add_argument(
        "--journal", type=Path, metavar="PATH",
        help="the journal file (default: $XDG_STATE_HOME/facilitator-streams/<hotkey ss58>.sqlite3)",
    )
    where.add_argument("--no-journal", action="store_true", help="keep everything in memory (a crash loses it)")
    group.add_argument(
        "--journal-reset", action="store_true",
        help="move the journal aside (kept as <file>.reset-<time>) and start with an empty one",
    )


def journal_path_for(args: argparse.Namespace, ss58: str) -> Path | None:
    """The journal this ``run`` uses (None: off); applies ``--journal-reset``. Raises JournalError."""
    if args.no_journal:
        if args.journal_reset:
            raise JournalError("(none)", "--journal-reset makes no sense with --no-journal", "drop one of them")
        return None
    path: Path = (args.journal or default_path(ss58)).expanduser()
    if args.journal_reset:
        moved = reset(path)
        if moved is not None:
            print(f"journal {path} moved aside to {moved} (kept); starting with an empty journal", file=sys.stderr)
    return path


def _when(timestamp: float) -> str:
    moment = datetime.datetime.fromtimestamp(timestamp, datetime.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    return f"{moment} ({_ago(time.time() - timestamp)} ago)"


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} s"


def format_summary(summary: Summary) -> str:
    pending = sum(summary.pending_by_kind.values())
    holder = f"in use by pid {summary.holder_pid}" if summary.holder_pid else "not in use"
    lines = [
        f"journal {summary.path}",
        f"  schema {summary.schema_version}, {summary.bytes / 1024:.1f} KiB, hotkey {summary.owner or '-'}, {holder}",
        f"pending updates (not answered by the facilitator; the next start sends them first): {pending}",
    ]
    for kind, count in summary.pending_by_kind.items():
        lines.append(f"  {kind}: {count}")
    if summary.pending_by_status:
        lines.append("  by status: " + ", ".join(f"{s} {n}" for s, n in summary.pending_by_status.items()))
    lines.append(
        f"open jobs (dispatched in-process, no final status; the next start reports them horde_failed): "
        f"{len(summary.open_jobs)}"
    )
    for job in summary.open_jobs[:20]:
        lines.append(f"  {job.uuid}  last status {job.last_status or '-'}, dispatched {_when(job.dispatched_at)}")
    if len(summary.open_jobs) > 20:
        lines.append(f"  … and {len(summary.open_jobs) - 20} more")
    oldest = summary.oldest
    if oldest is not None:
        what = f"{oldest.kind}" + (f" {oldest.status} for job {oldest.job_uuid}" if oldest.job_uuid else "")
        lines.append(f"oldest item: #{oldest.seq} {what}, accepted {_when(oldest.recorded_at)}")
    else:
        lines.append("oldest item: none")
    return "\n".join(lines)


def summary_json(summary: Summary) -> dict[str, Any]:
    oldest = summary.oldest
    return {
        "path": summary.path, "schema_version": summary.schema_version, "owner": summary.owner,
        "bytes": summary.bytes, "holder_pid": summary.holder_pid,
        "pending": sum(summary.pending_by_kind.values()),
        "pending_by_kind": summary.pending_by_kind, "pending_by_status": summary.pending_by_status,
        "open_jobs": [
            {"uuid": j.uuid, "last_status": j.last_status, "dispatched_at": j.dispatched_at,
             "updated_at": j.updated_at} for j in summary.open_jobs
        ],
        "oldest": None if oldest is None else {
            "seq": oldest.seq, "kind": oldest.kind, "job_uuid": oldest.job_uuid, "status": oldest.status,
            "recorded_at": oldest.recorded_at,
        },
    }


async def _journal(args: argparse.Namespace) -> None:
    try:
        summary = summarize(args.path)
    except JournalError as exc:
        raise CliError(str(exc)) from None
    if args.json:
        print(orjson.dumps(summary_json(summary), option=orjson.OPT_INDENT_2).decode())
    else:
        print(format_summary(summary))


def register(sub: Any) -> dict[str, Command]:
    parser = sub.add_parser(
        "journal", help="summarize a journal: pending updates per kind, open jobs, oldest item",
        description="Read a journal (safe while a client runs on it) and print what a restart would resend.",
    )
    parser.add_argument("path", type=Path, metavar="PATH", help="the journal file")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    return {"journal": _journal}
