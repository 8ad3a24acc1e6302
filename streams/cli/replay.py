"""``python -m streams replay FILE``: summarise a recording, or serve it to a client."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from streams.cli.common import CliError, Command, at_least, non_negative, port, positive, run_until_signalled
from streams.devtools.replay import ReplayServer, summarize
from streams.exceptions import ReplayError
from streams.recording import load_recording

__all__ = ["register"]


def register(sub: Any) -> dict[str, Command]:
    """Add ``replay`` to the ``python -m streams`` subcommands ."""
    parser = sub.add_parser(
        "replay",
        help="summarise a recording, or --serve it to a client as a facilitator",
        description="Print a timeline summary of a recording (or a capture of the real facilitator). With "
        "--serve, act as a facilitator that answers a client's auth and plays the recorded inbound frames "
        "to it, to reproduce an incident locally.",
    )
    parser.add_argument("file", type=Path, help="a recording (JSONL, facilitator-capture format)")
    parser.add_argument("--serve", action="store_true", help="play the inbound frames to a connecting client")
    parser.add_argument("--host", default="127.0.0.1", help="--serve: address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=port, default=8765, help="--serve: port (default 8765; 0 = any free port)")
    parser.add_argument("--speed", type=positive, default=1.0, help="--serve: time factor, e.g. 10 = ten times faster")
    parser.add_argument(
        "--linger",
        type=non_negative,
        default=0.0,
        help="--serve: seconds to keep the connection open after the last frame",
    )
    parser.add_argument(
        "--all-frames", action="store_true", help="--serve: also play the recorded answers to auth requests"
    )
    parser.add_argument(
        "--allow-truncated", action="store_true", help="ignore a truncated last line (a recorder killed mid-write)"
    )
    parser.add_argument("--timeline", type=at_least(2), default=40, metavar="N", help="show at most N timeline lines")
    parser.add_argument("--log-level", default=argparse.SUPPRESS, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return {"replay": _replay_command}


async def _replay_command(args: argparse.Namespace) -> None:
    try:
        recording = load_recording(args.file, allow_truncated=args.allow_truncated)
    except ReplayError as exc:
        raise CliError(str(exc)) from None
    if not args.serve:
        print(summarize(recording).render(max_timeline=args.timeline))
        return
    server = ReplayServer(
        recording,
        host=args.host,
        port=args.port,
        speed=args.speed,
        include_auth_responses=args.all_frames,
        linger=args.linger,
    )
    try:
        await server.start()
    except OSError as exc:
        raise CliError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None

    async def announce_and_wait() -> None:
        # Printed once SIGINT is handled: a script that signals right after reading it is safe.
        print(
            f"replaying {len(server.frames)} inbound frames of {args.file} at {server.url} "
            f"(speed {args.speed:g}); waiting for a client",
            flush=True,
        )
        await server.wait_done()

    try:
        await run_until_signalled(announce_and_wait)
    finally:
        await server.aclose()
    state = "done" if server.done else "interrupted"
    print(
        f"{state}: played {server.delivered} of {len(server.frames)} frames over "
        f"{server.connections} connection(s); the client sent {len(server.received)} frames",
        flush=True,
    )
