"""Play a recording as an observable on any scheduler (virtual time, or real time sped up)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from datetime import timedelta
from typing import Any

from reactivex import Observable, abc
from reactivex.disposable import SerialDisposable

from streams.recording.format import Record, Recording

__all__ = ["replay"]

log = logging.getLogger(__name__)



def _default_scheduler() -> abc.SchedulerBase:
    from reactivex.scheduler.eventloop import AsyncIOScheduler

    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        raise ValueError(
            "replay() needs a scheduler outside an event loop: pass e.g. HistoricalScheduler() "
            "(virtual time) or AsyncIOScheduler(loop) (real time)"
        ) from None
    return AsyncIOScheduler(loop)


def replay(
    recording: Recording | Iterable[Record],
    scheduler: abc.SchedulerBase | None = None,
    speed: float = 1.0,
) -> Observable[Record]:
    """Emit every record at ``t / speed`` seconds after subscription, then complete.

    Cold: each subscription replays from the start. The scheduler is ``scheduler``, else the
    one given to ``subscribe``, else an ``AsyncIOScheduler`` on the running loop. Records with
    the same time are emitted in file order in one scheduled action. ``speed=math.inf`` emits
    everything at once, in order.
    """
    if not speed > 0:
        raise ValueError(f"speed must be > 0, got {speed}")
    records = recording.records if isinstance(recording, Recording) else tuple(recording)

    def subscribe(
        observer: abc.ObserverBase[Record], sub_scheduler: abc.SchedulerBase | None = None
    ) -> abc.DisposableBase:
        sched = scheduler or sub_scheduler or _default_scheduler()
        origin = sched.now
        serial = SerialDisposable()
        position = 0

        def due(record: Record) -> timedelta:
            return timedelta(seconds=record.t / speed)

        def emit(_: abc.SchedulerBase, __: Any = None) -> None:
            nonlocal position
            if position < len(records):
                batch_due = due(records[position])
                while position < len(records) and due(records[position]) == batch_due:
                    if serial.is_disposed:
                        return
                    record = records[position]
                    position += 1
                    observer.on_next(record)
            if serial.is_disposed:
                return
            if position < len(records):
                serial.disposable = sched.schedule_absolute(origin + due(records[position]), emit)
            else:
                observer.on_completed()

        first = origin + due(records[0]) if records else origin
        serial.disposable = sched.schedule_absolute(first, emit)
        return serial

    return Observable(subscribe)
