"""The contract every operator keeps beyond its happy path: completion, disposal, schedulers, arguments.

- Completion: an operator completes when (and only when) its documented inputs have completed.
- Disposal: disposing the result ends the subscription of every input (no leaked connection).
- Schedulers: the scheduler given to ``subscribe`` reaches every input (virtual time works end to end).
- Arguments: bad values are refused at once, with a message naming the argument and the value.
"""

from __future__ import annotations

import random
from typing import Any

import pytest
from reactivex import Observable, defer, never, of, timer
from reactivex import operators as ops
from reactivex.subject import BehaviorSubject, Subject
from reactivex.testing import ReactiveTest, TestScheduler

from operators import (
    Acked,
    AckEvent,
    Backoff,
    Dropped,
    HoldPolicy,
    Unacked,
    hold_while_disconnected,
    match_acks,
    partition_by,
    retry_with_backoff,
    route_frames,
)

on_next = ReactiveTest.on_next
on_completed = ReactiveTest.on_completed
on_error = ReactiveTest.on_error
subscribe = ReactiveTest.subscribe


class MaxRandom(random.Random):
    """Always draws the upper bound: delays become exactly the ceilings."""

    def uniform(self, a: float, b: float) -> float:
        return b


def at(seconds: float, value: Any) -> Observable[Any]:
    """``value`` once, ``seconds`` after subscription, on whatever scheduler the subscriber passes."""
    return timer(seconds).pipe(ops.map(lambda _: value))


# --------------------------------------------------------------------------- match_acks


def test_match_acks_does_not_complete_while_sent_is_live() -> None:
    sent: Subject[str] = Subject()
    responses: Subject[int] = Subject()
    events: list[AckEvent[str, int]] = []
    completed: list[bool] = []
    match_acks(sent, responses, Subject()).subscribe(events.append, on_completed=lambda: completed.append(True))
    sent.on_next("a")
    sent.on_next("b")
    responses.on_next(1)
    responses.on_completed()  # sent is still live: "b" may yet be answered... by nothing, but sent decides
    assert completed == []
    sent.on_next("c")
    sent.on_completed()
    assert events == [Acked("a", 1), Unacked(("b", "c"))]
    assert completed == [True]


def test_disposing_match_acks_unsubscribes_all_three_inputs() -> None:
    inputs: tuple[Subject[str], Subject[int], Subject[bool]] = (Subject(), Subject(), Subject())
    events: list[AckEvent[str, int]] = []
    subscription = match_acks(*inputs).subscribe(events.append)
    assert all(len(subject.observers) == 1 for subject in inputs)
    subscription.dispose()
    assert [len(subject.observers) for subject in inputs] == [0, 0, 0]
    inputs[0].on_next("a")
    inputs[1].on_next(1)
    assert events == []


def test_an_error_of_one_input_ends_the_subscriptions_of_all_three() -> None:
    inputs: tuple[Subject[str], Subject[int], Subject[bool]] = (Subject(), Subject(), Subject())
    errors: list[Exception] = []
    match_acks(*inputs).subscribe(on_error=errors.append)
    failure = RuntimeError("responses failed")
    inputs[1].on_error(failure)
    assert errors == [failure]
    assert [len(subject.observers) for subject in inputs] == [0, 0, 0]


def test_match_acks_passes_the_subscribe_scheduler_to_every_input() -> None:
    scheduler = TestScheduler()
    events: list[tuple[float, AckEvent[str, int]]] = []
    sent = at(10.0, "a").pipe(ops.concat(at(5.0, "b")))  # "a" at 10, "b" at 15
    responses = at(20.0, 1).pipe(ops.concat(never()))  # live: completing both inputs would flush
    connected = at(30.0, False)
    match_acks(sent, responses, connected).subscribe(
        lambda event: events.append((scheduler.clock, event)), scheduler=scheduler
    )
    scheduler.advance_to(100.0)
    assert events == [(20.0, Acked("a", 1)), (30.0, Unacked(("b",)))]


# --------------------------------------------------------------------------- Backoff


def test_backoff_defaults_base_1_cap_60_stable_after_30() -> None:
    backoff = Backoff(rng=MaxRandom())
    assert (backoff.base, backoff.cap, backoff.stable_after) == (1.0, 60.0, 30.0)
    assert [backoff.next_delay() for _ in range(8)] == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    backoff.connection_up(100.0)
    backoff.connection_down(129.99)
    assert backoff.attempt == 8
    backoff.connection_up(200.0)
    backoff.connection_down(230.0)
    assert backoff.attempt == 0


def test_backoff_without_an_rng_draws_full_jitter_from_its_own() -> None:
    backoff = Backoff(base=1.0, cap=60.0)
    delays = [backoff.next_delay() for _ in range(3)]
    assert all(0.0 <= d <= 2.0**k for k, d in enumerate(delays))
    assert backoff.attempt == 3


@pytest.mark.parametrize("name", ["base", "cap", "stable_after"])
def test_backoff_refuses_a_negative_argument_by_name(name: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name} must be >= 0, got -0\.5$"):
        Backoff(**{name: -0.5})


def test_backoff_accepts_zeros() -> None:
    backoff = Backoff(base=0.0, cap=0.0, stable_after=0.0)
    assert backoff.next_delay() == 0.0
    backoff.connection_up(5.0)
    backoff.connection_down(5.0)  # up for 0 s >= stable_after 0: a reset
    assert backoff.attempt == 0


def test_reset_forgets_the_connection_too() -> None:
    backoff = Backoff(stable_after=30.0, rng=MaxRandom())
    backoff.connection_up(0.0)
    backoff.reset()
    backoff.next_delay()
    backoff.connection_down(100.0)  # a down without an up since the reset: no reset of the attempts
    assert backoff.attempt == 1


def test_retry_with_backoff_refuses_negative_max_retries_and_accepts_zero() -> None:
    with pytest.raises(ValueError, match=r"^max_retries must be >= 0, got -1$"):
        retry_with_backoff(Backoff(), max_retries=-1)
    scheduler = TestScheduler()
    err = ConnectionError("refused")
    source = scheduler.create_cold_observable(on_error(2, err))
    observer = scheduler.start(lambda: source.pipe(retry_with_backoff(Backoff(), max_retries=0)))
    assert observer.messages == [on_error(202, err)]  # no retry at all
    assert source.subscriptions == [subscribe(200, 202)]


def test_stable_after_is_measured_from_the_first_item_of_a_connection() -> None:
    scheduler = TestScheduler()
    # Up from its first item (+1) to the error (+40): 39 s >= 30 s, although the last item was 5 s before.
    source = scheduler.create_cold_observable(
        on_next(1, "a"), on_next(35, "b"), on_error(40, ConnectionError("dropped"))
    )
    backoff = Backoff(base=1.0, cap=60.0, stable_after=30.0, rng=MaxRandom())
    for _ in range(3):
        backoff.next_delay()  # three earlier failures: the next delay would be 8 s without a reset
    scheduler.start(lambda: source.pipe(retry_with_backoff(backoff)), disposed=245)
    assert [s.subscribe for s in source.subscriptions] == [200, 241]  # reset: the base delay, 1 s


def test_a_raising_should_retry_forwards_its_own_error_and_stops() -> None:
    scheduler = TestScheduler()
    source = scheduler.create_cold_observable(on_next(1, "a"), on_error(2, ConnectionError("dropped")))
    bug = TypeError("should_retry is broken")

    def should_retry(_: Exception) -> bool:
        raise bug

    observer = scheduler.start(lambda: source.pipe(retry_with_backoff(Backoff(), should_retry=should_retry)))
    assert observer.messages == [on_next(201, "a"), on_error(202, bug)]
    assert source.subscriptions == [subscribe(200, 202)]


def test_disposing_retry_with_backoff_unsubscribes_a_live_source() -> None:
    scheduler = TestScheduler()
    source = scheduler.create_cold_observable(on_next(1, "a"))  # never ends: a live connection
    observer = scheduler.start(lambda: source.pipe(retry_with_backoff(Backoff())), disposed=250)
    assert observer.messages == [on_next(201, "a")]
    assert source.subscriptions == [subscribe(200, 250)]


def test_disposing_retry_with_backoff_after_a_retry_unsubscribes_the_new_source() -> None:
    scheduler = TestScheduler()
    subscriptions: list[Any] = []
    attempts = iter([
        scheduler.create_cold_observable(on_error(1, ConnectionError("x"))),
        scheduler.create_cold_observable(on_next(1, "b")),
    ])

    def connect(_: Any) -> Observable[str]:
        source = next(attempts)
        subscriptions.append(source.subscriptions)
        return source

    backoff = Backoff(base=1.0, rng=MaxRandom())
    scheduler.start(lambda: defer(connect).pipe(retry_with_backoff(backoff)), disposed=250)
    assert subscriptions == [[subscribe(200, 201)], [subscribe(202, 250)]]


# --------------------------------------------------------------------------- hold_while_disconnected


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_count": -1}, r"^max_count must be >= 0, got -1$"),
        ({"max_bytes": -1, "size_of": len}, r"^max_bytes must be >= 0, got -1$"),
        ({"max_bounded": -1}, r"^max_bounded must be >= 0, got -1$"),
        ({"max_bytes": 10}, r"^max_bytes needs size_of$"),
    ],
)
def test_hold_refuses_bad_bounds_by_name(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        hold_while_disconnected(Subject(), lambda _: HoldPolicy.KEEP_ALL, **kwargs)


def test_hold_zero_bounds_are_valid_and_hold_nothing_of_their_kind() -> None:
    policy = {"s": HoldPolicy.KEEP_BOUNDED, "d": HoldPolicy.KEEP_ALL}
    gate: BehaviorSubject[bool] = BehaviorSubject(False)
    source: Subject[str] = Subject()
    dropped: list[Dropped[str]] = []
    out: list[str] = []
    source.pipe(
        hold_while_disconnected(gate, lambda item: policy[item[0]], max_bounded=0, on_dropped=dropped.append)
    ).subscribe(out.append)
    for item in ["s1", "d1", "s2"]:
        source.on_next(item)
    gate.on_next(True)
    assert out == ["d1"]
    assert [(d.item, d.reason) for d in dropped] == [("s1", "outbox_full"), ("s2", "outbox_full")]

    gate = BehaviorSubject(False)
    dropped.clear()
    Subject[str]().pipe(hold_while_disconnected(gate, lambda _: HoldPolicy.KEEP_ALL, max_count=0))
    source = Subject()
    source.pipe(
        hold_while_disconnected(gate, lambda _: HoldPolicy.KEEP_ALL, max_count=0, on_dropped=dropped.append)
    ).subscribe(out.append)
    source.on_next("d2")
    assert [(d.item, d.reason) for d in dropped] == [("d2", "outbox_full")]


def test_hold_passes_the_subscribe_scheduler_to_the_gate_and_the_source() -> None:
    scheduler = TestScheduler()
    out: list[tuple[float, str]] = []
    gate = at(20.0, True)
    source = at(10.0, "a").pipe(ops.concat(at(20.0, "b")))  # "a" at 10 (held), "b" at 30 (passes)
    source.pipe(hold_while_disconnected(gate, lambda _: HoldPolicy.KEEP_ALL)).subscribe(
        lambda item: out.append((scheduler.clock, item)), scheduler=scheduler
    )
    scheduler.advance_to(100.0)
    assert out == [(20.0, "a"), (30.0, "b")]


# --------------------------------------------------------------------------- partition_by


def test_partition_without_default_has_exactly_the_given_branches() -> None:
    parts = partition_by(Subject[str](), str.lower, ["a", "b", "a"])
    assert list(parts.branches) == ["a", "b"]
    with_default = partition_by(Subject[str](), str.lower, ["a"], default="other")
    assert list(with_default.branches) == ["a", "other"]


def test_partition_unknown_key_error_says_which_item_key_and_keys() -> None:
    source: Subject[str] = Subject()
    parts = partition_by(source, str.lower, ["a", "b"])
    errors: list[Exception] = []
    parts["a"].subscribe(on_error=errors.append)
    parts.connect()
    source.on_next("Z")
    assert len(errors) == 1
    assert str(errors[0]) == (
        "partition_by: item 'Z' has key 'z', not one of ['a', 'b'], and there is no default branch"
    )


def test_connect_after_dispose_subscribes_the_source_again() -> None:
    source: Subject[str] = Subject()
    parts = partition_by(source, str.lower, ["a"])
    items: list[str] = []
    parts["a"].subscribe(items.append)
    first = parts.connect()
    assert parts.connect() is first  # connected: the same connection, no second subscription
    assert len(source.observers) == 1
    first.dispose()
    assert not source.observers
    second = parts.connect()
    assert second is not first
    assert len(source.observers) == 1
    source.on_next("A")
    assert items == ["A"]
    first.dispose()  # disposing the old connection again does not touch the new one
    assert len(source.observers) == 1
    assert parts.connect() is second
    second.dispose()
    assert not source.observers


def test_after_a_failure_key_of_is_not_called_for_the_items_a_synchronous_source_still_emits() -> None:
    seen: list[str] = []

    def key_of(item: str) -> str:
        seen.append(item)
        return item.lower()

    parts = partition_by(of("a", "Z", "b"), key_of, ["a", "b"])  # "Z": no such branch, no default
    items: list[str] = []
    errors: list[Exception] = []
    parts["a"].subscribe(items.append, errors.append)
    parts["b"].subscribe(items.append, errors.append)
    parts.connect()
    assert items == ["a"] and len(errors) == 2
    assert seen == ["a", "Z"]  # "b" arrived after the branches had failed: ignored, not even keyed


# --------------------------------------------------------------------------- route_frames


def test_route_frames_has_the_keys_then_default_then_malformed_each_once() -> None:
    def route(keys: list[str], **kwargs: Any) -> list[str]:
        return list(route_frames(Subject[str](), str.upper, str.lower, keys, **kwargs).branches)

    assert route(["a", "b", "a"], malformed="bad") == ["a", "b", "bad"]
    assert route(["a"], malformed="bad", default="other") == ["a", "other", "bad"]
    assert route(["bad", "a"], malformed="bad", default="a") == ["bad", "a"]  # already keys: not added
    routed = route_frames(Subject[str](), str.upper, str.lower, ["a"], malformed="bad")
    assert list(routed.messages) == ["a", "bad"]
    with pytest.raises(KeyError, match="'other'"):
        routed["other"]


def test_route_frames_unrouted_error_says_which_key_and_which_keys() -> None:
    source: Subject[str] = Subject()
    routed = route_frames(source, str.upper, str.lower, ["a", "b"], malformed="bad")
    items: list[Any] = []
    routed["bad"].subscribe(items.append)
    routed.connect()
    source.on_next("Z")
    assert len(items) == 1 and items[0].frame == "Z"
    assert str(items[0].error) == (
        "route_frames: key 'z' is not one of ['a', 'b', 'bad'] and there is no default branch"
    )


def test_route_frames_completes_only_when_the_source_does() -> None:
    source: Subject[str] = Subject()
    routed = route_frames(source, str.upper, str.lower, ["a"], malformed="bad")
    completed: list[str] = []
    routed["a"].subscribe(on_completed=lambda: completed.append("a"))
    routed.messages["bad"].subscribe(on_completed=lambda: completed.append("bad messages"))
    routed.connect()
    source.on_next("garbage")  # malformed: no ending
    source.on_next("A")
    assert completed == []
    source.on_completed()
    assert completed == ["a", "bad messages"]


def test_route_frames_connect_passes_its_scheduler_to_the_source() -> None:
    scheduler = TestScheduler()
    routed = route_frames(at(10.0, "A").pipe(ops.concat(at(5.0, "B"))), str.upper, str.lower, ["a", "b"],
                          malformed="bad")
    got: list[tuple[float, str]] = []
    routed.messages["a"].subscribe(lambda m: got.append((scheduler.clock, m)))
    routed.messages["b"].subscribe(lambda m: got.append((scheduler.clock, m)))
    routed.connect(scheduler)
    scheduler.advance_to(100.0)
    assert got == [(10.0, "A"), (15.0, "B")]
