"""Transports: the client's only view of the network (``connect``/``send``/``recv``/``close``/``abort``).

- :mod:`streams.transport.base`: the :class:`Transport` contract and :class:`CloseInfo`.
- :mod:`streams.transport.websocket`: :class:`WebSocketTransport`, the production one.
- :mod:`streams.transport.memory`: :func:`memory_transport_pair`, an in-memory pair for tests.

A transport never reconnects by itself: the ConnectionManager decides when.
"""

from streams.exceptions import TransportClosed, TransportConnectError, TransportError
from streams.transport.base import ABNORMAL_CLOSURE, CloseInfo, Transport
from streams.transport.memory import MemoryPeer, MemoryTransport, memory_transport_pair
from streams.transport.websocket import WebSocketTransport

__all__ = [
    "ABNORMAL_CLOSURE",
    "CloseInfo",
    "MemoryPeer",
    "MemoryTransport",
    "Transport",
    "TransportClosed",
    "TransportConnectError",
    "TransportError",
    "WebSocketTransport",
    "memory_transport_pair",
]
