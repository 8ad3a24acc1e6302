"""Client configuration: every timing and bound of DESIGN.md is a field here, with its default."""

from __future__ import annotations

import dataclasses
import enum
import os
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from streams.exceptions import ConfigError
from streams.protocol import MAX_FRAME_BYTES
from streams.signatures import public_key_of

__all__ = ["FACILITATOR_MAX_FRAME_BYTES", "AuthMode", "ClientConfig", "ConfigError", "redact_url", "validate_ws_url"]

FACILITATOR_MAX_FRAME_BYTES = 16 * 2**20
"""The largest frame the production facilitator accepts (uvicorn's default; bigger ones close the link 1009)."""


class AuthMode(enum.StrEnum):
    """How the client authenticates each connection (PROTOCOL.md, "Connect-time auth")."""

    MESSAGE = "message"
    """A V0AuthenticationRequest after connecting, answered by a Response (the deployed facilitator)."""
    HEADERS = "headers"
    """X-Timestamp/X-Public-Key/X-Signature on the opening handshake (the upstream draft); no auth message."""
    BOTH = "both"
    """Both: works with either facilitator while the draft rolls out."""


def redact_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


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
    auth_mode: AuthMode = AuthMode.MESSAGE
    """``message`` (default), ``headers`` or ``both`` (a plain string is accepted): see :class:`AuthMode`."""

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
    max_outbound_frame_bytes: int = FACILITATOR_MAX_FRAME_BYTES
    """An update whose encoded frame is bigger is refused at enqueue (raised and reported), never sent."""
    poison_after_connections: int = 3
    """Report the oldest unanswered status update (SUSPECTED_POISON) once this many connections in a
    row ended without answering it (it is never dropped: a facilitator outage looks the same)."""
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

    verify_signatures: bool = True
    """Verify every job request and cheat report before it reaches the host (PROTOCOL.md "Signatures").
    False is for tests only, and the client warns about it at start."""
    trusted_signatories: tuple[str, ...] = ()
    """ss58 addresses allowed to sign jobs besides the validator's own hotkey. Empty: any valid
    signatory is accepted (as a validator with no whitelist does), with a warning at start."""
    signature_max_age: float | None = None
    """Refuse a signature whose timestamp is further than this many seconds from now; None: no bound."""
    journal_path: str | os.PathLike[str] | None = None
    """The durable journal behind the outbox (SQLite; created if missing). None: everything lives in memory."""
    journal_retry_interval: float = 5.0
    """After a journal write failed (disk full, read-only), retry the unwritten backlog this often."""

    statsd_host: str | None = None
    statsd_port: int = 8125
    statsd_prefix: str = "facilitator_client"

    def __post_init__(self) -> None:
        validate_ws_url(self.url)
        try:
            object.__setattr__(self, "auth_mode", AuthMode(self.auth_mode))
        except ValueError:
            choices = ", ".join(mode.value for mode in AuthMode)
            raise ConfigError(f"auth_mode must be one of {choices}; got {self.auth_mode!r}") from None
        if self.journal_path is not None and not isinstance(self.journal_path, str | os.PathLike):
            raise ConfigError(f"journal_path must be a path or None, got {type(self.journal_path).__name__}")
        if isinstance(self.journal_path, str) and not self.journal_path.strip():
            raise ConfigError("journal_path must not be empty (None turns the journal off)")
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
        self._check_signatories()
        if self.max_concurrent_jobs is not None and self.max_concurrent_jobs <= 0:
            raise ConfigError(f"max_concurrent_jobs must be > 0 or None, got {self.max_concurrent_jobs!r}")

    def _check_signatories(self) -> None:
        signatories = self.trusted_signatories
        if isinstance(signatories, str) or not isinstance(signatories, tuple | list | frozenset | set):
            raise ConfigError(
                f"trusted_signatories must be a tuple of ss58 addresses, got {type(signatories).__name__}"
            )
        object.__setattr__(self, "trusted_signatories", tuple(signatories))
        for index, address in enumerate(self.trusted_signatories):
            try:
                public_key_of(address)
            except ValueError as exc:
                raise ConfigError(f"trusted_signatories[{index}]: {exc}") from None

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
