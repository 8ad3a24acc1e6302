"""facilitator-streams: keep a validator connected to its facilitator, as a reactive pipeline.

The public surface a validator imports::

    from streams import FacilitatorClient, ClientConfig, SystemEvent
    from streams.protocol import V0MachineSpecsUpdate, JobStatus, V2JobRequest, V0JobCheated, ...

Everything else is reachable from its own subpackage: :mod:`streams.transport`,
:mod:`streams.dispatchers`, :mod:`streams.recording`, :mod:`streams.devtools` (simulator, demo,
replay) and :mod:`streams.exceptions`.

The names below are imported on first use (PEP 562): ``python -m streams`` imports this package
before its ``__main__`` runs, and ``__main__`` must take over SIGINT before the heavy imports
(pydantic, websockets, reactivex) so that an early Ctrl-C never prints a traceback.
"""

from __future__ import annotations

import importlib

TYPE_CHECKING = False  # not typing's: importing typing here would widen the Ctrl-C window above
if TYPE_CHECKING:
    from typing import Any

    from streams.client import FacilitatorClient
    from streams.config import ClientConfig
    from streams.dispatchers import CallbackDispatcher, Dispatcher, SimulatedDispatcher
    from streams.events import ConnectionState, EventType, SystemEvent
    from streams.exceptions import ConfigError, StreamsError, UsageError

    __version__: str

_EXPORTS = {
    "FacilitatorClient": "streams.client",
    "ClientConfig": "streams.config",
    "CallbackDispatcher": "streams.dispatchers",
    "Dispatcher": "streams.dispatchers",
    "SimulatedDispatcher": "streams.dispatchers",
    "ConnectionState": "streams.events",
    "EventType": "streams.events",
    "SystemEvent": "streams.events",
    "ConfigError": "streams.exceptions",
    "StreamsError": "streams.exceptions",
    "UsageError": "streams.exceptions",
}

__all__ = [
    "CallbackDispatcher",
    "ClientConfig",
    "ConfigError",
    "ConnectionState",
    "Dispatcher",
    "EventType",
    "FacilitatorClient",
    "SimulatedDispatcher",
    "StreamsError",
    "SystemEvent",
    "UsageError",
    "__version__",
]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value: Any = version("facilitator-streams")
        except PackageNotFoundError:  # running from a source tree that was never installed
            value = "0+unknown"
    elif name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    else:
        raise AttributeError(f"module 'streams' has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
