"""PerformanceMonitor: statsd lines over real UDP, and each SystemEvent from the scenario that causes it.

Everything runs on 127.0.0.1: a FacilitatorSimulator on a random port and a UDP socket standing
in for statsd. Waits are condition waits with timeouts; no test sleeps for a fixed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import pytest

from streams import ClientConfig, ConnectionState, EventType, FacilitatorClient, SimulatedDispatcher, SystemEvent
from streams.devtools.simulator import SUCCESS, FacilitatorSimulator
from streams.metrics import Metrics
from streams.protocol import JobStatus, V0JobCheated, V0MachineSpecsUpdate, V2JobRequest
from tests.helpers import ALICE, Running, fast_config, running_client, wait_until

pytestmark = pytest.mark.timeout(30)

# The data fields of each event type: what a host persisting events can rely on.
EVENT_FIELDS: dict[str, set[str]] = {
    "CONNECTED": {"connection_id", "connect_duration", "downtime"},
    "DISCONNECTED": {
        "connection_id", "lived", "pending_outbox", "pending_in_flight", "retry_in",
        "close_code", "close_reason", "exception", "exception_message",
    },
    "CONNECT_FAILED": {"attempt", "retry_in", "close_code", "close_reason", "exception", "exception_message"},
    "AUTH_FAILED": {
        "errors", "http_status", "retry_in", "close_code", "close_reason", "exception", "exception_message",
    },
    "ERROR_RESPONSE": {"job_uuid", "status", "errors"},
    "UNEXPECTED_RESPONSE": {"errors"},
    "MALFORMED_MESSAGE": {"excerpt", "error"},
    "MESSAGE_DROPPED": {
        "message_type", "reason", "count", "job_uuid", "status", "frame_bytes", "limit", "errors", "excerpt",
        "first_job_uuid", "last_job_uuid",
    },
    "SUSPECTED_POISON": {
        "message_type", "job_uuid", "status", "connections", "sends", "age", "frame_bytes", "excerpt",
    },
    "JOB_DISPATCH_FAILED": {"job_uuid", "exception", "message"},
    "JOB_UNFINISHED": {"job_uuid", "reason", "message"},
    "CHEAT_HANDLER_FAILED": {"job_uuid", "exception", "message"},
    "SOURCE_FAILED": {"exception", "message"},
    "SUBSCRIBER_FAILED": {"stream", "exception", "message"},
    "DISPATCHER_FAILED": {"operation", "exception", "message", "retry_in"},
    "JOB_REJECTED": {"job_uuid", "reason", "failure", "message", "signatory", "timestamp_ns"},
    "CHEAT_REJECTED": {"job_uuid", "trusted_job_uuid", "failure", "message", "signatory", "timestamp_ns"},
    "CONFIG_WARNING": {"setting"},
    "JOURNAL_RECOVERED": {
        "path", "resent_updates", "resent_status_updates", "resent_spec_updates", "horde_failed_jobs", "jobs",
        "oldest_recorded_at",
    },
    "JOURNAL_FAILED": {"path", "exception", "message"},
    "JOURNAL_RESUMED": {"path"},
}

STAT_LINE = re.compile(r"^(?P<name>[^:|\s]+):(?P<value>-?[0-9.]+)\|(?P<type>c|g|ms)$")


# -- a statsd stand-in -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Stat:
    name: str
    value: float
    type: str


class StatsdListener:
    """A UDP socket on 127.0.0.1:0 that parses what a statsd client sends it."""

    def __init__(self, prefix: str = "facilitator_client") -> None:
        self.prefix = prefix
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port: int = self.sock.getsockname()[1]
        self.stats: list[Stat] = []
        self.unparsed: list[str] = []

    def poll(self) -> list[Stat]:
        while True:
            try:
                datagram = self.sock.recv(65_535)
            except BlockingIOError:
                return self.stats
            for line in datagram.decode("ascii").splitlines():
                match = STAT_LINE.match(line)
                if match is None:
                    self.unparsed.append(line)
                else:
                    self.stats.append(Stat(match["name"], float(match["value"]), match["type"]))

    def of(self, name: str) -> list[Stat]:
        full = f"{self.prefix}.{name}"
        return [stat for stat in self.poll() if stat.name == full]

    def values(self, name: str) -> list[float]:
        return [stat.value for stat in self.of(name)]

    def total(self, name: str) -> float:
        return sum(self.values(name))

    def types(self) -> dict[str, set[str]]:
        found: dict[str, set[str]] = {}
        for stat in self.poll():
            found.setdefault(stat.name.removeprefix(f"{self.prefix}."), set()).add(stat.type)
        return found

    async def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        def check() -> bool:
            self.poll()
            return predicate()

        try:
            await wait_until(check, timeout, what)
        except AssertionError as exc:
            names = sorted({stat.name for stat in self.stats})
            raise AssertionError(f"{exc}; statsd names seen: {names}") from None

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def statsd_listener() -> Iterator[StatsdListener]:
    listener = StatsdListener()
    yield listener
    listener.close()


@pytest.fixture
async def sim() -> AsyncIterator[FacilitatorSimulator]:
    async with FacilitatorSimulator(seed=4242) as simulator:
        yield simulator


def closed_port(kind: socket.SocketKind = socket.SOCK_STREAM) -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, kind) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def assert_event_shape(event: SystemEvent) -> None:
    """Every event: the documented fields, a JSON-able ``data``, and a timestamp."""
    assert isinstance(event.type, EventType)
    assert set(event.data) == EVENT_FIELDS[str(event.type)], (event.type, sorted(event.data))
    assert isinstance(event.subtype, str) and isinstance(event.description, str) and event.description
    assert abs(event.timestamp - time.time()) < 60
    as_dict = event.to_dict()
    assert orjson.loads(orjson.dumps(as_dict)) == json.loads(json.dumps(as_dict, allow_nan=False))
    assert as_dict["type"] == str(event.type)


def only(run: Running, type_: str) -> SystemEvent:
    events = run.events_of(type_)
    assert len(events) == 1, [(e.type, e.description) for e in events]
    return events[0]


def status_frames(sim: FacilitatorSimulator) -> list[dict[str, Any]]:
    return sim.frames_of("V0JobStatusUpdate")


def spec(n: int) -> V0MachineSpecsUpdate:
    return V0MachineSpecsUpdate(
        miner_hotkey="5FHneW46xGXgs5mUiveU4sbTyGBzmstUspZC92UhjJM694ty",
        validator_hotkey=ALICE.ss58_address,
        specs={"gpu": {"count": n}, "cpu": {"count": 8}, "ram": {}, "hard_disk": {}},
        batch_id=f"batch-{n}",
    )


# -- statsd --------------------------------------------------------------------------------------


async def test_statsd_receives_the_metrics_of_a_scripted_session(
    sim: FacilitatorSimulator, statsd_listener: StatsdListener
) -> None:
    """Connect, 10 status updates (all acknowledged), a drop, a reconnect: names, types, values."""
    udp = statsd_listener
    config = fast_config(sim.url, statsd_host="127.0.0.1", statsd_port=udp.port)
    async with running_client(config) as run:
        await wait_until(lambda: run.client.is_connected, 5, "connected")
        jobs = [sim.register_job(str(uuid.uuid4())) for _ in range(10)]
        for job_uuid in jobs:  # synchronously: all ten are queued before the send loop runs
            run.client._statuses.open(job_uuid)("received")
        await udp.wait_for(lambda: udp.total("acks.success") == 10, 5, "ten acks")
        await udp.wait_for(lambda: udp.values("inflight.depth")[-1:] == [0], 5, "nothing in flight")
        await sim.drop()
        await udp.wait_for(lambda: udp.values("connected") == [0, 1, 0, 1], 5, "connected 0 -> 1 -> 0 -> 1")
        await udp.wait_for(lambda: len(udp.values("downtime")) == 1, 5, "the outage's downtime")
        await udp.wait_for(lambda: udp.total("messages.sent.V0Heartbeat") >= 2, 5, "a heartbeat per connection")

        # Every in-memory counter is mirrored exactly (statsd counters are deltas: they sum up).
        counters = run.counters
        await udp.wait_for(
            lambda: all(udp.total(name) == value for name, value in counters.items()), 5, "counters mirrored"
        )
        snapshot_gauges = run.client.metrics.snapshot()["gauges"]
        timings = run.client.metrics.snapshot()["timings"]

    assert udp.unparsed == [], "every line is prefix.name:value|type"
    assert all(stat.name.startswith("facilitator_client.") for stat in udp.stats)
    types = udp.types()
    assert all(len(found) == 1 for found in types.values()), types
    expected_types = {
        "connect.attempts": "c", "connect.successes": "c", "disconnects.1006": "c",
        "messages.sent.V0JobStatusUpdate": "c", "messages.sent.V0Heartbeat": "c",
        "messages.received.Response": "c", "acks.success": "c",
        "connected": "g", "outbox.depth": "g", "outbox.bytes": "g", "inflight.depth": "g",
        "connect.duration": "ms", "downtime": "ms", "latency.enqueue_to_wire": "ms", "latency.ack": "ms",
    }
    assert {name: types.get(name) for name in expected_types} == {n: {t} for n, t in expected_types.items()}

    assert udp.total("connect.attempts") == 2
    assert udp.total("connect.successes") == 2
    assert not udp.of("connect.failures") and not udp.of("auth.failures")
    assert udp.total("messages.sent.V0JobStatusUpdate") == 10
    assert not udp.of("messages.resent.V0JobStatusUpdate"), "all ten were acknowledged before the drop"
    assert udp.total("messages.received.Response") == 10
    assert udp.total("acks.success") == 10
    assert not [s for s in udp.stats if ".acks.error." in s.name or s.name.endswith(".acks.duplicate")]
    assert udp.total("disconnects.1006") == 1
    assert udp.total("disconnects.1000") == 1, "stop() closes with 1000"
    assert udp.values("connected") == [0, 1, 0, 1, 0], "and the gauge ends at 0 after stop()"
    assert set(udp.values("connected")) <= {0, 1}

    outbox = udp.values("outbox.depth")
    assert max(outbox) == 10 and outbox[-1] == 0
    in_flight = udp.values("inflight.depth")
    assert max(in_flight) >= 1 and in_flight[-1] == 0
    assert udp.values("outbox.bytes") == [0], "nothing was held back: nothing was ever disconnected-queued"
    assert snapshot_gauges["outbox.depth"] == 0 and snapshot_gauges["inflight.depth"] == 0

    connect_ms = udp.values("connect.duration")
    assert len(connect_ms) == 2 and all(0 < ms < 2_000 for ms in connect_ms)
    downtime_ms = udp.values("downtime")
    assert len(downtime_ms) == 1 and 0 < downtime_ms[0] < 2_000
    ack_ms = udp.values("latency.ack")
    assert len(ack_ms) == 10 and all(0 <= ms < 2_000 for ms in ack_ms)
    wire_ms = udp.values("latency.enqueue_to_wire")
    assert len(wire_ms) >= 12 and all(0 <= ms < 2_000 for ms in wire_ms)  # 10 statuses + 2 heartbeats
    # statsd gets milliseconds; the snapshot keeps seconds.
    assert timings["latency.ack"]["count"] == 10
    assert timings["latency.ack"]["max"] * 1000 == pytest.approx(max(ack_ms), abs=1e-3)
    assert timings["downtime"]["max"] * 1000 == pytest.approx(downtime_ms[0], abs=1e-3)


async def test_statsd_prefix_is_configurable(sim: FacilitatorSimulator) -> None:
    udp = StatsdListener(prefix="validator7.facilitator")
    try:
        config = fast_config(
            sim.url, statsd_host="127.0.0.1", statsd_port=udp.port, statsd_prefix="validator7.facilitator"
        )
        async with running_client(config) as run:
            await udp.wait_for(lambda: udp.total("connect.successes") == 1, 5, "connect under the custom prefix")
            assert run.counters["connect.successes"] == 1, "in-memory names carry no prefix"
        assert udp.stats and all(stat.name.startswith("validator7.facilitator.") for stat in udp.stats)
        assert not [stat for stat in udp.stats if "facilitator_client" in stat.name]
        assert udp.unparsed == []
    finally:
        udp.close()


@pytest.mark.parametrize(
    ("host", "port", "unusable"),
    [
        pytest.param("statsd.invalid", 8125, True, id="unresolvable-host"),
        pytest.param("statsd..bad-name", 8125, True, id="malformed-host"),
        # (a port out of range is refused by ClientConfig itself: tests/test_hardening.py)
        pytest.param("127.0.0.1", None, False, id="closed-port"),
    ],
)
async def test_a_failing_statsd_address_never_breaks_the_client(
    sim: FacilitatorSimulator, caplog: pytest.LogCaptureFixture, host: str, port: int | None, unusable: bool
) -> None:
    config = fast_config(sim.url, statsd_host=host, statsd_port=port or closed_port(socket.SOCK_DGRAM))
    job_uuid = sim.register_job(str(uuid.uuid4()))
    with caplog.at_level(logging.WARNING, logger="streams.metrics"):
        async with running_client(config) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            report = run.client._statuses.open(job_uuid)
            for status in ("received", "accepted", "executor_ready"):
                report(status)
                await sim.wait_for(lambda: sim.stored[job_uuid][-1] == status, 5, f"{status} stored")  # noqa: B023
            await sim.drop()
            await wait_until(lambda: len(run.events_of("CONNECTED")) == 2, 5, "reconnected")
            await wait_until(lambda: run.counters.get("acks.success", 0) == 3, 5, "acks counted in memory")
    assert sim.stored[job_uuid] == ["sent", "received", "accepted", "executor_ready"]
    assert run.counters["connect.successes"] == 2
    # An address that cannot be used is said once, at construction; a closed port is UDP's silence.
    warnings = [r.getMessage() for r in caplog.records if r.name == "streams.metrics"]
    assert len(warnings) == (1 if unusable else 0), warnings
    assert not unusable or "metrics stay in memory" in warnings[0]


def test_metrics_guard_every_statsd_call(caplog: pytest.LogCaptureFixture) -> None:
    """A statsd client that raises (here: used after close()) costs one warning, never an exception."""
    metrics = Metrics("127.0.0.1", closed_port(socket.SOCK_DGRAM))
    metrics.close()  # the statsd client's socket is gone: every send now raises inside statsd
    with caplog.at_level(logging.WARNING, logger="streams.metrics"):
        for _ in range(3):
            metrics.incr("connect.attempts")
            metrics.gauge("connected", 1)
            metrics.gauge("connected", 0)
            metrics.timing("latency.ack", 0.25)
    assert metrics.counter("connect.attempts") == 3
    assert metrics.gauge_value("connected") == 0
    assert metrics.samples("latency.ack") == [0.25] * 3
    assert len([r for r in caplog.records if "statsd" in r.getMessage()]) == 1, "logged once, not per call"
    metrics.close()  # idempotent


# -- metrics.snapshot() --------------------------------------------------------------------------


async def test_snapshot_holds_counters_gauges_and_timings_and_is_json(sim: FacilitatorSimulator) -> None:
    async with running_client(fast_config(sim.url)) as run:
        metrics = run.client.metrics
        await wait_until(lambda: run.client.is_connected, 5, "connected")
        job = await sim.send_job_request()  # the simulated dispatcher plays it to completion
        await sim.wait_for(lambda: "completed" in sim.stored[job["uuid"]], 5, "job completed")
        await wait_until(lambda: metrics.gauge_value("jobs.active") == 0, 5, "job finished")
        await wait_until(lambda: run.counters.get("acks.success", 0) == 6, 5, "six acks")
        snapshot = metrics.snapshot()

    assert set(snapshot) == {"counters", "gauges", "timings"}
    counters, gauges, timings = snapshot["counters"], snapshot["gauges"], snapshot["timings"]
    assert counters["connect.attempts"] == counters["connect.successes"] == 1
    assert counters["messages.received.V2JobRequest"] == 1
    assert counters["messages.received.Response"] == 6
    assert counters["messages.sent.V0JobStatusUpdate"] == 6  # received ... completed
    assert counters["jobs.dispatched"] == 1
    assert "jobs.failed" not in counters
    assert gauges == {
        "connected": 1, "outbox.depth": 0, "outbox.bytes": 0, "inflight.depth": 0, "jobs.active": 0
    }
    assert set(timings) >= {"connect.duration", "latency.enqueue_to_wire", "latency.ack"}
    assert "downtime" not in timings, "no outage yet"
    ack = timings["latency.ack"]
    assert set(ack) == {"count", "mean", "p50", "p99", "max"}
    assert ack["count"] == 6
    assert 0 <= ack["p50"] <= ack["p99"] <= ack["max"] < 2.0, "seconds, not milliseconds"
    assert json.loads(json.dumps(snapshot, allow_nan=False)) == orjson.loads(orjson.dumps(snapshot))
    # A copy: mutating it changes nothing inside.
    snapshot["counters"]["connect.attempts"] = 99
    assert run.client.metrics.counter("connect.attempts") == 1


# -- one test per SystemEvent ------------------------------------------------------------------


async def test_connected_event_carries_connection_id_duration_and_downtime(sim: FacilitatorSimulator) -> None:
    async with running_client(fast_config(sim.url)) as run:
        await wait_until(lambda: bool(run.events_of("CONNECTED")), 5, "connected")
        await sim.drop()
        await wait_until(lambda: len(run.events_of("CONNECTED")) == 2, 5, "reconnected")
        first, second = run.events_of("CONNECTED")
        disconnected = only(run, "DISCONNECTED")
    for event in (first, second):
        assert_event_shape(event)
        assert event.subtype == "connected"
        assert 0 < event.data["connect_duration"] < 2.0
    assert (first.data["connection_id"], second.data["connection_id"]) == (1, 2)
    assert first.data["downtime"] is None, "no outage before the first connection"
    gap = second.timestamp - disconnected.timestamp
    assert 0 < second.data["downtime"] <= gap + 0.01
    assert "connection 2" in second.description


async def test_disconnected_event_on_a_drop_says_why_how_long_and_what_was_pending(
    sim: FacilitatorSimulator,
) -> None:
    config = fast_config(sim.url, max_in_flight=3)
    jobs = [sim.register_job(str(uuid.uuid4())) for _ in range(5)]
    async with running_client(config) as run:
        await wait_until(lambda: run.client.is_connected, 5, "connected")
        sim.set_ack_delay(30.0)  # no Response: three updates stay in flight, two wait behind the window
        for job_uuid in jobs:
            run.client._statuses.open(job_uuid)("received")
        await sim.wait_for(lambda: len(status_frames(sim)) == 3, 5, "three updates on the wire")
        await wait_until(lambda: run.client.pending.in_flight == 3, 5, "three in flight")
        sim.set_ack_delay(0.0)
        await sim.drop()
        await wait_until(lambda: bool(run.events_of("DISCONNECTED")), 5, "disconnected")
        await sim.wait_for(lambda: all(sim.stored[j] == ["sent", "received"] for j in jobs), 5, "all stored")
        event = only(run, "DISCONNECTED")
        connected = run.events_of("CONNECTED")[0]
        counters = run.counters
    assert_event_shape(event)
    assert event.subtype == "1006"
    assert event.data["close_code"] == 1006
    assert event.data["close_reason"] == "connection lost without a close frame"
    assert event.data["exception"] == "ConnectionClosedError"
    assert event.data["exception_message"]
    assert event.data["pending_in_flight"] == 3
    assert event.data["pending_outbox"] == 2
    assert event.data["connection_id"] == 1
    assert event.data["retry_in"] is not None and 0 <= event.data["retry_in"] <= config.backoff_cap
    lived = event.timestamp - connected.timestamp
    assert event.data["lived"] == pytest.approx(lived, abs=0.05)
    assert "1006" in event.description and "ConnectionClosedError" in event.description
    assert counters["disconnects.1006"] == 1
    assert counters["messages.requeued"] == 3
    assert counters["messages.resent.V0JobStatusUpdate"] == 3


async def test_disconnected_event_carries_the_facilitators_close_code_and_reason(
    sim: FacilitatorSimulator,
) -> None:
    async with running_client(fast_config(sim.url)) as run:
        await wait_until(lambda: run.client.is_connected, 5, "connected")
        await sim.close(4001, "maintenance window")
        await wait_until(lambda: len(run.events_of("CONNECTED")) == 2, 5, "reconnected")
        closed = only(run, "DISCONNECTED")
    stopped = run.events_of("DISCONNECTED")[-1]
    assert_event_shape(closed)
    assert closed.subtype == "4001"
    assert (closed.data["close_code"], closed.data["close_reason"]) == (4001, "maintenance window")
    assert closed.data["exception"] == "ConnectionClosedError"
    assert "4001" in closed.data["exception_message"] and "maintenance window" in closed.data["exception_message"]
    assert (closed.data["pending_outbox"], closed.data["pending_in_flight"]) == (0, 0)
    # stop(): the client's own close, and no retry.
    assert_event_shape(stopped)
    assert (stopped.data["close_code"], stopped.data["retry_in"]) == (1000, None)
    assert stopped.data["exception"] == "ConnectionClosedOK"
    assert run.counters["disconnects.4001"] == run.counters["disconnects.1000"] == 1


@pytest.mark.parametrize(
    ("refusal", "error_type", "text", "close_code"),
    [
        ("validator_not_found", "auth.validator_not_found", "Validator not found", 3001),
        ("signature_invalid", "auth.signature_invalid", "Invalid signature", 3000),
    ],
)
async def test_auth_failed_event_carries_the_facilitators_error_text_and_close_code(
    sim: FacilitatorSimulator, refusal: Any, error_type: str, text: str, close_code: int
) -> None:
    sim.refuse_next_auth(refusal)
    async with running_client(fast_config(sim.url, backoff_cap=0.1)) as run:
        await wait_until(lambda: bool(run.events_of("CONNECTED")), 5, "connected after the refusal")
        event = only(run, "AUTH_FAILED")
        counters = run.counters
    assert_event_shape(event)
    assert event.subtype == "auth"
    assert event.data["close_code"] == close_code
    [error] = event.data["errors"]
    assert (error["type"], error["msg"]) == (error_type, text)
    assert error["help"], "the facilitator's help text is kept"
    assert error_type in event.description and text in event.description
    assert event.data["retry_in"] == pytest.approx(0.1)
    assert counters["auth.failures"] == 1
    assert counters["connect.failures"] == 1
    assert counters["connect.attempts"] == 2


async def test_connect_failed_event_when_nothing_listens() -> None:
    config = fast_config(f"ws://127.0.0.1:{closed_port()}/ws/v0/", backoff_cap=0.05)
    async with running_client(config) as run:
        await wait_until(lambda: len(run.events_of("CONNECT_FAILED")) >= 2, 5, "two failed attempts")
        first, second = run.events_of("CONNECT_FAILED")[:2]
        counters = run.counters
    assert_event_shape(first)
    assert (first.data["attempt"], second.data["attempt"]) == (1, 2)
    assert first.data["close_code"] is None
    assert first.data["exception"] and first.data["exception_message"]
    assert "never connected" in first.description
    assert 0 <= first.data["retry_in"] <= 0.05
    assert counters["connect.failures"] >= 2
    assert "connect.successes" not in counters
    assert not run.events_of("CONNECTED") and not run.events_of("DISCONNECTED")


async def test_error_response_event_for_a_status_of_an_unknown_job(sim: FacilitatorSimulator) -> None:
    unknown = str(uuid.uuid4())  # never registered: the facilitator answers job.not_found
    known = sim.register_job(str(uuid.uuid4()))
    async with running_client(fast_config(sim.url)) as run:
        await wait_until(lambda: run.client.is_connected, 5, "connected")
        run.client._statuses.open(unknown)("received")
        run.client._statuses.open(known)("received")
        await wait_until(lambda: run.counters.get("acks.success", 0) == 1, 5, "the known job's ack")
        event = only(run, "ERROR_RESPONSE")
        counters = run.counters
    assert sim.stored[known] == ["sent", "received"]
    assert [f["uuid"] for f in status_frames(sim)] == [unknown, known], "an error Response is not retried"
    assert_event_shape(event)
    assert event.subtype == "job.not_found"
    assert (event.data["job_uuid"], event.data["status"]) == (unknown, "received")
    [error] = event.data["errors"]
    assert (error["type"], error["msg"]) == ("job.not_found", "Job not found")
    assert "Job not found" in event.description and unknown in event.description
    assert counters["acks.error.job.not_found"] == 1
    assert "acks.duplicate" not in counters


async def test_error_response_without_errors_and_a_response_with_nothing_in_flight(
    sim: FacilitatorSimulator,
) -> None:
    job_uuid = sim.register_job(str(uuid.uuid4()))
    async with running_client(fast_config(sim.url)) as run:
        await wait_until(lambda: run.client.is_connected, 5, "connected")
        sim.set_ack_delay(30.0)  # the simulator's own Response never comes in time
        run.client._statuses.open(job_uuid)("received")
        await sim.wait_for(lambda: len(status_frames(sim)) == 1, 5, "the update on the wire")
        await sim.send_raw('{"status": "error", "errors": []}')  # answers the update in flight
        await wait_until(lambda: bool(run.events_of("ERROR_RESPONSE")), 5, "error response reported")
        await sim.send_raw(SUCCESS)  # nothing is in flight now
        await wait_until(lambda: bool(run.events_of("UNEXPECTED_RESPONSE")), 5, "unexpected response reported")
        error, unexpected = only(run, "ERROR_RESPONSE"), only(run, "UNEXPECTED_RESPONSE")
        counters = run.counters
        assert run.client.is_connected
    assert_event_shape(error)
    assert error.subtype == "unknown", "the same name as the metric when the facilitator gives no error type"
    assert counters["acks.error.unknown"] == 1
    assert_event_shape(unexpected)
    assert unexpected.subtype == "success"
    assert unexpected.data["errors"] == []
    assert counters["messages.unexpected_responses"] == 1


async def test_metric_names_built_from_the_wire_are_statsd_safe(
    sim: FacilitatorSimulator, statsd_listener: StatsdListener
) -> None:
    """An error type is the facilitator's text: a ``:`` or ``|`` in it must not corrupt the statsd line."""
    udp = statsd_listener
    job_uuid = sim.register_job(str(uuid.uuid4()))
    weird = '{"status": "error", "errors": [{"msg": "odd", "type": "db:timeout|c @ 50%"}]}'
    async with running_client(fast_config(sim.url, statsd_host="127.0.0.1", statsd_port=udp.port)) as run:
        await wait_until(lambda: run.client.is_connected, 5, "connected")
        sim.set_ack_delay(30.0)
        run.client._statuses.open(job_uuid)("received")
        await sim.wait_for(lambda: len(status_frames(sim)) == 1, 5, "the update on the wire")
        await sim.send_raw(weird)  # answers the update in flight
        await udp.wait_for(lambda: udp.total("acks.error.db_timeout_c___50_") == 1, 5, "the sanitized counter")
        event = only(run, "ERROR_RESPONSE")
        assert run.client.metrics.counter("acks.error.db:timeout|c @ 50%") == 1, "lookups take the raw name too"
    assert udp.unparsed == []
    assert event.subtype == "db:timeout|c @ 50%", "the event keeps the facilitator's text as is"


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
async def test_malformed_message_event_has_a_truncated_excerpt(sim: FacilitatorSimulator, binary: bool) -> None:
    garbage = "<html>" + "garbage! " * 20_000  # ~180 kB of not-JSON
    frame: str | bytes = garbage.encode() if binary else garbage
    async with running_client(fast_config(sim.url)) as run:
        await wait_until(lambda: run.client.is_connected, 5, "connected")
        await sim.send_raw(frame)
        job = await sim.send_job_request()
        await sim.wait_for(lambda: "completed" in sim.stored[job["uuid"]], 5, "the next job still runs")
        event = only(run, "MALFORMED_MESSAGE")
        assert run.client.is_connected
        counters = run.counters
    assert_event_shape(event)
    excerpt = event.data["excerpt"]
    assert len(excerpt) < 300, "an excerpt, not the frame"
    assert "<html>garbage! garbage!" in excerpt
    # One excerpt format (streams.protocol.excerpt) for text and binary frames: the start, and how much was left out.
    assert excerpt == f"{garbage[:200]}…(+{len(frame) - 200} more)"
    assert len(event.data["error"]) <= 500
    assert len(event.description) < 1000
    assert counters["messages.malformed"] == 1
    assert counters["messages.received.V2JobRequest"] == 1


async def test_message_dropped_events_for_status_updates_past_the_outbox_bound() -> None:
    """Never connected (nothing listens), outbox bound 3: five updates drop the two oldest, reported."""
    config = fast_config(f"ws://127.0.0.1:{closed_port()}/ws/v0/", outbox_max_messages=3)
    jobs = [str(uuid.uuid4()) for _ in range(5)]
    async with running_client(config) as run:
        await wait_until(lambda: bool(run.events_of("CONNECT_FAILED")), 5, "a failed attempt")
        for job_uuid in jobs:
            run.client._statuses.open(job_uuid)("received")
        dropped = run.events_of("MESSAGE_DROPPED")
        counters = run.counters
        # Depth gauges are published once per event-loop iteration, not per message.
        await wait_until(lambda: run.client.metrics.gauge_value("outbox.depth") == 3, 2, "outbox.depth 3")
        depth = run.client.metrics.gauge_value("outbox.depth")
    assert len(dropped) == 2
    for event, job_uuid in zip(dropped, jobs[:2], strict=True):
        assert_event_shape(event)
        assert event.subtype == "V0JobStatusUpdate"
        assert event.data == {
            "message_type": "V0JobStatusUpdate", "reason": "outbox_full", "count": 1,
            "job_uuid": job_uuid, "status": "received", "frame_bytes": 118, "limit": None, "errors": [],
            "first_job_uuid": job_uuid, "last_job_uuid": job_uuid,
            "excerpt": orjson.dumps(
                {"message_type": "V0JobStatusUpdate", "uuid": job_uuid, "status": "received", "metadata": None}
            ).decode(),
        }
        assert job_uuid in event.description and "outbox_full" in event.description
    assert counters["messages.dropped.V0JobStatusUpdate"] == 2
    assert depth == 3
    # Stopped while still disconnected: the three held updates are reported too (in one summary
    # event per message type, not one per message), not lost silently.
    at_stop = run.events_of("MESSAGE_DROPPED")[2:]
    summaries = [
        (e.data["reason"], e.data["count"], e.data["first_job_uuid"], e.data["last_job_uuid"]) for e in at_stop
    ]
    assert summaries == [("disposed", 3, jobs[2], jobs[4])]


async def test_stopping_while_disconnected_reports_every_unsent_status_update(sim: FacilitatorSimulator) -> None:
    jobs = [sim.register_job(str(uuid.uuid4())) for _ in range(4)]
    async with running_client(fast_config(sim.url, backoff_cap=0.3, drain_timeout=0.2)) as run:
        await wait_until(lambda: run.client.is_connected, 5, "connected")
        sim.set_ack_delay(30.0)
        for job_uuid in jobs[:2]:
            run.client._statuses.open(job_uuid)("received")
        await sim.wait_for(lambda: len(status_frames(sim)) == 2, 5, "two updates in flight")
        sim.set_ack_delay(0.0)  # (it delays the auth Responses of later connections too)
        sim.refuse_next_auth("signature_invalid", times=100)  # stays disconnected from now on
        await sim.drop()
        await wait_until(lambda: run.client.pending.wire == 2, 5, "the two requeued")
        for job_uuid in jobs[2:]:
            run.client._statuses.open(job_uuid)("received")  # held: the outbox is closed
        assert run.client.pending.held == 2
    (summary,) = run.events_of("MESSAGE_DROPPED")  # one per message type, with the count
    assert summary.data["reason"] == "disposed" and summary.data["count"] == len(jobs)
    assert (summary.data["first_job_uuid"], summary.data["last_job_uuid"]) == (jobs[0], jobs[-1])
    assert run.counters["messages.dropped.V0JobStatusUpdate"] == len(jobs)


async def test_message_dropped_events_for_spec_updates_past_max_pending_specs() -> None:
    config = fast_config(f"ws://127.0.0.1:{closed_port()}/ws/v0/", max_pending_specs=2)
    async with running_client(config) as run:
        await wait_until(lambda: bool(run.events_of("CONNECT_FAILED")), 5, "a failed attempt")
        for n in range(5):
            run.client.publish_specs(spec(n))
        dropped = run.events_of("MESSAGE_DROPPED")
        counters = run.counters
    assert len(dropped) == 3
    for event in dropped:
        assert_event_shape(event)
        assert event.subtype == "V0MachineSpecsUpdate"
        assert event.data["message_type"] == "V0MachineSpecsUpdate"
        assert (event.data["reason"], event.data["count"]) == ("outbox_full", 1)
        assert event.data["job_uuid"] is None and event.data["status"] is None
    assert counters["messages.dropped.V0MachineSpecsUpdate"] == 3
    assert "messages.dropped.V0Heartbeat" not in counters, "heartbeats are coalesced, not dropped"


async def test_job_dispatch_failed_event(sim: FacilitatorSimulator) -> None:
    async def handle(job: V2JobRequest, report: Any) -> None:
        report(JobStatus.ACCEPTED)
        raise ValueError(f"no executor for {job.executor_class}")

    async with running_client(fast_config(sim.url), handle) as run:
        await wait_until(lambda: run.client.is_connected, 5, "connected")
        job = await sim.send_job_request()
        await sim.wait_for(lambda: "horde_failed" in sim.stored[job["uuid"]], 5, "horde_failed stored")
        await wait_until(lambda: run.client.metrics.gauge_value("jobs.active") == 0, 5, "job finished")
        event = only(run, "JOB_DISPATCH_FAILED")
        counters = run.counters
    assert_event_shape(event)
    assert event.subtype == "ValueError"
    assert event.data == {
        "job_uuid": job["uuid"], "exception": "ValueError", "message": "no executor for spin_up-4min.gpu-24gb",
    }
    assert job["uuid"] in event.description
    assert counters["jobs.dispatched"] == counters["jobs.failed"] == 1
    assert sim.stored[job["uuid"]] == ["sent", "received", "accepted", "horde_failed"]


async def test_cheat_handler_failed_event(sim: FacilitatorSimulator) -> None:
    seen: list[str] = []

    async def on_cheat(report: V0JobCheated) -> None:
        seen.append(report.job_uuid)
        raise KeyError("unknown trusted job")

    async with running_client(fast_config(sim.url), on_cheat=on_cheat) as run:
        await wait_until(lambda: run.client.is_connected, 5, "connected")
        job_uuid = str(uuid.uuid4())
        await sim.send_cheat_report(job_uuid)
        await wait_until(lambda: bool(run.events_of("CHEAT_HANDLER_FAILED")), 5, "handler failure reported")
        event = only(run, "CHEAT_HANDLER_FAILED")
        counters = run.counters
        assert run.client.is_connected
    assert seen == [job_uuid]
    assert_event_shape(event)
    assert event.subtype == "KeyError"
    assert event.data == {"job_uuid": job_uuid, "exception": "KeyError", "message": "'unknown trusted job'"}
    assert counters["cheat.reports"] == counters["cheat.handler_failures"] == 1


async def test_source_failed_event_when_the_spec_source_raises(sim: FacilitatorSimulator) -> None:
    async def specs() -> AsyncIterator[V0MachineSpecsUpdate]:
        yield spec(1)
        raise OSError("nvidia-smi vanished")

    async with running_client(fast_config(sim.url), spec_updates=specs()) as run:
        await wait_until(lambda: bool(run.events_of("SOURCE_FAILED")), 5, "source failure reported")
        await sim.wait_for(lambda: len(sim.spec_updates) == 1, 5, "the spec before the failure is sent")
        event = only(run, "SOURCE_FAILED")
    assert_event_shape(event)
    assert event.subtype == "spec_updates"
    assert event.data == {"exception": "OSError", "message": "nvidia-smi vanished"}


# -- host subscribers that raise -----------------------------------------------------------------


async def test_raising_subscribers_on_events_and_state_never_break_the_client(sim: FacilitatorSimulator) -> None:
    job_uuid = sim.register_job(str(uuid.uuid4()))
    calls = {"events": 0, "state": 0}
    armed = False

    def bad_events(event: SystemEvent) -> None:
        calls["events"] += 1
        raise RuntimeError("host event store is down")

    def bad_state(state: ConnectionState) -> None:
        calls["state"] += 1
        if armed:  # the current state is delivered during subscribe(); raise from then on
            raise RuntimeError("host state callback bug")

    config = fast_config(sim.url)
    async with running_client(config) as run:
        run.client.events.subscribe(bad_events)
        run.client.state.subscribe(bad_state)
        armed = True
        late: list[SystemEvent] = []
        run.client.events.subscribe(late.append)  # subscribed after the raising one: still served
        await wait_until(lambda: run.client.is_connected, 5, "connected")
        report = run.client._statuses.open(job_uuid)
        report("received")
        await sim.wait_for(lambda: sim.stored[job_uuid][-1] == "received", 5, "received stored")
        await sim.drop()
        await wait_until(lambda: len(run.events_of("CONNECTED")) == 2, 5, "reconnected")
        report("accepted")
        await sim.wait_for(lambda: sim.stored[job_uuid][-1] == "accepted", 5, "accepted stored")
        counters, seen = run.counters, dict(calls)
        failures = run.events_of("SUBSCRIBER_FAILED")
    assert [e.type for e in late if e.type != "SUBSCRIBER_FAILED"][:3] == ["CONNECTED", "DISCONNECTED", "CONNECTED"]
    assert seen["events"] >= 3, "a raising subscriber keeps receiving events"
    assert seen["state"] >= 7, "and state changes (initial, connecting, authenticating, connected, ...)"
    assert counters["events.subscriber_errors"] == seen["events"]
    assert counters["state.subscriber_errors"] == seen["state"] - 1, "all but the one delivered in subscribe()"
    # One event per stream and exception type, then only the counters grow.
    assert sorted(e.subtype for e in failures) == ["events", "state"]
    for event in failures:
        assert_event_shape(event)
        assert event.data["exception"] == "RuntimeError"
    assert {e.data["message"] for e in failures} == {"host event store is down", "host state callback bug"}


async def test_a_state_subscriber_that_raises_on_the_current_value_stays_subscribed(
    sim: FacilitatorSimulator,
) -> None:
    seen: list[ConnectionState] = []

    def bad_state(state: ConnectionState) -> None:
        seen.append(state)
        raise RuntimeError("host state callback bug")

    async with running_client(fast_config(sim.url)) as run:
        run.client.state.subscribe(bad_state)
        await wait_until(lambda: ConnectionState.CONNECTED in seen, 5, "the subscriber sees CONNECTED")


async def test_every_event_of_a_rough_session_is_json(sim: FacilitatorSimulator) -> None:
    """Everything at once, then: every event's data survives orjson and strict json."""

    async def handle(job: V2JobRequest, report: Any) -> None:
        raise RuntimeError("boom")

    async def on_cheat(report: V0JobCheated) -> None:
        raise RuntimeError("cheat boom")

    sim.refuse_next_auth("signature_invalid")
    config = fast_config(sim.url, backoff_cap=0.05, max_pending_specs=1)
    async with running_client(config, handle, on_cheat=on_cheat) as run:
        await wait_until(lambda: run.client.is_connected, 5, "connected")
        await sim.send_raw(b"\xff\xfe not json")
        await sim.send_job_request()
        await sim.send_job_request(signature={"signature_type": "bittensor"})  # JOB_REJECTED
        await sim.send_cheat_report(str(uuid.uuid4()))
        await sim.send_cheat_report(str(uuid.uuid4()), signature={"signature_type": "bittensor"})  # CHEAT_REJECTED
        run.client._statuses.open(str(uuid.uuid4()))("received")
        before_drop = {"MALFORMED_MESSAGE", "JOB_DISPATCH_FAILED", "CHEAT_HANDLER_FAILED", "ERROR_RESPONSE"}
        await wait_until(lambda: before_drop <= {str(e.type) for e in run.events}, 5, "four kinds of failure")
        sim.refuse_next_auth("validator_not_found", times=2)
        await sim.drop()
        await wait_until(lambda: not run.client.is_connected, 5, "disconnected")
        for n in range(3):
            run.client.publish_specs(spec(n))
        await wait_until(lambda: len(run.events_of("CONNECTED")) == 2, 5, "reconnected")
    kinds = {str(e.type) for e in run.events}
    assert kinds >= {
        "CONNECTED", "DISCONNECTED", "AUTH_FAILED", "MALFORMED_MESSAGE", "JOB_DISPATCH_FAILED",
        "CHEAT_HANDLER_FAILED", "ERROR_RESPONSE", "MESSAGE_DROPPED", "JOB_REJECTED", "CHEAT_REJECTED",
    }, kinds  # CONFIG_WARNING (only for verify_signatures=False): tests/test_client_signatures.py checks its shape
    for event in run.events:
        assert_event_shape(event)
    lines = b"".join(orjson.dumps(e.to_dict()) + b"\n" for e in run.events)
    assert [json.loads(line)["type"] for line in lines.splitlines()] == [str(e.type) for e in run.events]


def test_event_fields_cover_every_event_type() -> None:
    assert set(EVENT_FIELDS) == {str(t) for t in EventType}


async def test_a_config_without_statsd_keeps_metrics_in_memory() -> None:
    config = ClientConfig(url="ws://127.0.0.1:1/ws/v0/")
    client = FacilitatorClient(config, signer=ALICE, dispatcher=SimulatedDispatcher())
    assert client.metrics.snapshot() == {"counters": {}, "gauges": {}, "timings": {}}, "before start(): empty"
    await client.stop()
    metrics = Metrics()
    metrics.incr("x")
    metrics.timing("t", 0.5)
    assert metrics.snapshot() == {
        "counters": {"x": 1},
        "gauges": {},
        "timings": {"t": {"count": 1, "mean": 0.5, "p50": 0.5, "p99": 0.5, "max": 0.5}},
    }


async def test_statsd_lines_are_batched_per_loop_iteration() -> None:
    """One datagram per metric call would be a system call each; they go out packed, once per iteration."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.setblocking(False)
    try:
        metrics = Metrics("127.0.0.1", listener.getsockname()[1], prefix="batch")
        for n in range(50):
            metrics.incr("messages.sent.V0JobStatusUpdate")
            metrics.timing("latency.ack", n / 1000)
        datagrams: list[bytes] = []
        deadline = time.monotonic() + 2
        while sum(d.count(b"\n") + 1 for d in datagrams) < 100 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)  # let the scheduled flush run, then read what arrived
            with contextlib.suppress(BlockingIOError):
                while True:
                    datagrams.append(listener.recv(65536))
        lines = [line for d in datagrams for line in d.decode().split("\n")]
        assert len(lines) == 100
        assert lines[0] == "batch.messages.sent.V0JobStatusUpdate:1|c"
        assert len(datagrams) < 20, "packed into few datagrams (512-byte UDP payloads)"
        metrics.close()
    finally:
        listener.close()


class _RecordingSink:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float]] = []

    def incr(self, name: str, count: float) -> None:
        self.calls.append(("incr", name, count))

    def gauge(self, name: str, value: float) -> None:
        self.calls.append(("gauge", name, value))

    def timing(self, name: str, seconds: float) -> None:
        self.calls.append(("timing", name, seconds))

    def close(self) -> None:
        pass


async def test_a_tally_hands_counts_over_once_per_loop_iteration_and_reads_are_exact() -> None:
    sink = _RecordingSink()
    metrics = Metrics(sinks=[sink])
    tally = metrics.tally()
    for _ in range(3):
        tally.incr("messages.sent.V0JobStatusUpdate")
    tally.timing("latency.ack", 0.5)
    tally.timing("latency.ack", 0.25)
    assert sink.calls == [], "nothing per message: handed over once per loop iteration"
    assert metrics.counter("messages.sent.V0JobStatusUpdate") == 3, "a read hands the tally over first"
    assert metrics.samples("latency.ack") == [0.5, 0.25]
    assert sink.calls == [
        ("incr", "messages.sent.V0JobStatusUpdate", 3), ("timing", "latency.ack", 0.5), ("timing", "latency.ack", 0.25),
    ]
    tally.incr("acks.success")
    await wait_until(lambda: sink.calls[-1] == ("incr", "acks.success", 1), 5, "the hand-over the tally scheduled")
    assert metrics.snapshot()["counters"]["acks.success"] == 1
    assert metrics.snapshot()["timings"]["latency.ack"]["count"] == 2


def test_a_tally_used_outside_an_event_loop_hands_over_at_once() -> None:
    metrics = Metrics()
    tally = metrics.tally()
    tally.incr("x")
    tally.timing("t", 1.0)
    assert metrics._counters == {"x": 1} and list(metrics._timings["t"]) == [1.0]
