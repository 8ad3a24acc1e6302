"""What ``run`` says by default: one line per connection change and per failure worth attention.

An operator who starts ``python -m streams run`` must learn at once when the URL does not
resolve, the port refuses, the path is wrong, the hotkey is refused, or jobs fail: a start line
says what the client connects to as whom, then each CONNECTED / DISCONNECTED / CONNECT_FAILED /
AUTH_FAILED is one line (with its cause and retry time), and so is each job or message failure,
at most ``burst`` per kind in ``window`` seconds (the rest are counted, and the count is said
when the window ends or the client stops) so a failing backlog cannot flood the terminal.
Everything else is logged at DEBUG. The lines go to the ``streams.cli`` logger: ``--log-level``
tunes them (INFO, the default for ``run``, shows them all; WARNING only the failures; DEBUG every
event) and ``--quiet`` silences them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from streams.events import EventType, SystemEvent

__all__ = ["LOGGER", "StatusLines"]

LOGGER = "streams.cli"

_CONNECTION = {
    EventType.CONNECTED: logging.INFO,
    EventType.DISCONNECTED: logging.WARNING,
    EventType.CONNECT_FAILED: logging.WARNING,
    EventType.AUTH_FAILED: logging.ERROR,
}
"""One line each, never throttled: they are as frequent as the backoff allows, no more."""

_FAILURES = {
    "JOB_DISPATCH_FAILED": logging.ERROR,
    "JOB_UNFINISHED": logging.ERROR,
    "JOB_REJECTED": logging.WARNING,
    "CHEAT_REJECTED": logging.WARNING,
    "CONFIG_WARNING": logging.WARNING,
    "SUSPECTED_POISON": logging.WARNING,
    "MESSAGE_DROPPED": logging.WARNING,
    "DISPATCHER_FAILED": logging.WARNING,
    "SOURCE_FAILED": logging.ERROR,
    "SUBSCRIBER_FAILED": logging.ERROR,
    "CHEAT_HANDLER_FAILED": logging.ERROR,
    "ERROR_RESPONSE": logging.WARNING,
    "MALFORMED_MESSAGE": logging.WARNING,
    "UNEXPECTED_RESPONSE": logging.WARNING,
}
"""Per job or per message: throttled per (type, subtype)."""


@dataclass(slots=True)
class _Window:
    started: float
    shown: int = 0
    suppressed: int = 0
    level: int = logging.WARNING


class StatusLines:
    """Subscribe it to ``client.events``; call :meth:`close` at the end to say what was held back."""

    def __init__(
        self,
        logger: logging.Logger | None = None,
        *,
        burst: int = 3,
        window: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger or logging.getLogger(LOGGER)
        self._burst = burst
        self._window = window
        self._clock = clock
        self._windows: dict[tuple[str, str], _Window] = {}

    def started(self, url: str, who: str, dispatcher: str, trusted: int = 0) -> None:
        """The start line; ``trusted``: how many signers besides this hotkey may sign jobs."""
        signers = (
            "jobs signed by this hotkey only (trust others with --trusted-signer)"
            if trusted == 0
            else f"jobs signed by this hotkey or {trusted} trusted signer{'s' * (trusted != 1)}"
        )
        self._log.info("connecting to %s as %s (dispatcher: %s; %s); Ctrl-C stops", url, who, dispatcher, signers)

    def __call__(self, event: SystemEvent) -> None:
        level = _CONNECTION.get(event.type)
        if level is not None:
            self._log.log(level, "%s: %s", event.type, _with_retry(event))
            return
        level = _FAILURES.get(str(event.type))
        if level is None:
            self._log.debug("%s %s: %s %s", event.type, event.subtype, event.description, event.data)
            return
        key = (str(event.type), event.subtype)
        now = self._clock()
        window = self._windows.get(key)
        if window is not None and now - window.started >= self._window:
            self._say_suppressed(key, window)
            window = None
        if window is None:
            window = self._windows[key] = _Window(now, level=level)
        if window.shown < self._burst:
            window.shown += 1
            self._log.log(level, "%s %s: %s", event.type, event.subtype, event.description)
        else:
            window.suppressed += 1
            self._log.debug("%s %s: %s", event.type, event.subtype, event.description)

    def close(self) -> None:
        """Say how many lines each kind held back in its last window."""
        windows, self._windows = self._windows, {}
        for key, window in windows.items():
            self._say_suppressed(key, window)

    def _say_suppressed(self, key: tuple[str, str], window: _Window) -> None:
        if window.suppressed:
            self._log.log(
                window.level, "%s %s: %d more in %.0f s (not shown; --events FILE keeps every event)",
                key[0], key[1], window.suppressed, min(self._window, self._clock() - window.started),
            )


def _with_retry(event: SystemEvent) -> str:
    retry = event.data.get("retry_in")
    if event.type is EventType.CONNECTED or not isinstance(retry, int | float):
        return event.description
    return f"{event.description}; retrying in {retry:.1f} s"
