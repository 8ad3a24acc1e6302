"""Inbound hot path: CPU per success Response from the transport's frame subject to ``match_acks``.

    python -m bench.inbound [--frames 5000] [--rounds 20]

Three wirings of the same subscribers (a monitor-like observer on every branch, subscribed first as
the client's monitor is, then ``match_acks`` on the Response messages, with one ack-expecting item
in flight per frame), each fed copies of ``{"status":"success","errors":[]}`` through a
``SafeSubject`` like the connection manager's:

- ``old``: the chain before issue 17: ``decode_frames`` → ``partition_by`` → ``ops.map(message)``;
- ``routed+map``: ``route_frames`` branches of ``Decoded`` items → ``ops.map(message)``;
- ``new``: the client's wiring (``route_inbound``): ``match_acks`` on ``routed.messages``.

Each wiring is built once; then they take turns, ``--rounds`` times, each pushing ``--frames``
frames per turn (100,000 per variant by default), so a change of load on a shared machine hits
every variant alike. The figure is the median over the turns of ``time.process_time`` per frame,
in µs (and the best turn: the least disturbed one); the garbage collector runs between turns.
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from reactivex import Observable
from reactivex import operators as ops
from reactivex.subject import Subject

from operators import Acked, Decoded, Malformed, decode_frames, match_acks, partition_by
from streams.client import INBOUND_ROUTES, route_inbound
from streams.protocol import MAX_FRAME_BYTES, InboundMessage, decode, message_kind
from streams.safe_subject import SafeSubject

FRAME = '{"status":"success","errors":[]}'
Variant = Callable[[SafeSubject[str | bytes], Observable[object]], tuple[Observable[Any], Callable[[], object]]]


def _old_route(item: Decoded[InboundMessage] | Malformed) -> str:
    """The key function of the old chain (``streams.client.inbound_route`` before issue 17)."""
    return "malformed" if isinstance(item, Malformed) else message_kind(item.message)


def _message(item: Any) -> Any:
    return item.message


def old(frames: SafeSubject[str | bytes], monitor: Observable[object]) -> tuple[Observable[Any], Callable[[], object]]:
    decoded = frames.pipe(decode_frames(functools.partial(decode, max_bytes=MAX_FRAME_BYTES)))
    inbound = partition_by(decoded, _old_route, INBOUND_ROUTES)
    _watch(inbound.branches.values(), monitor)
    return inbound["Response"].pipe(ops.map(_message)), inbound.connect


def routed_map(
    frames: SafeSubject[str | bytes], monitor: Observable[object]
) -> tuple[Observable[Any], Callable[[], object]]:
    inbound = route_inbound(frames, MAX_FRAME_BYTES)
    _watch(inbound.branches.values(), monitor)
    return inbound["Response"].pipe(ops.map(_message)), inbound.connect


def new(frames: SafeSubject[str | bytes], monitor: Observable[object]) -> tuple[Observable[Any], Callable[[], object]]:
    inbound = route_inbound(frames, MAX_FRAME_BYTES)
    _watch(inbound.branches.values(), monitor)
    return inbound.messages["Response"], inbound.connect


def _watch(branches: Any, monitor: Any) -> None:
    for branch in branches:
        branch.subscribe(monitor)


VARIANTS: dict[str, Variant] = {"old": old, "routed+map": routed_map, "new": new}


class Pipeline:
    """One wiring, built once: ``push(n)`` sends ``n`` success Responses through it, each answering
    one sent item, and returns the CPU time that took."""

    def __init__(self, variant: Variant, capacity: int) -> None:
        self.frames: SafeSubject[str | bytes] = SafeSubject()
        self.seen = [0, 0]
        seen = self.seen

        def monitor(item: object) -> None:  # what the monitor's _on_inbound does first
            seen[0] += 1 if isinstance(item, Decoded) else 0

        def on_ack(event: object) -> None:
            seen[1] += 1 if isinstance(event, Acked) else 0

        responses, connect = variant(self.frames, monitor)  # type: ignore[arg-type]
        sent: Subject[int] = Subject()
        match_acks(sent, responses, Subject()).subscribe(on_ack)
        connect()
        for n in range(capacity):  # in flight: each Response acknowledges one
            sent.on_next(n)

    def push(self, count: int) -> float:
        on_next = self.frames.on_next
        start = time.process_time()
        for _ in range(count):
            on_next(FRAME)
        return time.process_time() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inbound", description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5_000, help="frames per variant per round")
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args(argv)
    pipelines = {name: Pipeline(variant, args.frames * args.rounds) for name, variant in VARIANTS.items()}
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    gc.collect()
    gc.disable()  # the variants allocate alike (a Decoded and an Acked per frame): keep collections out of the turns
    try:
        for _ in range(args.rounds):  # alternating in short turns: a change of load hits every variant alike
            for name, pipeline in pipelines.items():
                samples[name].append(pipeline.push(args.frames) / args.frames * 1e6)
            gc.collect()
    finally:
        gc.enable()
    expected = [args.frames * args.rounds] * 2
    for name, pipeline in pipelines.items():
        if pipeline.seen != expected:
            raise AssertionError(f"{name}: expected {expected} frames monitored and acknowledged, got {pipeline.seen}")
    base = statistics.median(samples["old"])
    print(f"µs of CPU per success Response, frame subject → match_acks: median of {args.rounds} alternating "
          f"rounds of {args.frames} frames per variant ({args.frames * args.rounds} in all)")
    best = min(samples["old"])
    for name, values in samples.items():
        fig = statistics.median(values)
        print(
            f"  {name:<11} median {fig:5.2f} µs/frame ({fig / base:.2f}× old), "
            f"best turn {min(values):5.2f} ({min(values) / best:.2f}× old), worst {max(values):5.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
