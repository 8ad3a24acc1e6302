"""partition_by: routing, one upstream subscription, late subscribers, termination."""

from __future__ import annotations

from typing import Any

import pytest
from reactivex import Observable, abc, merge
from reactivex import operators as ops
from reactivex.disposable import CompositeDisposable
from reactivex.subject import Subject
from reactivex.testing import ReactiveTest, TestScheduler
from reactivex.testing.marbles import marbles_testing

from operators import Partitioned, partition_by

on_next = ReactiveTest.on_next
on_completed = ReactiveTest.on_completed
on_error = ReactiveTest.on_error
subscribe = ReactiveTest.subscribe


def case(item: str) -> str:
    return "upper" if item.isupper() else "lower"


def tagged(parts: Partitioned[str, Any]) -> Observable[tuple[str, Any]]:
    """All branches merged, each item tagged with its branch; connects once subscribed."""
    merged = merge(*(branch.pipe(ops.map(lambda x, k=key: (k, x))) for key, branch in parts.branches.items()))

    def subscribe_(observer: abc.ObserverBase[tuple[str, Any]], scheduler: abc.SchedulerBase | None = None):
        subscription = merged.subscribe(observer, scheduler=scheduler)
        return CompositeDisposable(subscription, parts.connect())

    return Observable(subscribe_)


def test_routing_by_key_docstring_diagram() -> None:
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        source = hot("-a-B-c-D-|")
        parts = partition_by(source, case, ["lower", "upper"])
        lookup = {"l": ("lower", "a"), "L": ("lower", "c"), "u": ("upper", "B"), "U": ("upper", "D")}
        assert start(tagged(parts)) == exp("-l-u-L-U-|", lookup)


def test_default_branch_gets_unknown_keys() -> None:
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        source = hot("-a-1-B-|")
        parts = partition_by(
            source, lambda x: "digit" if isinstance(x, int) else case(x), ["lower"], default="other"
        )
        assert set(parts.branches) == {"lower", "other"}
        lookup = {"l": ("lower", "a"), "d": ("other", 1), "o": ("other", "B")}
        assert start(tagged(parts)) == exp("-l-d-o-|", lookup)


def test_unknown_key_without_default_errors_every_branch() -> None:
    source: Subject[str] = Subject()
    parts = partition_by(source, case, ["lower"])
    with pytest.raises(KeyError):
        parts["upper"]
    errors: list[Exception] = []
    items: list[str] = []
    parts["lower"].subscribe(items.append, errors.append)
    parts["lower"].subscribe(items.append, errors.append)
    parts.connect()
    source.on_next("a")
    source.on_next("B")
    source.on_next("c")
    assert items == ["a", "a"]
    assert len(errors) == 2 and all(isinstance(e, ValueError) for e in errors)
    assert "'upper'" in str(errors[0]) and "no default" in str(errors[0])
    assert not source.observers  # the source was unsubscribed


def test_key_of_raising_errors_every_branch() -> None:
    source: Subject[Any] = Subject()
    parts = partition_by(source, case, ["lower", "upper"])
    errors: list[Exception] = []
    for key in ("lower", "upper"):
        parts[key].subscribe(on_error=errors.append)
    parts.connect()
    source.on_next(42)  # int has no isupper()
    assert len(errors) == 2 and all(isinstance(e, AttributeError) for e in errors)


def test_one_upstream_subscription_for_many_subscribers() -> None:
    scheduler = TestScheduler()
    source = scheduler.create_cold_observable(
        on_next(10, "a"), on_next(20, "B"), on_next(30, "c"), on_completed(40)
    )
    parts = partition_by(source, case, ["lower", "upper"])
    lower = [scheduler.create_observer() for _ in range(3)]
    upper = [scheduler.create_observer() for _ in range(2)]
    for observer in lower:
        parts["lower"].subscribe(observer)
    for observer in upper:
        parts["upper"].subscribe(observer)
    connection: list[abc.DisposableBase] = []
    scheduler.schedule_absolute(200, lambda *_: connection.append(parts.connect()))
    scheduler.schedule_absolute(205, lambda *_: connection.append(parts.connect()))  # no second one
    scheduler.start()

    assert source.subscriptions == [subscribe(200, 240)]
    assert connection[0] is connection[1]
    for observer in lower:
        assert observer.messages == [on_next(210, "a"), on_next(230, "c"), on_completed(240)]
    for observer in upper:
        assert observer.messages == [on_next(220, "B"), on_completed(240)]


def test_late_subscriber_misses_earlier_items() -> None:
    scheduler = TestScheduler()
    source = scheduler.create_hot_observable(
        on_next(210, "a"), on_next(220, "b"), on_next(230, "c"), on_completed(240)
    )
    parts = partition_by(source, case, ["lower", "upper"])
    early = scheduler.create_observer()
    late = scheduler.create_observer()
    parts["lower"].subscribe(early)
    scheduler.schedule_absolute(200, lambda *_: parts.connect())
    scheduler.schedule_absolute(225, lambda *_: parts["lower"].subscribe(late))
    scheduler.start()
    assert early.messages == [on_next(210, "a"), on_next(220, "b"), on_next(230, "c"), on_completed(240)]
    assert late.messages == [on_next(230, "c"), on_completed(240)]


def test_completion_and_error_reach_every_branch() -> None:
    with marbles_testing(timespan=1.0) as (start, _cold, hot, exp):
        parts = partition_by(hot("-a-B--|"), case, ["lower", "upper", "unused"])
        assert start(tagged(parts)) == exp("-l-u--|", {"l": ("lower", "a"), "u": ("upper", "B")})

    err = RuntimeError("socket closed")
    scheduler = TestScheduler()
    source = scheduler.create_hot_observable(on_next(210, "a"), on_error(220, err))
    parts = partition_by(source, case, ["lower", "upper", "unused"])
    observers = {key: scheduler.create_observer() for key in parts.branches}
    for key, observer in observers.items():
        parts[key].subscribe(observer)
    scheduler.schedule_absolute(200, lambda *_: parts.connect())
    scheduler.start()
    assert observers["lower"].messages == [on_next(210, "a"), on_error(220, err)]
    assert observers["upper"].messages == [on_error(220, err)]
    assert observers["unused"].messages == [on_error(220, err)]


def test_disposing_the_connection_unsubscribes_the_source() -> None:
    source: Subject[str] = Subject()
    parts = partition_by(source, case, ["lower", "upper"])
    items: list[str] = []
    parts["lower"].subscribe(items.append)
    connection = parts.connect()
    source.on_next("a")
    connection.dispose()
    assert not source.observers
    source.on_next("b")
    assert items == ["a"]
