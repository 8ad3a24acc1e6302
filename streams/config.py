"""Client configuration: every timing and bound of DESIGN.md is a field here, with its default.

Every field is type- and range-checked at construction (and by ``replace()``): numbers must be
finite, counts must be integers, and each has documented bounds. A value outside them raises
:class:`~streams.exceptions.ConfigError` naming the field, the value and the allowed range. The
lower bounds stop a typo from flooding the facilitator (``heartbeat_period=1e-6`` would send a
million heartbeats a second, ``backoff_base=1e-9`` thousands of connection attempts); the upper
ones stop values that can only be mistakes (a 3-minute heartbeat loses every job offer, an
infinite backoff never reconnects).
"""

from __future__ import annotations

import dataclasses
import enum
import math
import os
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from streams.exceptions import ConfigError
from streams.protocol import MAX_FRAME_BYTES
from streams.signatures import public_key_of

__all__ = [
    "BOUNDS",
    "FACILITATOR_MAX_FRAME_BYTES",
    "AuthMode",
    "Bound",
    "ClientConfig",
    "ConfigError",
    "redact_url",
    "validate_ws_url",
]

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

KiB = 2**10
MiB = 2**20
GiB = 2**30

_CONTROL_OR_SPACE = re.compile(r"[\x00-\x20\x7f-\x9f]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_STATSD_PREFIX = re.compile(r"[A-Za-z0-9_.-]+")


def redact_url(url: str) -> str:
    """The URL without its password, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")[2]
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit(parts._replace(netloc=user + netloc))


def validate_ws_url(url: object, *, what: str = "url") -> None:
    """Raise :class:`ConfigError` (a ValueError) unless ``url`` is a ws:// or wss:// URL with a host and valid port.

    Whitespace and control characters are refused anywhere in it: a URL with a newline or a space
    is a copy-paste accident, and would be sent as-is in the HTTP request line.
    """
    if not isinstance(url, str):
        raise ConfigError(f"{what} must be a string like ws://127.0.0.1:8765/ws/v0/, got {type(url).__name__}: {url!r}")
    if _CONTROL_OR_SPACE.search(url):
        raise ConfigError(f"{what} must not contain whitespace or control characters, got {url!r}")
    if len(url) > 2048:
        raise ConfigError(f"{what} must be at most 2048 characters, got {len(url)}")
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise ConfigError(
            f"{what} must be a ws:// or wss:// URL with a host, like ws://127.0.0.1:8765/ws/v0/; got {url!r}"
        )
    try:
        port = parts.port  # raises ValueError on a malformed or out-of-range port
    except ValueError as exc:
        raise ConfigError(f"{what} has an invalid port: {url!r} ({exc})") from None
    if port == 0:
        raise ConfigError(f"{what} has an invalid port: {url!r} (port 0 cannot be connected to)")


@dataclass(frozen=True, slots=True)
class Bound:
    """The allowed values of one numeric field: ``low <= value <= high``, finite, of ``kind``."""

    kind: type[int] | type[float]
    low: float
    high: float
    unit: str
    optional: bool = False
    """None is allowed too (it means "off" / "no limit"; the field's docstring says which)."""

    def describe(self) -> str:
        what = "an integer" if self.kind is int else "a finite number"
        text = f"{what} in [{_fmt(self.low)}, {_fmt(self.high)}] ({self.unit})"
        return text.replace(")", ") or None", 1) if self.optional else text

    def check(self, name: str, value: object) -> None:
        if value is None and self.optional:
            return
        ok_type = isinstance(value, int) if self.kind is int else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type:
            raise ConfigError(f"{name} must be {self.describe()}, got {type(value).__name__} {value!r}")
        assert isinstance(value, int | float)
        if not math.isfinite(value) or not self.low <= value <= self.high:
            raise ConfigError(f"{name} must be {self.describe()}, got {value!r}")


def _fmt(number: float) -> str:
    if isinstance(number, int) and number >= KiB and number % KiB == 0:
        for size, suffix in ((GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
            if number % size == 0:
                return f"{number // size} {suffix}"
    return f"{number:g}" if isinstance(number, float) else str(number)


BOUNDS: dict[str, Bound] = {
    "heartbeat_period": Bound(float, 0.05, 120.0, "seconds"),
    "ping_interval": Bound(float, 0.1, 600.0, "seconds", optional=True),
    "ping_timeout": Bound(float, 0.1, 600.0, "seconds", optional=True),
    "connect_timeout": Bound(float, 0.1, 600.0, "seconds"),
    "auth_timeout": Bound(float, 0.1, 600.0, "seconds"),
    "close_timeout": Bound(float, 0.1, 600.0, "seconds"),
    "send_timeout": Bound(float, 0.1, 600.0, "seconds"),
    "max_frame_bytes": Bound(int, 64 * KiB, MAX_FRAME_BYTES, "bytes"),
    "backoff_base": Bound(float, 0.01, 3600.0, "seconds"),
    "backoff_cap": Bound(float, 0.01, 3600.0, "seconds"),
    "backoff_stable_after": Bound(float, 0.0, 86400.0, "seconds"),
    "backoff_seed": Bound(int, -(2**63), 2**63 - 1, "seed", optional=True),
    "outbox_max_messages": Bound(int, 1, 10_000_000, "messages"),
    "outbox_max_bytes": Bound(int, 256, 64 * GiB, "bytes"),
    "max_outbound_frame_bytes": Bound(int, 64 * KiB, MAX_FRAME_BYTES, "bytes"),
    "poison_after_connections": Bound(int, 1, 1000, "connections"),
    "max_pending_specs": Bound(int, 1, 1_000_000, "messages"),
    "max_in_flight": Bound(int, 1, 1_000_000, "messages"),
    "wire_queue_size": Bound(int, 1, 1_000_000, "frames"),
    "send_batch_size": Bound(int, 1, 1_000_000, "frames"),
    "drain_timeout": Bound(float, 0.0, 3600.0, "seconds"),
    "cancel_drain_timeout": Bound(float, 0.0, 60.0, "seconds"),
    "max_concurrent_jobs": Bound(int, 1, 1_000_000, "jobs", optional=True),
    "dedup_window": Bound(int, 1, 100_000_000, "job uuids"),
    "signature_max_age": Bound(float, 1.0, 366 * 86400.0, "seconds", optional=True),
    "journal_retry_interval": Bound(float, 0.01, 3600.0, "seconds"),
    "statsd_port": Bound(int, 1, 65535, "a UDP port"),
}
"""The range of every numeric ClientConfig field (also what the CLI enforces, through ClientConfig)."""


def _check_text(name: str, value: object, *, optional: bool, pattern: re.Pattern[str], bad: str, limit: int) -> None:
    if value is None and optional:
        return
    if not isinstance(value, str):
        kind = "a string or None" if optional else "a string"
        raise ConfigError(f"{name} must be {kind}, got {type(value).__name__} {value!r}")
    if not value:
        raise ConfigError(f"{name} must not be empty" + (" (use None)" if optional else ""))
    if len(value) > limit:
        raise ConfigError(f"{name} must be at most {limit} characters, got {len(value)}")
    if pattern is _STATSD_PREFIX:
        if not pattern.fullmatch(value):
            raise ConfigError(f"{name} must be letters, digits, '_', '.' or '-' only, got {value!r}")
    elif pattern.search(value):
        raise ConfigError(f"{name} must not contain {bad}, got {value!r}")


@dataclass(frozen=True, slots=True)
class ClientConfig:
    """Where the client connects, and every timing and bound it keeps (DESIGN.md), with its default.

    All fields are checked at construction (and by :meth:`replace`); see the module docstring and
    :data:`BOUNDS`. Durations are in seconds, sizes in bytes. Build one with keyword arguments:
    ``ClientConfig(url="wss://facilitator.example/ws/v0/", heartbeat_period=30)``.
    """

    url: str
    """Facilitator websocket URL, e.g. ``ws://127.0.0.1:8765/ws/v0/``: ws:// or wss://, a host,
    a valid port; no whitespace or control characters; at most 2048 characters."""
    validator_version: str | None = None
    """Sent as ``X-Validator-Version`` (None: the header is absent, "unknown" to the facilitator).
    At most 256 characters, no control characters (it is an HTTP header value)."""
    runner_version: str | None = None
    """Sent as ``X-Validator-Runner-Version``; same rules as ``validator_version``."""
    auth_mode: AuthMode = AuthMode.MESSAGE
    """``message`` (default), ``headers`` or ``both`` (a plain string is accepted): see :class:`AuthMode`."""

    heartbeat_period: float = 60.0
    """Seconds between V0Heartbeats while connected; [0.05, 120], default 60. The facilitator offers
    jobs only to validators that sent one in the last 3 minutes, so 120 still leaves a retry; the
    floor caps them at 20 a second (``1e-6`` sent 100,000 in 6 s), low enough for tests that
    compress the 3-minute window, which production never needs (use 30-60)."""
    ping_interval: float | None = 20.0
    """Seconds between websocket pings (our keepalive); [0.1, 600] or None (no keepalive), default 20."""
    ping_timeout: float | None = 20.0
    """Seconds a ping may wait for its pong before the connection is dropped as dead; [0.1, 600]
    or None, default 20."""
    connect_timeout: float = 10.0
    """Seconds for the TCP + TLS + websocket handshake; [0.1, 600], default 10."""
    auth_timeout: float = 10.0
    """Seconds to wait for the facilitator's answer to the auth request; [0.1, 600], default 10."""
    close_timeout: float = 5.0
    """Seconds a closing handshake may take before the socket is aborted; [0.1, 600], default 5."""
    send_timeout: float = 10.0
    """Seconds one frame's write may block (a peer that stopped reading) before the connection is
    dropped; [0.1, 600], default 10."""
    max_frame_bytes: int = MAX_FRAME_BYTES
    """Largest frame sent or accepted, in bytes; [64 KiB, 50 MiB], default 50 MiB: the real
    facilitator's limit (a larger one is never useful); a job request is a few KiB."""

    backoff_base: float = 1.0
    """Seconds: the first reconnect delay is drawn from [0, base], doubling per failed attempt
    (full jitter); [0.01, 3600], default 1. Below 10 ms a dead server would see a connection storm."""
    backoff_cap: float = 60.0
    """Seconds: the largest reconnect delay, and the wait after a refused auth; [0.01, 3600] and
    >= backoff_base, default 60."""
    backoff_stable_after: float = 30.0
    """Seconds a connection must stay up before the backoff starts over (so a server that accepts
    and closes at once cannot cause a tight loop); [0, 86400], default 30."""
    backoff_seed: int | None = None
    """Seed for the jitter's random source (tests and demos); None draws from the OS."""

    outbox_max_messages: int = 100_000
    """Messages held while disconnected, at most; beyond it the oldest droppable ones go (and are
    reported); [1, 10,000,000], default 100,000."""
    outbox_max_bytes: int = 64 * MiB
    """Bytes of encoded frames held while disconnected, at most; [256, 64 GiB], default 64 MiB (below
    ~250 bytes not even one status update could be held)."""
    max_outbound_frame_bytes: int = FACILITATOR_MAX_FRAME_BYTES
    """An update whose encoded frame is bigger is refused at enqueue (raised and reported), never
    sent; [64 KiB, 50 MiB], default 16 MiB: what the production facilitator accepts."""
    poison_after_connections: int = 3
    """Report the oldest unanswered status update (SUSPECTED_POISON) once this many connections in a
    row ended without answering it (it is never dropped: a facilitator outage looks the same);
    [1, 1000], default 3."""
    max_pending_specs: int = 100
    """Spec updates held while disconnected beyond this count drop the oldest (reported);
    [1, 1,000,000], default 100."""
    max_in_flight: int = 1_000
    """Status updates sent and not yet acknowledged, at most (the ack window); [1, 1,000,000],
    default 1,000. Once full, the window takes more only when a batch's worth is free
    (``send_batch_size``, at most half the window), so a backlog goes out in batches."""
    wire_queue_size: int = 256
    """Frames released from the outbox to the send loop at once (backpressure watermark);
    [1, 1,000,000], default 256."""
    send_batch_size: int = 64
    """Frames ready to go at once are written as one batch of at most this many (one write through
    the websocket instead of one per frame; 1 = a write per frame); [1, 1,000,000], default 64."""

    drain_timeout: float = 5.0
    """stop(): how long to keep sending the outbox when connected; [0, 3600] seconds, default 5."""
    cancel_drain_timeout: float = 1.0
    """Cancellation / SIGINT: the same teardown with at most this much draining; [0, 60] seconds,
    default 1 (so Ctrl-C exits within 2 s)."""

    max_concurrent_jobs: int | None = 100
    """Jobs whose dispatcher runs at once, at most (more wait for a slot); [1, 1,000,000] or None
    (no limit), default 100."""
    dedup_window: int = 100_000
    """How many recent job uuids are remembered to dispatch each job once; [1, 100,000,000],
    default 100,000."""

    verify_signatures: bool = True
    """Verify every job request and cheat report before it reaches the host (PROTOCOL.md "Signatures").
    False is for tests only, and the client warns about it at start. A bool, default True."""
    trusted_signatories: tuple[str, ...] = ()
    """ss58 addresses allowed to sign jobs and cheat reports besides the validator's own hotkey (the
    validator's whitelist; put the facilitator's signer here). Empty (default): only the own hotkey is
    trusted, and any other signatory's job is reported `rejected` (said once at start, at INFO)."""
    signature_max_age: float | None = None
    """Refuse a signature whose timestamp is further than this many seconds from now; [1, 1 year]
    or None (default: no bound)."""
    journal_path: str | os.PathLike[str] | None = None
    """The durable journal behind the outbox (SQLite; created if missing). None (default): everything
    lives in memory. A path (str or os.PathLike), not empty."""
    journal_retry_interval: float = 5.0
    """After a journal write failed (disk full, read-only), retry the unwritten backlog this often;
    [0.01, 3600] seconds, default 5."""

    statsd_host: str | None = None
    """statsd host to mirror the metrics to; None (default) keeps them in memory only. A host name
    or address: no whitespace, at most 253 characters."""
    statsd_port: int = 8125
    """statsd UDP port; [1, 65535], default 8125."""
    statsd_prefix: str = "facilitator_client"
    """Prefix of every statsd metric name: letters, digits, ``_ . -`` (``:`` and ``|`` would break
    the statsd line format); at most 100 characters."""

    def __post_init__(self) -> None:
        validate_ws_url(self.url)
        try:
            object.__setattr__(self, "auth_mode", AuthMode(self.auth_mode))
        except ValueError:
            choices = ", ".join(mode.value for mode in AuthMode)
            raise ConfigError(f"auth_mode must be one of {choices}; got {self.auth_mode!r}") from None
        if not isinstance(self.verify_signatures, bool):
            raise ConfigError(
                f"verify_signatures must be True or False, got {type(self.verify_signatures).__name__} "
                f"{self.verify_signatures!r}"
            )
        for name in ("validator_version", "runner_version"):
            _check_text(name, getattr(self, name), optional=True, pattern=_CONTROL, bad="control characters", limit=256)
        _check_text(
            "statsd_host", self.statsd_host, optional=True, pattern=_CONTROL_OR_SPACE,
            bad="whitespace or control characters", limit=253,
        )
        _check_text("statsd_prefix", self.statsd_prefix, optional=False, pattern=_STATSD_PREFIX, bad="", limit=100)
        for name, bound in BOUNDS.items():
            bound.check(name, getattr(self, name))
        if self.journal_path is not None and not isinstance(self.journal_path, str | os.PathLike):
            raise ConfigError(f"journal_path must be a path or None, got {type(self.journal_path).__name__}")
        if isinstance(self.journal_path, str) and not self.journal_path.strip():
            raise ConfigError("journal_path must not be empty (None turns the journal off)")
        if self.backoff_base > self.backoff_cap:
            raise ConfigError(
                f"backoff_base ({self.backoff_base:g} s) must not exceed backoff_cap ({self.backoff_cap:g} s)"
            )
        self._check_signatories()

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
        """The HTTP headers of the websocket handshake (the version headers that are set)."""
        headers = {}
        if self.validator_version is not None:
            headers["X-Validator-Version"] = self.validator_version
        if self.runner_version is not None:
            headers["X-Validator-Runner-Version"] = self.runner_version
        return headers

    def replace(self, **changes: Any) -> ClientConfig:
        """A copy with ``changes`` applied, checked like a new one."""
        return dataclasses.replace(self, **changes)
