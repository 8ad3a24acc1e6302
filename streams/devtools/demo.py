"""``python -m streams demo``: the simulator and a client against it, with a live view and a summary.

The simulator plays a facilitator that sends job requests, a few cheat reports and malformed
frames, and (with ``--faults``) refuses the first auth, drops the connection, closes it with an
error code and stalls it. The client runs the simulated dispatcher. At the end the demo checks,
against what the facilitator stored, that no status was lost or reordered, prints a summary and
names the recording it wrote (replay it with ``python -m streams replay FILE`` or the notebook).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from bittensor_wallet import Keypair

from streams.client import FacilitatorClient
from streams.config import ClientConfig
from streams.devtools.simulator import FacilitatorSimulator, JobNotCreated
from streams.dispatchers.lifecycle import FAIL_ENV, IN_PROGRESS
from streams.dispatchers.simulated import SimulatedDispatcher
from streams.events import ConnectionState, EventType, SystemEvent

__all__ = ["EXPECTED", "DemoResult", "print_summary", "run_demo"]

EXPECTED = ["sent", "received", *(status.value for status in IN_PROGRESS)]
"""What the facilitator stores for every demo job before its final status (``sent`` is its own)."""




@dataclass
class DemoResult:
    jobs: int
    completed: int
    failed: int
    delivered: int
    lost: int
    duplicated: int
    reordered: int
    disconnects: Counter[str] = field(default_factory=Counter)
    downtime: float = 0.0
    elapsed: float = 0.0
    throughput: float = 0.0
    cheat_reports: int = 0
    malformed: int = 0
    recording: Path | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    timed_out: bool = False
    """``duration`` ended the demo before every job finished (``lost`` then counts the statuses of
    the unfinished jobs too: only ``reordered`` says something went wrong)."""

    @property
    def ok(self) -> bool:
        if self.timed_out:
            return self.reordered == 0
        return self.lost == 0 and self.reordered == 0 and self.completed + self.failed == self.jobs


async def run_demo(
    *,
    jobs: int = 50,
    duration: float = 45.0,
    faults: bool = True,
    seed: int = 7,
    step_delay: float = 0.15,
    record: Path | None = None,
    out: TextIO = sys.stdout,
    live: bool | None = None,
) -> DemoResult:
    """Run the whole demo; returns the figures the summary prints.

    ``duration`` is a hard limit on the demo's run (the client's teardown follows, bounded by its
    1 s drain): whatever is not finished by then is left, and the result says ``timed_out``.
    """
    from streams.recording import open_recorder

    rng = random.Random(seed)
    live = out.isatty() if live is None else live
    # Responses come 30 ms late, as from a facilitator that writes each status to its database
    # first: updates are in flight when a fault hits, and are resent after the reconnect.
    async with FacilitatorSimulator(seed=seed, ack_delay=0.03) as sim:
        config = ClientConfig(
            url=sim.url,
            heartbeat_period=1.0,
            ping_interval=0.5,
            ping_timeout=0.5,
            close_timeout=0.5,
            send_timeout=2.0,
            backoff_base=0.05,
            backoff_cap=0.5,
            backoff_stable_after=2.0,
            backoff_seed=seed,
            drain_timeout=1.0,
            # The simulator signs its jobs with the dev key //Bob: trusted here as a facilitator's signer would be.
            trusted_signatories=(Keypair.create_from_uri("//Bob").ss58_address,),
        )
        recorder = transport = None
        if record is not None:
            recorder, transport = open_recorder(record, config)
        client = FacilitatorClient(
            config,
            signer=Keypair.create_from_uri("//Alice"),
            dispatcher=SimulatedDispatcher(step_delay),
            on_cheat=_on_cheat,
            transport=transport,
        )
        events: list[SystemEvent] = []
        client.events.subscribe(events.append)
        if faults:
            sim.refuse_next_auth("validator_not_found")
        started = time.monotonic()
        client_task = asyncio.create_task(client.start(), name="demo-client")
        view = _LiveView(client, sim, jobs, out) if live else None
        view_task = asyncio.create_task(view.run(), name="demo-view") if view else None
        limit = asyncio.timeout(duration)
        try:
            async with limit:
                await _script(sim, client, jobs, faults, rng, step_delay)
                await sim.wait_for(lambda: _finished(sim) >= jobs, None)
                with contextlib.suppress(TimeoutError):  # let the last acknowledgements arrive
                    await asyncio.wait_for(_until(lambda: client.pending.pending == 0), 5)
        except TimeoutError:
            if not limit.expired():
                raise  # one of the script's own waits, not the duration
            timed_out = True
        else:
            timed_out = False
        finally:
            if view_task is not None:
                view_task.cancel()
                await asyncio.gather(view_task, return_exceptions=True)
            await client.stop()
            await client_task
            if recorder is not None:
                await recorder.aclose()
        elapsed = time.monotonic() - started
        result = _result(sim, client, events, jobs, elapsed)
        result.recording = record
        result.timed_out = timed_out and _finished(sim) < jobs
        if view is not None:
            view.clear()
        return result


async def _on_cheat(report: Any) -> None:
    """The demo's host just acknowledges cheat reports (a validator would re-check the job)."""


async def _until(predicate: Callable[[], bool]) -> None:
    while not predicate():  # noqa: ASYNC110 - polls client state that has no event of its own
        await asyncio.sleep(0.05)


async def _script(
    sim: FacilitatorSimulator, client: FacilitatorClient, jobs: int, faults: bool, rng: random.Random, step: float
) -> None:
    """The facilitator's side of the demo: job requests spread out, with faults among them."""
    await sim.wait_for(lambda: sim.authenticated_connections > 0, 15, "the client's first auth")
    fault_at = sorted(rng.sample(range(5, max(6, jobs)), k=min(4, max(0, jobs - 5)))) if faults else []
    kinds = ["drop", "close", "stall", "drop"]
    sent: list[str] = []
    for n in range(jobs):
        overrides: dict[str, Any] = {"env": dict([FAIL_ENV])} if n % 17 == 16 else {}
        job = await _create_job(sim, overrides)
        sent.append(job["uuid"])
        if n in (3, jobs // 2):
            with contextlib.suppress(JobNotCreated):  # the validator has just no channel at all: skip it
                await sim.send_cheat_report(sent[0])
        if n in (7, jobs - 3):
            await sim.wait_for(lambda: client.is_connected, 10, "connected before garbage")
            with contextlib.suppress(RuntimeError):  # the connection may just have died
                await sim.send_raw('{"message_type": "V2JobRequest", "uuid": 42}' if n == 7 else "{garbled")
        if n in fault_at and sim.open_connections:
            kind = kinds.pop(0)
            await sim.wait_for(lambda: client.is_connected, 10, "connected before a fault")
            before = sim.authenticated_connections
            try:
                if kind == "drop":
                    await sim.drop()
                elif kind == "close":
                    await sim.close(1011, "internal error (injected)")
                else:
                    await sim.stall()
            except RuntimeError:  # no open connection at this instant: skip this fault
                continue
            # A facilitator does not resend a job request it wrote into a dying connection, so the
            # script waits for the client to come back before it sends the next one.
            await sim.wait_for(_more_auths(sim, before), 15, "reconnection")
        await asyncio.sleep(step * rng.uniform(0.5, 1.5))


async def _create_job(sim: FacilitatorSimulator, overrides: dict[str, Any]) -> dict[str, Any]:
    """Like an SDK: the facilitator creates no job while the validator has no fresh channel; retry then."""
    while True:
        try:
            return await sim.send_job_request(None, **overrides)
        except JobNotCreated:
            await sim.wait_for_validator(15)


def _more_auths(sim: FacilitatorSimulator, than: int) -> Callable[[], bool]:
    return lambda: sim.authenticated_connections > than


def _finished(sim: FacilitatorSimulator) -> int:
    """Jobs whose final status the facilitator stored."""
    return sum(1 for statuses in sim.stored.values() if set(statuses) & {"completed", "failed"})


def _result(
    sim: FacilitatorSimulator, client: FacilitatorClient, events: list[SystemEvent], jobs: int, elapsed: float
) -> DemoResult:
    delivered = lost = reordered = completed = failed = 0
    for statuses in sim.stored.values():
        final = "failed" if "failed" in statuses else "completed"
        expected = [*EXPECTED, final]
        present = [s for s in statuses if s in expected]
        delivered += len(present) - 1  # "sent" is the facilitator's own
        lost += len(expected) - len(set(present))
        reordered += present != [s for s in expected if s in present]
        completed += final == "completed" and final in statuses
        failed += final == "failed"
    copies = Counter(
        (r.parsed["uuid"], r.parsed["status"])
        for r in sim.received
        if r.parsed is not None and r.parsed.get("message_type") == "V0JobStatusUpdate"
    )
    duplicated = sum(n - 1 for n in copies.values())
    disconnects: Counter[str] = Counter()
    for event in events:
        if event.type is EventType.DISCONNECTED:
            disconnects[f"{event.data.get('close_code')} {event.data.get('close_reason') or ''}".strip()] += 1
        elif event.type is EventType.AUTH_FAILED:
            disconnects["auth refused: " + ", ".join(e["type"] for e in event.data.get("errors", []))] += 1
    snapshot = client.metrics.snapshot()
    downtime = snapshot["timings"].get("downtime", {})
    return DemoResult(
        jobs=jobs,
        completed=completed,
        failed=failed,
        delivered=delivered,
        lost=lost,
        duplicated=duplicated,
        reordered=reordered,
        disconnects=disconnects,
        downtime=downtime.get("mean", 0.0) * downtime.get("count", 0),
        elapsed=elapsed,
        throughput=delivered / elapsed if elapsed else 0.0,
        cheat_reports=int(snapshot["counters"].get("cheat.reports", 0)),
        malformed=int(snapshot["counters"].get("messages.malformed", 0)),
        metrics=snapshot,
    )


class _LiveView:
    """A few terminal lines redrawn in place: state, progress, outbox, reconnects."""

    def __init__(self, client: FacilitatorClient, sim: FacilitatorSimulator, jobs: int, out: TextIO) -> None:
        self._client, self._sim, self._jobs, self._out = client, sim, jobs, out
        self._state = ConnectionState.DISCONNECTED
        self._lines = 0
        client.state.subscribe(self._on_state)

    def _on_state(self, state: ConnectionState) -> None:
        self._state = state

    async def run(self) -> None:
        while True:
            self.draw()
            await asyncio.sleep(0.1)

    def draw(self) -> None:
        width = max(20, min(50, shutil.get_terminal_size((80, 24)).columns - 40))
        done = _finished(self._sim)
        filled = int(width * done / max(1, self._jobs))
        depth = self._client.pending
        counters = self._client.metrics.snapshot()["counters"]
        colour = {"connected": "32", "connecting": "33", "authenticating": "33"}.get(self._state.value, "31")
        lines = [
            f"connection  \x1b[{colour}m{self._state.value:<15}\x1b[0m"
            f" reconnects {int(counters.get('connect.successes', 1)) - 1}"
            f"   disconnects {int(sum(v for k, v in counters.items() if k.startswith('disconnects.')))}",
            f"jobs        [{'#' * filled}{'.' * (width - filled)}] {done}/{self._jobs}",
            f"outbox      {depth.held + depth.wire:>6} queued   {depth.in_flight:>5} in flight"
            f"   sent {int(counters.get('messages.sent.V0JobStatusUpdate', 0))}"
            f"   acked {int(counters.get('acks.success', 0) + counters.get('acks.duplicate', 0))}",
        ]
        self.clear()
        self._out.write("\n".join(lines) + "\n")
        self._out.flush()
        self._lines = len(lines)

    def clear(self) -> None:
        if self._lines:
            self._out.write(f"\x1b[{self._lines}F\x1b[J")
            self._lines = 0


def print_summary(result: DemoResult, out: TextIO = sys.stdout) -> None:
    rows = [
        ("jobs", f"{result.jobs} requested, {result.completed} completed, {result.failed} failed (SIMULATE=fail)"),
        ("statuses", f"{result.delivered} delivered, {result.lost} lost, {result.duplicated} duplicated "
                     f"(resent after a drop, answered job.integrity_error), {result.reordered} jobs reordered"),
        ("disconnects", ", ".join(f"{n}x {reason}" for reason, n in result.disconnects.most_common()) or "none"),
        ("downtime", f"{result.downtime:.2f} s"),
        ("throughput", f"{result.throughput:.1f} status updates/s over {result.elapsed:.1f} s"),
        ("inbound", f"{result.cheat_reports} cheat reports, {result.malformed} malformed frames reported"),
    ]
    if result.recording is not None:
        rows.append(("recording", str(result.recording)))
        rows.append(("explore", f"python -m streams replay {result.recording}   |   "
                                f"make notebook RECORDING={result.recording}"))
    width = max(len(name) for name, _ in rows)
    out.write("\nfacilitator-streams demo — summary\n")
    out.write(f"{'-' * (width + 2)}\n")
    for name, value in rows:
        out.write(f"{name:<{width}}  {value}\n")
    if result.timed_out:
        out.write(
            f"\nSTOPPED at --duration after {result.elapsed:.1f} s, with {result.completed + result.failed} of "
            f"{result.jobs} jobs finished ({'none' if result.ok else 'some'} reordered).\n"
        )
    else:
        out.write("\nOK: nothing lost, nothing reordered.\n" if result.ok else "\nFAILED: see above.\n")
    out.flush()
