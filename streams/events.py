"""SystemEvents: what happened to the client, in a shape a host can persist as-is."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ConnectionState", "EventType", "SystemEvent"]


class EventType(enum.StrEnum):
    CONNECTED = "CONNECTED"
    DISCONNECTED = "DISCONNECTED"
    CONNECT_FAILED = "CONNECT_FAILED"
    AUTH_FAILED = "AUTH_FAILED"
    ERROR_RESPONSE = "ERROR_RESPONSE"
    MALFORMED_MESSAGE = "MALFORMED_MESSAGE"
    MESSAGE_DROPPED = "MESSAGE_DROPPED"
    SUSPECTED_POISON = "SUSPECTED_POISON"
    """The oldest unanswered status update outlived N connections that each ended without answering it."""
    JOB_DISPATCH_FAILED = "JOB_DISPATCH_FAILED"
    JOB_UNFINISHED = "JOB_UNFINISHED"
    """The dispatcher returned, or was cancelled at stop, before the job's final status: horde_failed reported."""
    CHEAT_HANDLER_FAILED = "CHEAT_HANDLER_FAILED"
    JOB_REJECTED = "JOB_REJECTED"
    """A job request whose signature did not verify (or whose signatory is not trusted): not run."""
    CHEAT_REJECTED = "CHEAT_REJECTED"
    """A cheat report whose signature did not verify: not passed to ``on_cheat``."""
    CONFIG_WARNING = "CONFIG_WARNING"
    """Once at start: a setting that is unsafe in production (verify_signatures=False: no signature checks)."""
    UNEXPECTED_RESPONSE = "UNEXPECTED_RESPONSE"
    SOURCE_FAILED = "SOURCE_FAILED"
    DISPATCHER_FAILED = "DISPATCHER_FAILED"
    SUBSCRIBER_FAILED = "SUBSCRIBER_FAILED"
    JOURNAL_RECOVERED = "JOURNAL_RECOVERED"
    JOURNAL_FAILED = "JOURNAL_FAILED"
    JOURNAL_RESUMED = "JOURNAL_RESUMED"


class ConnectionState(enum.StrEnum):
    DISCONNECTED = "disconnected"
    CONNECTING = "connecting"
    AUTHENTICATING = "authenticating"
    CONNECTED = "connected"


@dataclass(frozen=True, slots=True)
class SystemEvent:
    """One observable fact about the client; ``data`` is always JSON-able."""

    type: EventType
    subtype: str
    description: str
    data: dict[str, Any] = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "type": str(self.type),
            "subtype": self.subtype,
            "description": self.description,
            "data": self.data,
            "timestamp": self.timestamp,
        }
