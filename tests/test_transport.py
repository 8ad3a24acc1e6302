"""WebSocketTransport against the facilitator simulator on real sockets, and the memory transport."""

from __future__ import annotations

import asyncio
import base64
import random
import socket
import time
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
from bittensor_wallet import Keypair
from websockets.exceptions import ConnectionClosedError, InvalidStatus

from streams.devtools.simulator import SUCCESS, FacilitatorSimulator
from streams.transport import (
    CloseInfo,
    Transport,
    TransportClosed,
    TransportConnectError,
    WebSocketTransport,
    memory_transport_pair,
)

AuthFrame = Callable[..., str]  # the auth_frame fixture
MiB = 2**20
pytestmark = pytest.mark.timeout(20)


@pytest.fixture
async def transports() -> AsyncIterator[list[Transport]]:
    """Transports made by a test; whatever is still open is aborted afterwards."""
    made: list[Transport] = []
    yield made
    for transport in made:
        transport.abort()


async def open_authenticated(
    sim: FacilitatorSimulator, auth_frame: AuthFrame, made: list[Transport], **options: float
) -> WebSocketTransport:
    transport = WebSocketTransport(sim.url, **options)  # type: ignore[arg-type]
    made.append(transport)
    await transport.connect()
    await transport.send(auth_frame())
    assert await transport.recv() == SUCCESS
    return transport


async def recv_closed(transport: Transport, timeout: float = 5.0) -> CloseInfo:
    """Read until the connection ends; return how it ended."""
    async with asyncio.timeout(timeout):
        with pytest.raises(TransportClosed) as caught:
            while True:
                await transport.recv()
    assert transport.close_info == caught.value.info
    assert not transport.is_connected()
    return caught.value.info


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def test_auth_success_and_version_headers(
    simulator: FacilitatorSimulator, auth_frame: AuthFrame, transports: list[Transport]
) -> None:
    transport = WebSocketTransport(
        simulator.url, headers={"X-Validator-Version": "1.4.2", "X-Validator-Runner-Version": "0.9"}
    )
    transports.append(transport)
    assert transport.close_info is None and not transport.is_connected()
    await transport.connect()
    assert transport.is_connected()
    with pytest.raises(RuntimeError, match="already connected"):
        await transport.connect()
    await transport.send(auth_frame())
    assert await transport.recv() == '{"status":"success","errors":[]}'
    headers = simulator.request_headers[1]
    assert headers["x-validator-version"] == "1.4.2"
    assert headers["x-validator-runner-version"] == "0.9"
    assert simulator.authenticated_connections == 1

    await transport.close()
    await transport.close()  # idempotent
    info = transport.close_info
    assert info is not None and info.code == 1000
    await simulator.wait_for(lambda: simulator.open_connections == 0, 2.0)

    # Reusable: connect() again opens a fresh connection.
    await transport.connect()
    assert transport.close_info is None
    await transport.send(auth_frame())
    assert await transport.recv() == SUCCESS
    assert simulator.connections == 2
    await transport.close(1001, "going away")
    assert transport.close_info is not None and transport.close_info.code == 1001


@pytest.mark.parametrize(
    ("refusal", "code", "error_type"),
    [("bad_signature", 3000, "auth.signature_invalid"), ("unknown_hotkey", 3001, "auth.validator_not_found")],
)
async def test_auth_refused_closes_with_facilitator_code(
    refusal: str,
    code: int,
    error_type: str,
    alice: Keypair,
    bob: Keypair,
    auth_frame: AuthFrame,
    transports: list[Transport],
) -> None:
    async with FacilitatorSimulator(allowed_hotkeys=[alice.ss58_address]) as sim:
        transport = WebSocketTransport(sim.url)
        transports.append(transport)
        await transport.connect()
        if refusal == "bad_signature":
            await transport.send(auth_frame(alice, signed=b"not the public key"))
        else:
            await transport.send(auth_frame(bob))
        reply = await transport.recv()
        assert isinstance(reply, str)
        error = orjson.loads(reply)["errors"][0]
        assert error["type"] == error_type
        if refusal == "unknown_hotkey":
            assert bob.ss58_address in error["help"]
        info = await recv_closed(transport)
        assert info.code == code
        assert str(code) in info.describe()
        assert "facilitator" in info.reason


async def test_stall_is_detected_by_keepalive(
    simulator: FacilitatorSimulator, auth_frame: AuthFrame, transports: list[Transport]
) -> None:
    ping_interval, ping_timeout, close_timeout = 0.2, 0.2, 2.0  # a close handshake must not be waited for
    transport = await open_authenticated(
        simulator,
        auth_frame,
        transports,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        close_timeout=close_timeout,
    )
    await simulator.stall()
    started = time.monotonic()
    info = await recv_closed(transport)
    elapsed = time.monotonic() - started
    # Detection takes at most ping interval + ping timeout, and the link is dropped at once: no
    # close_timeout spent on a close handshake that a stalled peer never answers.
    assert elapsed < ping_interval + ping_timeout + 0.5
    assert info.code == 1011
    assert info.reason == "keepalive ping timeout"
    assert isinstance(info.exception, ConnectionClosedError)


async def test_abrupt_drop_is_1006(
    simulator: FacilitatorSimulator, auth_frame: AuthFrame, transports: list[Transport]
) -> None:
    transport = await open_authenticated(simulator, auth_frame, transports)
    await simulator.drop()
    info = await recv_closed(transport)
    assert info.code == 1006
    assert isinstance(info.exception, ConnectionClosedError)
    assert info.describe().startswith("code 1006 (connection lost without a close frame) — ConnectionClosedError: ")
    with pytest.raises(TransportClosed) as caught:
        await transport.send('{"message_type": "V0Heartbeat"}')
    assert caught.value.info == info


async def test_send_many_sends_each_frame_as_its_own_message_in_one_socket_write(
    simulator: FacilitatorSimulator, auth_frame: AuthFrame, transports: list[Transport]
) -> None:
    transport = await open_authenticated(simulator, auth_frame, transports)
    ws = transport._conn.ws  # type: ignore[union-attr]
    writes: list[int] = []  # frames per write call on the asyncio transport
    real_write, real_writelines = ws.transport.write, ws.transport.writelines
    inside = False

    def write(data: bytes) -> None:
        if not inside:  # (asyncio's writelines may join and call write: that is the same one write)
            writes.append(1)
        real_write(data)

    def writelines(chunks: list[bytes]) -> None:
        nonlocal inside
        writes.append(len(chunks))
        inside = True
        try:
            real_writelines(chunks)
        finally:
            inside = False

    ws.transport.write = write  # type: ignore[method-assign]
    ws.transport.writelines = writelines  # type: ignore[method-assign]
    frames = [
        orjson.dumps({"message_type": "V0MachineSpecsUpdate", "miner_hotkey": "5F", "validator_hotkey": "5G",
                      "specs": {"cpu": {"count": n}, "ram": {}, "hard_disk": {}}, "batch_id": f"b{n}"}).decode()
        for n in range(3)
    ]
    await transport.send_many(frames)
    assert writes == [3], "three frames, one socket write"
    await simulator.wait_for(lambda: len(simulator.spec_updates) == 3, 5.0)
    assert [update["batch_id"] for update in simulator.spec_updates] == ["b0", "b1", "b2"]
    assert [received.frame for received in simulator.received[-3:]] == frames  # three messages, as sent

    await simulator.drop()
    info = await recv_closed(transport)
    with pytest.raises(TransportClosed) as caught:
        await transport.send_many(frames)
    assert caught.value.info == info


async def test_ten_mib_frames_pass_both_ways(
    simulator: FacilitatorSimulator, auth_frame: AuthFrame, transports: list[Transport]
) -> None:
    transport = await open_authenticated(simulator, auth_frame, transports)
    big = "s" * (10 * MiB)
    specs = {
        "message_type": "V0MachineSpecsUpdate",
        "miner_hotkey": "5F",
        "validator_hotkey": "5G",
        "specs": {"cpu": {"count": 1}, "ram": {}, "hard_disk": {}, "blob": big},  # extra keys fit at the top
        "batch_id": "b",
    }
    await transport.send(orjson.dumps(specs).decode())
    await simulator.wait_for(lambda: len(simulator.spec_updates) == 1, 5.0)
    assert simulator.spec_updates[0]["specs"]["blob"] == big

    job = await simulator.send_job_request(env={"BIG": big})
    frame = await transport.recv()
    assert len(frame) > 10 * MiB
    assert orjson.loads(frame)["uuid"] == job["uuid"]


async def test_inbound_frame_over_max_size_closes_1009(
    simulator: FacilitatorSimulator, auth_frame: AuthFrame, transports: list[Transport]
) -> None:
    transport = await open_authenticated(simulator, auth_frame, transports, max_size=MiB)
    await simulator.send_raw("x" * (2 * MiB))
    info = await recv_closed(transport)
    assert info.code == 1009
    assert "message too big" in info.describe()


async def test_outbound_frame_over_server_max_size_closes_1009(
    auth_frame: AuthFrame, transports: list[Transport]
) -> None:
    async with FacilitatorSimulator(max_size=MiB) as sim:
        transport = await open_authenticated(sim, auth_frame, transports)
        await transport.send("x" * (2 * MiB))
        info = await recv_closed(transport)
        assert info.code == 1009
        assert "exceeds limit" in info.reason


async def test_connect_to_closed_port_fails_fast() -> None:
    transport = WebSocketTransport(f"ws://127.0.0.1:{free_port()}/ws/v0/")
    started = time.monotonic()
    with pytest.raises(TransportConnectError) as caught:
        await transport.connect()
    assert time.monotonic() - started < 2.0
    info = caught.value.info
    assert info.code is None
    assert isinstance(info.exception, OSError)
    assert "could not connect" in info.describe()
    assert transport.close_info == info
    assert not transport.is_connected()


async def test_handshake_that_never_completes_times_out() -> None:
    writers: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)  # accept TCP, say nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    try:
        port = server.sockets[0].getsockname()[1]
        transport = WebSocketTransport(f"ws://127.0.0.1:{port}/ws/v0/", open_timeout=0.3)
        started = time.monotonic()
        with pytest.raises(TransportConnectError) as caught:
            await transport.connect()
        elapsed = time.monotonic() - started
        assert 0.25 < elapsed < 2.0
        assert isinstance(caught.value.info.exception, TimeoutError)
        assert "timed out after 0.3 s" in caught.value.info.reason
    finally:
        for writer in writers:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_wrong_path_is_a_refused_handshake(simulator: FacilitatorSimulator) -> None:
    transport = WebSocketTransport(simulator.url.replace("/ws/v0/", "/ws/v9/"))
    with pytest.raises(TransportConnectError) as caught:
        await transport.connect()
    assert isinstance(caught.value.info.exception, InvalidStatus)
    assert "HTTP 404" in caught.value.info.reason


@pytest.mark.parametrize("many", [False, True], ids=["send", "send_many"])
async def test_send_that_cannot_complete_times_out(
    simulator: FacilitatorSimulator, auth_frame: AuthFrame, transports: list[Transport], many: bool
) -> None:
    send_timeout = 0.5
    transport = await open_authenticated(simulator, auth_frame, transports, send_timeout=send_timeout)
    await simulator.stall()
    # Incompressible (permessage-deflate is on): each frame really takes its size in socket buffers.
    frame = base64.b64encode(random.Random(1).randbytes(3 * MiB)).decode()
    with pytest.raises(TransportClosed) as caught:
        for _ in range(20):  # socket buffers hold a few MiB; a stalled peer fills them at once
            started = time.monotonic()
            if many:
                await transport.send_many([frame, frame])
            else:
                await transport.send(frame)
    assert time.monotonic() - started < send_timeout + 1.0
    info = caught.value.info
    assert isinstance(info.exception, TimeoutError)
    assert info.code == 1006
    assert "0.5 s" in info.reason
    assert not transport.is_connected()
    assert transport.close_info == info
    # The transport is reusable after a dead connection.
    await transport.connect()
    await transport.send(auth_frame())
    assert await transport.recv() == SUCCESS


async def test_recv_is_cancellation_safe(
    simulator: FacilitatorSimulator, auth_frame: AuthFrame, transports: list[Transport]
) -> None:
    transport = await open_authenticated(simulator, auth_frame, transports)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await transport.recv()
    job = await simulator.send_job_request()
    assert orjson.loads(await transport.recv())["uuid"] == job["uuid"]


async def _frames_until_closed(transport: Transport) -> list[str | bytes]:
    frames: list[str | bytes] = []
    while True:
        try:
            frames.append(await transport.recv())
        except TransportClosed:
            return frames


async def test_frames_queued_before_a_close_are_read_then_close_info(
    simulator: FacilitatorSimulator, auth_frame: AuthFrame, transports: list[Transport]
) -> None:
    transport = await open_authenticated(simulator, auth_frame, transports)
    jobs = [await simulator.send_job_request() for _ in range(3)]
    await simulator.close(3001, "bye")
    frames = await _frames_until_closed(transport)
    assert [orjson.loads(f)["uuid"] for f in frames] == [job["uuid"] for job in jobs]
    assert transport.close_info is not None
    assert (transport.close_info.code, transport.close_info.reason) == (3001, "bye")


async def test_abort_and_operations_when_not_connected(
    simulator: FacilitatorSimulator, auth_frame: AuthFrame, transports: list[Transport]
) -> None:
    transport = WebSocketTransport(simulator.url)
    with pytest.raises(TransportClosed, match="not connected"):
        await transport.recv()
    with pytest.raises(TransportClosed):
        await transport.send("{}")
    await transport.close()  # nothing to close
    transport.abort()
    transports.append(transport)
    await transport.connect()
    transport.abort()
    assert not transport.is_connected()
    assert transport.close_info is not None and transport.close_info.code == 1006
    await simulator.wait_for(lambda: simulator.open_connections == 0, 2.0)


async def test_connect_after_an_unnoticed_close(
    simulator: FacilitatorSimulator, auth_frame: AuthFrame, transports: list[Transport]
) -> None:
    transport = await open_authenticated(simulator, auth_frame, transports)
    await simulator.close(1001, "restarting")
    await simulator.wait_for(lambda: simulator.open_connections == 0, 2.0)
    assert not transport.is_connected()  # nobody called recv(), yet the transport knows
    await transport.connect()
    await transport.send(auth_frame())
    assert await transport.recv() == SUCCESS


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:8765/ws/v0/", "ws://", "ws:///ws/v0/", "127.0.0.1:8765", "ws://host:99999/", ""],
)
def test_invalid_urls_are_rejected(url: str) -> None:
    with pytest.raises(ValueError, match="URL"):
        WebSocketTransport(url)


# --- memory transport ---------------------------------------------------------------------------


async def test_memory_frames_both_ways_and_clean_close() -> None:
    transport, peer = memory_transport_pair()
    await transport.connect()
    assert await peer.wait_connected() == 1
    await transport.send("hello")
    assert await peer.recv() == "hello"
    await peer.send("world")
    await peer.send(b"\x00binary")
    assert await transport.recv() == "world"
    assert await transport.recv() == b"\x00binary"
    await transport.close(1000, "done")
    with pytest.raises(TransportClosed) as caught:
        await peer.recv()
    assert (caught.value.info.code, caught.value.info.reason) == (1000, "done")
    assert transport.close_info is not None and transport.close_info.code == 1000


async def test_memory_drop_delivers_queued_frames_then_1006() -> None:
    transport, peer = memory_transport_pair()
    await transport.connect()
    await peer.send("last words")
    await peer.drop()
    assert await transport.recv() == "last words"
    with pytest.raises(TransportClosed) as caught:
        await transport.recv()
    assert caught.value.info.code == 1006
    assert isinstance(caught.value.info.exception, ConnectionClosedError)
    assert not transport.is_connected()
    with pytest.raises(TransportClosed):
        await transport.send("too late")


async def test_memory_refuse_then_reconnect_and_peer_close_code() -> None:
    transport, peer = memory_transport_pair()
    peer.refuse = True
    with pytest.raises(TransportConnectError) as caught:
        await transport.connect()
    assert isinstance(caught.value.info.exception, ConnectionRefusedError)
    assert peer.connect_attempts == 1 and peer.connections == 0
    peer.refuse = False
    await transport.connect()
    await peer.close(3001)
    assert await _frames_until_closed(transport) == []
    info = transport.close_info
    assert info is not None and info.code == 3001 and "facilitator" in info.reason
    await transport.connect()  # a fresh connection with fresh queues
    assert await peer.wait_connected(connections=2) == 2
    await transport.send("again")
    assert await peer.recv() == "again"
    transport.abort()
    assert (await peer.wait_disconnected()).code == 1006


async def test_memory_send_timeout_when_peer_stops_reading() -> None:
    transport, peer = memory_transport_pair(max_queue=2, send_timeout=0.1)
    await transport.connect()
    await transport.send("1")
    await transport.send("2")
    with pytest.raises(TransportClosed) as caught:
        await transport.send("3")
    assert isinstance(caught.value.info.exception, TimeoutError)
    assert not transport.is_connected()
    assert (await peer.wait_disconnected()).code == 1006


async def test_the_connection_manager_sends_only_on_an_authenticated_connection() -> None:
    """``send`` and ``send_many`` refuse before auth (nothing but the auth request goes out before it)."""
    from streams.config import ClientConfig
    from streams.connection_manager import ConnectionManager
    from streams.transport import memory_transport_pair

    client, _peer = memory_transport_pair()
    manager = ConnectionManager(ClientConfig(url="ws://127.0.0.1:1/ws/v0/"), Keypair.create_from_uri("//Alice"), client)
    await client.connect()  # the transport is open, but nobody authenticated on it
    for send in (manager.send("a"), manager.send_many(["a", "b"])):
        with pytest.raises(TransportClosed, match="not connected"):
            await send
    client.abort()


def test_a_batch_write_handles_end_of_stream_as_websockets_does() -> None:
    """An empty chunk from the protocol means end-of-stream: half-close when the transport can, else close."""
    from types import SimpleNamespace

    from streams.transport.websocket import _write_all

    calls: list[object] = []

    def transport(can_write_eof: bool) -> SimpleNamespace:
        return SimpleNamespace(
            writelines=lambda chunks: calls.append(list(chunks)),
            can_write_eof=lambda: can_write_eof,
            write_eof=lambda: calls.append("eof"),
            close=lambda: calls.append("close"),
        )

    _write_all(SimpleNamespace(transport=transport(True)), [b"a", b"b"])  # type: ignore[arg-type]
    assert calls == [[b"a", b"b"]]
    calls.clear()
    _write_all(SimpleNamespace(transport=transport(True)), [b"close-frame", b""])  # type: ignore[arg-type]
    assert calls == [[b"close-frame"], "eof"]
    calls.clear()
    _write_all(SimpleNamespace(transport=transport(False)), [b""])  # type: ignore[arg-type]
    assert calls == ["close"]
