"""Decode wire frames into messages; a frame that fails to decode becomes an item, not an error.

Why: one garbage frame from the peer must not end the inbound stream (an ``on_error`` would
tear down every subscriber). ``ops.map`` turns a raising mapper into ``on_error``; this
operator turns it into a ``Malformed`` item that the monitor can count and report.

Marble diagram (``x`` is a frame that fails to decode)::

    frames:  -a-x-b-|
    result:  -A-M-B-|      A = Decoded(decode(a), a), M = Malformed(x, error)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from reactivex import Observable
from reactivex import operators as ops

__all__ = ["Decoded", "Malformed", "decode_frames"]

M = TypeVar("M")


@dataclass(frozen=True, slots=True)
class Decoded(Generic[M]):
    """A frame and the message decoded from it."""

    message: M
    frame: str | bytes


@dataclass(frozen=True, slots=True)
class Malformed:
    """A frame whose decoding raised ``error``."""

    frame: str | bytes
    error: Exception


def decode_frames(
    decode: Callable[[str | bytes], M],
) -> Callable[[Observable[str | bytes]], Observable[Decoded[M] | Malformed]]:
    """Map each frame to ``Decoded(decode(frame), frame)``, or ``Malformed`` if decode raises.

    Any ``Exception`` raised by ``decode`` is caught (``BaseException`` such as
    ``KeyboardInterrupt`` is not). Source completion and errors pass through unchanged.
    """

    def decode_one(frame: str | bytes) -> Decoded[M] | Malformed:
        try:
            return Decoded(decode(frame), frame)
        except Exception as exc:
            return Malformed(frame, exc)

    def operator(source: Observable[str | bytes]) -> Observable[Decoded[M] | Malformed]:
        return source.pipe(ops.map(decode_one))

    return operator
