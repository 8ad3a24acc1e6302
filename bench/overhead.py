"""The client's own CPU per status update, without sockets: ``python -m bench.overhead [--count N] [--profile]``.

The full client (report → outbox → send loop → ack tracking → monitor) runs against an answering
transport that costs next to nothing: ``send`` queues the success Response the facilitator would
write, ``recv`` returns it. What is left is the client's own code per update, the part issue 17 can
remove (websockets' framing and the socket calls are the floor the throughput row measures).
``--profile`` prints a pyinstrument profile of one run (needs pyinstrument).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from collections import deque
from collections.abc import Mapping

from bench.common import ALICE, Counter, bench_config, enqueue, until_connected, workload
from streams import FacilitatorClient, SimulatedDispatcher
from streams.exceptions import TransportClosed
from streams.transport import CloseInfo, Transport

_SUCCESS = '{"status":"success","errors":[]}'


class AnsweringTransport(Transport):
    """Answers every frame that expects a Response (auth, status updates) with a success Response."""

    def __init__(self) -> None:
        self._answers: deque[str] = deque()
        self._ready = asyncio.Event()
        self._open = False
        self._info: CloseInfo | None = None

    async def connect(self, *, headers: Mapping[str, str] | None = None) -> None:
        self._open = True

    async def send(self, frame: str) -> None:
        if not self._open:
            raise TransportClosed(CloseInfo(None, "not connected", None))
        if "V0Heartbeat" not in frame and "V0MachineSpecsUpdate" not in frame:
            self._answers.append(_SUCCESS)
            self._ready.set()

    async def recv(self) -> str | bytes:
        while not self._answers:
            if not self._open:
                raise TransportClosed(self._info or CloseInfo(1000, "closed", None))
            self._ready.clear()
            await self._ready.wait()
        return self._answers.popleft()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.abort()

    def abort(self) -> None:
        self._open = False
        self._info = CloseInfo(1000, "closed", None)
        self._ready.set()

    def is_connected(self) -> bool:
        return self._open

    @property
    def close_info(self) -> CloseInfo | None:
        return self._info


async def overhead_run(count: int) -> float:
    """CPU µs per status update, from the first report to the last acknowledgement."""
    client = FacilitatorClient(
        bench_config("ws://127.0.0.1:1/ws/v0/"), signer=ALICE, dispatcher=SimulatedDispatcher(0),
        transport=AnsweringTransport(),
    )
    task = asyncio.create_task(client.start(), name="bench-overhead-client")
    try:
        await until_connected(client)
        acks = Counter()
        client._messages.acks.subscribe(acks)  # type: ignore[union-attr]
        updates = workload(count)
        cpu0 = time.process_time()
        enqueue(client, updates)
        await acks.reached(count, timeout=120)
        return (time.process_time() - cpu0) / count * 1e6
    finally:
        await client.stop()
        await task


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead")
    parser.add_argument("--count", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    if args.profile:
        from pyinstrument import Profiler

        profiler = Profiler(interval=0.0001)
        profiler.start()
        asyncio.run(overhead_run(args.count))
        profiler.stop()
        sys.stdout.write(profiler.output_text(color=False, unicode=False))
        return
    figures = [asyncio.run(overhead_run(args.count)) for _ in range(args.rounds)]
    print(f"client overhead: {statistics.median(figures):.1f} µs CPU per status update, best {min(figures):.1f} "
          f"(median of {args.rounds}: {', '.join(f'{f:.1f}' for f in figures)})")


if __name__ == "__main__":
    cli()
