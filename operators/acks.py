"""Pair responses with the items they acknowledge (FIFO per connection).

Why: the facilitator's Responses carry no id: the n-th Response after a connection starts
answers the n-th ack-expecting item sent on that connection. Items sent just before a drop may
never be answered (OS buffers, half-open links); they must be resent first, in their original
order, after the reconnect. So when the connection ends, whatever is still in flight is emitted
once as ``Unacked`` and forgotten: responses on the next connection pair only with items sent
after that. Only ack-expecting items may be fed to ``sent`` (the caller filters heartbeats out).

Marble diagram (``a b c`` sent, ``1 2 3`` responses, connected ``f`` = False)::

    sent:       -a-b-----c---
    responses:  ---1---------2--3-
    connected:  -------f------
    result:     ---A---U-----B--X-     A = Acked(a, 1), U = Unacked((b,)),
                                       B = Acked(c, 2), X = UnexpectedResponse(3)

Completes when ``sent`` and ``responses`` have both completed (items still in flight are first
emitted as a final ``Unacked``); an error of any input is forwarded.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeAlias, TypeVar

from reactivex import Observable, abc
from reactivex.disposable import CompositeDisposable, SingleAssignmentDisposable

__all__ = ["AckEvent", "Acked", "Unacked", "UnexpectedResponse", "match_acks"]

T = TypeVar("T")
R = TypeVar("R")


@dataclass(slots=True)
class Acked(Generic[T, R]):
    """``response`` answers ``item``. One per acknowledgement, so not frozen (a frozen dataclass's
    ``__init__`` costs about 3x): read-only by convention."""

    item: T
    response: R


@dataclass(frozen=True, slots=True)
class Unacked(Generic[T]):
    """Items sent on the connection that just ended and never answered, in original order.

    They are to be resent first after the reconnect.
    """

    items: tuple[T, ...]


@dataclass(frozen=True, slots=True)
class UnexpectedResponse(Generic[R]):
    """A response that arrived with nothing in flight."""

    response: R


AckEvent: TypeAlias = Acked[T, R] | Unacked[T] | UnexpectedResponse[R]


def match_acks(
    sent: Observable[T], responses: Observable[R], connected: Observable[bool]
) -> Observable[AckEvent[T, R]]:
    """Emit ``Acked`` per response, ``Unacked`` per disconnect, ``UnexpectedResponse`` if idle.

    Args:
        sent: the ack-expecting items, as they are written to the wire.
        responses: the responses, as they are read from the wire.
        connected: the connection state; each ``False`` ends the current connection.
    """

    def subscribe(
        observer: abc.ObserverBase[AckEvent[T, R]], scheduler: abc.SchedulerBase | None = None
    ) -> abc.DisposableBase:
        in_flight: deque[T] = deque()
        sent_done = False
        responses_done = False
        stopped = False

        def flush() -> None:
            if in_flight:
                items = tuple(in_flight)
                in_flight.clear()  # before emitting: the observer may resend at once
                observer.on_next(Unacked(items))

        def on_sent(item: T) -> None:
            if not stopped:
                in_flight.append(item)

        def on_response(response: R) -> None:
            if stopped:
                return
            if in_flight:
                observer.on_next(Acked(in_flight.popleft(), response))
            else:
                observer.on_next(UnexpectedResponse(response))

        def on_connected(value: bool) -> None:
            if not stopped and not value:
                flush()

        def on_error(error: Exception) -> None:
            nonlocal stopped
            if stopped:
                return
            stopped = True
            observer.on_error(error)

        def maybe_complete() -> None:
            nonlocal stopped
            if stopped or not (sent_done and responses_done):
                return
            flush()
            stopped = True
            observer.on_completed()

        def on_sent_completed() -> None:
            nonlocal sent_done
            sent_done = True
            maybe_complete()

        def on_responses_completed() -> None:
            nonlocal responses_done
            responses_done = True
            maybe_complete()

        subscriptions = [SingleAssignmentDisposable() for _ in range(3)]
        disposable = CompositeDisposable(*subscriptions)
        subscriptions[0].disposable = connected.subscribe(on_connected, on_error, scheduler=scheduler)
        subscriptions[1].disposable = responses.subscribe(
            on_response, on_error, on_responses_completed, scheduler=scheduler
        )
        subscriptions[2].disposable = sent.subscribe(
            on_sent, on_error, on_sent_completed, scheduler=scheduler
        )
        return disposable

    return Observable(subscribe)
