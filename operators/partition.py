"""Route one source into named branches by key, with a single upstream subscription.

Why: inbound frames are one stream that fans out to the job dispatcher, the cheat handler,
the ack tracker and the monitor. RxPY's ``partition`` only splits in two and calls the
predicate once per branch; ``group_by`` creates branches lazily, so a consumer can miss the
first item of its type. ``partition_by`` creates every branch up front, calls ``key_of`` once
per item and subscribes to the source once, on an explicit ``connect()`` (publish + connect).

Marble diagram (``key_of`` = the letter's case; keys ``"lower"``, ``"upper"``)::

    source:       -a-B-c-D-|
    ["lower"]:    -a---c---|
    ["upper"]:    ---B---D-|

Wire every branch before ``connect()``: branches are hot, so a subscriber that subscribes
after ``connect()`` sees only the items emitted after it subscribed (and the termination).
An item whose key is not one of ``keys`` goes to the ``default`` branch if one is given;
otherwise every branch receives ``on_error(ValueError)`` and the source is unsubscribed.
Completion and errors of the source (and exceptions raised by ``key_of``) reach every branch.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from types import MappingProxyType
from typing import Generic, TypeVar

from reactivex import Observable, abc
from reactivex import operators as ops
from reactivex.disposable import Disposable, SingleAssignmentDisposable
from reactivex.subject import Subject

__all__ = ["Partitioned", "partition_by"]

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")


class _Branch(Subject[T]):
    """A branch subject whose ``on_next`` skips reactivex's per-item lock (twice per item, most of a
    hop's cost): like ``_on_next`` above it, a partition is driven from one thread at a time. Same
    contract otherwise: items after completion are ignored, ``on_next`` after ``dispose()`` raises."""

    def on_next(self, value: T) -> None:
        if self.is_disposed:
            self.check_disposed()
        if not self.is_stopped:
            for observer in self.observers.copy():
                observer.on_next(value)


class Partitioned(Generic[K, T]):
    """The branches of a partitioned source; nothing flows until ``connect()``."""

    def __init__(
        self,
        source: Observable[T],
        key_of: Callable[[T], K],
        keys: Iterable[K],
        default: K | None = None,
    ) -> None:
        ordered = list(dict.fromkeys(keys))
        if default is not None and default not in ordered:
            ordered.append(default)
        self._source = source
        self._key_of = key_of
        self._default = default
        self._subjects: dict[K, Subject[T]] = {key: _Branch() for key in ordered}
        self.branches: Mapping[K, Observable[T]] = MappingProxyType(
            {key: subject.pipe(ops.as_observable()) for key, subject in self._subjects.items()}
        )
        self._connection: abc.DisposableBase | None = None
        self._upstream: SingleAssignmentDisposable | None = None
        self._terminated = False

    def __getitem__(self, key: K) -> Observable[T]:
        """The branch for ``key`` (``KeyError`` if it is neither a key nor the default)."""
        return self.branches[key]

    def connect(self) -> abc.DisposableBase:
        """Subscribe once to the source; dispose the result to unsubscribe.

        Calling it again while connected returns the same disposable (no second subscription).
        """
        if self._connection is not None:
            return self._connection
        upstream = SingleAssignmentDisposable()

        def disconnect() -> None:
            upstream.dispose()
            if self._connection is connection:
                self._connection = None
                self._upstream = None

        connection = Disposable(disconnect)
        self._connection = connection
        self._upstream = upstream
        subscription = self._source.subscribe(self._on_next, self._on_error, self._on_completed)
        upstream.disposable = subscription
        return connection

    def _on_next(self, item: T) -> None:
        if self._terminated:
            return
        try:
            key = self._key_of(item)
        except Exception as exc:
            self._fail(exc)
            return
        subject = self._subjects.get(key)
        if subject is None and self._default is not None:
            subject = self._subjects[self._default]
        if subject is None:
            known = ", ".join(repr(k) for k in self._subjects)
            self._fail(
                ValueError(
                    f"partition_by: item {item!r} has key {key!r}, not one of [{known}], "
                    "and there is no default branch"
                )
            )
            return
        subject.on_next(item)

    def _fail(self, error: Exception) -> None:
        if self._upstream is not None:
            self._upstream.dispose()
        self._on_error(error)

    def _on_error(self, error: Exception) -> None:
        if self._terminated:
            return
        self._terminated = True
        for subject in list(self._subjects.values()):
            subject.on_error(error)

    def _on_completed(self) -> None:
        if self._terminated:
            return
        self._terminated = True
        for subject in list(self._subjects.values()):
            subject.on_completed()


def partition_by(
    source: Observable[T],
    key_of: Callable[[T], K],
    keys: Iterable[K],
    *,
    default: K | None = None,
) -> Partitioned[K, T]:
    """Split ``source`` into one hot branch per key; call ``connect()`` after wiring them.

    Args:
        source: the stream to split; subscribed once, by ``connect()``.
        key_of: the key of an item (called once per item).
        keys: the branch keys.
        default: the branch (added to the keys if missing) for items with any other key; without
            it such an item is an ``on_error(ValueError)`` on every branch.
    """
    return Partitioned(source, key_of, keys, default)
