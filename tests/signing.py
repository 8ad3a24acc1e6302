"""Sign job requests and cheat reports the way real traffic is signed (tests only; PROTOCOL.md "Signatures").

The library only verifies; tests need frames that verify (or, tampered, that do not). The signed
payload comes from streams.signatures, which tests/test_signatures.py pins byte for byte against
the real capture and against a hand-written expectation.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from pathlib import Path
from typing import Any

from bittensor_wallet import Keypair

from streams.protocol import V0JobCheated, V2JobRequest
from streams.signatures import job_signed_payload, signature_digest

BOB = Keypair.create_from_uri("//Bob")
"""Who signs the jobs of the real capture."""

_ROOT = Path(__file__).resolve().parents[1]
CAPTURE = next(
    (p for p in (_ROOT / "tests" / "data" / "real-facilitator-session.jsonl",
                 _ROOT / "notebooks" / "data" / "real-facilitator-session.jsonl") if p.exists()),
    _ROOT / "notebooks" / "data" / "real-facilitator-session.jsonl",
)


def signature(
    signer: Keypair, payload: Any, *, timestamp_ns: int | None = None, scope: str = "SignedFields"
) -> dict[str, Any]:
    """The `signature` object of a request whose payload P is `payload`."""
    ts = time.time_ns() if timestamp_ns is None else timestamp_ns
    return {
        "signature_type": "bittensor",
        "signatory": signer.ss58_address,
        "timestamp_ns": ts,
        "signature": base64.b64encode(signer.sign(signature_digest(ts, payload))).decode(),
        "signature_scope": scope,
    }


def job_body(job_uuid: str | None = None, **overrides: Any) -> dict[str, Any]:
    """An unsigned V2JobRequest shaped like the real facilitator's."""
    body: dict[str, Any] = {
        "type": "job.new",
        "message_type": "V2JobRequest",
        "uuid": job_uuid or str(uuid.uuid4()),
        "job_namespace": None,
        "executor_class": "spin_up-4min.gpu-24gb",
        "docker_image": "backenddevelopersltd/compute-horde-job-echo:v0-latest",
        "args": ["--hello", "world"],
        "env": {},
        "use_gpu": False,
        "volume": None,
        "output_upload": None,
        "artifacts_dir": None,
        "on_trusted_miner": False,
        "download_time_limit": 60,
        "execution_time_limit": 60,
        "upload_time_limit": 60,
        "streaming_start_time_limit": 60,
        "streaming_details": None,
    }
    body.update(overrides)
    return body


def sign_job(body: dict[str, Any], signer: Keypair = BOB, *, timestamp_ns: int | None = None) -> dict[str, Any]:
    """`body` with a `signature` first (as the real facilitator orders it), signed over its signed fields."""
    unsigned = {k: v for k, v in body.items() if k != "signature"}
    job = V2JobRequest.model_validate(unsigned)
    return {"signature": signature(signer, job_signed_payload(job), timestamp_ns=timestamp_ns), **unsigned}


def signed_job(job_uuid: str | None = None, signer: Keypair = BOB, **overrides: Any) -> dict[str, Any]:
    return sign_job(job_body(job_uuid, **overrides), signer)


def sign_cheat(
    body: dict[str, Any], signer: Keypair = BOB, *, dict_form: bool = False, timestamp_ns: int | None = None
) -> dict[str, Any]:
    """Sign a V0JobCheated as the SDK does (P = the sorted-JSON string), or in the dict form."""
    unsigned = {k: v for k, v in body.items() if k != "signature"}
    report = V0JobCheated.model_validate(unsigned)
    fields = {"job_uuid": report.job_uuid, "trusted_job_uuid": report.trusted_job_uuid, "details": report.details}
    payload: Any = fields if dict_form else json.dumps(fields, sort_keys=True)
    return {"signature": signature(signer, payload, timestamp_ns=timestamp_ns, scope="FullRequest"), **unsigned}


def cheat_body(job_uuid: str | None = None, **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "job.cheated",
        "message_type": "V0JobCheated",
        "job_uuid": job_uuid or str(uuid.uuid4()),
        "trusted_job_uuid": str(uuid.uuid4()),
        "details": {"reason": "test cheat report"},
    }
    body.update(overrides)
    return body


def captured_inbound(message_type: str) -> list[str]:
    """The facilitator → validator frames of the real capture with this message_type, verbatim."""
    lines = CAPTURE.read_text(encoding="utf-8").splitlines()[1:]
    records = [json.loads(line) for line in lines if line.strip()]
    frames = [r["frame"] for r in records if r.get("dir") == "in"]
    return [f for f in frames if json.loads(f).get("message_type") == message_type]
