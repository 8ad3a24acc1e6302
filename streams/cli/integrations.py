"""The flags of ``run`` that plug into the validator's own plumbing: the Django Channels layer and Prometheus.

    --channel-layer redis://HOST:PORT/DB   the validator's channels_redis layer (one, shared by both uses)
    --spec-source channels                 specs from ``machine_spec_sending`` (``--spec-channel``)
    --dispatcher channels:MODULE:ATTR      the host's routing per job; statuses back over ``job_status_updates__{uuid}``
    --prometheus-port PORT                 /metrics on 127.0.0.1 (``--prometheus-host``)
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from streams.cli.common import CliError, port
from streams.dispatchers import Dispatcher

if TYPE_CHECKING:
    from streams.client import FacilitatorClient
    from streams.integrations.channels import ChannelLayer, ChannelSpecSource
    from streams.integrations.prometheus import MetricsServer

__all__ = ["CHANNELS_DISPATCHER", "Plumbing", "add_run_flags"]

CHANNELS_DISPATCHER = "channels:"


def add_run_flags(run: argparse.ArgumentParser) -> None:
    group = run.add_argument_group("the validator's plumbing (Django Channels layer, Prometheus)")
    group.add_argument("--channel-layer", metavar="URL", help="its channels_redis layer, e.g. redis://127.0.0.1:6379/0")
    group.add_argument("--spec-source", choices=["none", "channels"], default="none",
                       help="`channels`: machine specs from the channel layer (default none)")
    group.add_argument("--spec-channel", default=None, metavar="NAME",
                       help="the channel the spec producer sends to (default machine_spec_sending)")
    group.add_argument("--prometheus-port", type=port, metavar="PORT", help="serve Prometheus /metrics on PORT")
    group.add_argument("--prometheus-host", metavar="HOST", help="address /metrics listens on (default 127.0.0.1)")


def _extra(name: str, exc: ImportError) -> CliError:
    return CliError(f"this needs the {name} extra (pip install 'facilitator-streams[{name}]'): {exc}")


class Plumbing:
    """What those flags make: one channel layer, the spec source, the dispatcher wrapper, the /metrics server."""

    def __init__(self, args: argparse.Namespace) -> None:
        """Checks the flags together (one ``error:`` line for the first problem)."""
        self._args = args
        dispatcher: str = args.dispatcher
        wants_layer = [flag for flag, wanted in (
            ("--spec-source channels", args.spec_source == "channels"),
            (f"--dispatcher {dispatcher}", dispatcher.startswith(CHANNELS_DISPATCHER)),
        ) if wanted]
        if wants_layer and not args.channel_layer:
            raise CliError(f"{wants_layer[0]} needs --channel-layer redis://HOST:PORT/DB")
        if args.channel_layer and not wants_layer:
            raise CliError("--channel-layer is used by --spec-source channels or --dispatcher channels:MODULE:ATTR")
        if args.spec_channel is not None and args.spec_source != "channels":
            raise CliError("--spec-channel needs --spec-source channels")
        if args.prometheus_host is not None and args.prometheus_port is None:
            raise CliError("--prometheus-host needs --prometheus-port")
        self.layer: ChannelLayer | None = None
        if args.channel_layer:
            try:
                from streams.integrations.channels import redis_channel_layer

                self.layer = redis_channel_layer(args.channel_layer)
            except ImportError as exc:
                raise _extra("channels", exc) from None
            except ValueError as exc:
                raise CliError(f"--channel-layer: {exc}") from None
        self.server: MetricsServer | None = None

    def dispatcher(self, spec: str, load: Callable[[str], Dispatcher]) -> Dispatcher:
        """``channels:MODULE:ATTR``: the host's handler (loaded by ``load``), statuses from the channel layer."""
        from streams.integrations.channels import ChannelsDispatcher

        target = spec.removeprefix(CHANNELS_DISPATCHER)
        module, sep, attr = target.partition(":")
        if not (module and sep and attr):
            raise CliError(f"--dispatcher must be channels:MODULE:ATTR (the host's job routing), got {spec!r}")
        assert self.layer is not None
        return ChannelsDispatcher(load(target), self.layer)

    def spec_source(self, signer: Any) -> ChannelSpecSource | None:
        if self._args.spec_source != "channels":
            return None
        from streams.integrations.channels import SPEC_CHANNEL, ChannelSpecSource

        hotkey = getattr(signer, "ss58_address", None)
        if not isinstance(hotkey, str) or not hotkey:
            raise CliError("--spec-source channels needs a hotkey with an ss58 address")
        assert self.layer is not None
        return ChannelSpecSource(self.layer, hotkey, channel=self._args.spec_channel or SPEC_CHANNEL)

    def attach(self, client: FacilitatorClient) -> None:
        """Prometheus: the client's metrics in the global REGISTRY, served on ``--prometheus-port``."""
        if self._args.prometheus_port is None:
            return
        try:
            from streams.integrations.prometheus import PrometheusSink, serve_metrics
        except ImportError as exc:
            raise _extra("prometheus", exc) from None
        host = self._args.prometheus_host or "127.0.0.1"
        try:
            self.server = serve_metrics(self._args.prometheus_port, host)
        except OSError as exc:
            raise CliError(
                f"cannot serve /metrics on {host}:{self._args.prometheus_port}: {exc.strerror or exc}"
            ) from None
        client.metrics.add_sink(PrometheusSink())

    async def aclose(self) -> None:
        if self.server is not None:
            from streams.integrations.prometheus import mark_process_dead

            self.server.close()
            mark_process_dead()
        close = getattr(self.layer, "close_pools", None)
        if close is not None:
            await close()
