"""facilitator-streams: keep a validator connected to its facilitator, as a reactive pipeline.

The public surface a validator imports::

    from streams import FacilitatorClient, ClientConfig, SystemEvent
    from streams.protocol import V0MachineSpecsUpdate, JobStatus, V2JobRequest, V0JobCheated, ...

Everything else is reachable from its own subpackage: :mod:`streams.transport`,
:mod:`streams.dispatchers`, :mod:`streams.recording`, :mod:`streams.devtools` (simulator, demo,
replay) and :mod:`streams.exceptions`.
"""

from importlib.metadata import PackageNotFoundError, version

from streams.client import FacilitatorClient
from streams.config import ClientConfig
from streams.dispatchers import CallbackDispatcher, Dispatcher, SimulatedDispatcher
from streams.events import ConnectionState, EventType, SystemEvent
from streams.exceptions import ConfigError, StreamsError, UsageError

try:
    __version__ = version("facilitator-streams")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

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
