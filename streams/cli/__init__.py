"""Command line: ``python -m streams run|simulate|demo|replay|worker|journal``.

One module per subcommand, each with ``register(subparsers) -> {name: coroutine function}``.
Expected failures (bad flags, unreadable wallets, malformed URLs, corrupt recordings) end with a
one-line ``error: ...`` on stderr and exit status 2, never a traceback: library errors
(:mod:`streams.exceptions`) become :class:`CliError` here and nowhere else. SIGINT and SIGTERM
cancel the running command, whose teardown drains for at most ``cancel_drain_timeout`` and exits
within 2 s. Nothing in the library imports this package.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from streams.cli import demo, journal, replay, run, simulate, worker
from streams.cli.common import EXIT_USAGE, CliError, Command, Parser

__all__ = ["build_parser", "main"]

_SUBCOMMANDS = (run, simulate, demo, replay, worker, journal)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Command]]:
    """The parser, and the coroutine function of each subcommand."""
    parser = Parser(prog="python -m streams", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--log-level", default=None, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="default WARNING (for `run`: INFO for its own status lines)",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    commands: dict[str, Command] = {}
    for module in _SUBCOMMANDS:
        commands.update(module.register(sub))
    return parser, commands


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2, its one line already printed)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    args.log_level_given = args.log_level is not None  # `run` shows its status lines unless told otherwise
    args.log_level = args.log_level or "WARNING"
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(commands[args.command](args))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return 0
