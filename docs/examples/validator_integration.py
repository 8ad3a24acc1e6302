"""The validator's facilitator client on facilitator-streams: the worked example of docs/MIGRATING.md.

It replaces the legacy ``FacilitatorClient`` (``async with client: await client.run_forever()``) and keeps
everything around it: the spec producer and the job driver still talk over the Django Channels layer,
Prometheus still scrapes the validator, failures still become SystemEvent rows.

The functions under "the validator's own pieces" are where the validator's code goes (each names what it
calls there); here they are small stand-ins, so the module runs as it is::

    FACILITATOR_URL=wss://... REDIS_URL=redis://127.0.0.1:6379/0 HOTKEY_URI=//Alice \
        python docs/examples/validator_integration.py
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import sqlite3
import threading
from typing import Any

from bittensor_wallet import Keypair

from streams import ClientConfig, FacilitatorClient, SystemEvent
from streams.dispatchers import Report
from streams.integrations.channels import ChannelLayer, ChannelsDispatcher, ChannelSpecSource, redis_channel_layer
from streams.integrations.prometheus import PrometheusSink, mark_process_dead, serve_metrics
from streams.protocol import JobStatus, V0JobCheated, V2JobRequest

log = logging.getLogger("facilitator")

JOB_DRIVER_CHANNEL = "organic_job_requests"
"""Stand-in only: where this example hands jobs to a driver (the validator submits a Celery task instead)."""

# --------------------------------------------------------------------------- the validator's own pieces


class NoMinerForJob(Exception):
    """validator: routing.NoMinerForExecutorType / routing.AllMinersBusy."""


async def pick_miner(job: V2JobRequest) -> str:
    """validator: ``(await routing.pick_miner_for_job_request(job_request)).hotkey``."""
    if job.executor_class.startswith("unsupported"):
        raise NoMinerForJob(f"no miner for executor class {job.executor_class}")
    return "5MinerHotkeyStandIn"


async def hand_to_job_driver(layer: ChannelLayer, job: V2JobRequest, miner_hotkey: str) -> None:
    """validator: ``execute_organic_job_request_on_worker(job_request, job_route)``: a Celery task whose job
    driver sends every status to ``job_status_updates__{uuid}``. It is not awaited to the end here: the
    statuses come back over the channel layer, the dispatcher listens for them."""
    await layer.send(JOB_DRIVER_CHANNEL, {"job": job.raw, "miner_hotkey": miner_hotkey})


class EventStore:
    """validator: ``SystemEvent.objects.create(type, subtype, long_description, data)``; here a SQLite table.

    Written by one thread of its own: the event loop only puts rows on a queue, a slow database never stalls it.
    """

    def __init__(self, path: str) -> None:
        self._rows: queue.SimpleQueue[tuple[str, str, str, dict[str, Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._write, args=(path,), name="event-store", daemon=True)
        self._thread.start()

    def record(self, type_: str, subtype: str, long_description: str, data: dict[str, Any]) -> None:
        self._rows.put((type_, subtype, long_description, data))

    def add(self, event: SystemEvent) -> None:
        """A subscriber of ``client.events``: every event the client emits becomes a row."""
        self.record("FACILITATOR_CLIENT", str(event.type), event.description,
                    {**event.data, "subtype": event.subtype, "timestamp": event.timestamp})

    def _write(self, path: str) -> None:
        db = sqlite3.connect(path)
        db.execute("CREATE TABLE IF NOT EXISTS system_events (type, subtype, long_description, data)")
        while (row := self._rows.get()) is not None:
            type_, subtype, description, data = row
            db.execute("INSERT INTO system_events VALUES (?, ?, ?, ?)",
                       (type_, subtype, description, json.dumps(data, default=str)))
            db.commit()
        db.close()

    def close(self) -> None:
        self._rows.put(None)
        self._thread.join(10)


# --------------------------------------------------------------------------- the wiring


def build_client(
    config: ClientConfig, keypair: Keypair, layer: ChannelLayer, store: EventStore, **client_options: Any
) -> FacilitatorClient:
    """The client, fed and drained the way the validator's legacy client was."""

    async def route_job(job: V2JobRequest, report: Report) -> None:
        """The host's job routing (legacy ``process_job_request`` after ``received``; the client verified the job)."""
        try:
            miner_hotkey = await pick_miner(job)
        except NoMinerForJob as exc:
            report(JobStatus.REJECTED, {"job_rejection_details": {
                "rejected_by": "validator", "reason": "no_miner_for_job", "message": str(exc)}})
            return
        await hand_to_job_driver(layer, job, miner_hotkey)

    async def on_cheat(report: V0JobCheated) -> None:
        """legacy ``report_miner_cheated_job`` after its signature check: mark the job, blacklist the miner."""
        store.record("MINER_ORGANIC_JOB_FAILURE", "JOB_CHEATED", "Job was reported as cheated",
                     {"job_uuid": report.job_uuid, "trusted_job_uuid": report.trusted_job_uuid})

    client = FacilitatorClient(
        config,
        signer=keypair,
        dispatcher=ChannelsDispatcher(route_job, layer),                  # statuses: job_status_updates__{uuid}
        on_cheat=on_cheat,
        spec_updates=ChannelSpecSource(layer, keypair.ss58_address),     # specs: machine_spec_sending
        **client_options,
    )
    client.metrics.add_sink(PrometheusSink())                            # the process's global REGISTRY
    client.events.subscribe(store.add)
    client.events.subscribe(lambda event: log.info("%s %s: %s", event.type, event.subtype, event.description))
    return client


async def run(
    config: ClientConfig,
    keypair: Keypair,
    redis_url: str,
    *,
    events_db: str = "facilitator-events.sqlite3",
    prometheus_port: int | None = None,
    **client_options: Any,
) -> None:
    """Run until cancelled (SIGINT, the management command's end): the validator's ``run_facilitator_client``."""
    layer = redis_channel_layer(redis_url)               # validator: channels.layers.get_channel_layer()
    store = EventStore(events_db)
    # A /metrics of its own; or set PROMETHEUS_MULTIPROC_DIR for all processes and the validator's view shows them.
    server = serve_metrics(prometheus_port) if prometheus_port is not None else None
    try:
        client = build_client(config, keypair, layer, store, **client_options)
        await client.start()                            # teardown (drain, close, stop tasks) runs on cancel
    finally:
        if server is not None:
            server.close()
        store.close()
        await layer.close_pools()  # type: ignore[attr-defined]
        mark_process_dead()


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    keypair = Keypair.create_from_uri(os.environ.get("HOTKEY_URI", "//Alice"))  # validator: BITTENSOR_WALLET().hotkey
    # The ValidatorWhitelist (ss58 addresses, space-separated): who may sign jobs besides this hotkey. Empty: only
    # jobs signed by this hotkey run; name the facilitator's signer to run its jobs.
    trusted = tuple(os.environ.get("TRUSTED_SIGNATORIES", "").split())
    config = ClientConfig(url=os.environ["FACILITATOR_URL"], trusted_signatories=trusted)
    port = os.environ.get("PROMETHEUS_PORT")
    try:
        asyncio.run(run(config, keypair, os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
                        prometheus_port=int(port) if port else None))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
