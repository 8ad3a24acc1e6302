"""Hold items while a gate is closed; release them, in order, when it opens.

Why: the outbox must survive disconnects without losing the order of queued data, without
unbounded memory, and without losing anything silently. RxPY has no ``pausableBuffered``
operator, so this is ours. The gate is the connection state (``True`` = connected); a
downstream consumer may also close it synchronously from inside ``on_next`` to apply
backpressure (its wire queue is full): the release stops right there and resumes, in order,
when the gate opens again.

Marble diagram (``a b c`` are KEEP_ALL data, ``h`` is a KEEP_LATEST heartbeat, gate
``t`` = True, ``f`` = False; the gate starts closed)::

    gate:    -t------f-------t-----------
    source:  --a--h----b--h----------c---
    result:  --a--h----------(h,b)---c---
                             ^ on reopen: the held KEEP_LATEST item first (it may
                               overtake data), then held data in arrival order

Policies (``policy_of(item)``): KEEP_ALL items are all held; KEEP_LATEST: at most one is held,
a newer one supersedes the older (reported ``Dropped(old, "superseded")``); KEEP_BOUNDED: held
like KEEP_ALL but evicted before KEEP_ALL items when a bound is exceeded. Bounds (``max_count``,
``max_bytes`` with ``size_of``) count every held item; eviction order: the held KEEP_LATEST item,
then the oldest KEEP_BOUNDED item, then the oldest KEEP_ALL item, each reported
``Dropped(item, "outbox_full")``. Items arriving while anything is held queue up behind it, also
while the gate is open. Source completion is deferred until everything held was released; a
source or gate error reports everything held as ``Dropped(item, "source_error")`` and forwards
the error; disposing the subscription reports everything held as ``Dropped(item, "disposed")``.
``on_depth(count, bytes)`` is called after every change of what is held.

Each subscription has its own buffer (cold). Not thread-safe (use it from one thread, e.g. the
event loop's), but re-entrant: ``on_next`` observers may push gate values or new source items.
Emissions are serialized: an item pushed from inside ``on_next`` is queued (briefly held) and
emitted after the current ``on_next`` returns, never from inside it.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from reactivex import Observable, abc
from reactivex.disposable import CompositeDisposable, Disposable, SingleAssignmentDisposable

__all__ = ["Dropped", "HoldPolicy", "hold_while_disconnected"]

T = TypeVar("T")

REASON_SUPERSEDED = "superseded"
REASON_OUTBOX_FULL = "outbox_full"
REASON_SOURCE_ERROR = "source_error"
REASON_DISPOSED = "disposed"


class HoldPolicy(enum.Enum):
    """How an item is held while the gate is closed."""

    KEEP_ALL = "keep_all"
    """Held in order; evicted last when a bound is exceeded (oldest first)."""
    KEEP_LATEST = "keep_latest"
    """At most one held (the newest); released first on reopen; evicted first."""
    KEEP_BOUNDED = "keep_bounded"
    """Held in order; evicted (oldest first) before any KEEP_ALL item."""


@dataclass(frozen=True, slots=True)
class Dropped(Generic[T]):
    """An item that was held and will never be emitted.

    ``reason`` is one of ``"superseded"``, ``"outbox_full"``, ``"source_error"``, ``"disposed"``.
    """

    item: T
    reason: str


@dataclass(slots=True)
class _Entry(Generic[T]):
    seq: int
    """KEEP_BOUNDED: how many KEEP_ALL items were added before it (its place in the arrival order)."""
    item: T
    size: int


class _Outbox(Generic[T]):
    """The held items of one subscription: one KEEP_LATEST slot and two FIFO queues.

    KEEP_ALL items (the bulk: every held status update) are stored bare, their sizes in a parallel
    deque, with no wrapper object per item; the arrival order between the two queues is kept by
    counting KEEP_ALL items in and out (an ``_Entry`` per held item was ~90 B of ~420 B per held update).
    """

    def __init__(self, max_count: int | None, max_bytes: int | None, max_bounded: int | None = None) -> None:
        self._max_count = max_count
        self._max_bytes = max_bytes
        self._max_bounded = max_bounded
        self._latest: _Entry[T] | None = None
        self._bounded: deque[_Entry[T]] = deque()
        self._all: deque[T] = deque()
        self._all_sizes: deque[int] = deque()
        self._all_added = 0
        self._all_taken = 0
        self.count = 0
        self.bytes = 0

    def __bool__(self) -> bool:
        return self.count > 0

    def _over(self) -> bool:
        if self._max_count is not None and self.count > self._max_count:
            return True
        return self._max_bytes is not None and self.bytes > self._max_bytes

    def _take(self, entry: _Entry[T]) -> T:
        self.count -= 1
        self.bytes -= entry.size
        return entry.item

    def _take_all(self) -> T:
        self.count -= 1
        self.bytes -= self._all_sizes.popleft()
        self._all_taken += 1
        return self._all.popleft()

    def add(self, item: T, policy: HoldPolicy, size: int) -> Sequence[Dropped[T]]:
        """Hold ``item``; return what was superseded or evicted, in the order it happened."""
        if policy is HoldPolicy.KEEP_ALL:  # the bulk of an outage: no wrapper, no list unless a bound is hit
            self._all.append(item)
            self._all_sizes.append(size)
            self._all_added += 1
            count = self.count = self.count + 1
            held_bytes = self.bytes = self.bytes + size
            if (self._max_count is None or count <= self._max_count) and (
                self._max_bytes is None or held_bytes <= self._max_bytes
            ):  # (``_over()``, inlined: this runs for every held status update)
                return ()
            return self._evict([])
        dropped: list[Dropped[T]] = []
        if policy is HoldPolicy.KEEP_LATEST:
            if self._latest is not None:
                dropped.append(Dropped(self._take(self._latest), REASON_SUPERSEDED))
            self._latest = _Entry(0, item, size)
        else:
            self._bounded.append(_Entry(self._all_added, item, size))
        self.count += 1
        self.bytes += size
        if self._max_bounded is not None and len(self._bounded) > self._max_bounded:
            dropped.append(Dropped(self._take(self._bounded.popleft()), REASON_OUTBOX_FULL))
        return self._evict(dropped)

    def _evict(self, dropped: list[Dropped[T]]) -> list[Dropped[T]]:
        """Evict until within the bounds (see the module doc for the order); append to ``dropped``."""
        while self.count and self._over():
            if self._latest is not None:
                victim, self._latest = self._latest, None
                dropped.append(Dropped(self._take(victim), REASON_OUTBOX_FULL))
            elif self._bounded:
                dropped.append(Dropped(self._take(self._bounded.popleft()), REASON_OUTBOX_FULL))
            else:
                dropped.append(Dropped(self._take_all(), REASON_OUTBOX_FULL))
        return dropped

    def pop(self) -> T:
        """Remove and return the next item to release (the held KEEP_LATEST one first)."""
        if self._latest is not None:
            entry, self._latest = self._latest, None
            return self._take(entry)
        # The oldest KEEP_BOUNDED item goes first once every KEEP_ALL item that arrived before it is out.
        if self._bounded and (not self._all or self._bounded[0].seq <= self._all_taken):
            return self._take(self._bounded.popleft())
        return self._take_all()

    def clear(self) -> list[T]:
        """Remove everything, returned in release order."""
        items: list[T] = []
        while self.count:
            items.append(self.pop())
        return items


class _HoldSubscription(Generic[T]):
    """State and handlers of one subscription to the operator's observable."""

    def __init__(
        self,
        observer: abc.ObserverBase[T],
        policy_of: Callable[[T], HoldPolicy],
        outbox: _Outbox[T],
        size_of: Callable[[T], int] | None,
        on_dropped: Callable[[Dropped[T]], None] | None,
        on_depth: Callable[[int, int], None] | None,
    ) -> None:
        self._observer = observer
        self._policy_of = policy_of
        self._outbox = outbox
        self._size_of = size_of
        self._on_dropped = on_dropped
        self._on_depth = on_depth
        self._open = False
        self._emitting = False
        self._source_done = False
        self.stopped = False

    # -- reporting ---------------------------------------------------------------------------

    def _report(self, dropped: Sequence[Dropped[T]]) -> None:
        if self._on_dropped is not None:
            for d in dropped:
                self._on_dropped(d)

    def _depth(self) -> None:
        if self._on_depth is not None:
            self._on_depth(self._outbox.count, self._outbox.bytes)

    def _clear(self, reason: str) -> None:
        items = self._outbox.clear()
        if items:
            self._report([Dropped(item, reason) for item in items])
            self._depth()

    # -- gate --------------------------------------------------------------------------------

    def on_gate(self, value: bool) -> None:
        if self.stopped:
            return
        self._open = bool(value)
        if self._open:
            self._drain()

    def on_gate_completed(self) -> None:
        """The gate stays in its last state."""

    # -- source ------------------------------------------------------------------------------

    def on_next(self, item: T) -> None:
        if self.stopped:
            return
        if self._open and not self._emitting and not self._outbox:
            self._emitting = True
            try:
                self._observer.on_next(item)
            finally:
                self._emitting = False
            self._drain()  # what the observer pushed meanwhile was held
            return
        try:
            policy = self._policy_of(item)
            size = self._size_of(item) if self._size_of is not None else 0
        except Exception as exc:  # a failing policy_of/size_of must not lose the item silently
            self._report([Dropped(item, REASON_SOURCE_ERROR)])
            self.on_error(exc)
            return
        dropped = self._outbox.add(item, policy, size)
        if dropped:
            self._report(dropped)
        self._depth()
        if self._open:  # while closed nothing can be released: reopening the gate drains
            self._drain()

    def on_completed(self) -> None:
        if self.stopped:
            return
        self._source_done = True
        self._drain()

    def on_error(self, error: Exception) -> None:
        if self.stopped:
            return
        self.stopped = True
        self._clear(REASON_SOURCE_ERROR)
        self._observer.on_error(error)

    # -- release -----------------------------------------------------------------------------

    def _drain(self) -> None:
        """Release held items while the gate stays open; complete if the source is done."""
        if self._emitting or self.stopped:
            return
        self._emitting = True
        try:
            # The gate is re-checked after every item: an observer may close it from on_next.
            outbox = self._outbox
            while self._open and outbox.count and not self.stopped:
                item = outbox.pop()
                self._depth()
                self._observer.on_next(item)
        finally:
            self._emitting = False
        if self._source_done and not self._outbox and not self.stopped:
            self.stopped = True
            self._observer.on_completed()

    def dispose(self) -> None:
        self.stopped = True
        self._clear(REASON_DISPOSED)


def hold_while_disconnected(
    gate: Observable[bool],
    policy_of: Callable[[T], HoldPolicy],
    *,
    max_count: int | None = None,
    max_bytes: int | None = None,
    max_bounded: int | None = None,
    size_of: Callable[[T], int] | None = None,
    on_dropped: Callable[[Dropped[T]], None] | None = None,
    on_depth: Callable[[int, int], None] | None = None,
) -> Callable[[Observable[T]], Observable[T]]:
    """Hold source items while ``gate`` is False (or has not emitted yet); see the module doc.

    Args:
        gate: True = pass/release, False = hold. Starts closed. Completion keeps the last state;
            an error is forwarded (held items reported as ``"source_error"``).
        policy_of: the HoldPolicy of an item (asked only for items that are held).
        max_count: bound on the number of held items (all policies together).
        max_bytes: bound on the sum of ``size_of(item)`` of held items; requires ``size_of``.
        max_bounded: bound on the number of held KEEP_BOUNDED items alone; past it the oldest
            KEEP_BOUNDED item is evicted (``"outbox_full"``) whatever the other bounds say.
        size_of: size of an item in bytes (0 for every item if not given).
        on_dropped: called once for every item that is held and then never emitted.
        on_depth: called with ``(count, bytes)`` after every change of what is held (once per
            held item, including its evictions; once per released item; once when cleared).

    If ``policy_of`` or ``size_of`` raises, that item and everything held are reported as
    ``"source_error"`` and the exception is forwarded as ``on_error``.
    """
    if max_count is not None and max_count < 0:
        raise ValueError(f"max_count must be >= 0, got {max_count}")
    if max_bytes is not None and max_bytes < 0:
        raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
    if max_bounded is not None and max_bounded < 0:
        raise ValueError(f"max_bounded must be >= 0, got {max_bounded}")
    if max_bytes is not None and size_of is None:
        raise ValueError("max_bytes needs size_of")

    def operator(source: Observable[T]) -> Observable[T]:
        def subscribe(
            observer: abc.ObserverBase[T], scheduler: abc.SchedulerBase | None = None
        ) -> abc.DisposableBase:
            state = _HoldSubscription(
                observer, policy_of, _Outbox[T](max_count, max_bytes, max_bounded), size_of, on_dropped, on_depth
            )
            gate_subscription = SingleAssignmentDisposable()
            source_subscription = SingleAssignmentDisposable()
            # Disposal order: stop the inputs first, then report what is still held.
            disposable = CompositeDisposable(
                gate_subscription, source_subscription, Disposable(state.dispose)
            )
            # Gate first: a BehaviorSubject gate sets the state before synchronous items arrive.
            gate_subscription.disposable = gate.subscribe(
                state.on_gate, state.on_error, state.on_gate_completed, scheduler=scheduler
            )
            if not state.stopped:
                source_subscription.disposable = source.subscribe(
                    state.on_next, state.on_error, state.on_completed, scheduler=scheduler
                )
            return disposable

        return Observable(subscribe)

    return operator
