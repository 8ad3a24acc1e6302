"""Property tests of hold_while_disconnected: random item/gate sequences, with re-entrant backpressure."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from hypothesis import given, settings
from hypothesis import strategies as st
from reactivex.subject import Subject

from operators import Dropped, HoldPolicy, hold_while_disconnected


@dataclass(frozen=True)
class Item:
    id: int
    policy: HoldPolicy
    size: int
    backpressure: bool  # the consumer closes the gate from inside on_next when it receives this item


item_events = st.tuples(st.just("item"), st.sampled_from(list(HoldPolicy)), st.integers(0, 10), st.booleans())
gate_events = st.tuples(st.just("gate"), st.booleans())
events = st.lists(st.one_of(item_events, item_events, gate_events), max_size=60)


@dataclass
class Run:
    inputs: list[Item]
    out: list[Item]
    dropped: list[Dropped[Item]]
    depth: list[tuple[int, int]]
    completed: bool


def drive(evs: list[tuple[object, ...]], max_count: int | None = None, max_bytes: int | None = None) -> Run:
    gate: Subject[bool] = Subject()
    source: Subject[Item] = Subject()
    run = Run([], [], [], [], False)
    backpressure = True

    def on_next(item: Item) -> None:
        run.out.append(item)
        if backpressure and item.backpressure:
            gate.on_next(False)

    def on_completed() -> None:
        run.completed = True

    op = hold_while_disconnected(
        gate,
        lambda i: i.policy,
        max_count=max_count,
        max_bytes=max_bytes,
        size_of=lambda i: i.size,
        on_dropped=run.dropped.append,
        on_depth=lambda c, b: run.depth.append((c, b)),
    )
    source.pipe(op).subscribe(on_next, on_completed=on_completed)
    for ev in evs:
        if ev[0] == "gate":
            gate.on_next(bool(ev[1]))
        else:
            _, policy, size, bp = ev
            assert isinstance(policy, HoldPolicy) and isinstance(size, int)
            item = Item(len(run.inputs), policy, size, bool(bp))
            run.inputs.append(item)
            source.on_next(item)
    source.on_completed()
    backpressure = False
    gate.on_next(True)
    return run


def ids(items: list[Item], *policies: HoldPolicy) -> list[int]:
    return [i.id for i in items if i.policy in policies]


@settings(max_examples=200, deadline=None)
@given(events)
def test_unbounded_keeps_every_data_item_in_order(evs: list[tuple[object, ...]]) -> None:
    run = drive(evs)
    data = (HoldPolicy.KEEP_ALL, HoldPolicy.KEEP_BOUNDED)
    # No KEEP_ALL (nor KEEP_BOUNDED) item is lost, and their order is the input order.
    assert ids(run.out, HoldPolicy.KEEP_ALL) == ids(run.inputs, HoldPolicy.KEEP_ALL)
    assert ids(run.out, *data) == ids(run.inputs, *data)
    # Heartbeats never reorder among themselves; the only drops are superseded heartbeats.
    beats = ids(run.out, HoldPolicy.KEEP_LATEST)
    assert beats == sorted(beats)
    assert all(d.reason == "superseded" and d.item.policy is HoldPolicy.KEEP_LATEST for d in run.dropped)
    # Everything is accounted for exactly once; completion came after the final release.
    seen = Counter([i.id for i in run.out] + [d.item.id for d in run.dropped])
    assert seen == Counter(i.id for i in run.inputs)
    assert run.completed
    assert not run.depth or run.depth[-1] == (0, 0)


@settings(max_examples=200, deadline=None)
@given(
    events,
    st.one_of(st.none(), st.integers(0, 6)),
    st.one_of(st.none(), st.integers(0, 30)),
)
def test_bounded_every_item_is_output_or_dropped_exactly_once(
    evs: list[tuple[object, ...]], max_count: int | None, max_bytes: int | None
) -> None:
    run = drive(evs, max_count, max_bytes)
    seen = Counter([i.id for i in run.out] + [d.item.id for d in run.dropped])
    assert seen == Counter(i.id for i in run.inputs)
    assert {d.reason for d in run.dropped} <= {"superseded", "outbox_full"}
    # What is emitted keeps the input order (data among itself, heartbeats among themselves).
    data = ids(run.out, HoldPolicy.KEEP_ALL, HoldPolicy.KEEP_BOUNDED)
    assert data == sorted(data)
    beats = ids(run.out, HoldPolicy.KEEP_LATEST)
    assert beats == sorted(beats)
    # The bounds hold at every step.
    assert all(max_count is None or c <= max_count for c, _ in run.depth)
    assert all(max_bytes is None or b <= max_bytes for _, b in run.depth)
    assert run.completed
    # And exactly what a naive list-based model of the rules predicts (eviction order included).
    model_out, model_dropped = model(evs, max_count, max_bytes)
    assert [i.id for i in run.out] == model_out
    assert [(d.item.id, d.reason) for d in run.dropped] == model_dropped


def model(
    evs: list[tuple[object, ...]], max_count: int | None, max_bytes: int | None
) -> tuple[list[int], list[tuple[int, str]]]:
    """The delivery rules written as plainly as possible (no re-entrancy: backpressure is a flag)."""
    out: list[int] = []
    dropped: list[tuple[int, str]] = []
    held: list[Item] = []  # KEEP_ALL and KEEP_BOUNDED, arrival order
    latest: list[Item] = []  # at most one KEEP_LATEST
    is_open = False
    backpressure = True

    def emit(item: Item) -> None:
        nonlocal is_open
        out.append(item.id)
        if backpressure and item.backpressure:
            is_open = False

    def release() -> None:
        while is_open and (latest or held):
            emit(latest.pop() if latest else held.pop(0))

    def over() -> bool:
        everything = held + latest
        return (max_count is not None and len(everything) > max_count) or (
            max_bytes is not None and sum(i.size for i in everything) > max_bytes
        )

    n = 0
    for ev in evs:
        if ev[0] == "gate":
            is_open = bool(ev[1])
            release()
            continue
        _, policy, size, bp = ev
        assert isinstance(policy, HoldPolicy) and isinstance(size, int)
        item = Item(n, policy, size, bool(bp))
        n += 1
        if is_open and not held and not latest:
            emit(item)
            continue
        if policy is HoldPolicy.KEEP_LATEST:
            dropped.extend((old.id, "superseded") for old in latest)
            latest[:] = [item]
        else:
            held.append(item)
        while over():
            bounded = [i for i in held if i.policy is HoldPolicy.KEEP_BOUNDED]
            victim = latest.pop() if latest else bounded[0] if bounded else held[0]
            if victim in held:
                held.remove(victim)
            dropped.append((victim.id, "outbox_full"))
        release()
    backpressure = False
    is_open = True
    release()
    return out, dropped
