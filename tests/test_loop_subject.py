"""LoopSubject and SafeSubject skip reactivex's per-item lock: the Subject contract must not change."""

from __future__ import annotations

from typing import Any

import pytest
from reactivex.internal import DisposedException
from reactivex.subject import Subject

from streams.safe_subject import LoopSubject, SafeSubject


@pytest.mark.parametrize("make", [Subject, LoopSubject, SafeSubject])
def test_the_lock_free_subjects_keep_the_subject_contract(make: Any) -> None:
    subject = make()
    seen: list[Any] = []
    first = subject.subscribe(lambda v: seen.append(("a", v)), on_completed=lambda: seen.append("done"))
    subject.subscribe(lambda v: seen.append(("b", v)))
    subject.on_next(1)
    first.dispose()
    subject.on_next(2)
    subject.on_completed()
    subject.on_next(3)  # after completion: ignored
    assert seen == [("a", 1), ("b", 1), ("b", 2)]
    subject.dispose()
    with pytest.raises(DisposedException):
        subject.on_next(4)


@pytest.mark.parametrize("make", [Subject, LoopSubject, SafeSubject])
def test_an_observer_that_unsubscribes_itself_does_not_skip_the_next_one(make: Any) -> None:
    subject = make()
    seen: list[str] = []
    subscriptions: list[Any] = []
    subscriptions.append(subject.subscribe(lambda _v: (seen.append("a"), subscriptions[0].dispose())))
    subject.subscribe(lambda _v: seen.append("b"))
    subject.on_next(1)
    subject.on_next(2)
    assert seen == ["a", "b", "b"]


def test_loop_subject_propagates_an_observer_error_and_safe_subject_contains_it() -> None:
    def boom(_value: int) -> None:
        raise RuntimeError("boom")

    plain: LoopSubject[int] = LoopSubject()
    plain.subscribe(boom)
    with pytest.raises(RuntimeError, match="boom"):
        plain.on_next(1)
    errors: list[BaseException] = []
    safe: SafeSubject[int] = SafeSubject(on_subscriber_error=errors.append)
    seen: list[int] = []
    safe.subscribe(boom)
    safe.subscribe(seen.append)
    safe.on_next(1)
    assert seen == [1] and [str(e) for e in errors] == ["boom"]
