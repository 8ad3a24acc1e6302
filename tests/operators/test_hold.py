"""hold_while_disconnected: marble tests (virtual time) and direct re-entrancy/bounds tests."""

from __future__ import annotations

from typing import Any

import pytest
from reactivex import of
from reactivex import operators as ops
from reactivex.subject import BehaviorSubject, Subject
from reactivex.testing import ReactiveTest, TestScheduler
from reactivex.testing.marbles import marbles_testing

from operators import Dropped, HoldPolicy, hold_while_disconnected

GATE = {"t": True, "f": False}
on_next = ReactiveTest.on_next
on_completed = ReactiveTest.on_completed
on_error = ReactiveTest.on_error
subscribe = ReactiveTest.subscribe


def letters(item: Any) -> HoldPolicy:
    """``h`` (and numbers) are heartbeats (KEEP_LATEST), everything else is data (KEEP_ALL)."""
    return HoldPolicy.KEEP_LATEST if item == "h" or isinstance(item, int) else HoldPolicy.KEEP_ALL


# --------------------------------------------------------------------------- marble tests


def test_gate_starts_closed_then_passthrough_while_open() -> None:
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        gate = hot("----t-------", GATE)
        source = hot("--a---b-c-|")
        expected = exp("----a-b-c-|")
        assert start(source.pipe(hold_while_disconnected(gate, letters))) == expected


def test_docstring_diagram() -> None:
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        gate = hot("-t------f-------t-----------", GATE)
        source = hot("--a--h----b--h----------c---")
        expected = exp("--a--h----------(h,b)---c---")
        assert start(source.pipe(hold_while_disconnected(gate, letters))) == expected


def test_disconnect_in_the_middle_of_a_burst() -> None:
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        gate = hot("-t---f------t----------", GATE)
        source = hot("--a-b-c-d-e---------f-|")
        expected = exp("--a-b-------(c,d,e)-f-|")
        assert start(source.pipe(hold_while_disconnected(gate, letters))) == expected


def test_reconnect_disconnect_storm_gate_flapping() -> None:
    with marbles_testing(timespan=1.0) as (start, _cold, hot, _exp):
        gate = hot("-t-f-t-f-t-f-t-f-t-f-t", GATE)
        source = hot("--a-b-c-d-e-f-g-h-i--|")
        # An item arriving while closed is released when the gate next opens.
        expected = [
            *(on_next(200 + t, v) for t, v in [(2, "a"), (5, "b"), (6, "c"), (9, "d"), (10, "e")]),
            *(on_next(200 + t, v) for t, v in [(13, "f"), (14, "g"), (17, "h"), (18, "i")]),
            on_completed(221),
        ]
        assert start(source.pipe(hold_while_disconnected(gate, letters))) == expected


def test_storm_gate_flapping_every_tick_with_an_item_every_tick() -> None:
    scheduler = TestScheduler()
    # The gate is created first, so at equal times its value is applied before the item.
    gate = scheduler.create_hot_observable(*(on_next(t, t % 2 == 1) for t in range(201, 300)))
    source = scheduler.create_hot_observable(*(on_next(t, f"x{t}") for t in range(201, 300)))
    observer = scheduler.start(lambda: source.pipe(hold_while_disconnected(gate, letters)))
    # Odd ticks (open): straight through; even ticks (closed): released at the next odd tick.
    expected = [on_next(t + (t % 2 == 0), f"x{t}") for t in range(201, 300)]
    assert observer.messages == expected


def test_storm_with_heartbeats_and_long_outages_keeps_data_order() -> None:
    with marbles_testing(timespan=1.0) as (start, _cold, hot, _exp):
        gate = hot("-t-f-t-f-----t-f-t---f--------t----", GATE)
        source = hot("--a-b-h-c-h-d--e--h---f-h-g-h---|")
        # e arrives together with a gate close (the gate's value applies first): held until 17.
        timeline = "a@2 b@5 h@6 h@13 c@13 d@13 e@17 h@18 h@30 f@30 g@30"
        expected = [on_next(200 + int(t), v) for v, t in (e.split("@") for e in timeline.split())]
        expected.append(on_completed(232))
        assert start(source.pipe(hold_while_disconnected(gate, letters))) == expected


def test_source_completion_while_holding_is_deferred_until_released() -> None:
    dropped: list[Dropped[Any]] = []
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        gate = hot("-t-f-----t---", GATE)
        source = hot("--a--b-|------")
        expected = exp("--a------(b,|)")
        op = hold_while_disconnected(gate, letters, on_dropped=dropped.append)
        assert start(source.pipe(op)) == expected
    assert dropped == []


def test_source_completion_with_nothing_held_completes_at_once_even_if_closed() -> None:
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        gate = hot("-t-f-------", GATE)
        source = hot("--a--|")
        assert start(source.pipe(hold_while_disconnected(gate, letters))) == exp("--a--|")


def test_source_error_while_holding_reports_held_and_forwards_error() -> None:
    dropped: list[Dropped[Any]] = []
    err = RuntimeError("boom")
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        gate = hot("-t-f----------t", GATE)
        source = hot("--a--b-h-c-#", error=err)
        expected = exp("--a--------#", error=err)
        op = hold_while_disconnected(gate, letters, on_dropped=dropped.append)
        assert start(source.pipe(op)) == expected
    # Reported in release order: the held KEEP_LATEST item first, then data in arrival order.
    assert dropped == [
        Dropped("h", "source_error"),
        Dropped("b", "source_error"),
        Dropped("c", "source_error"),
    ]


def test_gate_error_reports_held_as_source_error_and_forwards() -> None:
    dropped: list[Dropped[Any]] = []
    err = RuntimeError("gate broke")
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        gate = hot("-t-f---#", GATE, err)
        source = hot("--a--b-----c")
        expected = exp("--a----#", error=err)
        op = hold_while_disconnected(gate, letters, on_dropped=dropped.append)
        assert start(source.pipe(op)) == expected
    assert dropped == [Dropped("b", "source_error")]


def test_gate_completion_keeps_last_state() -> None:
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        gate = hot("-t|-----", GATE)
        source = hot("---a-b-|")
        assert start(source.pipe(hold_while_disconnected(gate, letters))) == exp("---a-b-|")
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        gate = hot("-t-f|----------", GATE)
        source = hot("--a--b-|")
        assert start(source.pipe(hold_while_disconnected(gate, letters))) == exp("--a------")


def test_newest_only_policy_one_heartbeat_on_reconnect() -> None:
    dropped: list[Dropped[Any]] = []
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        gate = hot("-t-f---------t---", GATE)
        source = hot("--1-2-3-4-5-6----|")
        expected = exp("--1----------6---|")
        op = hold_while_disconnected(gate, lambda _: HoldPolicy.KEEP_LATEST, on_dropped=dropped.append)
        assert start(source.pipe(op)) == expected
    assert dropped == [Dropped(n, "superseded") for n in (2, 3, 4, 5)]


def test_keep_latest_is_released_first() -> None:
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        gate = hot("-------t----", GATE)
        source = hot("-a-b-h-----c")
        expected = exp("-------(h,a,b)")
        # c arrives after the release, while nothing is held: straight through.
        result = start(source.pipe(hold_while_disconnected(gate, letters)))
        assert result == [*expected, on_next(211, "c")]


# --------------------------------------------------------------------------- TestScheduler


def test_disposal_reports_held_as_disposed_and_unsubscribes_upstream() -> None:
    scheduler = TestScheduler()
    source = scheduler.create_hot_observable(
        on_next(210, "a"), on_next(230, "b"), on_next(240, "h"), on_next(250, "c"), on_next(600, "late")
    )
    gate = scheduler.create_hot_observable(on_next(220, True), on_next(225, False), on_next(700, True))
    dropped: list[Dropped[Any]] = []
    depth: list[tuple[int, int]] = []
    op = hold_while_disconnected(
        gate, letters, on_dropped=dropped.append, on_depth=lambda c, b: depth.append((c, b))
    )
    observer = scheduler.start(lambda: source.pipe(op), disposed=500)

    assert observer.messages == [on_next(220, "a")]
    assert dropped == [Dropped("h", "disposed"), Dropped("b", "disposed"), Dropped("c", "disposed")]
    assert depth[-1] == (0, 0)
    assert source.subscriptions == [subscribe(200, 500)]
    assert gate.subscriptions == [subscribe(200, 500)]


def test_each_subscription_has_its_own_buffer() -> None:
    scheduler = TestScheduler()
    source = scheduler.create_hot_observable(on_next(210, "a"), on_next(310, "b"), on_completed(400))
    gate = scheduler.create_hot_observable(on_next(300, True), on_next(350, True))
    held = source.pipe(hold_while_disconnected(gate, letters))
    first = scheduler.create_observer()
    second = scheduler.create_observer()
    scheduler.schedule_absolute(200, lambda *_: held.subscribe(first))
    scheduler.schedule_absolute(305, lambda *_: held.subscribe(second))
    scheduler.start()
    assert first.messages == [on_next(300, "a"), on_next(310, "b"), on_completed(400)]
    assert second.messages == [on_next(350, "b"), on_completed(400)]


# --------------------------------------------------------------------------- direct (Subjects)


class Rig:
    """A gate Subject, a source Subject and a recording observer around the operator."""

    def __init__(self, **kwargs: Any) -> None:
        self.gate: Subject[bool] = Subject()
        self.source: Subject[Any] = Subject()
        self.out: list[Any] = []
        self.dropped: list[Dropped[Any]] = []
        self.depth: list[tuple[int, int]] = []
        self.completed = False
        self.errors: list[Exception] = []
        self.hooks: dict[Any, Any] = {}  # item -> callback run inside on_next
        self._inside = 0
        self.nested = False
        kwargs.setdefault("policy_of", kind_policy)
        op = hold_while_disconnected(
            self.gate,
            on_dropped=self.dropped.append,
            on_depth=lambda c, b: self.depth.append((c, b)),
            **kwargs,
        )
        self.subscription = self.source.pipe(op).subscribe(self._on_next, self.errors.append, self._done)

    def _on_next(self, item: Any) -> None:
        self.nested = self.nested or self._inside > 0
        self._inside += 1
        try:
            self.out.append(item)
            hook = self.hooks.pop(item, None)
            if hook is not None:
                hook()
        finally:
            self._inside -= 1

    def _done(self) -> None:
        self.completed = True

    def push(self, *items: Any) -> None:
        for item in items:
            self.source.on_next(item)


def kind_policy(item: tuple[str, int] | tuple[str, int, int]) -> HoldPolicy:
    return {"A": HoldPolicy.KEEP_ALL, "B": HoldPolicy.KEEP_BOUNDED, "L": HoldPolicy.KEEP_LATEST}[item[0]]


def size3(item: tuple[str, int, int]) -> int:
    return item[2]


def test_bounds_by_count_eviction_order() -> None:
    rig = Rig(max_count=3)
    a1, b1, l1, a2, b2, a3, a4, l2, b3 = (
        ("A", 1),
        ("B", 1),
        ("L", 1),
        ("A", 2),
        ("B", 2),
        ("A", 3),
        ("A", 4),
        ("L", 2),
        ("B", 3),
    )
    rig.push(a1, b1, l1)
    assert rig.dropped == []
    rig.push(a2)  # 4 > 3: the held KEEP_LATEST goes first
    assert rig.dropped == [Dropped(l1, "outbox_full")]
    rig.push(b2)  # then the oldest KEEP_BOUNDED
    assert rig.dropped[-1] == Dropped(b1, "outbox_full")
    rig.push(a3)  # the oldest KEEP_BOUNDED again (b2)
    assert rig.dropped[-1] == Dropped(b2, "outbox_full")
    rig.push(a4)  # only KEEP_ALL left: the oldest one
    assert rig.dropped[-1] == Dropped(a1, "outbox_full")
    rig.push(l2)  # the incoming heartbeat is the first candidate itself
    assert rig.dropped[-1] == Dropped(l2, "outbox_full")
    rig.push(b3)  # the incoming KEEP_BOUNDED is the only KEEP_BOUNDED: evicted itself
    assert rig.dropped[-1] == Dropped(b3, "outbox_full")
    assert len(rig.dropped) == 6
    assert all(c <= 3 for c, _ in rig.depth)
    rig.gate.on_next(True)
    assert rig.out == [a2, a3, a4]
    assert rig.depth[-1] == (0, 0)


def test_bounds_by_bytes_eviction_order() -> None:
    rig = Rig(max_bytes=10, size_of=size3)
    a1, b1, l1, a2, b2, a3, a4 = (
        ("A", 1, 4),
        ("B", 1, 3),
        ("L", 1, 2),
        ("A", 2, 2),
        ("B", 2, 5),
        ("A", 3, 20),
        ("A", 4, 1),
    )
    rig.push(a1, b1, l1)
    assert rig.depth[-1] == (3, 9)
    rig.push(a2)  # 11 bytes: the heartbeat goes
    assert rig.dropped == [Dropped(l1, "outbox_full")]
    assert rig.depth[-1] == (3, 9)
    rig.push(b2)  # 14 bytes: b1 (11), still over: b2 (6)
    assert rig.dropped[1:] == [Dropped(b1, "outbox_full"), Dropped(b2, "outbox_full")]
    assert rig.depth[-1] == (2, 6)
    rig.push(a3)  # 26 bytes, only KEEP_ALL: a1, a2, then the incoming a3 itself
    assert rig.dropped[3:] == [
        Dropped(a1, "outbox_full"),
        Dropped(a2, "outbox_full"),
        Dropped(a3, "outbox_full"),
    ]
    assert rig.depth[-1] == (0, 0)
    rig.push(a4)
    rig.gate.on_next(True)
    assert rig.out == [a4]
    assert all(b <= 10 for _, b in rig.depth)


def test_bounds_by_count_and_bytes_together() -> None:
    rig = Rig(max_count=2, max_bytes=100, size_of=size3)
    items = [("A", i, 10) for i in range(5)]
    rig.push(*items)
    assert [d.item for d in rig.dropped] == items[:3]
    rig.gate.on_next(True)
    assert rig.out == items[3:]
    assert all(c <= 2 for c, _ in rig.depth)


def test_on_depth_values() -> None:
    rig = Rig(size_of=size3)
    rig.push(("A", 1, 5), ("L", 1, 1), ("L", 2, 2), ("B", 1, 3))
    assert rig.depth == [(1, 5), (2, 6), (2, 7), (3, 10)]
    rig.gate.on_next(True)  # one value per released item
    assert rig.depth[4:] == [(2, 8), (1, 3), (0, 0)]
    assert rig.out == [("L", 2, 2), ("A", 1, 5), ("B", 1, 3)]
    rig.push(("A", 2, 7))  # straight through: nothing held, no depth change
    assert len(rig.depth) == 7


def test_reentrant_gate_close_stops_release_and_resumes_in_order() -> None:
    rig = Rig()
    a, b, c, d, e, f = (("A", i) for i in range(6))
    rig.push(a, b, c, d)
    rig.hooks[b] = lambda: rig.gate.on_next(False)  # the consumer's wire queue is full
    rig.gate.on_next(True)
    assert rig.out == [a, b]
    assert rig.depth[-1] == (2, 0)
    rig.push(e)  # held behind c, d
    assert rig.out == [a, b]
    rig.hooks[d] = lambda: rig.gate.on_next(False)
    rig.gate.on_next(True)
    assert rig.out == [a, b, c, d]
    rig.gate.on_next(True)
    assert rig.out == [a, b, c, d, e]
    rig.push(f)
    assert rig.out == [a, b, c, d, e, f]
    assert not rig.nested


def test_items_arriving_while_held_never_overtake_even_with_gate_open() -> None:
    rig = Rig()
    a, b, c, x = ("A", 0), ("A", 1), ("A", 2), ("A", 9)
    rig.push(a, b, c)
    rig.hooks[a] = lambda: rig.push(x)  # re-entrant item while b, c are still held
    rig.gate.on_next(True)
    assert rig.out == [a, b, c, x]
    assert not rig.nested


def test_reentrant_items_during_passthrough_are_serialized() -> None:
    rig = Rig()
    rig.gate.on_next(True)
    p, q, r = ("A", 1), ("A", 2), ("A", 3)
    rig.hooks[p] = lambda: rig.push(q, r)
    rig.push(p)
    assert rig.out == [p, q, r]
    assert not rig.nested  # q and r were not emitted from inside p's on_next


def test_reentrant_close_and_reopen_inside_on_next_continues() -> None:
    rig = Rig()
    items = [("A", i) for i in range(4)]
    rig.push(*items)

    def flap() -> None:
        rig.gate.on_next(False)
        rig.gate.on_next(True)

    rig.hooks[items[1]] = flap
    rig.gate.on_next(True)
    assert rig.out == items


def test_dispose_from_inside_on_next_stops_release() -> None:
    rig = Rig()
    items = [("A", i) for i in range(4)]
    rig.push(*items)
    rig.hooks[items[1]] = lambda: rig.subscription.dispose()
    rig.gate.on_next(True)
    assert rig.out == items[:2]
    assert rig.dropped == [Dropped(items[2], "disposed"), Dropped(items[3], "disposed")]
    rig.push(("A", 9))
    rig.gate.on_next(True)
    assert rig.out == items[:2]


def test_completion_after_reentrant_close_waits_for_the_rest() -> None:
    rig = Rig()
    items = [("A", i) for i in range(3)]
    rig.push(*items)
    rig.source.on_completed()
    rig.hooks[items[0]] = lambda: rig.gate.on_next(False)
    rig.gate.on_next(True)
    assert rig.out == items[:1] and not rig.completed
    rig.gate.on_next(True)
    assert rig.out == items and rig.completed


def test_failing_policy_is_reported_and_forwarded() -> None:
    rig = Rig()
    rig.push(("A", 1))
    rig.push(("?", 2))  # kind_policy raises KeyError
    assert [d.reason for d in rig.dropped] == ["source_error", "source_error"]
    assert {d.item for d in rig.dropped} == {("A", 1), ("?", 2)}
    assert len(rig.errors) == 1 and isinstance(rig.errors[0], KeyError)


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError):
        hold_while_disconnected(Subject(), letters, max_bytes=10)
    with pytest.raises(ValueError):
        hold_while_disconnected(Subject(), letters, max_count=-1)


def test_composes_with_a_behavior_subject_gate() -> None:
    gate = BehaviorSubject(True)
    out: list[str] = []
    of("a", "b").pipe(hold_while_disconnected(gate, letters), ops.map(str.upper)).subscribe(out.append)
    assert out == ["A", "B"]


def test_max_bounded_evicts_oldest_bounded_only() -> None:
    """A per-class bound on KEEP_BOUNDED items: the oldest of them go, KEEP_ALL items stay."""
    gate: BehaviorSubject[bool] = BehaviorSubject(False)
    source: Subject[str] = Subject()
    dropped: list[Dropped[str]] = []
    out: list[str] = []
    policy = {"s": HoldPolicy.KEEP_BOUNDED, "d": HoldPolicy.KEEP_ALL}
    source.pipe(
        hold_while_disconnected(gate, lambda item: policy[item[0]], max_bounded=2, on_dropped=dropped.append)
    ).subscribe(out.append)
    for item in ["s1", "d1", "s2", "s3", "d2", "s4"]:
        source.on_next(item)
    gate.on_next(True)
    assert out == ["d1", "s3", "d2", "s4"]
    assert [(d.item, d.reason) for d in dropped] == [("s1", "outbox_full"), ("s2", "outbox_full")]
