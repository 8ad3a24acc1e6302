"""``python -m streams run``: the client against a facilitator until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
from reactivex import operators as ops

from streams.cli import integrations
from streams.cli.common import CliError, Command, host_port, non_negative, positive, run_until_signalled
from streams.cli.journal import add_run_arguments as add_journal_arguments
from streams.cli.journal import journal_path_for
from streams.cli.report import LOGGER as STATUS_LOGGER
from streams.cli.report import StatusLines
from streams.config import AuthMode, ClientConfig
from streams.dispatchers import Dispatcher, SimulatedDispatcher, as_dispatcher
from streams.events import ConnectionState, SystemEvent
from streams.exceptions import ConfigError, JournalError, RecordingError

__all__ = ["EventFile", "load_dispatcher", "load_signer", "load_trusted_signers", "register"]

log = logging.getLogger("streams")

DISPATCHER_CHOICES = "`celery`, MODULE:ATTR (your own), channels:MODULE:ATTR or `simulated`"


def register(sub: Any) -> dict[str, Command]:
    run = sub.add_parser("run", help="run the client against a facilitator until SIGINT/SIGTERM")
    run.add_argument("--url", required=True, help="facilitator URL, e.g. ws://127.0.0.1:8765/ws/v0/")
    keys = run.add_argument_group("validator hotkey (one of)")
    keys.add_argument("--hotkey-uri", help="a key URI such as //Alice (development keys)")
    keys.add_argument("--wallet-name")
    keys.add_argument("--wallet-hotkey")
    keys.add_argument("--wallet-path", default="~/.bittensor/wallets")
    run.add_argument(
        "--auth-mode", choices=[mode.value for mode in AuthMode], default=AuthMode.MESSAGE.value,
        help="how each connection authenticates: `message` (V0AuthenticationRequest, the deployed facilitator), "
        "`headers` (signed X-Timestamp/X-Public-Key/X-Signature handshake headers, the upstream draft) or `both`",
    )
    run.add_argument(
        "--dispatcher", help=f"required: {DISPATCHER_CHOICES} (`simulated` fakes the work: demos and tests only)"
    )
    run.add_argument("--step-delay", type=non_negative, default=None,
                     help="--dispatcher simulated only: seconds per step (default 0.5)")
    trust = run.add_argument_group(
        "who may sign jobs besides this validator's hotkey (none given: only jobs signed by this hotkey run; "
        "trust the facilitator's signer to run its jobs)"
    )
    trust.add_argument("--trusted-signer", action="append", default=[], metavar="SS58", help="repeatable")
    trust.add_argument("--trusted-signers-file", type=Path, metavar="PATH", help="one ss58 per line, # comments")
    trust.add_argument("--signature-max-age", type=positive, metavar="SECONDS", help="refuse older job signatures")
    run.add_argument("--heartbeat-period", type=positive, default=60.0)
    run.add_argument("--ping-interval", type=positive, default=20.0)
    run.add_argument("--ping-timeout", type=positive, default=20.0)
    run.add_argument("--backoff-base", type=positive, default=1.0)
    run.add_argument("--backoff-cap", type=positive, default=60.0)
    run.add_argument("--statsd", type=host_port, metavar="HOST:PORT", help="send metrics to statsd")
    run.add_argument("--events", type=Path, metavar="FILE", help="append SystemEvents as JSON lines")
    run.add_argument("--record", type=Path, metavar="FILE", help="record the traffic as JSONL")
    run.add_argument(
        "--log-level", default=argparse.SUPPRESS, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="INFO (default): a start line, connection changes and failures; WARNING: failures only; "
        "DEBUG: every event",
    )
    run.add_argument("--quiet", action="store_true", help="no status lines (errors still end the process)")
    from streams.cli import worker

    worker.add_run_flags(run)
    add_journal_arguments(run)
    integrations.add_run_flags(run)
    return {"run": _run}


def load_trusted_signers(addresses: Sequence[str], path: Path | None) -> tuple[str, ...]:
    """``--trusted-signer`` values plus the lines of ``--trusted-signers-file``, each checked."""
    from streams.signatures import public_key_of

    found = [(address, "--trusted-signer") for address in addresses]
    if path is not None:
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            why = getattr(exc, "strerror", None) or exc
            raise CliError(f"cannot read --trusted-signers-file {path}: {why}") from None
        for number, line in enumerate(lines, 1):
            address = line.split("#", 1)[0].strip()
            if address:
                found.append((address, f"{path}:{number}"))
    for address, where in found:
        try:
            public_key_of(address)
        except ValueError as exc:
            raise CliError(f"{where}: {exc}") from None
    return tuple(dict.fromkeys(address for address, _ in found))


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


def load_dispatcher(spec: str, step_delay: float | None, args: argparse.Namespace | None = None) -> Dispatcher:
    if step_delay is not None and spec != "simulated":  # flags that only make sense together are checked together
        raise CliError(f"--step-delay applies only to --dispatcher simulated (this run uses --dispatcher {spec})")
    if args is not None:
        from streams.cli.worker import dispatcher_from_args, refuse_celery_flags

        refuse_celery_flags(args)
        if spec == "celery":
            return dispatcher_from_args(args)
    if spec == "simulated":
        return SimulatedDispatcher(0.5 if step_delay is None else step_delay)
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
    try:
        return as_dispatcher(target)  # refuses sync callables: each job would fail at run time
    except TypeError as exc:
        raise CliError(f"--dispatcher {spec}: {exc}") from None


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


async def _run(args: argparse.Namespace) -> None:
    from streams.client import FacilitatorClient

    if args.dispatcher is None:
        raise CliError(f"--dispatcher is required: {DISPATCHER_CHOICES}; `simulated` reports fake work")
    trusted = load_trusted_signers(args.trusted_signer, args.trusted_signers_file)
    try:
        config = ClientConfig(
            trusted_signatories=trusted,
            signature_max_age=args.signature_max_age,
            url=args.url,
            heartbeat_period=args.heartbeat_period,
            ping_interval=args.ping_interval,
            ping_timeout=args.ping_timeout,
            backoff_base=args.backoff_base,
            backoff_cap=args.backoff_cap,
            auth_mode=AuthMode(args.auth_mode),
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
    plumbing = integrations.Plumbing(args)
    if args.dispatcher.startswith(integrations.CHANNELS_DISPATCHER):
        dispatcher = plumbing.dispatcher(args.dispatcher, lambda spec: load_dispatcher(spec, args.step_delay))
    else:
        dispatcher = load_dispatcher(args.dispatcher, args.step_delay, args)
    transport = None
    recorder = None
    if args.record:
        from streams.recording import open_recorder

        try:
            recorder, transport = open_recorder(args.record, config)
        except RecordingError as exc:
            raise CliError(f"--record: {exc}") from None
    client = FacilitatorClient(
        config, signer=signer, dispatcher=dispatcher, transport=transport, spec_updates=plumbing.spec_source(signer)
    )
    events = EventFile(args.events) if args.events else None
    if events is not None:
        client.events.subscribe(events.write)
    status = _status_lines(args)
    client.events.subscribe(status)
    others = sum(address != _who(signer) for address in config.trusted_signatories)  # who else may sign jobs
    # Said at the first connection attempt: after the start's own checks (the journal), which may refuse it.
    client.state.pipe(ops.filter(lambda state: state is ConnectionState.CONNECTING), ops.take(1)).subscribe(
        lambda _: status.started(config.url, _who(signer), args.dispatcher, others)
    )
    try:
        plumbing.attach(client)
        await run_until_signalled(client.start)
    except JournalError as exc:  # not a journal, corrupt, newer, another hotkey's, locked: refused at start
        raise CliError(str(exc)) from None
    finally:
        status.close()
        await plumbing.aclose()
        if events is not None:
            events.close()
        if recorder is not None:
            await recorder.aclose()


def _status_lines(args: argparse.Namespace) -> StatusLines:
    """The operator's view: INFO unless --log-level says otherwise; --quiet: nothing but ERRORs of the library."""
    logger = logging.getLogger(STATUS_LOGGER)
    if args.quiet:
        logger.setLevel(logging.CRITICAL + 1)
        logging.getLogger().setLevel(max(logging.getLogger().level, logging.ERROR))
    elif not getattr(args, "log_level_given", False):
        logger.setLevel(logging.INFO)
    return StatusLines(logger)


def _who(signer: Any) -> str:
    """The hotkey as an operator knows it: its ss58 address (else the public key in hex)."""
    address = getattr(signer, "ss58_address", None)
    return address if isinstance(address, str) and address else "0x" + bytes(signer.public_key).hex()
