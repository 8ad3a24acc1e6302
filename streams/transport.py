"""Transports: one websocket connection at a time, with every way it can end described.

The rest of the client sees only :class:`Transport`: ``connect()``, ``send()``, ``recv()``,
``close()``, ``abort()``. Everything websocket-specific (close frames, handshake errors, keepalive,
flow control) stays in this module and comes out as a :class:`CloseInfo`, so a disconnect is never
a bare "1006". A transport never reconnects by itself: the ConnectionManager decides when.

:func:`memory_transport_pair` gives an in-memory transport and its server-side peer for fast tests.
"""

from __future__ import annotations

import abc
import asyncio
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import (
    ConnectionClosed,
    ConnectionClosedError,
    ConnectionClosedOK,
    InvalidHandshake,
    InvalidStatus,
    WebSocketException,
)
from websockets.frames import CLOSE_CODE_EXPLANATIONS, Close
from websockets.protocol import State

if TYPE_CHECKING:
    from streams.config import ClientConfig

__all__ = [
    "CloseInfo",
    "MemoryPeer",
    "MemoryTransport",
    "Transport",
    "TransportClosed",
    "TransportConnectError",
    "TransportError",
    "WebSocketTransport",
    "memory_transport_pair",
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


class TransportError(Exception):
    """Base of the transport's errors; ``info`` says what happened to the connection."""

    def __init__(self, info: CloseInfo) -> None:
        super().__init__(info.describe())
        self.info = info


class TransportConnectError(TransportError):
    """connect() failed: refused, unreachable, handshake rejected, or open timeout."""


class TransportClosed(TransportError):
    """send()/recv() on a connection that has ended; ``info`` says why it ended."""


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
    async def connect(self) -> None:
        """Open a new connection; TransportConnectError on failure, RuntimeError if already open."""

    @abc.abstractmethod
    async def send(self, frame: str) -> None:
        """Send one text frame; TransportClosed if the connection has ended or the send timed out."""

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

    def __aiter__(self) -> Transport:
        return self

    async def __anext__(self) -> str | bytes:
        """Frames until the connection ends; then ``close_info`` says why."""
        try:
            return await self.recv()
        except TransportClosed:
            raise StopAsyncIteration from None


def _validate_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(f"transport URL must start with ws:// or wss://, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"transport URL has no host: {url!r} (expected e.g. ws://127.0.0.1:8765/ws/v0/)")
    try:
        parts.port  # noqa: B018 - raises ValueError on a malformed or out-of-range port
    except ValueError as exc:
        raise ValueError(f"transport URL has an invalid port: {url!r} ({exc})") from None


@dataclass(slots=True)
class _Connection:
    ws: ClientConnection
    info: CloseInfo | None = None
    send_started: float | None = None
    """loop.time() when the send in progress began (None between sends)."""
    watchdog: asyncio.TimerHandle | None = None
    """The one timer that bounds sends on this connection (see WebSocketTransport.send)."""
    send_timed_out: bool = False
    keepalive: asyncio.Task[None] | None = None
    """Pings the peer every ping_interval; aborts the link when a pong is late (see _keepalive)."""


class WebSocketTransport(Transport):
    """A :class:`Transport` over the websockets library (new asyncio API).

    Keepalive is ours, not websockets': a peer that does not answer a ping within ``ping_timeout``
    ends the connection at once, 1011 "keepalive ping timeout", within ``ping_interval +
    ping_timeout`` of going silent (websockets' own would then wait ``close_timeout`` more for a close
    handshake that a half-open link never completes). ``headers`` go with every opening handshake
    (X-Validator-Version, X-Validator-Runner-Version).
    """

    def __init__(
        self,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        max_size: int = 50 * 2**20,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = 20.0,
        open_timeout: float = 10.0,
        close_timeout: float = 5.0,
        send_timeout: float = 10.0,
    ) -> None:
        _validate_url(url)
        self.url = url
        self._headers = dict(headers or {})
        self._max_size = max_size
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._open_timeout = open_timeout
        self._close_timeout = close_timeout
        self._send_timeout = send_timeout
        self._conn: _Connection | None = None
        self._last_conn: _Connection | None = None
        """The most recent connection, kept after it ended so teardown can release it fully."""
        self._connecting = False
        self._close_info: CloseInfo | None = None

    @classmethod
    def from_config(cls, config: ClientConfig) -> WebSocketTransport:
        """The transport a FacilitatorClient uses for ``config`` (its URL, headers and timings)."""
        return cls(
            config.url,
            headers=config.headers,
            max_size=config.max_frame_bytes,
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
            open_timeout=config.connect_timeout,
            close_timeout=config.close_timeout,
            send_timeout=config.send_timeout,
        )

    async def connect(self) -> None:
        if self.is_connected() or self._connecting:
            raise RuntimeError("transport is already connected (close() or abort() it first)")
        if self._conn is not None:  # ended (or ending) without anyone noticing: settle it first
            self._settle(self._conn)
        self._connecting = True
        try:
            ws = await connect(
                self.url,
                additional_headers=self._headers,
                max_size=self._max_size,
                ping_interval=None,  # see _keepalive
                open_timeout=self._open_timeout,
                close_timeout=self._close_timeout,
            )
        except (OSError, TimeoutError, WebSocketException) as exc:
            self._close_info = CloseInfo(None, self._connect_failure(exc), exc)
            raise TransportConnectError(self._close_info) from exc
        finally:
            self._connecting = False
        self._conn = self._last_conn = conn = _Connection(ws)
        self._close_info = None
        if self._ping_interval is not None and self._ping_timeout is not None:
            conn.keepalive = asyncio.get_running_loop().create_task(
                self._keepalive(conn, self._ping_interval, self._ping_timeout), name="transport-keepalive"
            )

    async def _keepalive(self, conn: _Connection, interval: float, timeout: float) -> None:
        """Owned by the connection: cancelled when it ends, awaited by wait_closed()."""
        ws = conn.ws
        while conn.info is None:
            await asyncio.sleep(interval)
            try:
                async with asyncio.timeout(timeout):  # the ping's own write counts: a stalled peer blocks it
                    pong = await ws.ping()
                    await pong
            except ConnectionClosed:
                return
            except TimeoutError:
                error = ConnectionClosedError(Close(1011, "keepalive ping timeout"), None)
                self._ended(conn, CloseInfo(1011, "keepalive ping timeout", error))
                ws.transport.abort()
                return

    def _connect_failure(self, exc: BaseException) -> str:
        if isinstance(exc, TimeoutError):
            return f"opening handshake with {self.url} timed out after {self._open_timeout:g} s"
        if isinstance(exc, InvalidStatus):
            response = exc.response
            status = f"HTTP {response.status_code} {response.reason_phrase}"
            return f"{self.url} rejected the websocket handshake: {status}"
        if isinstance(exc, InvalidHandshake):
            return f"websocket handshake with {self.url} failed: {exc}"
        if isinstance(exc, OSError):
            return f"could not connect to {self.url}: {exc.strerror or exc}"
        return f"could not connect to {self.url}: {exc}"

    def _ended(self, conn: _Connection, info: CloseInfo) -> CloseInfo:
        """Record why ``conn`` ended (first report wins) and forget it if it is the current one."""
        if conn.watchdog is not None:
            conn.watchdog.cancel()
            conn.watchdog = None
        if conn.keepalive is not None and conn.keepalive is not asyncio.current_task():
            conn.keepalive.cancel()
        if conn.info is None:
            conn.info = info
        if self._conn is conn:
            self._conn = None
            self._close_info = conn.info
        return conn.info

    def _settle(self, conn: _Connection) -> None:
        ws = conn.ws
        if ws.state is State.CLOSED:
            self._ended(conn, _closed_info(ws.close_exc))
        else:
            ws.transport.abort()
            self._ended(conn, CloseInfo(ABNORMAL_CLOSURE, "connection was closing; aborted", None))

    def _current(self) -> _Connection:
        conn = self._conn
        if conn is None:
            raise TransportClosed(self._close_info or CloseInfo(None, "not connected", None))
        return conn

    async def send(self, frame: str) -> None:
        conn = self._current()
        # Bounded by a watchdog timer per connection, not a timeout per frame: asyncio.timeout()
        # costs more than the send itself when nothing blocks (profiled: ~15% of the client's CPU
        # per status update), and wait_for() is worse (a task per frame).
        loop = asyncio.get_running_loop()
        conn.send_started = started = loop.time()
        if conn.watchdog is None:
            conn.watchdog = loop.call_at(started + self._send_timeout, self._watchdog, conn)
        try:
            await conn.ws.send(frame)
        except ConnectionClosed as exc:
            raise TransportClosed(self._ended(conn, _closed_info(exc))) from exc
        finally:
            conn.send_started = None
        if conn.send_timed_out:  # aborted by the watchdog; websockets then ends the send quietly
            raise TransportClosed(self._ended(conn, _send_timed_out(self._send_timeout))) from TimeoutError()

    def _watchdog(self, conn: _Connection) -> None:
        """Abort ``conn`` if its send in progress started ``send_timeout`` ago or more."""
        conn.watchdog = None
        started = conn.send_started
        if started is None or conn.info is not None:
            return  # idle (the next send re-arms it) or already ended
        loop = asyncio.get_running_loop()
        deadline = started + self._send_timeout
        if deadline - loop.time() > 0.001:  # a later send than the one that armed it: wait for its deadline
            conn.watchdog = loop.call_at(deadline, self._watchdog, conn)
            return
        # A send stuck in flow control means the peer stopped reading: count the link as dead.
        conn.send_timed_out = True
        self._ended(conn, _send_timed_out(self._send_timeout))
        conn.ws.transport.abort()

    async def recv(self) -> str | bytes:
        conn = self._current()
        try:
            return await conn.ws.recv()  # cancellation-safe in websockets' asyncio API
        except ConnectionClosed as exc:
            raise TransportClosed(self._ended(conn, _closed_info(exc))) from exc

    async def close(self, code: int = 1000, reason: str = "") -> None:
        conn = self._conn
        if conn is None:
            return
        ws = conn.ws
        try:
            # websockets bounds the handshake by close_timeout; the outer bound is a safety net.
            async with asyncio.timeout(self._close_timeout + 1.0):
                await ws.close(code, reason)
        except TimeoutError as exc:
            ws.transport.abort()
            info = CloseInfo(ABNORMAL_CLOSURE, "close handshake timed out; connection aborted", exc)
            self._ended(conn, info)
            return
        self._ended(conn, _closed_info(ws.close_exc))

    def abort(self) -> None:
        conn = self._conn
        if conn is None:
            last = self._last_conn
            if last is not None and last.ws.state is not State.CLOSED:
                last.ws.transport.abort()  # a closing handshake that nobody waits for any more
            return
        if conn.ws.state is State.CLOSED:  # already over: keep the real reason
            self._settle(conn)
            return
        conn.ws.transport.abort()
        self._ended(conn, CloseInfo(ABNORMAL_CLOSURE, "connection aborted by the client", None))

    async def wait_closed(self) -> None:
        conn = self._last_conn
        if conn is None:
            return
        await conn.ws.wait_closed()
        if conn.keepalive is not None:
            conn.keepalive.cancel()
            await asyncio.wait([conn.keepalive])

    def is_connected(self) -> bool:
        """True while the connection is open (a closing one no longer counts)."""
        return self._conn is not None and self._conn.ws.state is State.OPEN

    @property
    def close_info(self) -> CloseInfo | None:
        return self._close_info


# ---------------------------------------------------------------------------------------------
# In-memory transport: the same contract without sockets, for fast tests of the layers above.
# ---------------------------------------------------------------------------------------------


class _Channel:
    """A one-way frame queue that can be ended: readers drain queued frames, then get the end."""

    def __init__(self, capacity: int) -> None:
        self._items: deque[str | bytes] = deque()
        self._capacity = capacity
        self._changed = asyncio.Event()
        self.end: CloseInfo | None = None

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def put(self, item: str | bytes) -> None:
        while self.end is None and self._capacity and len(self._items) >= self._capacity:
            await self._changed.wait()
        if self.end is not None:
            raise TransportClosed(self.end)
        self._items.append(item)
        self._notify()

    async def get(self) -> str | bytes:
        while not self._items:
            if self.end is not None:
                raise TransportClosed(self.end)
            await self._changed.wait()
        item = self._items.popleft()
        self._notify()
        return item

    def finish(self, info: CloseInfo) -> None:
        if self.end is None:
            self.end = info
            self._notify()


@dataclass(slots=True)
class _Link:
    """One in-memory "connection": a channel each way plus each side's view of how it ended."""

    number: int
    to_client: _Channel
    to_peer: _Channel
    client_info: CloseInfo | None = None
    peer_info: CloseInfo | None = None

    @property
    def open(self) -> bool:
        return self.client_info is None

    def end(self, client_info: CloseInfo, peer_info: CloseInfo) -> None:
        if self.client_info is not None:
            return
        self.client_info, self.peer_info = client_info, peer_info
        # The client's inbound frames drain before its end; its sends fail at once.
        self.to_client.finish(client_info)
        self.to_peer.finish(peer_info)


def _dropped(description: str) -> CloseInfo:
    return CloseInfo(ABNORMAL_CLOSURE, description, _closed_exception(None, "", initiated=False))


class MemoryPeer:
    """The server side of :func:`memory_transport_pair`: scripted by tests."""

    def __init__(self, *, max_queue: int) -> None:
        self.refuse = False
        """While True, the client's connect() fails with TransportConnectError."""
        self.connections = 0
        """Connections accepted so far."""
        self.connect_attempts = 0
        self._max_queue = max_queue
        self._link: _Link | None = None
        self._changed = asyncio.Event()

    @property
    def accept_connections(self) -> bool:
        """The inverse of ``refuse``."""
        return not self.refuse

    @accept_connections.setter
    def accept_connections(self, value: bool) -> None:
        self.refuse = not value

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _open(self) -> _Link:
        self.connect_attempts += 1
        if self.refuse:
            self._notify()
            refused = ConnectionRefusedError("peer.refuse is set")
            raise TransportConnectError(CloseInfo(None, "memory peer refuses connections", refused))
        old = self._link
        if old is not None:
            old.end(_dropped("superseded by a new connection"), _dropped("superseded by a new connection"))
        self.connections += 1
        link = _Link(self.connections, _Channel(0), _Channel(self._max_queue))
        self._link = link
        self._notify()
        return link

    def _ended(self) -> None:
        self._notify()

    def is_connected(self) -> bool:
        return self._link is not None and self._link.open

    def _current(self) -> _Link:
        link = self._link
        if link is None:
            raise TransportClosed(CloseInfo(None, "no client has connected", None))
        return link

    async def wait_connected(self, connections: int = 1, timeout: float = 5.0) -> int:
        """Wait until a connection is open and at least ``connections`` were accepted; returns the count."""
        async with asyncio.timeout(timeout):
            while not (self.is_connected() and self.connections >= connections):
                await self._changed.wait()
        return self.connections

    async def wait_disconnected(self, timeout: float = 5.0) -> CloseInfo:
        """Wait until the current connection has ended; returns how the peer saw it end."""
        link = self._current()
        async with asyncio.timeout(timeout):
            while link.peer_info is None:
                await self._changed.wait()
        return link.peer_info

    async def send(self, frame: str | bytes) -> None:
        """Deliver a frame to the client; TransportClosed if the connection has ended."""
        link = self._current()
        try:
            await link.to_client.put(frame)
        except TransportClosed:
            assert link.peer_info is not None
            raise TransportClosed(link.peer_info) from None

    async def recv(self) -> str | bytes:
        """Next frame the client sent; TransportClosed (with the client's code) when it ends."""
        return await self._current().to_peer.get()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """A clean close from the server side: the client sees ``code`` and ``reason``."""
        link = self._current()
        description = reason or _code_description(code)
        link.end(
            CloseInfo(code, description, _closed_exception(code, reason, initiated=False)),
            CloseInfo(code, description, _closed_exception(code, reason, initiated=True)),
        )
        self._notify()

    async def drop(self) -> None:
        """An abrupt drop (no close frame): the client sees 1006."""
        link = self._current()
        link.end(_dropped(_NO_CLOSE_FRAME), _dropped("dropped by the peer"))
        self._notify()


class MemoryTransport(Transport):
    """The client side of :func:`memory_transport_pair`."""

    def __init__(self, peer: MemoryPeer, *, send_timeout: float = 10.0) -> None:
        self.peer = peer
        self._send_timeout = send_timeout
        self._link: _Link | None = None
        self._close_info: CloseInfo | None = None

    async def connect(self) -> None:
        if self.is_connected():
            raise RuntimeError("transport is already connected (close() or abort() it first)")
        await asyncio.sleep(0)  # a real connect yields; keep callers honest about that
        try:
            self._link = self.peer._open()
        except TransportConnectError as exc:
            self._link = None
            self._close_info = exc.info
            raise
        self._close_info = None

    def _current(self) -> _Link:
        link = self._link
        if link is None:
            raise TransportClosed(self._close_info or CloseInfo(None, "not connected", None))
        if link.client_info is not None:
            self._close_info = link.client_info
            raise TransportClosed(link.client_info)
        return link

    async def send(self, frame: str) -> None:
        link = self._current()
        try:
            async with asyncio.timeout(self._send_timeout):
                await link.to_peer.put(frame)
        except TimeoutError as exc:
            info = _send_timed_out(self._send_timeout)
            link.end(info, _dropped("client aborted after a send timeout"))
            self._close_info = link.client_info
            self.peer._ended()
            raise TransportClosed(info) from exc
        except TransportClosed:
            assert link.client_info is not None
            self._close_info = link.client_info
            raise TransportClosed(link.client_info) from None

    async def recv(self) -> str | bytes:
        link = self._link
        if link is None:
            raise TransportClosed(self._close_info or CloseInfo(None, "not connected", None))
        try:
            return await link.to_client.get()
        except TransportClosed:
            self._close_info = link.client_info
            raise

    async def close(self, code: int = 1000, reason: str = "") -> None:
        link = self._link
        if link is None or not link.open:
            return
        description = reason or _code_description(code)
        link.end(
            CloseInfo(code, description, _closed_exception(code, reason, initiated=True)),
            CloseInfo(code, description, _closed_exception(code, reason, initiated=False)),
        )
        self._close_info = link.client_info
        self.peer._ended()
        await asyncio.sleep(0)

    def abort(self) -> None:
        link = self._link
        if link is None or not link.open:
            return
        link.end(_dropped("connection aborted by the client"), _dropped(_NO_CLOSE_FRAME))
        self._close_info = link.client_info
        self.peer._ended()

    def is_connected(self) -> bool:
        return self._link is not None and self._link.open

    @property
    def close_info(self) -> CloseInfo | None:
        link = self._link
        if link is not None and link.client_info is not None:
            return link.client_info
        return self._close_info


def memory_transport_pair(*, max_queue: int = 0, send_timeout: float = 10.0) -> tuple[MemoryTransport, MemoryPeer]:
    """An in-memory client transport and its server-side peer.

    ``max_queue`` bounds the frames the peer has not read yet (0 = unbounded); with a bound, a
    peer that stops reading makes the client's send time out, as a stalled socket would.
    """
    peer = MemoryPeer(max_queue=max_queue)
    return MemoryTransport(peer, send_timeout=send_timeout), peer
