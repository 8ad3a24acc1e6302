"""One lifecycle for every component, and an owner for the short-lived tasks they start.

Every component of the client (ConnectionManager, MessageManager, HeartbeatManager,
SpecUpdateManager, JobStatusUpdateManager, JobDispatcher, CheatReportHandler, PerformanceMonitor)
is a :class:`Component`: ``await start()`` once, ``await stop()`` once. The client starts them in
dependency order and registers each ``stop`` on an ``AsyncExitStack`` as it goes, so teardown runs
in reverse order by construction. A component that runs a loop owns its task: ``start()`` creates
it, ``stop()`` cancels and awaits it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any, Protocol, runtime_checkable

from streams.exceptions import UsageError

__all__ = ["Component", "TaskOwner"]

log = logging.getLogger(__name__)


@runtime_checkable
class Component(Protocol):
    """``start()`` once, then ``stop()`` once; ``stop()`` also works on a component never started."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class TaskOwner:
    """Starts tasks, keeps a strong reference, routes their failures to ``on_error``.

    Exceptions never escape a task silently ("Task exception was never retrieved"): the done
    callback retrieves them and hands them to ``on_error``.
    """

    def __init__(self, name: str, on_error: Callable[[str, BaseException], None] | None = None) -> None:
        self._name = name
        self._on_error = on_error
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    def __len__(self) -> int:
        return len(self._tasks)

    def start(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        if self._closed:
            coro.close()
            raise UsageError(f"{self._name} is closed; cannot start {name}")
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._name}:{name}")
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            if self._on_error is not None:
                self._on_error(task.get_name(), exc)
            else:
                log.error("task %s failed", task.get_name(), exc_info=exc)


    async def aclose(self) -> None:
        """Cancel every task and wait until each has finished; no task can be started afterwards."""
        self._closed = True
        await self.cancel_all()

    async def cancel_all(self) -> None:
        """Cancel every running task and wait until each has finished (new ones may still start)."""
        tasks = set(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
