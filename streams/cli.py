"""Command line: ``python -m streams run|simulate|demo|replay``.

Expected failures (bad flags, unreadable wallets, malformed URLs, corrupt recordings) end with a
one-line ``error: ...`` on stderr and exit status 2, never a traceback. SIGINT and SIGTERM cancel
the client, whose teardown drains for at most ``cancel_drain_timeout`` and exits within 2 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, NoReturn

import orjson

from streams.config import ClientConfig, ConfigError
from streams.events import SystemEvent
from streams.job_dispatcher import CallbackDispatcher, Dispatcher, SimulatedDispatcher
from streams.journal import JournalError
from streams.journal_cli import add_run_arguments as add_journal_arguments
from streams.journal_cli import journal_path_for

log = logging.getLogger("streams")

EXIT_USAGE = 2


class CliError(Exception):
    """An expected failure: printed as one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"error: {message} (see `{self.prog} --help`)\n")


def _positive(value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"{value!r} must be > 0")
    return number


def _host_port(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{value!r} is not HOST:PORT")
    return host, int(port)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m streams", description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run the client against a facilitator until SIGINT/SIGTERM")
    run.add_argument("--url", required=True, help="facilitator URL, e.g. ws://127.0.0.1:8765/ws/v0/")
    keys = run.add_argument_group("validator hotkey (one of)")
    keys.add_argument("--hotkey-uri", help="a key URI such as //Alice (development keys)")
    keys.add_argument("--wallet-name")
    keys.add_argument("--wallet-hotkey")
    keys.add_argument("--wallet-path", default="~/.bittensor/wallets")
    run.add_argument("--dispatcher", default="simulated", help="`simulated`, `celery` or MODULE:ATTR")
    run.add_argument("--step-delay", type=float, default=0.5, help="simulated dispatcher: seconds per step")
    run.add_argument("--heartbeat-period", type=_positive, default=60.0)
    run.add_argument("--ping-interval", type=_positive, default=20.0)
    run.add_argument("--ping-timeout", type=_positive, default=20.0)
    run.add_argument("--backoff-base", type=_positive, default=1.0)
    run.add_argument("--backoff-cap", type=_positive, default=60.0)
    run.add_argument("--statsd", type=_host_port, metavar="HOST:PORT", help="send metrics to statsd")
    run.add_argument("--events", type=Path, metavar="FILE", help="append SystemEvents as JSON lines")
    run.add_argument("--record", type=Path, metavar="FILE", help="record the traffic as JSONL")
    run.add_argument("--log-level", default=argparse.SUPPRESS, choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_journal_arguments(run)
    _register_extra_commands(sub)
    return parser


def load_signer(args: argparse.Namespace) -> Any:
    from bittensor_wallet import Keypair, Wallet

    if args.hotkey_uri and (args.wallet_name or args.wallet_hotkey):
        raise CliError("give either --hotkey-uri or --wallet-name/--wallet-hotkey, not both")
    if args.hotkey_uri:
        try:
            return Keypair.create_from_uri(args.hotkey_uri)
        except Exception as exc:
            raise CliError(f"--hotkey-uri {args.hotkey_uri!r} is not a valid key URI: {exc}") from None
    if not (args.wallet_name and args.wallet_hotkey):
        raise CliError("a hotkey is required: --hotkey-uri URI, or --wallet-name NAME --wallet-hotkey HOTKEY")
    path = Path(args.wallet_path).expanduser()
    try:
        wallet = Wallet(name=args.wallet_name, hotkey=args.wallet_hotkey, path=str(path))
        return wallet.hotkey
    except Exception as exc:
        raise CliError(
            f"cannot read hotkey {args.wallet_hotkey!r} of wallet {args.wallet_name!r} under {path}: {exc}"
        ) from None


def load_dispatcher(spec: str, step_delay: float, args: argparse.Namespace | None = None) -> Dispatcher:
    if spec == "celery" and args is not None:
        from streams.celery import dispatcher_from_args

        return dispatcher_from_args(args)
    if spec == "simulated":
        if step_delay < 0:
            raise CliError(f"--step-delay must be >= 0, got {step_delay}")
        return SimulatedDispatcher(step_delay)
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise CliError(f"--dispatcher must be `simulated` or MODULE:ATTR, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
        target = getattr(module, attr)
    except (ImportError, AttributeError) as exc:
        raise CliError(f"cannot load dispatcher {spec!r}: {exc}") from None
    if isinstance(target, type):
        try:
            target = target()
        except Exception as exc:
            raise CliError(f"cannot create dispatcher {spec!r}: {exc}") from None
    if isinstance(target, Dispatcher):
        return target
    if callable(target):
        return CallbackDispatcher(target)
    raise CliError(f"{spec!r} is neither `async def handle(job, report)` nor an object with such a method")


class EventFile:
    """Writes each SystemEvent as one JSON line; a write error is logged once, never fatal."""

    def __init__(self, path: Path) -> None:
        try:
            self._file = path.open("ab")
        except OSError as exc:
            raise CliError(f"cannot open --events file {path}: {exc.strerror or exc}") from None
        self._failed = False

    def write(self, event: SystemEvent) -> None:
        try:
            self._file.write(orjson.dumps(event.to_dict()) + b"\n")
            self._file.flush()
        except OSError as exc:
            if not self._failed:
                log.error("cannot write events file: %s", exc)
                self._failed = True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()


async def run_until_signalled(main: Callable[[], Awaitable[None]]) -> None:
    """Run ``main`` in a task that SIGINT/SIGTERM cancel (its teardown then runs)."""
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(main())

    def cancel_once() -> None:
        # A second Ctrl-C must not cut the (bounded) teardown short and leave tasks behind.
        if not task.cancelling():
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, cancel_once)
    try:
        await task
    except asyncio.CancelledError:
        if not task.cancelled():
            raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


async def _run(args: argparse.Namespace) -> None:
    from streams.client import FacilitatorClient

    try:
        config = ClientConfig(
            url=args.url,
            heartbeat_period=args.heartbeat_period,
            ping_interval=args.ping_interval,
            ping_timeout=args.ping_timeout,
            backoff_base=args.backoff_base,
            backoff_cap=args.backoff_cap,
            statsd_host=args.statsd[0] if args.statsd else None,
            statsd_port=args.statsd[1] if args.statsd else 8125,
        )
    except ConfigError as exc:
        raise CliError(str(exc)) from None
    signer = load_signer(args)
    try:
        config = config.replace(journal_path=journal_path_for(args, signer.ss58_address))
    except JournalError as exc:
        raise CliError(str(exc)) from None
    dispatcher = load_dispatcher(args.dispatcher, args.step_delay, args)
    transport = None
    recorder = None
    if args.record:
        from streams.recording import open_recorder

        recorder, transport = open_recorder(args.record, config)
    client = FacilitatorClient(config, signer=signer, dispatcher=dispatcher, transport=transport)
    events = EventFile(args.events) if args.events else None
    if events is not None:
        client.events.subscribe(events.write)
    client.events.subscribe(lambda event: log.info("%s %s: %s", event.type, event.subtype, event.description))
    try:
        await run_until_signalled(client.start)
    except JournalError as exc:  # not a journal, corrupt, newer, locked: refused before anything ran
        raise CliError(str(exc)) from None
    finally:
        if events is not None:
            events.close()
        if recorder is not None:
            await recorder.aclose()


COMMANDS: dict[str, Callable[[argparse.Namespace], Coroutine[Any, Any, None]]] = {"run": _run}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        asyncio.run(COMMANDS[args.command](args))
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    return 0


def _register_extra_commands(sub: Any) -> None:
    """Subcommands that live in their own modules (simulator, demo, replay) add themselves here."""
    modules = ("streams.simulator_cli", "streams.demo", "streams.replay", "streams.celery", "streams.journal_cli")
    for module_name in modules:
        try:
            module = importlib.import_module(module_name)
        except ImportError as exc:
            if exc.name != module_name:
                raise
            continue
        register = getattr(module, "register_cli", None)
        if register is not None:
            COMMANDS.update(register(sub))
