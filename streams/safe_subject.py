"""Subjects that keep one failing observer from breaking the emitter or the other observers.

A host subscribing to ``client.events`` or ``client.state`` with a callback that raises must not
tear down the connection loop that emitted the value: the error is logged and counted instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import TypeVar

from reactivex import abc
from reactivex.subject import BehaviorSubject, Subject

__all__ = ["SafeBehaviorSubject", "SafeSubject", "SubscriberErrorHook", "T"]

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


class SafeSubject(Subject[T]):
    def __init__(self, on_subscriber_error: SubscriberErrorHook | None = None) -> None:
        super().__init__()
        self.on_subscriber_error = on_subscriber_error

    def _on_next_core(self, value: T) -> None:
        with self.lock:
            observers = self.observers.copy()
        _deliver(observers, value, self.on_subscriber_error)


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
