"""The Prometheus sink: real HTTP scrapes of /metrics after scripted sessions, in one process and multiprocess."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import orjson
import pytest

try:
    import prometheus_client
except ImportError as exc:  # pragma: no cover - make test installs the extra
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.skip(f"the prometheus extra is not installed (make test installs it): {exc}", allow_module_level=True)
    raise

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from streams.devtools.simulator import FacilitatorSimulator
from streams.integrations.prometheus import METRICS, MetricSpec, PrometheusSink, serve_metrics
from streams.metrics import Metrics
from tests.helpers import fast_config, running_client, wait_until

ROOT = Path(__file__).resolve().parent.parent
NAMESPACE = "facilitator_client"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    """GET /metrics (real HTTP) and index every sample by name and labels."""
    with urllib.request.urlopen(url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return parse(text)


def parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def series_of(statsd_name: str) -> tuple[MetricSpec, str, dict[str, str]]:
    """The Prometheus series a statsd name goes to, by the documented table."""
    for spec in METRICS:
        label = spec.variable_label
        if label is None and statsd_name == spec.statsd:
            return spec, spec.name, dict(spec.labels)
        if label is not None and statsd_name.startswith(spec.prefix) and len(statsd_name) > len(spec.prefix):
            return spec, spec.name, {**dict(spec.labels), label: statsd_name[len(spec.prefix):]}
    raise AssertionError(f"{statsd_name} is not in the Prometheus table")


def value(samples: Samples, name: str, **labels: str) -> float:
    key = (f"{NAMESPACE}_{name}", frozenset(labels.items()))
    assert key in samples, f"no series {key}; have {sorted(k for k in samples if name in k[0])}"
    return samples[key]


def counter_labels(spec: MetricSpec, labels: dict[str, str]) -> dict[str, str]:
    """Labels of a series, with the ones another statsd name of the same metric sets (acks: error_type="")."""
    names = {label for other in METRICS if other.name == spec.name for label, _ in other.labels}
    names |= {other.variable_label for other in METRICS if other.name == spec.name and other.variable_label}
    return {name: labels.get(name, "") for name in names}


def assert_counters_exported(samples: Samples, counters: dict[str, float]) -> None:
    """Every counter the client counted has the same value in Prometheus."""
    for statsd_name, count in counters.items():
        spec, name, labels = series_of(statsd_name)
        assert value(samples, name, **counter_labels(spec, labels)) == count, statsd_name


async def test_a_scrape_after_a_scripted_session_shows_the_series_and_values(simulator: FacilitatorSimulator) -> None:
    sim = simulator
    registry = CollectorRegistry()
    sink = PrometheusSink(registry)
    server = serve_metrics(0, registry=registry)  # 127.0.0.1, a free port
    try:
        assert server.url.startswith("http://127.0.0.1:")
        before = scrape(server.url)
        assert value(before, "connect_attempts_total") == 0, "unlabelled series exist from the start"
        async with running_client(fast_config(sim.url)) as run:
            run.client.metrics.add_sink(sink)  # after start: what was counted is handed over
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            jobs = [await sim.send_job_request() for _ in range(3)]
            await sim.send_raw("not json")
            await sim.wait_for(lambda: all(sim.stored[j["uuid"]][-1] == "completed" for j in jobs), 10, "jobs done")
            await wait_until(lambda: run.client.pending.pending == 0, 5, "every update acknowledged")
            live = await asyncio.to_thread(scrape, server.url)
            assert value(live, "connected") == 1
        snapshot = run.client.metrics.snapshot()
        samples = await asyncio.to_thread(scrape, server.url)
    finally:
        server.close()
    assert value(samples, "messages_sent_total", type="V0JobStatusUpdate") == 18  # 3 jobs x 6 statuses
    assert value(samples, "acks_total", outcome="success", error_type="") == 18
    assert value(samples, "messages_received_total", type="V2JobRequest") == 3
    assert value(samples, "jobs_dispatched_total") == 3 and value(samples, "messages_malformed_total") == 1
    assert value(samples, "disconnects_total", code="1000") == 1  # the stop
    assert value(samples, "connected") == 0 and value(samples, "jobs_active") == 0
    assert value(samples, "ack_latency_seconds_count") == 18
    latency = snapshot["timings"]["latency.ack"]
    assert value(samples, "ack_latency_seconds_sum") == pytest.approx(latency["mean"] * latency["count"])
    assert value(samples, "ack_latency_seconds_bucket", le="+Inf") == 18
    assert value(samples, "connect_duration_seconds_count") == 1
    assert_counters_exported(samples, snapshot["counters"])
    for name, gauge in snapshot["gauges"].items():
        assert value(samples, series_of(name)[1]) == gauge, name
    with pytest.raises(OSError):  # closed: the port is released
        await asyncio.to_thread(scrape, server.url)


def test_sinks_on_one_registry_share_collectors_and_the_global_registry_is_the_default() -> None:
    registry = CollectorRegistry()
    first, second = Metrics(sinks=[PrometheusSink(registry)]), Metrics(sinks=[PrometheusSink(registry)])
    first.incr("acks.error.job.not_found")
    second.incr("acks.error.job.not_found", 2)
    first.incr("journal.writes")  # a name not in the table still shows up
    first.timing("latency.enqueue_to_wire", 0.002)
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "acks_total", outcome="error", error_type="job.not_found") == 3
    assert value(samples, "journal_writes_total") == 1
    assert value(samples, "enqueue_to_wire_latency_seconds_bucket", le="0.0025") == 1
    assert value(samples, "enqueue_to_wire_latency_seconds_bucket", le="0.001") == 0
    default = PrometheusSink()
    assert default.registry is prometheus_client.REGISTRY
    Metrics(sinks=[default]).incr("cheat.reports")
    assert value(parse(generate_latest().decode()), "cheat_reports_total") >= 1
    with pytest.raises(ValueError, match="namespace must be a Prometheus name"):
        PrometheusSink(registry, namespace="facilitator-client")


def test_statsd_and_prometheus_see_the_same_calls() -> None:
    """statsd stays a sink of its own: same lines as before, whatever else is added."""
    listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listener.bind(("127.0.0.1", 0))
    listener.settimeout(2)
    registry = CollectorRegistry()
    try:
        metrics = Metrics("127.0.0.1", listener.getsockname()[1], sinks=[PrometheusSink(registry)])
        metrics.incr("messages.sent.V0Heartbeat")  # no running loop: statsd sends at once
        metrics.timing("latency.ack", 0.25)
        lines = [listener.recv(65536).decode() for _ in range(2)]
        metrics.close()
    finally:
        listener.close()
    assert lines == ["facilitator_client.messages.sent.V0Heartbeat:1|c", "facilitator_client.latency.ack:250.000000|ms"]
    samples = parse(generate_latest(registry).decode())
    assert value(samples, "messages_sent_total", type="V0Heartbeat") == 1
    assert value(samples, "ack_latency_seconds_sum") == 0.25


def test_a_sink_that_raises_is_logged_once_and_never_breaks_the_client(caplog: pytest.LogCaptureFixture) -> None:
    class Broken:
        def incr(self, name: str, count: float) -> None:
            raise RuntimeError("down")

        gauge = timing = incr

        def close(self) -> None:
            raise RuntimeError("down")

    metrics = Metrics(sinks=[Broken()])
    for _ in range(3):
        metrics.incr("connect.attempts")
        metrics.timing("latency.ack", 0.1)
    metrics.close()
    assert metrics.counter("connect.attempts") == 3
    assert len([r for r in caplog.records if "Broken send failed" in r.getMessage()]) == 1
    with pytest.raises(TypeError, match=r"needs \.incr\(\); object has none"):
        metrics.add_sink(object())  # type: ignore[arg-type]


@pytest.mark.timeout(60)
async def test_multiprocess_mode_sums_the_processes(tmp_path: Path) -> None:
    """Two client processes write to PROMETHEUS_MULTIPROC_DIR; a scrape of a MultiProcessCollector adds them up."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    counters: list[dict[str, float]] = []
    for jobs in (2, 3):
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "tests.prometheus_peer", str(jobs)], cwd=ROOT, env=env,
            capture_output=True, timeout=30,
        )
        assert done.returncode == 0, done.stderr.decode()
        counters.append(orjson.loads(done.stdout.splitlines()[-1]))
    files = await asyncio.to_thread(lambda: [path.name for path in tmp_path.iterdir()])
    assert any(name.startswith("counter_") for name in files), "values went to files"
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))  # type: ignore[no-untyped-call]
    server = serve_metrics(0, registry=registry)
    try:
        samples = await asyncio.to_thread(scrape, server.url)
    finally:
        server.close()
    assert value(samples, "jobs_dispatched_total") == 5
    assert value(samples, "messages_sent_total", type="V0JobStatusUpdate") == 30
    assert value(samples, "ack_latency_seconds_count") == 30
    summed: dict[str, float] = {}
    for each in counters:
        for name, count in each.items():
            summed[name] = summed.get(name, 0) + count
    assert_counters_exported(samples, summed)
    live = [key for key in samples if key[0] == f"{NAMESPACE}_connected"]
    assert all(samples[key] == 0 for key in live), "both processes marked dead: no live gauge left"


def test_the_readme_table_matches_the_mapping() -> None:
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(facilitator_client_[a-z_]+)(\{[^}]*\})?` \| `([^`]+)` \|", readme, re.MULTILINE)
    documented = {(statsd, prom) for prom, _labels, statsd in rows}
    expected = {(spec.statsd, f"{NAMESPACE}_{spec.name}") for spec in METRICS}
    assert documented == expected
