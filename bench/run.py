"""``python -m bench``: run the benchmarks and print one markdown table, each figure with its target.

    python -m bench [--rounds 3] [--quick] [--profile FILE] [--json FILE]

``--profile FILE`` also runs one client throughput run under pyinstrument and writes its text
report to FILE (the figures in the table come from runs without the profiler).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.common import ROOT, median
from bench.idle import Idle, idle_run
from bench.journal import journal_compare
from bench.latency import Latency, latency_run
from bench.overhead import overhead_run
from bench.recovery import Recovery, recovery_run
from bench.shutdown import Shutdown, shutdown_run
from bench.throughput import Run, client_run, compare

TARGET_RATIO = 0.9
"""Client throughput / plain websockets loop (same frames, same window, every Response read)."""
TARGET_CPU_RATIO = 1.3
"""Client CPU per status update / the baseline's."""
TARGET_OLD_DESIGN = 1.0
"""Client throughput / a fire-and-forget loop of the old design (no acks, a task per job)."""
TARGET_BYTES = 256
TARGET_P99 = 0.001
TARGET_RECOVERY = 0.9
"""Backlog recovery rate / steady throughput."""
TARGET_SHUTDOWN = 2.0
TARGET_JOURNAL_RATIO = 0.8
TARGET_JOURNAL_SHUTDOWN = 0.5


@dataclass(frozen=True, slots=True)
class Sizes:
    throughput: int = 20_000
    memory: int = 100_000
    recovery: int = 10_000
    latency_rates: tuple[float, ...] = (1_000.0, 5_000.0)
    latency_seconds: float = 5.0
    idle_seconds: float = 10.0
    shutdown_queued: int = 1_000
    shutdown_runs: int = 3


QUICK = Sizes(
    throughput=5_000, memory=20_000, recovery=2_000, latency_seconds=1.0, idle_seconds=2.0, shutdown_runs=1
)


async def memory_run(mode: str, count: int) -> dict[str, float]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.memory", "--mode", mode, "--count", str(count),
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"bench.memory --mode {mode} failed with {proc.returncode}")
    result: dict[str, float] = orjson.loads(out.splitlines()[-1])
    return result


def machine() -> str:
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cpu = f"{os.cpu_count()} CPUs" + (f" ({model})" if model else "")
    return f"{cpu}, {platform.machine()}, Linux {platform.release()}, Python {platform.python_version()}"


def _busy(runs: list[Run]) -> float:
    """The simulator's share of a core over these runs (median): near 1.0 it, not the client, is the limit."""
    return median([r.sim_cpu_seconds / r.seconds for r in runs])


def _ok(met: bool) -> str:
    return "yes" if met else "**no**"


def table(
    sizes: Sizes,
    baselines: list[Run],
    clients: list[Run],
    old_design: list[Run],
    old_pre_encoded: list[Run],
    memory: dict[str, dict[str, float]],
    recovery: Recovery,
    latencies: list[Latency],
    idle: Idle,
    shutdowns: list[Shutdown],
    journal: tuple[list[Run], list[Run]],
    journal_shutdowns: list[Shutdown],
    when: str,
    overhead: list[float],
) -> str:
    base_rate = median([r.rate for r in baselines])
    client_rate = median([r.rate for r in clients])
    old_rate = median([r.rate for r in old_design])
    old_cpu = median([r.cpu_us_per_msg for r in old_design])
    pre_rate = median([r.rate for r in old_pre_encoded])
    pre_cpu = median([r.cpu_us_per_msg for r in old_pre_encoded])
    ratio = client_rate / base_rate
    old_ratio = client_rate / old_rate
    base_cpu = median([r.cpu_us_per_msg for r in baselines])
    client_cpu = median([r.cpu_us_per_msg for r in clients])
    cpu_ratio = client_cpu / base_cpu
    sim_cpu = median([r.sim_cpu_us_per_msg for r in baselines + clients])
    traced = memory["tracemalloc"]["bytes_per_message"]
    rss = memory["rss"]["bytes_per_message"]
    frame = memory["rss"]["held_frame_bytes_per_message"]
    same_count = recovery.count / client_rate
    recovery_ratio = same_count / recovery.seconds  # recovery rate / steady throughput
    exits = [s.seconds for s in shutdowns]
    pending = min(s.pending for s in shutdowns)
    clean = all(s.returncode in (0, 130) and not s.warnings for s in shutdowns)
    n = len(clients)
    rows = [
        "| # | benchmark | result | target | met |",
        "| --- | --- | --- | --- | --- |",
        f"| 1 | Throughput: {sizes.throughput:,} JobStatusUpdates, every Response read "
        f"| client **{client_rate:,.0f} msgs/s**, plain websockets {base_rate:,.0f} msgs/s: "
        f"**ratio {ratio:.2f}** (median of {n} alternating runs each) "
        f"| ratio ≥ {TARGET_RATIO} | {_ok(ratio >= TARGET_RATIO)} |",
        f"| 1b | CPU per status update | client **{client_cpu:.0f} µs**, baseline {base_cpu:.0f} µs: "
        f"**{cpu_ratio:.2f}×** (simulator {sim_cpu:.0f} µs, its own process) "
        f"| ≤ {TARGET_CPU_RATIO}× | {_ok(cpu_ratio <= TARGET_CPU_RATIO)} |",
        f"| 1c | vs the old design: fire-and-forget, a task per job that builds each status's frame and "
        f"sends it, no acks "
        f"| old design {old_rate:,.0f} msgs/s ({old_cpu:.0f} µs CPU per update, client {client_cpu:.0f} µs): "
        f"client at **{old_ratio:.3f}×** of it; with every frame encoded before its clock starts, "
        f"{pre_rate:,.0f} msgs/s ({pre_cpu:.0f} µs): client at {client_rate / pre_rate:.3f}×. "
        f"The simulator was busy {_busy(clients) * 100:.0f} % of the client's runs and "
        f"{_busy(old_design) * 100:.0f} % "
        f"of the old design's (its CPU over the run's time): at ~100 % it sets the pace of both "
        f"| ≥ {TARGET_OLD_DESIGN}× | {_ok(old_ratio >= TARGET_OLD_DESIGN)} |",
        f"| 1d | The client's own CPU per status update, no sockets (`python -m bench.overhead`: an in-process "
        f"transport that answers every update) | **{median(overhead):.1f} µs** (median of {len(overhead)}) "
        f"| report | — |",
        f"| 2 | Memory: {sizes.memory:,} status updates held while disconnected "
        f"| **{traced:.0f} B/msg** (tracemalloc), **{rss:.0f} B/msg** (RSS); the frame text itself is "
        f"{frame:.0f} B | ≤ {TARGET_BYTES} B/msg | {_ok(max(traced, rss) <= TARGET_BYTES)} |",
        f"| 3 | Recovery: facilitator down with a {recovery.count:,}-update backlog, then up "
        f"| all acknowledged **{recovery.seconds:.2f} s** after it listens again (reconnected and "
        f"authenticated after {recovery.reconnect_seconds * 1000:.0f} ms): **{recovery_ratio:.2f}×** "
        f"the steady throughput | ≥ {TARGET_RECOVERY}× | {_ok(recovery_ratio >= TARGET_RECOVERY)} |",
        *(
            f"| 4{'abcdefg'[i]} | Latency: enqueue-to-wire at {latency.rate:,.0f} msgs/s, connected "
            f"| p50 **{latency.p50 * 1000:.2f} ms**, p99 **{latency.p99 * 1000:.2f} ms** "
            f"(max {latency.max * 1000:.1f} ms; {latency.count:,} updates at {latency.achieved_rate:,.0f}/s) "
            f"| p99 ≤ {TARGET_P99 * 1000:.0f} ms | {_ok(latency.p99 <= TARGET_P99)} |"
            for i, latency in enumerate(latencies)
        ),
        f"| 5 | Shutdown: SIGINT to `python -m streams run` with {sizes.shutdown_queued:,} updates queued "
        f"| exit after **{median(exits):.2f} s** (max {max(exits):.2f} s of {len(exits)}); {pending:,} "
        f"pending updates reported on the way out; "
        f"{'exit status 0, no asyncio warnings' if clean else 'WARNINGS or a bad exit status'} "
        f"| ≤ {TARGET_SHUTDOWN:.0f} s | {_ok(max(exits) <= TARGET_SHUTDOWN and clean)} |",
        f"| 6 | Idle: connected, nothing to send, heartbeat every {idle.heartbeat_period:g} s and a ping every "
        f"{idle.ping_interval:g} s, for {idle.seconds:.0f} s | **{idle.cpu_percent:.3f} % of a core** "
        f"({idle.cpu_seconds * 1000:.0f} ms CPU) | report | — |",
        *journal_rows(sizes, *journal, journal_shutdowns),
    ]
    notes = [
        "",
        f"Measured {when} on {machine()}, all in one `make bench` run.",
        "The facilitator simulator (`bench.simserver`) runs in its own process for every run; the client "
        "under test and the baseline run in the benchmark process, one after the other, alternating, each "
        "against a fresh simulator process, with the same frames, the same in-flight window (1,000) and "
        "reading every Response. Throughput is timed from the first update handed over to the last "
        "Response read; CPU is per process (the machine is shared, so CPU per update is the steadier figure). "
        "Latency is timed from just before `report(status)` to the return of the frame's `ws.send`. "
        "Reconnect backoff is capped at 50 ms in 3; the shutdown simulator stops reading right after auth. "
        "5 runs with `--no-journal` (today's drain-then-report); 7 and 8 with the SQLite journal "
        "(WAL, synchronous=FULL: every commit fsync'ed, in a temporary directory on the benchmark machine's disk).",
    ]
    return "\n".join(rows + notes)


def journal_rows(sizes: Sizes, plain: list[Run], journaled: list[Run], shutdowns: list[Shutdown]) -> list[str]:
    plain_rate = median([r.rate for r in plain])
    journal_rate = median([r.rate for r in journaled])
    ratio = journal_rate / plain_rate
    extra_cpu = median([r.cpu_us_per_msg for r in journaled]) - median([r.cpu_us_per_msg for r in plain])
    exits = [s.seconds for s in shutdowns]
    kept = min(s.kept for s in shutdowns)
    dropped = max(s.pending for s in shutdowns)
    clean = all(s.returncode in (0, 130) and not s.warnings for s in shutdowns)
    met = max(exits) <= TARGET_JOURNAL_SHUTDOWN and clean and dropped == 0 and kept == sizes.shutdown_queued
    return [
        f"| 7 | Throughput with the journal: {sizes.throughput:,} JobStatusUpdates, each durable before it is sent "
        f"| **{journal_rate:,.0f} msgs/s** with, {plain_rate:,.0f} msgs/s without: **ratio {ratio:.2f}** "
        f"(median of {len(journaled)} alternating runs each; CPU per update {extra_cpu:+.0f} µs, "
        f"writer thread included) "
        f"| ratio ≥ {TARGET_JOURNAL_RATIO} | {_ok(ratio >= TARGET_JOURNAL_RATIO)} |",
        f"| 8 | SIGINT exit with the journal, {sizes.shutdown_queued:,} updates queued "
        f"| exit after **{median(exits):.2f} s** (max {max(exits):.2f} s of {len(exits)}); {kept:,} updates kept "
        f"in the journal for the next start, {dropped} dropped; "
        f"{'exit status 0, no asyncio warnings' if clean else 'WARNINGS or a bad exit status'} "
        f"| ≤ {TARGET_JOURNAL_SHUTDOWN} s, nothing dropped | {_ok(met)} |",
    ]


async def profile_throughput(count: int, path: Path) -> None:
    try:
        from pyinstrument import Profiler
    except ImportError:
        raise SystemExit("--profile needs pyinstrument: .venv/bin/pip install pyinstrument") from None

    profiler = Profiler(async_mode="disabled")
    profiler.start()
    try:
        await client_run(count)
    finally:
        profiler.stop()
    text = profiler.output_text(unicode=True, color=False, show_all=False)
    await asyncio.to_thread(path.write_text, text)


async def main(args: argparse.Namespace) -> int:
    sizes = QUICK if args.quick else Sizes()
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")

    def say(what: str) -> None:
        print(f"… {what}", file=sys.stderr, flush=True)

    say(f"throughput: {args.rounds} × (baseline, client, old design ×2), {sizes.throughput:,} updates each")
    baselines, clients, old_design, old_pre_encoded = await compare(sizes.throughput, args.rounds)
    say(f"overhead: {args.rounds} × the client against an answering in-process transport")
    overhead = [await overhead_run(sizes.throughput) for _ in range(args.rounds)]
    say("memory: tracemalloc and RSS, a fresh process each")
    memory = {mode: await memory_run(mode, sizes.memory) for mode in ("tracemalloc", "rss")}
    say(f"recovery: {sizes.recovery:,}-update backlog")
    recovery = await recovery_run(sizes.recovery)
    latencies = []
    for rate in sizes.latency_rates:
        say(f"latency: {rate:,.0f} msgs/s for {sizes.latency_seconds:g} s")
        latencies.append(await latency_run(rate, sizes.latency_seconds))
    say(f"idle: {sizes.idle_seconds:g} s connected with nothing to send")
    idle = await idle_run(sizes.idle_seconds)
    say(f"shutdown: {sizes.shutdown_runs} × SIGINT with {sizes.shutdown_queued:,} queued")
    shutdowns = [await shutdown_run(sizes.shutdown_queued) for _ in range(sizes.shutdown_runs)]
    say(f"journal: {args.rounds} × (client, client with the journal), then SIGINT with the journal")
    journal = await journal_compare(sizes.throughput, args.rounds)
    journal_shutdowns = [await shutdown_run(sizes.shutdown_queued, journal=True) for _ in range(sizes.shutdown_runs)]
    if args.profile is not None:
        say(f"profile: one client throughput run under pyinstrument -> {args.profile}")
        await profile_throughput(sizes.throughput, args.profile)
    print(table(
        sizes, baselines, clients, old_design, old_pre_encoded, memory, recovery, latencies, idle, shutdowns, journal,
        journal_shutdowns, when, overhead,
    ))
    if args.json is not None:
        raw: dict[str, Any] = {
            "when": when, "machine": machine(),
            "throughput": {
                "baseline": [asdict(r) for r in baselines],
                "client": [asdict(r) for r in clients],
                "fire_and_forget": [asdict(r) for r in old_design],
                "fire_and_forget_pre_encoded": [asdict(r) for r in old_pre_encoded],
            },
            "overhead_us_per_update": overhead,
            "memory": memory, "recovery": asdict(recovery), "latency": [asdict(lat) for lat in latencies],
            "idle": asdict(idle),
            "shutdown": [asdict(s) for s in shutdowns],
            "journal": {"client": [asdict(r) for r in journal[0]], "journal": [asdict(r) for r in journal[1]],
                        "shutdown": [asdict(s) for s in journal_shutdowns]},
        }
        args.json.write_bytes(orjson.dumps(raw, option=orjson.OPT_INDENT_2))
    return 0


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description="facilitator-streams benchmarks")
    parser.add_argument("--rounds", type=int, default=5, help="throughput runs per side (alternating)")
    parser.add_argument("--quick", action="store_true", help="smaller counts, for a smoke run")
    parser.add_argument("--profile", type=Path, help="write a pyinstrument profile of a client throughput run")
    parser.add_argument("--json", type=Path, help="also write the raw figures as JSON")
    return asyncio.run(main(parser.parse_args(argv)))
