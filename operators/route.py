"""Decode each frame and route it to a keyed branch in one step: a fused decode + partition + map.

Why: every Response on the hot path (one per status update) used to cross ``decode_frames`` (a
map), ``partition_by`` (a subject), the branch's ``as_observable`` and a map to the message: five
AutoDetachObserver layers, two maps and a subject between the frame subject and ``match_acks``.
``route_frames`` decodes, keys and dispatches each frame in one call (a dict lookup on the key) and
hands each subscriber what it asked for directly: the ``Decoded`` item (``routed[key]``, for whoever
needs the frame, e.g. the monitor) or just the message (``routed.messages[key]``, e.g. the ack
tracker): two layers, the router's subscription and the subscriber's own.

Marble diagram (``p r`` decode to messages keyed ``"a"``, ``q`` to one keyed ``"b"``, ``x`` fails
to decode; ``P`` = ``Decoded(decode(p), p)``, ``X`` = ``Malformed(x, error)``, ``1 2`` = ``decode(p)``,
``decode(r)``)::

    source:              -p-q-x-r-|
    routed["a"]:         -P-----R-|
    routed["b"]:         ---Q-----|
    routed["malformed"]: -----X---|
    messages["a"]:       -1-----2-|

Like ``partition_by``: every branch exists up front, the source is subscribed once, on an explicit
``connect()``, and branches are hot (wire them before ``connect()``). Completion and errors of the
source reach every branch. Unlike it, nothing a frame does ends the stream: a frame whose
``decode`` or ``key_of`` raises, or whose key is no branch's (and there is no ``default``), becomes
``Malformed(frame, error)`` on the ``malformed`` branch. Branches take no lock per item (unlike
reactivex's Subject): drive the router from one thread at a time (the event loop's). Nothing is
scheduled; ``connect(scheduler)`` passes its scheduler on to the source.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

from reactivex import Observable, abc
from reactivex.disposable import Disposable, SingleAssignmentDisposable

from .decode import Decoded, Malformed

__all__ = ["Routed", "route_frames"]

K = TypeVar("K", bound=Hashable)
M = TypeVar("M")

Frame = str | bytes


class _Branch(Generic[M]):
    """The subscribers of one key, in subscription order, each wanting the ``Decoded`` item or the message.

    The subscriber tuple is replaced, never mutated, so an emission iterates it without copying, and
    a subscriber added during one gets the next item (as with a Subject; one disposed during it is
    skipped at once, by its AutoDetachObserver).
    """

    __slots__ = ("_error", "_observers", "_stopped")

    def __init__(self) -> None:
        self._observers: tuple[tuple[abc.ObserverBase[Any], bool], ...] = ()
        self._stopped = False
        self._error: Exception | None = None

    def observable(self, wants_message: bool) -> Observable[Any]:
        def subscribe(observer: abc.ObserverBase[Any], _: abc.SchedulerBase | None = None) -> abc.DisposableBase:
            if self._stopped:  # a late subscriber learns how it ended, as from a Subject
                if self._error is not None:
                    observer.on_error(self._error)
                else:
                    observer.on_completed()
                return Disposable()
            entry = (observer, wants_message)
            self._observers = (*self._observers, entry)

            def unsubscribe() -> None:
                self._observers = tuple(e for e in self._observers if e is not entry)

            return Disposable(unsubscribe)

        return Observable(subscribe)

    def emit(self, message: M, frame: Frame) -> None:
        item: Decoded[M] | None = None
        for observer, wants_message in self._observers:
            if wants_message:
                observer.on_next(message)
            else:
                if item is None:
                    item = Decoded(message, frame)
                observer.on_next(item)

    def emit_malformed(self, item: Malformed) -> None:
        for observer, wants_message in self._observers:
            if not wants_message:  # a malformed frame has no message
                observer.on_next(item)

    def terminate(self, error: Exception | None) -> None:
        self._stopped = True
        self._error = error
        observers, self._observers = self._observers, ()
        for observer, _ in observers:
            if error is not None:
                observer.on_error(error)
            else:
                observer.on_completed()


class Routed(Generic[K, M]):
    """The branches of routed frames; nothing flows until ``connect()``.

    ``branches[key]`` (also ``routed[key]``) emits ``Decoded`` items (and, on the malformed branch,
    ``Malformed`` ones); ``messages[key]`` emits the same branch's decoded messages only.
    """

    def __init__(
        self,
        source: Observable[Frame],
        decode: Callable[[Frame], M],
        key_of: Callable[[M], K],
        keys: Iterable[K],
        default: K | None,
        malformed: K,
    ) -> None:
        ordered = list(dict.fromkeys(keys))
        for extra in (default, malformed):
            if extra is not None and extra not in ordered:
                ordered.append(extra)
        self._source = source
        self._decode = decode
        self._key_of = key_of
        self._routes: dict[K, _Branch[M]] = {key: _Branch() for key in ordered}
        self._fallback = None if default is None else self._routes[default]
        self._malformed = self._routes[malformed]
        self.branches: Mapping[K, Observable[Decoded[M] | Malformed]] = MappingProxyType(
            {key: branch.observable(False) for key, branch in self._routes.items()}
        )
        self.messages: Mapping[K, Observable[M]] = MappingProxyType(
            {key: branch.observable(True) for key, branch in self._routes.items()}
        )
        self._connection: abc.DisposableBase | None = None
        self._terminated = False

    def __getitem__(self, key: K) -> Observable[Decoded[M] | Malformed]:
        """The branch for ``key`` (``KeyError`` if it is no branch's key)."""
        return self.branches[key]

    def connect(self, scheduler: abc.SchedulerBase | None = None) -> abc.DisposableBase:
        """Subscribe once to the source (with ``scheduler``, if given); dispose the result to unsubscribe.

        Calling it again while connected returns the same disposable (no second subscription); after
        that disposable was disposed, it subscribes again.
        """
        if self._connection is not None:
            return self._connection
        upstream = SingleAssignmentDisposable()

        def disconnect() -> None:
            upstream.dispose()
            if self._connection is connection:
                self._connection = None

        connection = Disposable(disconnect)
        self._connection = connection
        upstream.disposable = self._source.subscribe(
            self._on_next, self._on_error, self._on_completed, scheduler=scheduler
        )
        return connection

    def _on_next(self, frame: Frame) -> None:
        if self._terminated:
            return
        try:
            message = self._decode(frame)
            key = self._key_of(message)
            branch = self._routes.get(key, self._fallback)
        except Exception as exc:
            self._malformed.emit_malformed(Malformed(frame, exc))
            return
        if branch is None:
            self._malformed.emit_malformed(Malformed(frame, self._unrouted(key)))
            return
        branch.emit(message, frame)

    def _unrouted(self, key: K) -> ValueError:
        known = ", ".join(repr(k) for k in self._routes)
        return ValueError(f"route_frames: key {key!r} is not one of [{known}] and there is no default branch")

    def _on_error(self, error: Exception) -> None:
        if not self._terminated:
            self._terminated = True
            for branch in self._routes.values():
                branch.terminate(error)

    def _on_completed(self) -> None:
        if not self._terminated:
            self._terminated = True
            for branch in self._routes.values():
                branch.terminate(None)


def route_frames(
    source: Observable[Frame],
    decode: Callable[[Frame], M],
    key_of: Callable[[M], K],
    keys: Iterable[K],
    *,
    malformed: K,
    default: K | None = None,
) -> Routed[K, M]:
    """Decode each frame of ``source`` and route it by ``key_of(message)``; ``connect()`` after wiring.

    Args:
        source: the frames; subscribed once, by ``connect()``.
        decode: frame to message; any ``Exception`` it raises makes the frame ``Malformed``.
        key_of: the branch key of a message (called once per decoded frame); raising makes the
            frame ``Malformed``.
        keys: the branch keys.
        malformed: the branch (added to the keys if missing) for frames that failed to decode, to
            key, or to route.
        default: the branch (added to the keys if missing) for messages with any other key;
            without it such a frame is ``Malformed`` with a ``ValueError`` naming the key.
    """
    return Routed(source, decode, key_of, keys, default, malformed)
