"""Cheat reports go to the host's ``on_cheat`` handler, each in an owned task; a raise is reported.

A report whose signature does not verify never reaches ``on_cheat``: it is published on ``rejected``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import reactivex
from reactivex.subject import Subject

from streams.dispatchers.callback import require_async
from streams.lifecycle import TaskOwner
from streams.protocol import V0JobCheated
from streams.signatures import SignatureVerifier, Verification

__all__ = ["CheatHandler", "CheatHandlerFailure", "CheatRejected", "CheatReportHandler"]

CheatHandler = Callable[[V0JobCheated], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class CheatHandlerFailure:
    report: V0JobCheated
    error: BaseException


@dataclass(frozen=True, slots=True)
class CheatRejected:
    report: V0JobCheated
    verification: Verification


class CheatReportHandler:
    def __init__(self, handler: CheatHandler | None, verifier: SignatureVerifier | None = None) -> None:
        if handler is not None:
            require_async(handler, "on_cheat", "an `async def on_cheat(report)` function")
        self._handler = handler
        self._tasks = TaskOwner("cheat-reports")
        self._failures: Subject[CheatHandlerFailure] = Subject()
        self._verifier = verifier
        self._rejected: Subject[CheatRejected] = Subject()

    @property
    def failures(self) -> reactivex.Observable[CheatHandlerFailure]:
        return self._failures

    @property
    def rejected(self) -> reactivex.Observable[CheatRejected]:
        """Reports whose signature did not verify: not passed to ``on_cheat``."""
        return self._rejected

    def submit(self, report: V0JobCheated) -> None:
        if self._verifier is not None:
            verification = self._verifier.verify_cheat(report)
            if not verification.ok:
                self._rejected.on_next(CheatRejected(report, verification))
                return
        if self._handler is None:
            return
        self._tasks.start(self._run(self._handler, report), report.job_uuid)

    async def _run(self, handler: CheatHandler, report: V0JobCheated) -> None:
        try:
            await handler(report)
        except Exception as exc:
            self._failures.on_next(CheatHandlerFailure(report, exc))

    async def start(self) -> None:
        """Nothing to start: reports arrive through ``submit``."""

    async def stop(self) -> None:
        await self._tasks.aclose()
        self._failures.on_completed()
        self._rejected.on_completed()
