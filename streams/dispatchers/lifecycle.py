"""The sample job lifecycle that the simulated dispatcher, the Celery sample task and the demo play.

One script, so that every simulated job goes through the same statuses with the same metadata:
``accepted``, ``executor_ready``, ``volumes_ready``, ``execution_done``, then ``completed`` — or
``failed`` when the job's env has ``SIMULATE=fail``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from streams.protocol import JobStatus

__all__ = ["FAIL_ENV", "IN_PROGRESS", "final_status"]

IN_PROGRESS = (JobStatus.ACCEPTED, JobStatus.EXECUTOR_READY, JobStatus.VOLUMES_READY, JobStatus.EXECUTION_DONE)
"""In-progress statuses a simulated job reports, in order, one step apart."""

FAIL_ENV = ("SIMULATE", "fail")
"""A job whose env has ``SIMULATE=fail`` ends in ``failed`` instead of ``completed``."""


def final_status(job_uuid: str, env: object) -> tuple[JobStatus, dict[str, Any]]:
    """The final status and its metadata for a simulated job with this env."""
    key, value = FAIL_ENV
    if isinstance(env, Mapping) and env.get(key) == value:
        return JobStatus.FAILED, {
            "job_failure_details": {
                "reason": "nonzero_return_code",
                "stage": "execution",
                "message": "simulated failure (env SIMULATE=fail)",
                "docker_process_exit_status": 1,
            }
        }
    return JobStatus.COMPLETED, {
        "miner_response": {"docker_process_stdout": f"simulated {job_uuid}", "docker_process_stderr": ""}
    }
