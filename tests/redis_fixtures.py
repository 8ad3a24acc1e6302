"""Real services for the Celery tests: a ``redis-server`` and a Celery worker, each a subprocess.

Both wait for readiness on a condition (PING answered, the worker's "ready." log line) with a
deadline, never a fixed sleep, and both are killed and reaped on exit, whatever happened.
The Makefile installs redis-server from the system packages when it is missing; tests skip only
if it still cannot be found.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def wait_for(predicate: Callable[[], bool], timeout: float, what: str, on_timeout: Callable[[], str] = str) -> None:
    """Poll ``predicate`` (a cheap check) until true; fail naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}. {on_timeout()}")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def missing(reason: str) -> None:
    """Skip on a developer's machine; fail in CI (CI=true), where these tests must run."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"{reason} (CI must run the Celery tests)", pytrace=False)
    pytest.skip(reason)


def redis_server_binary() -> str:
    path = shutil.which("redis-server")
    if path is None:
        missing("redis-server not found: `make test` installs it (apt-get install redis-server)")
    assert path is not None
    return path


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RedisServer:
    """A redis-server on 127.0.0.1:port. ``persistent``: append-only file, fsync always (restartable)."""

    def __init__(self, workdir: Path, *, persistent: bool = False, port: int | None = None) -> None:
        self.binary = redis_server_binary()
        self.workdir = workdir
        self.persistent = persistent
        self.port = port or free_port()
        self.log = workdir / f"redis-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.proc is None, "already running"
        persistence = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else ["--appendonly", "no"]
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--dir", str(self.workdir), *persistence],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )
        wait_for(self._answers, 10, f"redis-server on port {self.port} to answer PING", lambda: _tail(self.log))

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise AssertionError(f"redis-server exited with {self.proc.returncode}:\n{_tail(self.log)}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """SIGKILL: no shutdown save, no goodbye to clients (what a crash or an OOM kill does)."""
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.kill()
            proc.wait(10)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


class CeleryWorker:
    """``python -m streams worker`` (a real Celery worker running the sample lifecycle task)."""

    def __init__(
        self, broker: str, queue: str, workdir: Path, *, step_delay: float = 0.05, concurrency: int = 16,
        extra: Sequence[str] = (),
    ) -> None:
        self.argv = [
            sys.executable, "-m", "streams", "--log-level", "INFO", "worker", "--broker", broker,
            "--queue", queue, "--step-delay", str(step_delay), "--concurrency", str(concurrency),
            "--pool", "threads", *extra,
        ]
        self.log = workdir / f"worker-{queue}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                self.argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        wait_for(self._ready, 30, "the Celery worker to be ready", self.tail)

    def _ready(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the Celery worker exited with {self.proc.returncode}:\n{self.tail()}")
        return " ready." in self.log.read_text(errors="replace")

    def tail(self) -> str:
        return _tail(self.log)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def celery_pids(self) -> list[int]:
        """The Celery worker processes ``python -m streams worker`` started (it restarts one that dies)."""
        return [int(pid) for pid in re.findall(r"celery worker started \(pid (\d+)\)", self.text())]

    def stop(self) -> None:
        """SIGTERM (Celery's warm shutdown), SIGKILL if it is not gone within 10 s."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        for pid in self.celery_pids():  # the supervised Celery processes: gone with it, or made to go
            with contextlib.suppress(AssertionError):
                wait_for(lambda pid=pid: not _alive(pid), 10, f"celery worker {pid} to exit")  # type: ignore[misc]
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)

    def __enter__(self) -> CeleryWorker:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


@contextlib.contextmanager
def redis_and_worker(
    workdir: Path, queue: str, *, persistent: bool = False, step_delay: float = 0.05, concurrency: int = 16,
    extra: Sequence[str] = (),
) -> Iterator[tuple[RedisServer, CeleryWorker]]:
    with RedisServer(workdir, persistent=persistent) as server:
        with CeleryWorker(
            server.url, queue, workdir, step_delay=step_delay, concurrency=concurrency, extra=extra
        ) as worker:
            yield server, worker
