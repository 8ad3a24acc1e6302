"""CallbackDispatcher: ``async def handle(job, report)`` as a dispatcher (the seed's phase 1).

Sync callables are refused at construction, not run in a thread: a job handler is expected to
wait on I/O (a miner, a queue) without blocking the event loop, and a sync one handed over by
mistake (``builtins:print``, a class instead of an instance) would otherwise fail every job at
run time with a ``TypeError`` that says nothing about the cause.
"""

from __future__ import annotations

import functools
import inspect

from streams.dispatchers.base import Dispatcher, Handler, Report
from streams.protocol import V2JobRequest

__all__ = ["CallbackDispatcher", "as_dispatcher", "is_async_callable", "require_async"]


def is_async_callable(obj: object) -> bool:
    """True for an ``async def`` function or method, a partial of one, or an object with ``async def __call__``."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    if inspect.iscoroutinefunction(obj):
        return True
    if isinstance(obj, type) or not callable(obj):
        return False
    return inspect.iscoroutinefunction(type(obj).__call__)


def require_async(obj: object, what: str, expected: str) -> None:
    """Raise a TypeError naming ``what`` unless ``obj`` is an async callable (see :func:`is_async_callable`)."""
    if is_async_callable(obj):
        return
    name = getattr(obj, "__qualname__", None) or type(obj).__name__
    if isinstance(obj, type):
        got = f"the class {name} (pass an instance, {name}(...), or an async function)"
    elif callable(obj):
        got = f"the plain (sync) callable {name}; sync callables are not supported, make it `async def`"
    else:
        got = f"{type(obj).__name__} {obj!r:.80}"
    raise TypeError(f"{what} must be {expected}; got {got}")


class CallbackDispatcher:
    """Wraps ``async def handle(job, report)``: the simplest dispatcher."""

    def __init__(self, handler: Handler) -> None:
        require_async(handler, "the dispatcher callback", "an `async def handle(job, report)` function")
        self._handler = handler

    async def handle(self, job: V2JobRequest, report: Report) -> None:
        await self._handler(job, report)

    def __repr__(self) -> str:
        return f"CallbackDispatcher({getattr(self._handler, '__qualname__', self._handler)!r})"


def as_dispatcher(dispatcher: Dispatcher | Handler) -> Dispatcher:
    """A Dispatcher as is; an ``async def handle(job, report)`` function wrapped in CallbackDispatcher.

    Raises TypeError for anything else, including a class, a sync function and an object whose
    ``handle`` is not ``async def``.
    """
    if not isinstance(dispatcher, type) and isinstance(dispatcher, Dispatcher):
        require_async(
            dispatcher.handle, f"{type(dispatcher).__name__}.handle", "`async def handle(self, job, report)`"
        )
        return dispatcher
    if callable(dispatcher):
        require_async(
            dispatcher, "dispatcher", "an `async def handle(job, report)` function or an object with such a method"
        )
        return CallbackDispatcher(dispatcher)
    raise TypeError(
        f"dispatcher must have `async def handle(job, report)` or be such a function; got {type(dispatcher).__name__}"
    )
