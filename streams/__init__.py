"""facilitator-streams: keep a validator connected to its facilitator, as a reactive pipeline."""

from streams.client import FacilitatorClient
from streams.config import ClientConfig, ConfigError
from streams.events import ConnectionState, EventType, SystemEvent
from streams.job_dispatcher import CallbackDispatcher, Dispatcher, JobDispatcher, SimulatedDispatcher

__version__ = "0.1.0"

__all__ = [
    "CallbackDispatcher",
    "ClientConfig",
    "ConfigError",
    "ConnectionState",
    "Dispatcher",
    "EventType",
    "FacilitatorClient",
    "JobDispatcher",
    "SimulatedDispatcher",
    "SystemEvent",
    "__version__",
]
