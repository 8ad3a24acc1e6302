"""An in-memory transport and its scripted server-side peer: the Transport contract without sockets."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass

from streams.exceptions import TransportClosed, TransportConnectError
from streams.transport.base import (
    _NO_CLOSE_FRAME,
    ABNORMAL_CLOSURE,
    CloseInfo,
    Transport,
    _closed_exception,
    _code_description,
    _send_timed_out,
)

__all__ = ["MemoryPeer", "MemoryTransport", "memory_transport_pair"]


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
        self.request_headers: list[dict[str, str]] = []
        """The per-attempt headers of every connect() (what a websocket server would see)."""
        self._max_queue = max_queue
        self._link: _Link | None = None
        self._changed = asyncio.Event()

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def _open(self, headers: Mapping[str, str] | None = None) -> _Link:
        self.connect_attempts += 1
        self.request_headers.append(dict(headers or {}))
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

    async def connect(self, *, headers: Mapping[str, str] | None = None) -> None:
        if self.is_connected():
            raise RuntimeError("transport is already connected (close() or abort() it first)")
        await asyncio.sleep(0)  # a real connect yields; keep callers honest about that
        try:
            self._link = self.peer._open(headers)
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
