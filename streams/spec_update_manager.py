"""SpecUpdateManager: machine-spec updates from the host, as one ordered observable.

Sources: an Observable or an async iterable given at construction, and ``publish()`` calls
(``FacilitatorClient.publish_specs``). A source that fails is reported, never fatal.

Updates the outbox refuses (specs that do not fit the facilitator's schema, a frame over the size
limit) raise :class:`~streams.exceptions.MessageRefused` to a ``publish()`` caller; from a source, or
published before ``start()``, they are only reported (the outbox's ``refused`` stream), so one bad
update never ends the source.
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable

import reactivex
from reactivex.abc import DisposableBase
from reactivex.subject import Subject

from streams.exceptions import MessageRefused, UsageError
from streams.lifecycle import TaskOwner
from streams.protocol import V0MachineSpecsUpdate

SpecSource = reactivex.Observable[V0MachineSpecsUpdate] | AsyncIterable[V0MachineSpecsUpdate]


class SpecUpdateManager:
    def __init__(
        self,
        source: SpecSource | None = None,
        *,
        on_source_error: Callable[[BaseException], None] | None = None,
    ) -> None:
        if source is not None and not isinstance(source, reactivex.Observable | AsyncIterable):
            raise TypeError(
                f"spec_updates must be an Observable or an async iterable of V0MachineSpecsUpdate, "
                f"got {type(source).__name__}"
            )
        self._source = source
        self._on_source_error = on_source_error
        self._updates: Subject[V0MachineSpecsUpdate] = Subject()
        self._tasks = TaskOwner("spec-updates", lambda _name, exc: self._source_failed(exc))
        self._subscription: DisposableBase | None = None
        self._stopped = False
        self._started = False
        self._early: list[V0MachineSpecsUpdate] = []

    @property
    def updates(self) -> reactivex.Observable[V0MachineSpecsUpdate]:
        return self._updates

    def publish(self, update: V0MachineSpecsUpdate) -> None:
        """Queue ``update``; raises MessageRefused (a ValueError) if the outbox refuses it (also reported)."""
        if self._stopped:
            raise UsageError("publish_specs() called after the client stopped")
        if not isinstance(update, V0MachineSpecsUpdate):
            raise TypeError(f"expected a V0MachineSpecsUpdate, got {type(update).__name__}")
        if not self._started:
            self._early.append(update)  # published before start(): kept, sent first, in order
            return
        self._updates.on_next(update)

    async def start(self) -> None:
        self._started = True
        early, self._early = self._early, []
        for update in early:
            self._forward(update)
        if isinstance(self._source, reactivex.Observable):
            self._subscription = self._source.subscribe(
                on_next=self._forward, on_error=self._source_failed
            )
        elif self._source is not None:
            self._tasks.start(self._consume(self._source), "async-source")

    async def _consume(self, source: AsyncIterable[V0MachineSpecsUpdate]) -> None:
        async for update in source:
            self._forward(update)

    def _forward(self, update: V0MachineSpecsUpdate) -> None:
        """From a source (or published early): a refused update is reported by the outbox, not raised."""
        try:
            self.publish(update)
        except MessageRefused:
            pass

    def _source_failed(self, exc: BaseException) -> None:
        if self._on_source_error is not None:
            self._on_source_error(exc)

    async def stop(self) -> None:
        self._stopped = True
        if self._subscription is not None:
            self._subscription.dispose()
        await self._tasks.aclose()
        self._updates.on_completed()


__all__ = ["SpecSource", "SpecUpdateManager"]
