"""``python -m streams simulate``: run the facilitator simulator until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from streams.cli.common import CliError, Command, at_least, non_negative, port, run_until_signalled
from streams.devtools.simulator import FacilitatorSimulator, serve_forever

__all__ = ["register"]


def register(sub: Any) -> dict[str, Command]:
    parser = sub.add_parser("simulate", help="run a protocol-faithful facilitator simulator")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port, default=8765)
    parser.add_argument("--jobs", type=at_least(0), default=0, help="job requests for the first validator to connect")
    parser.add_argument("--job-interval", type=non_negative, default=0.0, help="seconds between job requests")
    parser.add_argument("--allow", action="append", metavar="SS58", help="allowed validator hotkey (repeatable)")
    parser.add_argument("--ack-delay", type=non_negative, default=0.0, help="delay every Response by this many seconds")
    parser.add_argument("--chaos-every", type=at_least(1), default=None, help="inject a random fault every ~N frames")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--lenient",
        action="store_true",
        help="kinder than production: no server pings, 50 MiB frames, no compression, jobs queued for a "
        "validator without a fresh heartbeat and sent to its newest connection only, idle eviction, "
        "any specs and metadata accepted",
    )
    parser.add_argument(
        "--auth-mode",
        action="append",
        choices=("message", "headers"),
        metavar="MODE",
        help="what authenticates a connection: `message` (production today) and/or `headers` "
        "(connect-time draft); repeatable (default both)",
    )
    return {"simulate": _simulate}


async def _simulate(args: argparse.Namespace) -> None:

    def ready(sim: FacilitatorSimulator) -> None:
        mode = "lenient" if sim.lenient else "strict"
        print(
            f"facilitator simulator listening on {sim.url} ({mode}; jobs signed by {sim.job_signer_ss58})", flush=True
        )

    async def serve() -> None:
        try:
            await serve_forever(
                args.host,
                args.port,
                args.jobs,
                job_interval=args.job_interval,
                allowed_hotkeys=args.allow,
                ack_delay=args.ack_delay,
                chaos_every=args.chaos_every,
                seed=args.seed,
                lenient=args.lenient,
                auth_modes=args.auth_mode or ("message", "headers"),
                on_ready=ready,
            )
        except OSError as exc:
            raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None

    await run_until_signalled(serve)
    print("simulator stopped", file=sys.stderr)
