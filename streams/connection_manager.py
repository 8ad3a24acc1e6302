"""ConnectionManager: connect, authenticate, read, and reconnect forever with jittered backoff.

It is the only owner of the transport's lifecycle. It publishes the connection state (a
BehaviorSubject), the inbound frames of authenticated connections, and a record of every attempt,
success, rejection and disconnect (``changes``) from which the PerformanceMonitor builds its
events and metrics. Nothing but the auth request is ever sent before a ``success`` Response.

Auth (``ClientConfig.auth_mode``, PROTOCOL.md "Connect-time auth"):

- ``message``: a V0AuthenticationRequest first; authenticated on its ``success`` Response.
- ``headers``: X-Timestamp / X-Public-Key / X-Signature on the opening handshake, signed afresh for
  every attempt; no auth message. The draft facilitator refuses a bad handshake with HTTP 403 and
  answers nothing on success, so the connection counts as authenticated once the handshake succeeds.
- ``both``: the headers and the message. A facilitator that already authenticated the connection by
  its headers answers the message ``auth.already_authenticated`` (connection open): that counts as
  success too, so ``both`` works against the deployed facilitator and the draft alike.

A handshake refused with HTTP 403 is an auth refusal (AuthRejected), retried at the backoff cap like
an error Response to the auth message. In ``headers`` mode a facilitator without the draft ignores the
headers and answers every frame ``auth.not_authenticated``: the first such Response ends the
connection as an auth refusal, and it is not passed on, so the status update it "answered" stays
unacknowledged and is resent (nothing is lost by choosing ``headers`` too early).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, NoReturn

import reactivex

from operators import Backoff
from streams.config import AuthMode, ClientConfig
from streams.events import ConnectionState
from streams.exceptions import UsageError
from streams.protocol import DecodeError, Response, Signer, V0AuthenticationRequest, decode, encode
from streams.safe_subject import SafeBehaviorSubject, SafeSubject
from streams.transport import CloseInfo, Transport, TransportClosed, TransportConnectError, TransportError

__all__ = [
    "AuthRejected",
    "AuthenticationFailed",
    "ConnectAttempt",
    "ConnectFailed",
    "Connected",
    "ConnectionChange",
    "ConnectionManager",
    "Disconnected",
    "Frame",
    "auth_headers",
]

log = logging.getLogger(__name__)

Frame = str | bytes


@dataclass(frozen=True, slots=True)
class ConnectAttempt:
    attempt: int


@dataclass(frozen=True, slots=True)
class ConnectFailed:
    attempt: int
    info: CloseInfo
    retry_in: float


@dataclass(frozen=True, slots=True)
class Connected:
    connection_id: int
    connect_duration: float
    """Seconds from the start of the attempt to the auth success."""
    downtime: float | None
    """Seconds since the previous connection ended (None for the first one)."""


@dataclass(frozen=True, slots=True)
class AuthRejected:
    response: Response | None
    """The facilitator's error Response; None when it answered something else or timed out."""
    description: str
    info: CloseInfo | None
    retry_in: float


@dataclass(frozen=True, slots=True)
class Disconnected:
    connection_id: int
    info: CloseInfo
    lived: float
    """Seconds the authenticated connection stayed up."""
    retry_in: float | None
    """Backoff before the next attempt; None when the client is stopping."""


@dataclass(frozen=True, slots=True)
class SignerFailed:
    """``signer.sign()`` raised (an HSM or remote signer briefly unavailable): retried with backoff."""

    attempt: int
    error: Exception
    retry_in: float


ConnectionChange = ConnectAttempt | ConnectFailed | Connected | AuthRejected | SignerFailed | Disconnected


class _SignerError(Exception):
    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


class _GuardedSigner:
    """The host's signer as the manager uses it: a raise is a _SignerError (an AUTH_FAILED, retried
    with backoff), a result that is not bytes a TypeError naming the expected type (a bug: refused)."""

    def __init__(self, signer: Signer) -> None:
        self._signer = signer

    @property
    def public_key(self) -> bytes | None:
        return self._signer.public_key

    def sign(self, data: bytes) -> bytes:
        try:
            signature: object = self._signer.sign(data)
        except Exception as exc:
            raise _SignerError(exc) from exc
        if not isinstance(signature, bytes | bytearray):
            raise TypeError(
                f"signer.sign() must return bytes (the sr25519 signature), got {type(signature).__name__}"
            )
        return bytes(signature)


_ALREADY_AUTHENTICATED = "auth.already_authenticated"
_NOT_AUTHENTICATED = "auth.not_authenticated"


def auth_headers(signer: Signer, now: float) -> dict[str, str]:
    """Connect-time auth headers (upstream draft): the sr25519 signature of the timestamp string.

    The facilitator accepts a timestamp at most 60 s old and 5 s ahead, so they are made per attempt.
    """
    if signer.public_key is None:
        raise ValueError("the signer has no public key, so it cannot authenticate")
    timestamp = str(int(now))
    signature = bytes(signer.sign(timestamp.encode()))
    return {
        "X-Timestamp": timestamp,
        "X-Public-Key": bytes(signer.public_key).hex(),
        "X-Signature": "0x" + signature.hex(),
    }


class AuthenticationFailed(Exception):
    def __init__(self, description: str, response: Response | None = None) -> None:
        super().__init__(description)
        self.response = response



async def _raise(error: Exception) -> NoReturn:
    raise error

class ConnectionManager:
    """Owns one Transport; ``run()`` keeps it connected and authenticated until ``stop()``."""

    def __init__(
        self,
        config: ClientConfig,
        signer: Signer,
        transport: Transport,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_subscriber_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        self._config = config
        self._signer = _GuardedSigner(signer)
        self._transport = transport
        self._clock = clock
        self._wall_clock = wall_clock
        """Unix time for the X-Timestamp header (injectable: tests of a skewed clock)."""
        self._backoff = Backoff(
            base=config.backoff_base,
            cap=config.backoff_cap,
            stable_after=config.backoff_stable_after,
            rng=random.Random(config.backoff_seed),
        )
        self._state: SafeBehaviorSubject[ConnectionState] = SafeBehaviorSubject(
            ConnectionState.DISCONNECTED, on_subscriber_error
        )
        self._frames: SafeSubject[Frame] = SafeSubject()
        self._changes: SafeSubject[ConnectionChange] = SafeSubject()
        self._stopping = asyncio.Event()
        self._connection_id = 0
        self._attempt = 0
        self._last_down: float | None = None
        self._connected_at = 0.0
        self._ignored_headers: Response | None = None
        """headers mode: the facilitator's ``auth.not_authenticated`` answer on this connection, if any."""
        self._task: asyncio.Task[None] | None = None

    # -- observables -------------------------------------------------------------------------
    @property
    def state(self) -> reactivex.Observable[ConnectionState]:
        return self._state

    @property
    def frames(self) -> reactivex.Observable[Frame]:
        """Inbound frames of authenticated connections, on the event loop thread."""
        return self._frames

    @property
    def changes(self) -> reactivex.Observable[ConnectionChange]:
        return self._changes

    @property
    def is_connected(self) -> bool:
        return self._state.value is ConnectionState.CONNECTED

    @property
    def connection_id(self) -> int:
        return self._connection_id

    # -- sending -----------------------------------------------------------------------------
    def send(self, frame: str) -> Coroutine[Any, Any, None]:
        """Send on the authenticated connection (await the result); TransportClosed when there is none.

        Returns the transport's own ``send`` coroutine rather than wrapping it in another one: this
        runs once per frame.
        """
        if self._state.value is not ConnectionState.CONNECTED:
            return _raise(TransportClosed(CloseInfo(None, "not connected", None)))
        return self._transport.send(frame)

    def send_many(self, frames: Sequence[str]) -> Coroutine[Any, Any, None]:
        """``send`` for several frames, in order, as one write where the transport can."""
        if self._state.value is not ConnectionState.CONNECTED:
            return _raise(TransportClosed(CloseInfo(None, "not connected", None)))
        return self._transport.send_many(frames)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Start the connection loop in a task this manager owns (``stop()`` ends it)."""
        if self._task is not None:
            raise UsageError("ConnectionManager.start() can be called once")
        self._task = asyncio.create_task(self._run(), name="facilitator-connection")

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The connection loop, for an owner that wants to learn when it fails (it never ends by itself)."""
        return self._task

    async def stop(self, close_timeout: float | None = None) -> None:
        """Close with 1000 (bounded by ``close_timeout``), end the loop, release the socket, complete the streams."""
        self._stopping.set()
        timeout = self._config.close_timeout if close_timeout is None else close_timeout
        try:
            if self._transport.is_connected():
                async with asyncio.timeout(timeout):
                    try:
                        await self._transport.close(1000, "client stopping")
                    except TransportError as exc:  # a close that fails still ends the connection
                        log.debug("close failed: %s", exc)
        except TimeoutError:
            pass
        finally:
            self._transport.abort()  # no-op after a clean close; ends a half-closed one at once
            if self._task is not None:
                self._task.cancel()
                await asyncio.wait([self._task])
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(0.5, timeout)):
                    await self._transport.wait_closed()  # the websocket's own I/O tasks end too
            self._frames.on_completed()
            self._changes.on_completed()
            self._state.on_completed()

    async def _run(self) -> None:
        """Connect, authenticate, read; on any failure back off and try again, until stop()."""
        try:
            while not self._stopping.is_set():
                delay = await self._connect_once()
                if self._stopping.is_set():
                    break
                await self._sleep(delay)
        finally:
            if self._transport.is_connected():
                self._transport.abort()
            if self._state.value is ConnectionState.CONNECTED:
                # Cancelled while connected (a teardown whose close did not finish in time): the
                # disconnect is still explained, like every other one.
                ended = self._clock()
                info = self._transport.close_info or CloseInfo(None, "client stopped; connection aborted", None)
                self._changes.on_next(Disconnected(self._connection_id, info, ended - self._connected_at, None))
            self._set_state(ConnectionState.DISCONNECTED)

    # -- internals ---------------------------------------------------------------------------
    async def _connect_once(self) -> float:
        """One connection's whole life. Returns the delay before the next attempt."""
        self._attempt += 1
        started = self._clock()
        self._set_state(ConnectionState.CONNECTING)
        self._changes.on_next(ConnectAttempt(self._attempt))
        mode = self._config.auth_mode
        try:
            # Signed before connecting: a signer that fails costs the facilitator no connection.
            headers = None if mode is AuthMode.MESSAGE else auth_headers(self._signer, self._wall_clock())
            auth_frame = None if mode is AuthMode.HEADERS else encode(V0AuthenticationRequest.from_signer(self._signer))
        except _SignerError as exc:
            self._set_state(ConnectionState.DISCONNECTED)
            delay = self._backoff.next_delay()
            self._changes.on_next(SignerFailed(self._attempt, exc.error, delay))
            return delay
        try:
            if headers is None:
                await self._transport.connect()  # the contract's old shape: custom transports keep working
            else:
                await self._transport.connect(headers=headers)
        except TransportConnectError as exc:
            self._set_state(ConnectionState.DISCONNECTED)
            if exc.info.http_status == HTTPStatus.FORBIDDEN:
                delay = self._config.backoff_cap
                self._changes.on_next(AuthRejected(None, self._forbidden(exc.info), exc.info, delay))
                return delay
            delay = self._backoff.next_delay()
            self._changes.on_next(ConnectFailed(self._attempt, exc.info, delay))
            return delay

        self._set_state(ConnectionState.AUTHENTICATING)
        try:
            await self._authenticate(auth_frame)
        except AuthenticationFailed as exc:
            delay = self._config.backoff_cap
            if exc.response is None:
                # Garbage, another message, or silence: the facilitator is not about to close, so
                # waiting for its close frame would only delay the report. Report now, then close.
                self._changes.on_next(AuthRejected(None, str(exc), None, delay))
                await self._close_quietly("auth failed")
                self._set_state(ConnectionState.DISCONNECTED)
                return delay
            info = await self._await_close()
            self._set_state(ConnectionState.DISCONNECTED)
            self._changes.on_next(AuthRejected(exc.response, str(exc), info, delay))
            return delay
        except TransportClosed as exc:
            self._set_state(ConnectionState.DISCONNECTED)
            delay = self._backoff.next_delay()
            self._changes.on_next(ConnectFailed(self._attempt, exc.info, delay))
            return delay

        self._connection_id += 1
        now = self._connected_at = self._clock()
        downtime = None if self._last_down is None else now - self._last_down
        self._backoff.connection_up(now)
        self._changes.on_next(Connected(self._connection_id, now - started, downtime))
        self._set_state(ConnectionState.CONNECTED)
        self._ignored_headers = None
        info = await self._read_until_closed()
        ended = self._clock()
        self._last_down = ended
        self._backoff.connection_down(ended)
        stopping = self._stopping.is_set()
        refused = self._ignored_headers
        retry_in = None if stopping else self._config.backoff_cap if refused else self._backoff.next_delay()
        self._changes.on_next(Disconnected(self._connection_id, info, ended - now, retry_in))
        if refused is not None:
            description = (
                f"auth headers ignored: the facilitator answered {refused.describe()} (it does not support "
                "connect-time auth; use auth_mode 'both' or 'message')"
            )
            self._changes.on_next(AuthRejected(refused, description, info, retry_in or 0.0))
        self._set_state(ConnectionState.DISCONNECTED)
        return retry_in or 0.0

    def _forbidden(self, info: CloseInfo) -> str:
        text = f"auth refused at the handshake: {info.reason}"
        if self._config.auth_mode is AuthMode.MESSAGE:
            text += " (the facilitator may require connect-time auth: try auth_mode 'both' or 'headers')"
        else:
            text += " (signature invalid, hotkey not a validator, or the clock is off by more than a minute)"
        return text

    async def _authenticate(self, frame: str | None) -> None:
        mode = self._config.auth_mode
        if frame is None:
            return  # headers mode: the handshake was the auth, the draft facilitator answers nothing more
        await self._transport.send(frame)
        try:
            async with asyncio.timeout(self._config.auth_timeout):
                reply = await self._transport.recv()
        except TimeoutError:
            raise AuthenticationFailed(
                f"no auth response within {self._config.auth_timeout:g} s"
            ) from None
        try:
            message = decode(reply)
        except DecodeError as exc:
            raise AuthenticationFailed(f"unreadable auth response: {exc}") from None
        if not isinstance(message, Response):
            raise AuthenticationFailed(
                f"expected an auth Response, got {type(message).__name__}"
            )
        if message.is_success:
            return
        if mode is AuthMode.BOTH and message.error_types == (_ALREADY_AUTHENTICATED,):
            return  # authenticated by the headers already
        raise AuthenticationFailed(f"auth rejected: {message.describe()}", message)

    async def _close_quietly(self, reason: str) -> None:
        """Close with 1000 within close_timeout (then abort): the connection is of no use any more."""
        try:
            async with asyncio.timeout(self._config.close_timeout):
                await self._transport.close(1000, reason)
        except (TimeoutError, TransportError) as exc:
            log.debug("close after a failed auth: %s", exc)
        finally:
            self._transport.abort()

    async def _await_close(self) -> CloseInfo | None:
        """After a rejected auth the facilitator closes (3000/3001): wait briefly to learn the code."""
        try:
            async with asyncio.timeout(self._config.close_timeout):
                while True:
                    await self._transport.recv()
        except TransportClosed as exc:
            return exc.info
        except TimeoutError:
            await self._transport.close(1000, "auth rejected")
            return self._transport.close_info

    async def _read_until_closed(self) -> CloseInfo:
        check = self._config.auth_mode is AuthMode.HEADERS
        try:
            while True:
                frame = await self._transport.recv()
                if check and isinstance(frame, str) and _NOT_AUTHENTICATED in frame:
                    if await self._headers_ignored(frame):
                        continue  # not an answer to what was sent: kept from the ack matching
                self._frames.on_next(frame)
        except TransportClosed as exc:
            return exc.info

    async def _headers_ignored(self, frame: str) -> bool:
        """headers mode: is ``frame`` the facilitator saying it never authenticated us? Then hang up."""
        try:
            message = decode(frame, self._config.max_frame_bytes)
        except DecodeError:
            return False
        if not isinstance(message, Response) or _NOT_AUTHENTICATED not in message.error_types:
            return False
        if self._ignored_headers is None:
            self._ignored_headers = message
            await self._transport.close(1008, "connect-time auth headers were ignored")
        return True

    async def _sleep(self, delay: float) -> None:
        if delay <= 0:
            return
        try:
            async with asyncio.timeout(delay):
                await self._stopping.wait()
        except TimeoutError:
            pass

    def _set_state(self, state: ConnectionState) -> None:
        if self._state.value is not state:
            self._state.on_next(state)
