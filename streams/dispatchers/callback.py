"""CallbackDispatcher: ``async def handle(job, report)`` as a dispatcher (the seed's phase 1)."""

from __future__ import annotations

from streams.dispatchers.base import Dispatcher, Handler, Report
from streams.protocol import V2JobRequest

__all__ = ["CallbackDispatcher", "as_dispatcher"]


class CallbackDispatcher:
    """Wraps ``async def handle(job, report)``: the simplest dispatcher."""

    def __init__(self, handler: Handler) -> None:
        if not callable(handler):
            raise TypeError(f"dispatcher callback must be callable, got {type(handler).__name__}")
        self._handler = handler

    async def handle(self, job: V2JobRequest, report: Report) -> None:
        await self._handler(job, report)

    def __repr__(self) -> str:
        return f"CallbackDispatcher({getattr(self._handler, '__qualname__', self._handler)!r})"


def as_dispatcher(dispatcher: Dispatcher | Handler) -> Dispatcher:
    """A Dispatcher as is; an ``async def handle(job, report)`` function wrapped in CallbackDispatcher."""
    if isinstance(dispatcher, Dispatcher):
        return dispatcher
    if callable(dispatcher):
        return CallbackDispatcher(dispatcher)
    raise TypeError(
        f"dispatcher must have `async def handle(job, report)` or be such a function; got {type(dispatcher).__name__}"
    )


