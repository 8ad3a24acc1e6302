"""Reusable reactive operators: pure reactivex, scheduler-agnostic, no I/O, no asyncio.

One operator per module:

- ``hold``: ``hold_while_disconnected``, a pausable, bounded, order-keeping buffer.
- ``partition``: ``partition_by``, one upstream subscription split into keyed branches.
- ``decode``: ``decode_frames``, decoding that turns garbage into items, not errors.
- ``route``: ``route_frames``, decode + partition + message extraction fused into one step per frame.
- ``backoff``: ``Backoff`` (full jitter) and ``retry_with_backoff``.
- ``acks``: ``match_acks``, FIFO pairing of responses with sent items per connection.
"""

from .acks import Acked, AckEvent, Unacked, UnexpectedResponse, match_acks
from .backoff import Backoff, retry_with_backoff
from .decode import Decoded, Malformed, decode_frames
from .hold import Dropped, HoldPolicy, hold_while_disconnected
from .partition import Partitioned, partition_by
from .route import Routed, route_frames

__all__ = [
    "AckEvent",
    "Acked",
    "Backoff",
    "Decoded",
    "Dropped",
    "HoldPolicy",
    "Malformed",
    "Partitioned",
    "Routed",
    "Unacked",
    "UnexpectedResponse",
    "decode_frames",
    "hold_while_disconnected",
    "match_acks",
    "partition_by",
    "retry_with_backoff",
    "route_frames",
]
