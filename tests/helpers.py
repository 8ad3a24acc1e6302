"""Shared test helpers: the dev key, condition waits, and a client run in an owned task."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from bittensor_wallet import Keypair

from streams import ClientConfig, FacilitatorClient, SystemEvent
from streams.dispatchers import Dispatcher, Handler, SimulatedDispatcher

ALICE = Keypair.create_from_uri("//Alice")
BOB = Keypair.create_from_uri("//Bob")

FULL_SEQUENCE = ["received", "accepted", "executor_ready", "volumes_ready", "execution_done", "completed"]


async def wait_until(predicate: Callable[[], bool], timeout: float, what: str = "condition") -> None:
    """Poll a condition until it holds; fail with ``what`` if it does not within ``timeout``."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


def fast_config(url: str, **overrides: Any) -> ClientConfig:
    """Timings scaled down so reconnect scenarios take a fraction of a second; //Bob trusted to sign jobs."""
    defaults: dict[str, Any] = dict(
        heartbeat_period=5.0,
        ping_interval=0.5,
        ping_timeout=0.5,
        connect_timeout=2.0,
        auth_timeout=2.0,
        close_timeout=1.0,
        send_timeout=2.0,
        backoff_base=0.01,
        backoff_cap=0.05,
        backoff_stable_after=0.5,
        backoff_seed=1,
        drain_timeout=2.0,
        # As a production validator should: the facilitator's signer (the simulator's //Bob) is trusted
        # besides the own hotkey, so the simulator's jobs run (with none configured only own jobs would).
        trusted_signatories=(BOB.ss58_address,),
    )
    defaults.update(overrides)
    return ClientConfig(url=url, **defaults)


def server_side(task: asyncio.Task[Any]) -> bool:
    """Tasks of the simulator (the facilitator's side) end with the simulator, not the client."""
    coro = task.get_coro()
    code = getattr(coro, "cr_code", None)
    filename = code.co_filename if code is not None else ""
    return task is asyncio.current_task() or "websockets/asyncio/server" in filename or "simulator" in filename


class Running:
    """A started client plus what it reported, for assertions."""

    def __init__(self, client: FacilitatorClient) -> None:
        self.client = client
        self.events: list[SystemEvent] = []
        client.events.subscribe(self.events.append)

    def events_of(self, type_: str) -> list[SystemEvent]:
        return [event for event in self.events if event.type == type_]

    @property
    def counters(self) -> dict[str, float]:
        counters: dict[str, float] = self.client.metrics.snapshot()["counters"]
        return counters


@contextlib.asynccontextmanager
async def running_client(
    config: ClientConfig,
    dispatcher: Dispatcher | Handler | None = None,
    **kwargs: Any,
) -> AsyncIterator[Running]:
    """Start a client in a task; on exit stop it and check that it left no task behind."""
    before = asyncio.all_tasks()
    client = FacilitatorClient(
        config, signer=ALICE, dispatcher=dispatcher or SimulatedDispatcher(step_delay=0.0), **kwargs
    )
    running = Running(client)
    task = asyncio.create_task(client.start(), name="test-client")
    try:
        yield running
    finally:
        async with asyncio.timeout(10):
            await client.stop()
            await task
        leftover = [t for t in asyncio.all_tasks() - before if not t.done() and not server_side(t)]
        assert not leftover, f"tasks left behind: {leftover}"


class ProcessLines:
    """A child process whose output lines (``stream``: "stdout" or "stderr") are collected as they come.

    ``changed`` is set after every new line and at the end of the stream; ``kill()`` ends the process
    and the reader (safe to call on an exited one).
    """

    def __init__(self, proc: asyncio.subprocess.Process, stream: str) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.changed = asyncio.Event()
        reader = proc.stdout if stream == "stdout" else proc.stderr
        assert reader is not None, f"the child's {stream} is not a pipe"
        self._reader = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self.changed.set()
        self.changed.set()

    async def finish(self, timeout: float = 30.0) -> int:
        """Wait for the exit and the last line; the exit status."""
        async with asyncio.timeout(timeout):
            returncode = await self.proc.wait()
            await self._reader
        return returncode

    async def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        await self.proc.wait()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
