"""Exponential backoff with full jitter, and a retry operator that waits it out.

Why: after a server restart every client reconnects at once; full jitter spreads them out
(``delay = uniform(0, min(cap, base * 2**attempt))``). A server that accepts and closes at once
must not cause a tight loop, so the attempt counter restarts only after a connection stayed up
for ``stable_after`` seconds. RxPY's ``retry`` resubscribes immediately and has no delay, so
``retry_with_backoff`` is ours. ``Backoff`` is pure: it never reads a clock, the caller passes
``now`` in, so it is deterministic in tests (seeded ``random.Random``) and in virtual time.

Marble diagram (``#`` an error, ``d1``, ``d2`` the drawn delays)::

    source (1st): -a-#
    source (2nd):     <-d1->-b-#
    source (3rd):                <-d2->-c-|
    result:       -a--------b----------c-|
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import TypeVar

from reactivex import Observable, abc
from reactivex.disposable import (
    CompositeDisposable,
    Disposable,
    SerialDisposable,
    SingleAssignmentDisposable,
)
from reactivex.scheduler import TimeoutScheduler

__all__ = ["Backoff", "retry_with_backoff"]

T = TypeVar("T")

_MAX_EXPONENT = 1023  # 2.0 ** 1024 overflows a float; the cap is reached long before anyway


class Backoff:
    """Full-jitter exponential backoff state (pure: clock values are passed in, in seconds)."""

    def __init__(
        self,
        base: float = 1.0,
        cap: float = 60.0,
        stable_after: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        for name, value in (("base", base), ("cap", cap), ("stable_after", stable_after)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        self.base = base
        self.cap = cap
        self.stable_after = stable_after
        self._rng = rng if rng is not None else random.Random()
        self._attempt = 0
        self._up_since: float | None = None

    @property
    def attempt(self) -> int:
        """How many delays were drawn since the last reset."""
        return self._attempt

    def ceiling(self) -> float:
        """The upper bound of the next delay: ``min(cap, base * 2**attempt)``."""
        return min(self.cap, self.base * 2.0 ** min(self._attempt, _MAX_EXPONENT))

    def next_delay(self) -> float:
        """Draw ``uniform(0, min(cap, base * 2**attempt))`` seconds, then count the attempt."""
        delay = self._rng.uniform(0.0, self.ceiling())
        self._attempt += 1
        return delay

    def connection_up(self, now: float) -> None:
        """A connection came up at ``now`` (seconds, any fixed origin)."""
        self._up_since = now

    def connection_down(self, now: float) -> None:
        """A connection ended at ``now``: reset the attempts if it stayed up ``stable_after``."""
        if self._up_since is not None and now - self._up_since >= self.stable_after:
            self._attempt = 0
        self._up_since = None

    def reset(self) -> None:
        """Start the delay sequence over."""
        self._attempt = 0
        self._up_since = None


def _always(_: Exception) -> bool:
    return True


def retry_with_backoff(
    backoff: Backoff,
    *,
    should_retry: Callable[[Exception], bool] = _always,
    max_retries: int | None = None,
    scheduler: abc.SchedulerBase | None = None,
) -> Callable[[Observable[T]], Observable[T]]:
    """Resubscribe to the source after each error, waiting ``backoff.next_delay()`` first.

    The first item of every (re)subscription calls ``backoff.connection_up(now)``; every error
    calls ``backoff.connection_down(now)`` (``now`` = the scheduler's clock in seconds), so a
    connection that stayed up ``stable_after`` seconds restarts the delay sequence.

    Args:
        backoff: the delay policy (shared state: use one per connection loop).
        should_retry: errors for which it returns False are forwarded at once.
        max_retries: forward the error after this many consecutive retries that produced no
            item (an item resets the count); None retries forever.
        scheduler: where the delays run; defaults to the scheduler given to ``subscribe``,
            else ``TimeoutScheduler``.
    """
    if max_retries is not None and max_retries < 0:
        raise ValueError(f"max_retries must be >= 0, got {max_retries}")

    def operator(source: Observable[T]) -> Observable[T]:
        def subscribe(
            observer: abc.ObserverBase[T], scheduler_: abc.SchedulerBase | None = None
        ) -> abc.DisposableBase:
            sched = scheduler or scheduler_ or TimeoutScheduler.singleton()
            subscription = SerialDisposable()
            timer = SerialDisposable()
            retries = 0
            up = False
            stopped = False

            def now() -> float:
                return sched.to_seconds(sched.now)

            def on_next(item: T) -> None:
                nonlocal up, retries
                if stopped:
                    return
                if not up:
                    up = True
                    retries = 0
                    backoff.connection_up(now())
                observer.on_next(item)

            def on_error(error: Exception) -> None:
                nonlocal stopped, retries
                if stopped:
                    return
                backoff.connection_down(now())
                try:
                    retry = should_retry(error)
                except Exception as exc:
                    stopped = True
                    observer.on_error(exc)
                    return
                if not retry or (max_retries is not None and retries >= max_retries):
                    stopped = True
                    observer.on_error(error)
                    return
                retries += 1
                delay = backoff.next_delay()
                timer.disposable = sched.schedule_relative(delay, lambda _s, _st: subscribe_source())

            def on_completed() -> None:
                nonlocal stopped
                if stopped:
                    return
                stopped = True
                observer.on_completed()

            def subscribe_source() -> None:
                nonlocal up
                if stopped:
                    return
                up = False
                inner = SingleAssignmentDisposable()
                subscription.disposable = inner
                inner.disposable = source.subscribe(on_next, on_error, on_completed, scheduler=scheduler_)

            def dispose() -> None:
                nonlocal stopped
                stopped = True

            disposable = CompositeDisposable(Disposable(dispose), timer, subscription)
            subscribe_source()
            return disposable

        return Observable(subscribe)

    return operator
