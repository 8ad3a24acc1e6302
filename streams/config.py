"""Client configuration: every timing and bound of DESIGN.md is a field here, with its default."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from streams.exceptions import ConfigError
from streams.protocol import MAX_FRAME_BYTES

__all__ = ["ClientConfig", "ConfigError", "validate_ws_url"]


def validate_ws_url(url: object, *, what: str = "url") -> None:
    """Raise :class:`ConfigError` (a ValueError) unless ``url`` is a ws:// or wss:// URL with a host and valid port."""
    if not isinstance(url, str):
        raise ConfigError(f"{what} must be a string like ws://127.0.0.1:8765/ws/v0/, got {type(url).__name__}")
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ConfigError(
            f"{what} must be a ws:// or wss:// URL with a host, like ws://127.0.0.1:8765/ws/v0/; got {url!r}"
        )
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed or out-of-range port
    except ValueError as exc:
        raise ConfigError(f"{what} has an invalid port: {url!r} ({exc})") from None


@dataclass(frozen=True, slots=True)
class ClientConfig:
    url: str
    """Facilitator websocket URL, e.g. ``ws://127.0.0.1:8765/ws/v0/``."""
    validator_version: str | None = None
    """Sent as ``X-Validator-Version`` (absent means "unknown" to the facilitator)."""
    runner_version: str | None = None
    """Sent as ``X-Validator-Runner-Version``."""

    heartbeat_period: float = 60.0
    ping_interval: float | None = 20.0
    ping_timeout: float | None = 20.0
    connect_timeout: float = 10.0
    auth_timeout: float = 10.0
    close_timeout: float = 5.0
    send_timeout: float = 10.0
    max_frame_bytes: int = MAX_FRAME_BYTES

    backoff_base: float = 1.0
    backoff_cap: float = 60.0
    backoff_stable_after: float = 30.0
    backoff_seed: int | None = None
    """Seed for the jitter's random source (tests and demos); None draws from the OS."""

    outbox_max_messages: int = 100_000
    outbox_max_bytes: int = 64 * 2**20
    max_pending_specs: int = 100
    """Spec updates held while disconnected beyond this count drop the oldest (reported)."""
    max_in_flight: int = 1_000
    """Status updates sent and not yet acknowledged, at most (the ack window)."""
    wire_queue_size: int = 256
    """Frames released from the outbox to the send loop at once (backpressure watermark)."""

    drain_timeout: float = 5.0
    """stop(): how long to keep sending the outbox when connected."""
    cancel_drain_timeout: float = 1.0
    """Cancellation / SIGINT: the same teardown with at most this much draining."""

    max_concurrent_jobs: int | None = 100
    dedup_window: int = 100_000
    """How many recent job uuids are remembered to dispatch each job once."""

    statsd_host: str | None = None
    statsd_port: int = 8125
    statsd_prefix: str = "facilitator_client"

    def __post_init__(self) -> None:
        validate_ws_url(self.url)
        for field in dataclasses.fields(self):
            value: Any = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if field.name == "backoff_seed":
                continue
            if value <= 0 and field.name not in ("backoff_stable_after", "drain_timeout", "cancel_drain_timeout"):
                raise ConfigError(f"{field.name} must be > 0, got {value!r}")
            if value < 0:
                raise ConfigError(f"{field.name} must be >= 0, got {value!r}")
        if self.backoff_base > self.backoff_cap:
            raise ConfigError(
                f"backoff_base ({self.backoff_base}) must not exceed backoff_cap ({self.backoff_cap})"
            )
        if self.max_concurrent_jobs is not None and self.max_concurrent_jobs <= 0:
            raise ConfigError(f"max_concurrent_jobs must be > 0 or None, got {self.max_concurrent_jobs!r}")

    @property
    def headers(self) -> dict[str, str]:
        headers = {}
        if self.validator_version is not None:
            headers["X-Validator-Version"] = self.validator_version
        if self.runner_version is not None:
            headers["X-Validator-Runner-Version"] = self.runner_version
        return headers

    def replace(self, **changes: Any) -> ClientConfig:
        return dataclasses.replace(self, **changes)
