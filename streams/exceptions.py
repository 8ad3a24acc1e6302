"""Every error the library raises on purpose, in one hierarchy.

Catch :class:`StreamsError` for "anything facilitator-streams refused or could not do". Like
websockets' own exceptions, the ones that mean misuse or bad input also subclass the built-in a
caller would expect (``ValueError`` for bad values, ``RuntimeError`` for a call at the wrong time),
so ``except ValueError`` keeps working. Only the CLI turns these into ``error: ...`` lines and exit
codes; the library never prints or exits.

    StreamsError
    ├── ConfigError (ValueError)          a ClientConfig field out of range or malformed
    ├── UsageError (RuntimeError)         start() twice, publish after stop(), ...
    ├── DecodeError (ValueError)          a frame that is not a valid message
    ├── MessageRefused (ValueError)       an outbound message that must never be sent
    │   ├── MessageTooLarge               its frame is over max_outbound_frame_bytes
    │   └── InvalidSpecs                  machine specs the facilitator cannot parse
    ├── TransportError                    what happened to a connection (``info``)
    │   ├── TransportConnectError         connect() failed
    │   └── TransportClosed               send()/recv() on an ended connection
    ├── RecordingError                    a recording that cannot be written
    ├── ReplayError (ValueError)          a recording that cannot be read (file, line, problem)
    ├── DispatcherError                   a dispatcher backend operation failed (retried)
    └── JournalError                      a journal file that cannot be used (file, way out)
        └── JournalLocked                 another process holds it (its pid)
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from streams.transport.base import CloseInfo

__all__ = [
    "ConfigError",
    "DecodeError",
    "DispatcherError",
    "InvalidSpecs",
    "JournalError",
    "JournalLocked",
    "MessageRefused",
    "MessageTooLarge",
    "RecordingError",
    "ReplayError",
    "StreamsError",
    "TransportClosed",
    "TransportConnectError",
    "TransportError",
    "UsageError",
]


class StreamsError(Exception):
    """Base of every error facilitator-streams raises on purpose."""


class ConfigError(StreamsError, ValueError):
    """A configuration value is out of range or malformed; the message names the field."""


class UsageError(StreamsError, RuntimeError):
    """A call at the wrong time: start() twice, publish after stop(), a component used before start()."""


class DecodeError(StreamsError, ValueError):
    """A frame that is not a valid message; says what was wrong and shows the start of the frame."""

    def __init__(self, reason: str, excerpt: str = "") -> None:
        super().__init__(reason, excerpt)
        self.reason = reason
        self.excerpt = excerpt

    def __str__(self) -> str:
        return f"{self.reason}; frame: {self.excerpt!r}" if self.excerpt else self.reason


class MessageRefused(StreamsError, ValueError):
    """An outbound message refused at enqueue because sending it would break the connection.

    It is never sent; the client also reports it (``MESSAGE_DROPPED`` with ``reason``). ``kind`` is
    the message type, ``reason`` a short machine-readable word (``too_large``, ``invalid_specs``).
    """

    reason = "refused"

    def __init__(self, kind: str, description: str) -> None:
        super().__init__(description)
        self.kind = kind


class MessageTooLarge(MessageRefused):
    """The encoded frame is bigger than the facilitator accepts (it would close the link with 1009,
    and the update, resent first after each reconnect, would block every later one)."""

    reason = "too_large"

    def __init__(self, kind: str, size: int, limit: int) -> None:
        super().__init__(
            kind,
            f"{kind} not sent: its frame is {size} bytes, over the {limit} byte limit "
            f"(ClientConfig.max_outbound_frame_bytes; the facilitator closes the connection on bigger frames)",
        )
        self.size = size
        self.limit = limit


class InvalidSpecs(MessageRefused):
    """Machine specs that do not fit the facilitator's hardware schema (its handler would crash, on
    every connection that carries them). ``errors`` are ``"field.path: problem"`` strings."""

    reason = "invalid_specs"

    def __init__(self, kind: str, errors: list[str]) -> None:
        shown = "; ".join(errors[:5]) + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else "")
        super().__init__(kind, f"{kind} not sent: specs do not fit the facilitator's hardware schema: {shown}")
        self.errors = errors


class TransportError(StreamsError):
    """Base of the transport's errors; ``info`` says what happened to the connection."""

    def __init__(self, info: CloseInfo) -> None:
        super().__init__(info.describe())
        self.info = info


class TransportConnectError(TransportError):
    """connect() failed: refused, unreachable, handshake rejected, or open timeout."""


class TransportClosed(TransportError):
    """send()/recv() on a connection that has ended; ``info`` says why it ended."""


class RecordingError(StreamsError):
    """A recording that cannot be opened for writing."""


class ReplayError(StreamsError, ValueError):
    """A recording that cannot be used: says which file, which line and what is wrong."""

    def __init__(self, path: str | Path | None, line: int | None, problem: str) -> None:
        where = str(path) if path is not None else "recording"
        if line is not None:
            where += f": line {line}"
        super().__init__(f"{where}: {problem}")
        self.path = path
        self.line = line
        self.problem = problem


class DispatcherError(StreamsError):
    """A dispatcher backend operation that failed and is being retried (e.g. Redis unavailable).

    ``operation`` names what failed (for the Celery dispatcher: ``read``, ``ack``, ``publish``,
    ``entry``); ``retry_in`` is the delay before the next attempt, None when it is not retried.
    """

    def __init__(self, operation: str, error: BaseException, attempt: int, retry_in: float | None) -> None:
        self.operation = operation
        self.error = error
        self.attempt = attempt
        self.retry_in = retry_in
        super().__init__(f"{operation}: {type(error).__name__}: {error}")


JOURNAL_RESET_HINT = "start with --journal-reset to move it aside (it is kept, renamed), or pass --journal PATH"


class JournalError(StreamsError):
    """A journal file that cannot be used; the message names the file and the way out."""

    def __init__(self, path: str | Path, problem: str, hint: str = JOURNAL_RESET_HINT) -> None:
        super().__init__(f"journal {path}: {problem}; {hint}")
        self.path = Path(path)
        self.problem = problem


class JournalLocked(JournalError):
    """Another live process holds the journal (``pid``: its pid, when it could be read)."""

    def __init__(self, path: str | Path, pid: int | None) -> None:
        holder = f"pid {pid}" if pid is not None else "a process whose pid is unknown"
        super().__init__(
            path, f"in use by another client ({holder})",
            "stop that client first, or give this one its own file with --journal PATH",
        )
        self.pid = pid
