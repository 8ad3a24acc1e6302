"""Connect-time auth (PROTOCOL.md, "Connect-time auth", an upstream draft): ``auth_mode`` headers/both.

The server here does what the draft says: it checks X-Timestamp (at most 60 s old, at most 5 s in the
future), X-Public-Key and X-Signature (sr25519 over the timestamp string) in the opening handshake
and refuses with HTTP 403 otherwise. Once the handshake succeeds the connection is authenticated: an
auth message is answered ``auth.already_authenticated`` (the connection stays open).
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Any

import orjson
import pytest
from bittensor_wallet import Keypair
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from streams import ClientConfig
from streams.cli import build_parser
from streams.cli import main as cli_main
from streams.config import AuthMode
from streams.connection_manager import auth_headers
from streams.devtools.simulator import ALREADY_AUTHENTICATED, SUCCESS, FacilitatorSimulator
from streams.exceptions import ConfigError
from streams.transport import memory_transport_pair
from tests.helpers import ALICE, fast_config, running_client, wait_until

pytestmark = pytest.mark.timeout(30)

MAX_AGE = 60
MAX_AHEAD = 5


class HeaderAuthFacilitator:
    """A websocket server on 127.0.0.1 doing the draft's handshake auth (``skew``: its clock's offset)."""

    def __init__(self, skew: float = 0.0) -> None:
        self.skew = skew
        self.attempts: list[Headers] = []
        self.refusals: list[str] = []
        self.authenticated: list[str] = []
        self.frames: list[dict[str, Any]] = []
        self.url = ""

    def _check(self, connection: ServerConnection, request: Request) -> Response | None:
        headers = request.headers
        self.attempts.append(headers)
        problem = self._problem(headers)
        if problem is None:
            return None
        self.refusals.append(problem)
        return connection.respond(HTTPStatus.FORBIDDEN, f"{problem}\n")

    def _problem(self, headers: Headers) -> str | None:
        timestamp, public_key, signature = (headers.get(h) for h in ("X-Timestamp", "X-Public-Key", "X-Signature"))
        if timestamp is None or public_key is None or signature is None:
            return "missing auth headers"
        try:
            age = time.time() + self.skew - int(timestamp)
        except ValueError:
            return "bad timestamp"
        if age > MAX_AGE or age < -MAX_AHEAD:
            return f"timestamp out of range (age {age:.0f} s)"
        try:
            keypair = Keypair(public_key=public_key, ss58_format=42)
            valid = keypair.verify(timestamp.encode(), signature)
        except Exception as exc:
            return f"unusable key or signature: {exc}"
        if not valid:
            return "signature invalid"
        self.authenticated.append(keypair.ss58_address)
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        async for frame in ws:
            message = orjson.loads(frame)
            self.frames.append(message)
            kind = message.get("message_type")
            if kind == "V0AuthenticationRequest":
                await ws.send(ALREADY_AUTHENTICATED)  # the handshake authenticated this connection
            elif kind == "V0JobStatusUpdate":
                await ws.send(SUCCESS)

    def kinds(self) -> list[str]:
        return [frame.get("message_type", "?") for frame in self.frames]


@contextlib.asynccontextmanager
async def header_facilitator(skew: float = 0.0) -> AsyncIterator[HeaderAuthFacilitator]:
    facilitator = HeaderAuthFacilitator(skew)
    async with serve(facilitator._handle, "127.0.0.1", 0, process_request=facilitator._check) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        facilitator.url = f"ws://127.0.0.1:{port}/ws/v0/"
        yield facilitator


def test_auth_headers_sign_the_timestamp_string() -> None:
    headers = auth_headers(ALICE, 1_764_000_000.9)
    assert headers["X-Timestamp"] == "1764000000"
    assert ALICE.public_key is not None
    assert headers["X-Public-Key"] == ALICE.public_key.hex()
    assert headers["X-Signature"].startswith("0x")
    assert ALICE.verify(b"1764000000", bytes.fromhex(headers["X-Signature"][2:]))
    assert not ALICE.verify(b"1764000001", bytes.fromhex(headers["X-Signature"][2:]))


def test_auth_mode_config_and_cli_flag() -> None:
    assert ClientConfig(url="ws://127.0.0.1:1/ws/v0/").auth_mode is AuthMode.MESSAGE
    assert ClientConfig(url="ws://127.0.0.1:1/ws/v0/", auth_mode="both").auth_mode is AuthMode.BOTH  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="auth_mode must be one of message, headers, both; got 'header'"):
        ClientConfig(url="ws://127.0.0.1:1/ws/v0/", auth_mode="header")  # type: ignore[arg-type]
    parser, _ = build_parser()
    args = parser.parse_args(["run", "--url", "ws://127.0.0.1:1/ws/v0/", "--auth-mode", "headers"])
    assert args.auth_mode == "headers"
    assert cli_main(["run", "--url", "ws://127.0.0.1:1/ws/v0/", "--auth-mode", "bogus"]) == 2


async def test_headers_mode_sends_no_auth_message_and_counts_the_handshake_as_auth() -> None:
    async with header_facilitator() as server:
        async with running_client(fast_config(server.url, auth_mode="headers")) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            run.client._statuses.open(str(uuid.uuid4()))("accepted")
            await wait_until(lambda: run.counters.get("acks.success", 0) == 1, 5, "the status update answered")
            assert server.authenticated == [ALICE.ss58_address]
            assert "V0AuthenticationRequest" not in server.kinds()
            assert server.kinds()[0] == "V0Heartbeat", "liveness first, as after a message auth"
            assert len(run.events_of("CONNECTED")) == 1
            assert not run.events_of("AUTH_FAILED") and not run.events_of("UNEXPECTED_RESPONSE")


async def test_both_mode_takes_already_authenticated_as_success_against_the_draft() -> None:
    async with header_facilitator() as server:
        async with running_client(fast_config(server.url, auth_mode="both")) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            run.client._statuses.open(str(uuid.uuid4()))("accepted")
            await wait_until(lambda: run.counters.get("acks.success", 0) == 1, 5, "the status update answered")
            assert server.authenticated == [ALICE.ss58_address]
            assert server.kinds()[:2] == ["V0AuthenticationRequest", "V0Heartbeat"]
            assert not run.events_of("AUTH_FAILED")
            assert not run.events_of("ERROR_RESPONSE") and not run.events_of("UNEXPECTED_RESPONSE")


async def test_both_mode_works_against_the_deployed_facilitator_too() -> None:
    async with FacilitatorSimulator(seed=41) as sim:
        async with running_client(fast_config(sim.url, auth_mode="both")) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            headers = sim.request_headers[1]
            assert headers["x-public-key"] == (ALICE.public_key or b"").hex()
            assert ALICE.verify(headers["x-timestamp"].encode(), bytes.fromhex(headers["x-signature"][2:]))
            assert abs(int(headers["x-timestamp"]) - time.time()) < 5
            assert sim.authenticated_connections == 1


async def test_message_mode_sends_no_auth_headers() -> None:
    transport, peer = memory_transport_pair()
    config = fast_config("ws://127.0.0.1:1/ws/v0/")
    async with running_client(config, transport=transport):
        await peer.wait_connected(1)
    assert peer.request_headers[0] == {}


@pytest.mark.parametrize(("skew", "why"), [(120.0, "stale"), (-30.0, "from the future")])
async def test_a_refused_handshake_is_auth_failed_retried_at_the_cap_with_fresh_headers(skew: float, why: str) -> None:
    async with header_facilitator(skew=skew) as server:
        config = fast_config(server.url, auth_mode="headers", backoff_cap=0.3)
        async with running_client(config) as run:
            await wait_until(lambda: len(run.events_of("AUTH_FAILED")) >= 2, 5, f"a {why} timestamp refused twice")
            server.skew = 0.0  # the clocks agree again
            await wait_until(lambda: run.client.is_connected, 5, "connected once the timestamp is fresh")
            failed = run.events_of("AUTH_FAILED")
            assert all(e.data["http_status"] == 403 for e in failed)
            assert all(e.data["retry_in"] == pytest.approx(0.3) for e in failed)
            assert "403" in failed[0].description and "clock" in failed[0].description
            assert not run.events_of("CONNECT_FAILED"), "a refused auth is not a connect failure"
            assert run.counters["auth.failures"] == len(failed)
            gap = run.events_of("CONNECTED")[0].timestamp - failed[-1].timestamp
            assert gap >= 0.29, "retried at the backoff cap"
        assert server.refusals[0].startswith("timestamp out of range")
        signatures = [headers["X-Signature"] for headers in server.attempts]
        assert len(set(signatures)) == len(signatures) >= 3, "headers are signed afresh for every attempt"
        assert "V0AuthenticationRequest" not in server.kinds()


async def test_message_mode_against_a_facilitator_that_wants_headers_says_so() -> None:
    async with header_facilitator() as server:
        async with running_client(fast_config(server.url, backoff_cap=0.3)) as run:
            await wait_until(lambda: run.events_of("AUTH_FAILED"), 5, "refused")
            event = run.events_of("AUTH_FAILED")[0]
            assert event.data["http_status"] == 403
            assert "auth_mode" in event.description
            assert not run.client.is_connected
        assert server.refusals[0] == "missing auth headers"


async def test_headers_mode_against_a_facilitator_without_the_draft_loses_nothing() -> None:
    """It ignores the headers and answers auth.not_authenticated: an auth refusal, and the status
    update that the refusal seemed to answer stays queued (it was never stored)."""
    async with FacilitatorSimulator(seed=42, auth_modes=["message"]) as sim:
        job_uuid = sim.register_job(str(uuid.uuid4()))
        async with running_client(fast_config(sim.url, auth_mode="headers", backoff_cap=0.3)) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected (the handshake succeeded)")
            run.client._statuses.open(job_uuid)("accepted")
            await wait_until(lambda: len(run.events_of("AUTH_FAILED")) >= 2, 5, "refused on two connections")
            failed = run.events_of("AUTH_FAILED")
            assert "auth.not_authenticated" in failed[0].description and "auth_mode" in failed[0].description
            assert failed[0].data["errors"][0]["type"] == "auth.not_authenticated"
            assert all(e.data["retry_in"] == pytest.approx(0.3) for e in failed)
            assert run.client.pending.pending == 1, "the status update is kept to be resent"
            assert not run.events_of("ERROR_RESPONSE") and not run.events_of("UNEXPECTED_RESPONSE")
            assert not run.events_of("MESSAGE_DROPPED")
        assert sim.stored[job_uuid] == ["sent"]
        closes = [record.close_code for record in sim.connection_log.values() if record.close_code is not None]
        assert closes.count(1008) >= 2 and set(closes) <= {1008, 1000}, closes  # 1000: the client's stop
