"""Inbound hot path: CPU per success Response from the transport's frame subject to ``match_acks``.

    python -m bench.inbound [--frames 100000] [--rounds 7]

Three wirings of the same subscribers (a monitor-like observer on every branch, subscribed first as
the client's monitor is, then ``match_acks`` on the Response messages, with one ack-expecting item
in flight per frame), each fed ``--frames`` copies of ``{"status":"success","errors":[]}`` through
a ``SafeSubject`` like the connection manager's:

- ``old``: the chain before issue 17: ``decode_frames`` → ``partition_by`` → ``ops.map(message)``;
- ``routed+map``: ``route_frames`` branches of ``Decoded`` items → ``ops.map(message)``;
- ``new``: the client's wiring (``route_inbound``): ``match_acks`` on ``routed.messages``.

The variants run alternately, ``--rounds`` times each (the machine may be loaded); the figure is
the median of ``time.process_time`` per frame, in µs.
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


def run_once(variant: Variant, count: int) -> float:
    """µs of CPU per frame for ``count`` success Responses, each acknowledging one sent item."""
    frames: SafeSubject[str | bytes] = SafeSubject()
    seen = [0, 0]

    def monitor(item: object) -> None:  # what the monitor's _on_inbound does first
        seen[0] += 1 if isinstance(item, Decoded) else 0

    def on_ack(event: object) -> None:
        seen[1] += 1 if isinstance(event, Acked) else 0

    responses, connect = variant(frames, monitor)  # type: ignore[arg-type]
    sent: Subject[int] = Subject()
    match_acks(sent, responses, Subject()).subscribe(on_ack)
    connect()
    for n in range(count):
        sent.on_next(n)
    gc.collect()
    on_next = frames.on_next
    start = time.process_time()
    for _ in range(count):
        on_next(FRAME)
    elapsed = time.process_time() - start
    if seen != [count, count]:
        raise AssertionError(f"expected {count} frames monitored and acknowledged, got {seen}")
    return elapsed / count * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inbound", description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, variant in VARIANTS.items():
            samples[name].append(run_once(variant, args.frames))
    base = statistics.median(samples["old"])
    print(f"µs of CPU per success Response, frame subject → match_acks; median of {args.rounds} alternating rounds "
          f"of {args.frames} frames")
    for name, values in samples.items():
        fig = statistics.median(values)
        spread = f"{min(values):.2f}–{max(values):.2f}"
        print(f"  {name:<11} {fig:6.2f} µs/frame  (range {spread}; {fig / base:.2f}× old)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
