"""PROTOCOL.md's signature scheme written out once more for the tests, independently of the simulator
and of the client's streams.signatures: the oracle both are checked against (it verifies the real capture).
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from bittensor_wallet import Keypair

__all__ = ["digest", "job_payload", "verifies"]

def digest(timestamp_ns: int, payload: Any) -> bytes:
    return hashlib.blake2b(timestamp_ns.to_bytes(8, "big") + json.dumps(payload, sort_keys=True).encode()).digest()


def verifies(frame: dict[str, Any], payload: Any) -> bool:
    signature = frame["signature"]
    keypair = Keypair(ss58_address=signature["signatory"])
    return bool(keypair.verify(digest(signature["timestamp_ns"], payload), base64.b64decode(signature["signature"])))


def job_payload(job: dict[str, Any]) -> str:
    """PROTOCOL.md's signed fields, written out here independently of the simulator (full-field items)."""
    streaming = job["streaming_details"]
    fields = {
        "executor_class": job["executor_class"],
        "docker_image": job["docker_image"],
        "args": job["args"],
        "env": job["env"],
        "use_gpu": job.get("use_gpu", True),
        "artifacts_dir": job["artifacts_dir"] or "",
        "on_trusted_miner": job["on_trusted_miner"],
        "download_time_limit": job["download_time_limit"],
        "execution_time_limit": job["execution_time_limit"],
        "upload_time_limit": job["upload_time_limit"],
        "streaming_start_time_limit": job["streaming_start_time_limit"],
        "streaming_details": None
        if streaming is None
        else {
            "public_key": streaming["public_key"],
            "executor_ip": streaming.get("executor_ip"),
        },
        "volumes": job["volume"]["volumes"] if job["volume"] else [],
        "uploads": job["output_upload"]["uploads"] if job["output_upload"] else [],
    }
    return json.dumps(fields, separators=(",", ":"), ensure_ascii=False)
