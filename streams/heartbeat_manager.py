"""HeartbeatManager: a timer per authenticated connection, so heartbeats never pile up.

    connected:  F----T-----------F------T------
    heartbeats: -----h---h---h-----------h---h-   (first one at once after auth, then every period)

No heartbeat is produced while disconnected, so a reconnect sends one fresh heartbeat rather than
a backlog of stale ones; the outbox's KEEP_LATEST policy coalesces any that wait.
"""

from __future__ import annotations

import reactivex
from reactivex import operators as ops
from reactivex.abc import SchedulerBase
from reactivex.subject import Subject

from streams.events import ConnectionState
from streams.protocol import V0Heartbeat

__all__ = ["HeartbeatManager"]


class HeartbeatManager:
    def __init__(
        self,
        period: float,
        state: reactivex.Observable[ConnectionState],
        scheduler: SchedulerBase | None = None,
    ) -> None:
        if period <= 0:
            raise ValueError(f"heartbeat period must be > 0, got {period!r}")
        self._period = period
        self._state = state
        self._scheduler = scheduler
        self._stopped: Subject[None] = Subject()
        self._heartbeat = V0Heartbeat()

    @property
    def heartbeats(self) -> reactivex.Observable[V0Heartbeat]:
        def per_connection(connected: bool) -> reactivex.Observable[V0Heartbeat]:
            if not connected:
                return reactivex.empty()
            # The first heartbeat is emitted synchronously, as the connection comes up, so that it
            # reaches the send loop before any backlog the reconnect releases.
            return reactivex.interval(self._period, scheduler=self._scheduler).pipe(
                ops.start_with(-1), ops.map(lambda _: self._heartbeat)
            )

        def is_connected(state: ConnectionState) -> bool:
            return state is ConnectionState.CONNECTED

        connected: reactivex.Observable[bool] = self._state.pipe(
            ops.map(is_connected), ops.distinct_until_changed()
        )
        per_state: reactivex.Observable[reactivex.Observable[V0Heartbeat]] = connected.pipe(ops.map(per_connection))
        return per_state.pipe(ops.switch_latest(), ops.take_until(self._stopped))

    async def start(self) -> None:
        """Nothing to start: the heartbeat timers follow the connection state once subscribed."""

    async def stop(self) -> None:
        self._stopped.on_next(None)
        self._stopped.on_completed()
