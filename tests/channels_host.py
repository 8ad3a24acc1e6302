"""A host's job routing for ``run --dispatcher channels:tests.channels_host:route_job`` (the CLI tests).

It hands each job to the job driver (tests/channels_peer.py) over the channel layer named by
``TEST_CHANNEL_LAYER``; the driver's statuses come back to the client over ``job_status_updates__{uuid}``.
"""

from __future__ import annotations

import os

from streams.dispatchers import Report
from streams.integrations.channels import ChannelLayer, redis_channel_layer
from streams.protocol import V2JobRequest
from tests.channels_peer import JOBS_CHANNEL

_layer: ChannelLayer | None = None


async def route_job(job: V2JobRequest, report: Report) -> None:
    global _layer
    if _layer is None:
        _layer = redis_channel_layer(os.environ["TEST_CHANNEL_LAYER"])
    await _layer.send(JOBS_CHANNEL, {"job_uuid": job.uuid, "fail": "FAIL" in job.env})
