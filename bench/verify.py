"""Cost of verifying a job request's signature (streams.signatures), in µs per job.

    python -m bench.verify [--count 2000]

Measured on the real captured job requests: the whole check the client runs before dispatch (parse
the signature, trust, build the signed fields, blake2b, sr25519 verify), and the sr25519 verify alone.
Decides whether verification may run inline on the event loop (it does: see streams/signatures.py).
A candidate row for ``python -m bench``'s table.
"""

from __future__ import annotations

import argparse
import base64
import json
import statistics
import time
from typing import Any

from bittensor_wallet import Keypair

from bench.common import ROOT
from streams.protocol import V2JobRequest, decode
from streams.signatures import SignatureVerifier, job_signed_payload, signature_digest

CAPTURE = ROOT / "notebooks" / "data" / "real-facilitator-session.jsonl"


def _jobs() -> list[V2JobRequest]:
    jobs = []
    for line in CAPTURE.read_text(encoding="utf-8").splitlines()[1:]:
        record: dict[str, Any] = json.loads(line)
        if record.get("dir") == "in" and '"V2JobRequest"' in record["frame"]:
            message = decode(record["frame"])
            assert isinstance(message, V2JobRequest)
            jobs.append(message)
    return jobs


def _per_call_us(fn: Any, count: int, rounds: int = 5) -> float:
    """Median over rounds of the mean time per call, in µs."""
    samples = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(count):
            fn()
        samples.append((time.perf_counter() - start) / count * 1e6)
    return statistics.median(samples)


def verify_cost(count: int = 2_000) -> dict[str, float]:
    jobs = _jobs()
    verifier = SignatureVerifier(trusted_signatories=[Keypair.create_from_uri("//Bob").ss58_address])
    job = jobs[0]
    assert verifier.verify_job(job).ok
    sig = job.signature
    assert isinstance(sig, dict)
    keypair = Keypair(ss58_address=sig["signatory"])
    digest = signature_digest(sig["timestamp_ns"], job_signed_payload(job))
    raw = base64.b64decode(sig["signature"])
    return {
        "verify_job_us": round(_per_call_us(lambda: verifier.verify_job(job), count), 1),
        "sr25519_verify_us": round(_per_call_us(lambda: keypair.verify(digest, raw), count), 1),
        "decode_us": round(_per_call_us(lambda: decode(json.dumps(job.raw)), count), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.verify")
    parser.add_argument("--count", type=int, default=2_000)
    args = parser.parse_args()
    print(json.dumps(verify_cost(args.count)))


if __name__ == "__main__":
    main()
