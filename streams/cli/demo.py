"""``python -m streams demo``: the simulator and a client with faults, a live view and a summary."""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from streams.cli.common import CliError, Command, at_least, non_negative, positive, run_until_signalled
from streams.devtools.demo import DemoResult, print_summary, run_demo
from streams.exceptions import RecordingError

__all__ = ["register"]


def register(sub: Any) -> dict[str, Command]:
    parser = sub.add_parser("demo", help="the simulator and a client, with a live view and a summary")
    parser.add_argument("--jobs", type=at_least(1), default=50, help="job requests the facilitator sends (default 50)")
    parser.add_argument("--duration", type=positive, default=45.0,
                        help="stop after this many seconds, finished or not (default 45)")
    parser.add_argument("--faults", action=argparse.BooleanOptionalAction, default=True,
                        help="inject drops, close codes, a stall and an auth refusal (default on)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--step-delay", type=non_negative, default=0.15, help="simulated job step delay")
    parser.add_argument("--record", type=Path, default=None,
                        help="recording file (default recordings/demo-<time>.jsonl)")
    return {"demo": _demo}


async def _demo(args: argparse.Namespace) -> None:
    record: Path = args.record or Path("recordings") / f"demo-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.jsonl"
    if args.record is None:
        record.parent.mkdir(parents=True, exist_ok=True)
    outcome: list[DemoResult] = []

    async def main() -> None:
        try:
            result = await run_demo(
                jobs=args.jobs, duration=args.duration, faults=args.faults, seed=args.seed,
                step_delay=args.step_delay, record=record,
            )
        except RecordingError as exc:
            raise CliError(f"--record: {exc}") from None
        outcome.append(result)

    print(f"demo: {args.jobs} jobs, faults {'on' if args.faults else 'off'}, seed {args.seed}; Ctrl-C stops it")
    await run_until_signalled(main)
    if not outcome:
        print("demo interrupted", file=sys.stderr)
        return
    print_summary(outcome[0])
    if not outcome[0].ok:
        raise CliError("the demo lost or reordered status updates")
    if outcome[0].timed_out:
        print(f"demo: stopped at --duration {args.duration:g} s before every job finished", file=sys.stderr)
