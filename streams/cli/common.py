"""What every subcommand shares: the one-line error, argument types, and signal-driven cancellation."""

from __future__ import annotations

import argparse
import asyncio
import math
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, NoReturn

__all__ = [
    "EXIT_USAGE",
    "CliError",
    "Command",
    "Parser",
    "at_least",
    "host_port",
    "non_negative",
    "port",
    "positive",
    "run_until_signalled",
]

EXIT_USAGE = 2

Command = Callable[[argparse.Namespace], Coroutine[Any, Any, None]]
"""What a subcommand module's ``register(sub)`` maps its command names to."""


class CliError(Exception):
    """An expected failure: printed as one ``error: ...`` line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with the project's error format: one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see `{self.prog} --help`)\n")


def _number(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if math.isnan(number):
        raise argparse.ArgumentTypeError(f"{value!r} is not a number")
    return number


def positive(value: str) -> float:
    """A number > 0 (``inf`` allowed where the flag means "no limit")."""
    number = _number(value)
    if not number > 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be > 0")
    return number


def non_negative(value: str) -> float:
    number = _number(value)
    if not number >= 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be >= 0")
    return number


def at_least(minimum: int) -> Callable[[str], int]:
    """A whole number >= ``minimum`` (an argparse type)."""

    def parse(value: str) -> int:
        try:
            number = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{value!r} is not a whole number") from None
        if number < minimum:
            raise argparse.ArgumentTypeError(f"{value!r} must be >= {minimum}")
        return number

    parse.__name__ = f"whole number >= {minimum}"
    return parse


def port(value: str) -> int:
    if not value.isdigit() or not 0 <= int(value) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not a port number (0 picks a free one)")
    return int(value)


def host_port(value: str) -> tuple[str, int]:
    host, sep, number = value.rpartition(":")
    if not sep or not host or not number.isdigit() or not 0 < int(number) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host, int(number)


async def run_until_signalled(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` in a task that SIGINT/SIGTERM cancel (its teardown then runs)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(main())

    signalled = False

    def cancel_once() -> None:
        # A second Ctrl-C must not cut the (bounded) teardown short and leave tasks behind.
        nonlocal signalled
        signalled = True
        if not task.cancelling():
            task.cancel()

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        loop.add_signal_handler(sig, cancel_once)
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
    finally:
        for sig, handler in previous.items():
            loop.remove_signal_handler(sig)
            # remove_signal_handler installs Python's default (KeyboardInterrupt on SIGINT), which
            # would turn a second Ctrl-C during the exit into a traceback: after a signal, further
            # SIGINTs are ignored (the process is on its way out); otherwise what was there returns.
            if sig == signal.SIGINT and signalled:
                signal.signal(sig, signal.SIG_IGN)
            elif handler is not None:
                signal.signal(sig, handler)
