"""The facilitator simulator in its own process, driven over stdin/stdout by the benchmarks.

    python -m bench.simserver [--port N] [--accept-unknown-jobs] [--stall-after-auth] [--lenient]

The simulator is strict (as production: server pings, permessage-deflate) unless ``--lenient``.

Prints one JSON line ``{"url": ..., "port": ...}`` once listening, then answers one JSON line per
command line read from stdin:

    stats   {"received": n, "statuses": n, "stored": n, "connections": n, "authenticated": n}
    down    stops the server (connections closed, new ones refused); {"ok": true}
    up      listens again on the same port; {"ok": true}
    quit    (or EOF) exits

``--stall-after-auth`` stalls every connection right after its auth Response (it stops reading:
nothing is acknowledged, pings go unanswered, a close handshake never completes).
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import sys
from typing import Any

import orjson

from streams.devtools.simulator import FacilitatorSimulator, _Conn


class BenchSimulator(FacilitatorSimulator):
    """The simulator, plus a stall that starts exactly at auth success (no race with the client)."""

    def __init__(self, *, stall_after_auth: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.stall_after_auth = stall_after_auth

    async def _authenticate(self, conn: _Conn, message: Any) -> bool:
        result = await super()._authenticate(conn, message)
        if result and self.stall_after_auth:
            self._stall(conn, None)
        return result


def _stats(sim: FacilitatorSimulator) -> dict[str, float]:
    statuses = sum(
        1 for r in sim.received if r.parsed is not None and r.parsed.get("message_type") == "V0JobStatusUpdate"
    )
    return {
        "received": len(sim.received),
        "statuses": statuses,
        "stored": sum(len(v) - 1 for v in sim.stored.values()),
        "connections": sim.connections,
        "authenticated": sim.authenticated_connections,
        "cpu": resource.getrusage(resource.RUSAGE_SELF).ru_utime + resource.getrusage(resource.RUSAGE_SELF).ru_stime,
    }


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> None:
    sim = BenchSimulator(
        port=args.port,
        accept_unknown_jobs=args.accept_unknown_jobs,
        stall_after_auth=args.stall_after_auth,
        seed=1,
        lenient=args.lenient,
        eviction_interval=None,  # a benchmark's connection is never evicted, whatever it sends
    )
    await sim.start()
    _reply({"url": sim.url, "port": sim.port})
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    try:
        while True:
            line = (await reader.readline()).decode().strip()
            if not line or line == "quit":
                break
            if line == "stats":
                _reply(_stats(sim))
            elif line == "down":
                await sim.stop()
                _reply({"ok": True})
            elif line == "up":
                await sim.start()
                _reply({"ok": True})
            else:
                _reply({"error": f"unknown command {line!r}"})
    finally:
        await sim.stop()


def cli() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.simserver")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--accept-unknown-jobs", action="store_true")
    parser.add_argument("--stall-after-auth", action="store_true")
    parser.add_argument("--lenient", action="store_true", help="the simulator's kinder mode (no pings, no deflate)")
    asyncio.run(main(parser.parse_args()))


if __name__ == "__main__":
    cli()
