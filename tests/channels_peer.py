"""The validator's side of the channel layer, as a separate process for the tests.

    python -m tests.channels_peer specs URL --first N --count M [--malformed-after K]
        sends M spec messages (batch ids ``batch-N`` … ) to ``machine_spec_sending`` as the validator's spec
        producer does (a malformed one after the K-th), then exits.
    python -m tests.channels_peer driver URL --jobs N [--jobs-channel C] [--step-delay S] [--stagger S]
        the job driver: receives job hand-offs on C (``{"job_uuid", "fail", "malformed"}`` or ``{"job": raw job}``,
        env FAIL: the job fails) and publishes each
        job's statuses to ``job_status_updates__{uuid}`` in the validator's message shape; exits after N jobs.

Prints ``done`` at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from channels_redis.core import RedisChannelLayer

JOBS_CHANNEL = "test_job_driver"
STEPS = ("accepted", "executor_ready", "volumes_ready", "execution_done")


def spec_message(index: int) -> dict[str, Any]:
    """A spec producer message: what ``machine_spec_sending`` carries (no validator hotkey)."""
    return {
        "specs": {
            "cpu": {"count": 8 + index, "model": "AMD EPYC 7763", "frequency": 2450.0, "clocks": [2450.0]},
            "gpu": {"capacity": 24576, "count": 1, "details": [{"name": "NVIDIA RTX A6000", "capacity": 49140}]},
            "ram": {"total": 65536000, "free": 32768000, "available": 40000000, "used": 25536000},
            "hard_disk": {"total": 1000000000, "free": 500000000, "used": 500000000},
            "has_docker": True,
            "os": "Ubuntu 22.04",
        },
        "miner_hotkey": f"5Miner{index:04d}",
        "batch_id": f"batch-{index}",
    }


def status_message(job_uuid: str, status: str, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the validator's job driver sends: ``{"type": "job_status_update", "payload": JobStatusUpdate JSON}``."""
    payload = {"message_type": "V0JobStatusUpdate", "uuid": job_uuid, "status": status, "metadata": metadata}
    return {"type": "job_status_update", "payload": payload}


def final_metadata(job_uuid: str, fail: bool) -> tuple[str, dict[str, Any]]:
    if fail:
        details = {"reason": "nonzero_return_code", "stage": "execution", "message": "exit 1",
                   "docker_process_exit_status": 1}
        return "failed", {"job_failure_details": details}
    return "completed", {"miner_response": {"docker_process_stdout": f"done {job_uuid}", "docker_process_stderr": ""}}


async def send_specs(layer: RedisChannelLayer, first: int, count: int, malformed_after: int | None) -> None:
    for index in range(first, first + count):
        await layer.send("machine_spec_sending", spec_message(index))
        if malformed_after is not None and index == first + malformed_after - 1:
            await layer.send("machine_spec_sending", {"specs": "not an object", "miner_hotkey": "5Bad"})


async def drive(layer: RedisChannelLayer, jobs: int, jobs_channel: str, step_delay: float, stagger: float) -> None:
    async def play(index: int, job_uuid: str, fail: bool, malformed: bool) -> None:
        channel = f"job_status_updates__{job_uuid}"
        await asyncio.sleep(index * stagger)  # spread the jobs over time, as real ones are
        if malformed:
            await layer.send(channel, {"type": "job_status_update", "payload": {"uuid": job_uuid, "status": "bogus"}})
        for status in STEPS:
            await asyncio.sleep(step_delay)
            await layer.send(channel, status_message(job_uuid, status))
        await asyncio.sleep(step_delay)
        await layer.send(channel, status_message(job_uuid, *final_metadata(job_uuid, fail)))

    async with asyncio.TaskGroup() as group:
        for index in range(jobs):
            handoff = await layer.receive(jobs_channel)
            job = handoff.get("job") or {}  # the worked example hands over the whole raw job
            job_uuid = handoff.get("job_uuid") or job["uuid"]
            env = job.get("env") or {}
            fail, malformed = bool(handoff.get("fail") or "FAIL" in env), bool(handoff.get("malformed"))
            group.create_task(play(index, job_uuid, fail, malformed))


async def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("command", choices=["specs", "driver"])
    parser.add_argument("url")
    parser.add_argument("--first", type=int, default=0)
    parser.add_argument("--count", type=int, default=10)
    parser.add_argument("--malformed-after", type=int, default=None)
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--jobs-channel", default=JOBS_CHANNEL)
    parser.add_argument("--step-delay", type=float, default=0.01)
    parser.add_argument("--stagger", type=float, default=0.0)
    args = parser.parse_args(argv)
    layer = RedisChannelLayer(hosts=[args.url])
    try:
        if args.command == "specs":
            await send_specs(layer, args.first, args.count, args.malformed_after)
        else:
            await drive(layer, args.jobs, args.jobs_channel, args.step_delay, args.stagger)
    finally:
        await layer.close_pools()
    print("done", flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
