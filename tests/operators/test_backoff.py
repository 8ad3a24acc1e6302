"""Backoff statistics and reset rules; retry_with_backoff in virtual time."""

from __future__ import annotations

import random
from statistics import fmean
from typing import Any

import pytest
from reactivex import defer
from reactivex.testing import ReactiveTest, TestScheduler
from reactivex.testing.marbles import marbles_testing

from operators import Backoff, retry_with_backoff

on_next = ReactiveTest.on_next
on_completed = ReactiveTest.on_completed
on_error = ReactiveTest.on_error
subscribe = ReactiveTest.subscribe


class MaxRandom(random.Random):
    """Always draws the upper bound: delays become exactly the ceilings 1, 2, 4, ..."""

    def uniform(self, a: float, b: float) -> float:
        return b


# --------------------------------------------------------------------------- Backoff


def test_full_jitter_distribution_per_attempt() -> None:
    backoff = Backoff(base=1.0, cap=60.0, rng=random.Random(1234))
    attempts = 9  # ceilings 1, 2, 4, ..., 32, then the 60 s cap
    draws: list[list[float]] = [[] for _ in range(attempts)]
    for _ in range(10_000):
        backoff.reset()
        for k in range(attempts):
            assert backoff.attempt == k
            draws[k].append(backoff.next_delay())
    for k, sample in enumerate(draws):
        ceiling = min(60.0, 2.0**k)
        assert min(sample) >= 0.0
        assert max(sample) <= ceiling
        assert max(sample) > 0.99 * ceiling  # the whole range is used
        # uniform(0, c): mean c/2, standard error c/sqrt(12)/100 ~ 0.003 c
        assert fmean(sample) == pytest.approx(ceiling / 2, rel=0.03)


def test_never_above_the_cap_even_after_very_many_attempts() -> None:
    backoff = Backoff(base=0.5, cap=10.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(3000)]  # 2.0 ** 3000 would overflow a float
    assert backoff.attempt == 3000
    assert all(0.0 <= d <= 10.0 for d in delays)
    assert max(delays[-100:]) > 9.0


def test_reset_only_after_a_stable_connection() -> None:
    backoff = Backoff(stable_after=30.0, rng=random.Random(0))
    for _ in range(4):
        backoff.next_delay()
    backoff.connection_up(100.0)
    backoff.connection_down(129.9)  # accepted then closed after 29.9 s: not stable
    assert backoff.attempt == 4
    backoff.connection_down(500.0)  # down without up (a failed connect): no reset
    assert backoff.attempt == 4
    backoff.next_delay()
    backoff.connection_up(1000.0)
    backoff.connection_down(1030.0)  # stayed up 30 s: start over
    assert backoff.attempt == 0
    backoff.next_delay()
    backoff.reset()
    assert backoff.attempt == 0


def test_attempt_is_read_only() -> None:
    backoff = Backoff()
    with pytest.raises(AttributeError):
        backoff.attempt = 3  # type: ignore[misc]


# --------------------------------------------------------------------------- retry_with_backoff


def test_resubscribes_after_the_drawn_delays() -> None:
    scheduler = TestScheduler()
    err = ConnectionError("dropped")
    source = scheduler.create_cold_observable(on_next(1, "a"), on_error(3, err))
    expected_delays = Backoff(rng=random.Random(42))  # the same draws, computed independently
    backoff = Backoff(rng=random.Random(42))
    observer = scheduler.start(
        lambda: source.pipe(retry_with_backoff(backoff, scheduler=scheduler)), disposed=300
    )

    starts = [200.0]
    while True:
        failed_at = starts[-1] + 3
        nxt = failed_at + expected_delays.next_delay()
        if nxt > 300:
            break
        starts.append(nxt)
    assert len(starts) >= 5
    assert [s.subscribe for s in source.subscriptions] == pytest.approx(starts)
    # (ColdObservable records unsubscription times truncated to whole ticks)
    assert [s.unsubscribe for s in source.subscriptions[:-1]] == [int(s + 3) for s in starts[:-1]]
    assert [m.time for m in observer.messages] == pytest.approx([s + 1 for s in starts])
    # Each connection lived 2 s (< stable_after): the attempts kept growing.
    assert backoff.attempt == len(starts)  # the last draw scheduled a resubscription after 300


def test_marble_delays_double_and_max_retries_forwards_the_error() -> None:
    err = ConnectionError("refused")
    with marbles_testing(timespan=1.0) as (start, cold, _hot, exp):
        source = cold("--#", None, err)
        op = retry_with_backoff(Backoff(base=1.0, rng=MaxRandom()), max_retries=3)
        # fails at 2, waits 1, fails at 5, waits 2, fails at 9, waits 4, fails at 15: 3 retries used.
        assert start(source.pipe(op)) == exp("---------------#", error=err)


def test_marble_items_from_each_attempt() -> None:
    err = ConnectionError("reset")
    with marbles_testing(timespan=1.0) as (start, cold, _hot, exp):
        attempts = iter(["-a-#", "-b-#", "-c-|"])
        source = defer(lambda _: cold(next(attempts), None, err))
        op = retry_with_backoff(Backoff(base=1.0, rng=MaxRandom()), max_retries=1)
        # a at 1, error at 3, wait 1: b at 5, error at 7, wait 2: c at 10, completes at 12.
        # max_retries=1 is enough: an item resets the count of consecutive failed retries.
        assert start(source.pipe(op)) == exp("-a---b----c-|")


def test_stable_connection_restarts_the_delay_sequence() -> None:
    scheduler = TestScheduler()
    source = scheduler.create_cold_observable(on_next(1, "a"), on_error(40, ConnectionError("x")))
    backoff = Backoff(base=1.0, stable_after=30.0, rng=MaxRandom())
    scheduler.start(lambda: source.pipe(retry_with_backoff(backoff)), disposed=400)
    # up from +1 to +40 (39 s >= 30 s): every error resets, so every delay is the base (1 s).
    starts = [s.subscribe for s in source.subscriptions]
    assert starts[:4] == [200, 241, 282, 323]


def test_should_retry_false_forwards_at_once_and_completion_passes() -> None:
    scheduler = TestScheduler()
    fatal = PermissionError("auth rejected")
    source = scheduler.create_cold_observable(on_next(1, "a"), on_error(2, fatal))
    op = retry_with_backoff(Backoff(), should_retry=lambda e: not isinstance(e, PermissionError))
    observer = scheduler.start(lambda: source.pipe(op))
    assert observer.messages == [on_next(201, "a"), on_error(202, fatal)]
    assert source.subscriptions == [subscribe(200, 202)]

    scheduler = TestScheduler()
    ok = scheduler.create_cold_observable(on_next(1, "a"), on_completed(2))
    observer = scheduler.start(lambda: ok.pipe(retry_with_backoff(Backoff())))
    assert observer.messages == [on_next(201, "a"), on_completed(202)]


def test_disposal_while_waiting_cancels_the_resubscription() -> None:
    scheduler = TestScheduler()
    source = scheduler.create_cold_observable(on_error(1, ConnectionError("x")))
    backoff = Backoff(base=50.0, cap=50.0, rng=MaxRandom())
    observer: Any = scheduler.start(lambda: source.pipe(retry_with_backoff(backoff)), disposed=230)
    assert source.subscriptions == [subscribe(200, 201)]
    assert observer.messages == []
    scheduler.advance_to(1000)
    assert len(source.subscriptions) == 1
