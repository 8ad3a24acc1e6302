"""Serve a recording's inbound frames to a connecting client, to reproduce an incident locally."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from streams.devtools.replay.pairing import playback_frames
from streams.protocol import (
    DecodeError,
    V0AuthenticationRequest,
    decode_outbound,
)
from streams.recording.format import Recording

__all__ = ["NOT_AUTHENTICATED_FRAME", "SUCCESS_FRAME", "ReplayServer"]

log = logging.getLogger(__name__)

SUCCESS_FRAME = '{"status":"success","errors":[]}'
"""The real facilitator's success Response, byte for byte."""
NOT_AUTHENTICATED_FRAME = (
    '{"status":"error","errors":[{"msg":"Not authenticated","type":"auth.not_authenticated",'
    '"help":"Please send authentication request first"}]}'
)


class ReplayServer:
    """A websocket server that plays a recording's inbound frames to a connecting client.

    It answers the client's auth request with success (no signature check), then sends the
    recorded inbound frames (of all recorded connections, in order; see :func:`playback_frames`)
    with their original spacing divided by ``speed``, the first one at once. What the client
    sends is kept in ``received``, not answered: the recorded Responses are played instead.
    One client at a time: a new connection takes over from the current one (closed with 1001)
    and resumes the playback where it stopped; so does a reconnect after a disconnect. After the
    last frame (and ``linger`` seconds) it closes the connection with 1000 and :meth:`wait_done`
    returns.
    """

    def __init__(
        self,
        recording: Recording,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        speed: float = 1.0,
        include_auth_responses: bool = False,
        linger: float = 0.0,
    ) -> None:
        if not speed > 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        if linger < 0:
            raise ValueError(f"linger must be >= 0, got {linger}")
        self.recording = recording
        self.frames = playback_frames(recording, include_auth_responses=include_auth_responses)
        self.host = host
        self._requested_port = port
        self.speed = speed
        self.linger = linger
        self.delivered = 0
        """Frames sent so far (also the resume position)."""
        self.connections = 0
        self.received: list[str | bytes] = []
        """Every frame the client(s) sent, in order."""
        self._server: Any = None
        self._active: Any = None
        self._player: asyncio.Task[None] | None = None
        self._done: asyncio.Event | None = None

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the server is not started")
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def url(self) -> str:
        return f"ws://{self.host}:{self.port}/ws/v0/"

    @property
    def done(self) -> bool:
        return self._done is not None and self._done.is_set()

    async def start(self) -> None:
        """Listen (``port=0``: any free port, see ``.port``); OSError if the port is taken."""
        from websockets.asyncio.server import serve

        if self._server is not None:
            raise RuntimeError("the server is already started")
        self._done = asyncio.Event()
        self._server = await serve(self._handle, self.host, self._requested_port, max_size=None, close_timeout=2.0)

    async def wait_done(self) -> None:
        """Wait until every frame was played and the connection closed."""
        if self._done is None:
            raise RuntimeError("start() the server first")
        await self._done.wait()

    async def aclose(self, timeout: float = 1.0) -> None:
        """Stop listening and close any connection (1001), waiting at most ``timeout`` seconds."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        try:
            async with asyncio.timeout(timeout):
                await server.wait_closed()
        except TimeoutError:
            log.warning("replay server connections did not close within %g s", timeout)

    async def __aenter__(self) -> ReplayServer:
        await self.start()
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()

    async def _handle(self, ws: Any) -> None:
        from websockets.exceptions import ConnectionClosed

        self.connections += 1
        previous, previous_player = self._active, self._player
        self._active, self._player = ws, None
        if previous_player is not None:
            await self._reap(previous_player, stop=True)
        if previous is not None:
            await previous.close(1001, "superseded by a new connection")
        player: asyncio.Task[None] | None = None
        try:
            await self._authenticate(ws)
            if self._active is ws and not self.done:
                player = self._player = asyncio.create_task(self._play(ws), name="replay-player")
            async for message in ws:
                self.received.append(message)
        except ConnectionClosed:
            pass
        finally:
            if self._active is ws:
                self._active = None
            if player is not None:
                if self._player is player:
                    self._player = None
                await self._reap(player, stop=not self.done)

    async def _reap(self, player: asyncio.Task[None], *, stop: bool) -> None:
        """Wait for a player to end (cancelling it first if ``stop``); log it if it failed."""
        from websockets.exceptions import ConnectionClosed

        if stop:
            player.cancel()
        try:
            await asyncio.wait([player])
        finally:
            if not player.done():  # we are being cancelled ourselves
                player.cancel()
        if not player.cancelled():
            exc = player.exception()
            if exc is not None and not isinstance(exc, ConnectionClosed):
                log.error("replay player failed", exc_info=exc)

    async def _authenticate(self, ws: Any) -> None:
        while True:
            message = await ws.recv()
            self.received.append(message)
            try:
                request = decode_outbound(message)
            except DecodeError:
                request = None
            if isinstance(request, V0AuthenticationRequest):
                await ws.send(SUCCESS_FRAME)
                return
            await ws.send(NOT_AUTHENTICATED_FRAME)

    async def _play(self, ws: Any) -> None:
        loop = asyncio.get_running_loop()
        frames = self.frames
        if self.delivered < len(frames):
            base_t = frames[self.delivered].t
            base = loop.time()
            while self.delivered < len(frames):
                frame = frames[self.delivered]
                delay = base + (frame.t - base_t) / self.speed - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                await ws.send(frame.frame)
                self.delivered += 1
        if self.linger:
            await asyncio.sleep(self.linger)
        assert self._done is not None
        self._done.set()  # before closing: the handler must not cancel a finished playback
        await ws.close(1000, "replay finished")
