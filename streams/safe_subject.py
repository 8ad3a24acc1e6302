"""Subjects that keep one failing observer from breaking the emitter or the other observers,
and a plain Subject without the per-item lock, for the per-message path.

A host subscribing to ``client.events`` or ``client.state`` with a callback that raises must not
tear down the connection loop that emitted the value: the error is logged and counted instead.

reactivex's ``Subject.on_next`` takes its lock twice per item (~1.4 µs of ~1.7 µs per hop on the
benchmark machine, and a status update crosses about seven subjects). The lock guards only the
disposed check and the copy of the observer list, and ``list.copy()`` is atomic under the GIL; the
observers were always called outside it. So these subjects read both without it: same
semantics (items after completion are ignored, ``on_next`` after ``dispose()`` raises).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

from reactivex import abc
from reactivex.subject import BehaviorSubject, Subject

__all__ = ["LoopSubject", "SafeBehaviorSubject", "SafeSubject", "SubscriberErrorHook", "T"]

log = logging.getLogger(__name__)
T = TypeVar("T")

SubscriberErrorHook = Callable[[BaseException], None]


def _deliver(observers: Iterable[abc.ObserverBase[T]], value: T, hook: SubscriberErrorHook | None) -> None:
    for observer in observers:
        try:
            observer.on_next(value)
        except Exception as exc:
            log.exception("a subscriber raised while handling %r", type(value).__name__)
            if hook is not None:
                hook(exc)


class LoopSubject(Subject[T]):
    """A Subject whose ``on_next`` takes no lock (see the module doc); an observer's error propagates."""

    def on_next(self, value: T) -> None:
        if self.is_disposed:
            self.check_disposed()  # raises DisposedException, as Subject.on_next does
        if not self.is_stopped:
            observers = self.observers
            if len(observers) == 1:  # the usual case: no snapshot needed for one observer
                observers[0].on_next(value)
                return
            for observer in observers.copy():
                observer.on_next(value)


class SafeSubject(Subject[T]):
    def __init__(self, on_subscriber_error: SubscriberErrorHook | None = None) -> None:
        super().__init__()
        self.on_subscriber_error = on_subscriber_error

    def on_next(self, value: T) -> None:
        if self.is_disposed:
            self.check_disposed()
        if not self.is_stopped:
            observers = self.observers
            # One observer (the inbound frames' router, per frame): no snapshot needed.
            _deliver(observers if len(observers) == 1 else observers.copy(), value, self.on_subscriber_error)


class SafeBehaviorSubject(BehaviorSubject[T]):
    def __init__(self, value: T, on_subscriber_error: SubscriberErrorHook | None = None) -> None:
        super().__init__(value)
        self.on_subscriber_error = on_subscriber_error

    def _on_next_core(self, value: T) -> None:
        with self.lock:
            observers = self.observers.copy()
            self.value = value
        _deliver(observers, value, self.on_subscriber_error)

    def _subscribe_core(
        self, observer: abc.ObserverBase[T], scheduler: abc.SchedulerBase | None = None
    ) -> abc.DisposableBase:
        # The current value is delivered on subscribe: guarded too, so a raising subscriber
        # neither makes subscribe() raise nor loses its subscription.
        class Guarded(abc.ObserverBase[T]):
            first = True

            def on_next(inner, value: T) -> None:
                if inner.first:
                    inner.first = False
                    _deliver((observer,), value, self.on_subscriber_error)
                else:
                    observer.on_next(value)

            def on_error(inner, error: Exception) -> None:
                observer.on_error(error)

            def on_completed(inner) -> None:
                observer.on_completed()

        return super()._subscribe_core(Guarded(), scheduler)
