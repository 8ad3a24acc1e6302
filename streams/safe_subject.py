"""Subjects that keep one failing observer from breaking the emitter or the other observers.

A host subscribing to ``client.events`` or ``client.state`` with a callback that raises must not
tear down the connection loop that emitted the value: the error is logged and counted instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from reactivex.subject import BehaviorSubject, Subject

log = logging.getLogger(__name__)
T = TypeVar("T")

SubscriberErrorHook = Callable[[BaseException], None]


class SafeSubject(Subject[T]):
    def __init__(self, on_subscriber_error: SubscriberErrorHook | None = None) -> None:
        super().__init__()
        self.on_subscriber_error = on_subscriber_error

    def _on_next_core(self, value: T) -> None:
        with self.lock:
            observers = self.observers.copy()
        for observer in observers:
            try:
                observer.on_next(value)
            except Exception as exc:
                log.exception("a subscriber raised while handling %r", type(value).__name__)
                if self.on_subscriber_error is not None:
                    self.on_subscriber_error(exc)


class SafeBehaviorSubject(BehaviorSubject[T]):
    def __init__(self, value: T, on_subscriber_error: SubscriberErrorHook | None = None) -> None:
        super().__init__(value)
        self.on_subscriber_error = on_subscriber_error

    def _on_next_core(self, value: T) -> None:
        with self.lock:
            observers = self.observers.copy()
            self.value = value
        for observer in observers:
            try:
                observer.on_next(value)
            except Exception as exc:
                log.exception("a subscriber raised while handling %r", type(value).__name__)
                if self.on_subscriber_error is not None:
                    self.on_subscriber_error(exc)
