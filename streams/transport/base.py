"""The transport contract: one connection at a time, with every way it can end described.

The rest of the client sees only :class:`Transport`: ``connect()``, ``send()``, ``recv()``,
``close()``, ``abort()``. Everything websocket-specific (close frames, handshake errors, keepalive,
flow control) stays in this module and comes out as a :class:`CloseInfo`, so a disconnect is never
a bare "1006". A transport never reconnects by itself: the ConnectionManager decides when.

Implementations: :mod:`streams.transport.websocket` (production) and :mod:`streams.transport.memory`
(an in-memory pair for fast tests).
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
)
from websockets.frames import CLOSE_CODE_EXPLANATIONS, Close

from streams.exceptions import TransportClosed, TransportConnectError, TransportError

__all__ = [
    "ABNORMAL_CLOSURE",
    "CloseInfo",
    "Transport",
    "TransportClosed",
    "TransportConnectError",
    "TransportError",
]

ABNORMAL_CLOSURE = 1006
"""The code reported when a connection ends without a close frame (RFC 6455 §7.1.5)."""

_NO_CLOSE_FRAME = "connection lost without a close frame"

# The facilitator's own close codes, so an empty close reason still says something.
_FACILITATOR_CODES = {
    3000: "facilitator: invalid signature",
    3001: "facilitator: validator not found, or disconnected by the facilitator",
}


@dataclass(frozen=True, slots=True)
class CloseInfo:
    """Why a connection ended (or never started): the one thing every disconnect event reports."""

    code: int | None
    """Websocket close code (1006 for an abrupt drop); None if the connection never opened."""
    reason: str
    """The close reason text, or a description when the peer gave none."""
    exception: BaseException | None
    """What ended it: ConnectionClosed*, TimeoutError, OSError, InvalidHandshake, ..."""
    http_status: int | None = None
    """The HTTP status of a refused opening handshake (e.g. 403: connect-time auth refused)."""

    def describe(self) -> str:
        """One line for logs and events: ``code 3001 (reason) — ConnectionClosedError: ...``."""
        text = "never connected" if self.code is None else f"code {self.code}"
        if self.reason:
            text += f" ({self.reason})"
        exc = self.exception
        if exc is not None:
            text += f" — {_exception_text(exc)}"
            cause = exc.__cause__
            if cause is not None and not isinstance(cause, asyncio.CancelledError):
                text += f" (caused by {_exception_text(cause)})"
        return text


def _exception_text(exc: BaseException) -> str:
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__



def _code_description(code: int) -> str:
    return _FACILITATOR_CODES.get(code) or CLOSE_CODE_EXPLANATIONS.get(code, "")


def _send_timed_out(timeout: float) -> CloseInfo:
    error = TimeoutError("send blocked: the peer is not reading, or the link is down")
    return CloseInfo(ABNORMAL_CLOSURE, f"send did not complete within {timeout:g} s; connection aborted", error)


def _closed_info(exc: ConnectionClosed) -> CloseInfo:
    """Turn websockets' ConnectionClosed into a CloseInfo: the peer's frame first, then ours."""
    frame = exc.rcvd if exc.rcvd is not None else exc.sent
    if frame is None:
        return CloseInfo(ABNORMAL_CLOSURE, _NO_CLOSE_FRAME, exc)
    return CloseInfo(frame.code, frame.reason or _code_description(frame.code), exc)


def _closed_exception(code: int | None, reason: str, *, initiated: bool) -> ConnectionClosed:
    """A websockets-shaped exception for the memory transport, so both transports look alike."""
    if code is None or code == ABNORMAL_CLOSURE:
        return ConnectionClosedError(None, None)
    frame = Close(code, reason)
    cls = ConnectionClosedOK if code in (1000, 1001) else ConnectionClosedError
    return cls(frame, frame, not initiated)


class Transport(abc.ABC):
    """One connection at a time; reusable (connect() again after it ends); never reconnects itself."""

    @abc.abstractmethod
    async def connect(self, *, headers: Mapping[str, str] | None = None) -> None:
        """Open a new connection; TransportConnectError on failure, RuntimeError if already open.

        ``headers`` go with this attempt's opening handshake only (connect-time auth signs a fresh
        timestamp per attempt), on top of any the transport sends every time.
        """

    @abc.abstractmethod
    async def send(self, frame: str) -> None:
        """Send one text frame; TransportClosed if the connection has ended or the send timed out."""

    async def send_many(self, frames: Sequence[str]) -> None:
        """Send text frames in order, each its own message, as one write where the transport can.

        TransportClosed if the connection has ended or the send timed out; then any prefix of the
        frames may have been sent (as with ``send``, whether the last one arrived is unknown).
        By default, ``send`` for each frame.
        """
        for frame in frames:
            await self.send(frame)

    @abc.abstractmethod
    async def recv(self) -> str | bytes:
        """Next inbound frame (bytes for a binary frame); TransportClosed when the connection ends."""

    @abc.abstractmethod
    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close with a close handshake, bounded by the close timeout; idempotent."""

    @abc.abstractmethod
    def abort(self) -> None:
        """Drop the connection at once, without a close handshake."""

    async def wait_closed(self) -> None:  # noqa: B027 - optional hook, nothing to wait for by default
        """Wait until the last connection released its resources (its I/O tasks), after close/abort."""

    @abc.abstractmethod
    def is_connected(self) -> bool:
        """True from a successful connect() until the connection ends."""

    @property
    @abc.abstractmethod
    def close_info(self) -> CloseInfo | None:
        """Why the last connection ended (or failed to open); None while open or never opened."""
