"""Shared fixtures: the validator's dev key, auth frames, and a running facilitator simulator."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
from bittensor_wallet import Keypair

from streams.devtools.simulator import FacilitatorSimulator

AuthFrame = Callable[..., str]


def pytest_configure(config: pytest.Config) -> None:
    """A suite started in the background by a non-interactive shell (``make test &``) inherits SIGINT
    *ignored*, and every CLI child the Ctrl-C tests start would inherit that too (the CLI keeps an
    inherited "ignore", as ``nohup`` wants): they would wait for an exit that never comes. Restore
    Python's default so those tests test the Ctrl-C a user's terminal sends."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _private_state_home(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run`` journals under $XDG_STATE_HOME by default: each test (and its child processes) gets its own."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("xdg-state")))


@pytest.fixture(scope="session")
def alice() -> Keypair:
    """The validator hotkey of the captures (sr25519 dev key //Alice)."""
    return Keypair.create_from_uri("//Alice")


@pytest.fixture(scope="session")
def bob() -> Keypair:
    return Keypair.create_from_uri("//Bob")


@pytest.fixture(scope="session")
def auth_frame(alice: Keypair) -> AuthFrame:
    """``auth_frame(keypair=alice, signed=public_key)``: a V0AuthenticationRequest frame, as PROTOCOL.md says."""

    def build(keypair: Keypair = alice, signed: bytes | None = None) -> str:
        public_key = keypair.public_key
        assert public_key is not None
        signature = keypair.sign(public_key if signed is None else signed)
        return orjson.dumps(
            {
                "message_type": "V0AuthenticationRequest",
                "public_key": public_key.hex(),
                "signature": "0x" + signature.hex(),
            }
        ).decode()

    return build


@pytest.fixture
async def simulator() -> AsyncIterator[FacilitatorSimulator]:
    """A simulator on 127.0.0.1 (random port), stopped after the test."""
    async with FacilitatorSimulator(seed=1234) as sim:
        yield sim
