"""decode_frames: garbage becomes Malformed items; the stream survives and completes."""

from __future__ import annotations

import json
from typing import Any

from reactivex import operators as ops
from reactivex.testing.marbles import marbles_testing

from operators import Decoded, Malformed, decode_frames


def decode(frame: str | bytes) -> dict[str, Any]:
    value = json.loads(frame)
    if not isinstance(value, dict):
        raise TypeError(f"not an object: {value!r}")
    return value


def summary(item: Decoded[dict[str, Any]] | Malformed) -> tuple[Any, ...]:
    if isinstance(item, Decoded):
        return ("ok", item.message["n"], item.frame)
    return ("bad", item.frame, type(item.error).__name__)


def test_garbage_becomes_malformed_and_the_stream_continues() -> None:
    frames = {"a": '{"n": 1}', "x": "{not json", "b": b'{"n": 2}', "y": "[1, 2]", "z": b"\xff\xfe"}
    with marbles_testing(timespan=1.0) as (start, cold, _hot, exp):
        source = cold("-a-x-b-y-z-|", frames)
        result = start(source.pipe(decode_frames(decode), ops.map(summary)))
        expected = exp(
            "-A-X-B-Y-Z-|",
            {
                "A": ("ok", 1, '{"n": 1}'),
                "X": ("bad", "{not json", "JSONDecodeError"),
                "B": ("ok", 2, b'{"n": 2}'),
                "Y": ("bad", "[1, 2]", "TypeError"),
                "Z": ("bad", b"\xff\xfe", "JSONDecodeError"),
            },
        )
        assert result == expected


def test_malformed_keeps_the_exception_and_errors_upstream_pass_through() -> None:
    err = ConnectionError("gone")
    boom = ValueError("boom")

    def failing(frame: str | bytes) -> int:
        raise boom

    with marbles_testing(timespan=1.0) as (start, cold, _hot, exp):
        result = start(cold("-a-#", None, err).pipe(decode_frames(failing)))
        assert result == exp("-m-#", {"m": Malformed("a", boom)}, err)
