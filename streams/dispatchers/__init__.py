"""Dispatchers: who runs a job once the client received it.

- :mod:`.base`: the Protocols (Dispatcher, ManagedDispatcher, FeedingDispatcher) and StatusFeed.
- :mod:`.callback`: CallbackDispatcher, around ``async def handle(job, report)``.
- :mod:`.simulated`: SimulatedDispatcher, which plays :mod:`.lifecycle` (demos and tests).
- :mod:`.celery`: CeleryDispatcher (phase 2, the ``celery`` extra), imported on its own.
"""

from streams.dispatchers.base import (
    Dispatcher,
    FeedingDispatcher,
    Handler,
    ManagedDispatcher,
    Metadata,
    Report,
    StatusAck,
    StatusFeed,
)
from streams.dispatchers.callback import CallbackDispatcher, as_dispatcher
from streams.dispatchers.simulated import SimulatedDispatcher

__all__ = [
    "CallbackDispatcher",
    "Dispatcher",
    "FeedingDispatcher",
    "Handler",
    "ManagedDispatcher",
    "Metadata",
    "Report",
    "SimulatedDispatcher",
    "StatusAck",
    "StatusFeed",
    "as_dispatcher",
]
