"""The client runs only jobs whose signature verifies and whose signatory it trusts (against the simulator)."""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import pytest
from bittensor_wallet import Keypair

from streams.devtools.simulator import FacilitatorSimulator
from streams.protocol import JobStatus, V0JobCheated, V2JobRequest
from tests.helpers import ALICE, fast_config, running_client, wait_until
from tests.signing import BOB, cheat_body, job_body, sign_cheat, sign_job
from tests.test_monitor import assert_event_shape

CHARLIE = Keypair.create_from_uri("//Charlie")


class Recorder:
    """A dispatcher that completes each job at once and remembers what reached it."""

    def __init__(self) -> None:
        self.jobs: list[str] = []

    async def handle(self, job: V2JobRequest, report: Any) -> None:
        self.jobs.append(job.uuid)
        report(JobStatus.COMPLETED, {"miner_response": {"docker_process_stdout": "", "docker_process_stderr": ""}})


def untrusted_rejection(signatory: str) -> dict[str, Any]:
    """The metadata of the ``rejected`` status a job from a signatory the validator does not trust gets."""
    return {
        "job_rejection_details": {
            "rejected_by": "validator",
            "reason": "invalid_signature",
            "message": f"signatory {signatory} is neither this validator's hotkey nor a trusted signatory "
            "(to run its jobs, add it to trusted_signatories / run --trusted-signer)",
        }
    }


async def _send(sim: FacilitatorSimulator, frame: dict[str, Any]) -> dict[str, Any]:
    """Deliver a job request exactly as given (signed here, or tampered with), as a created job."""
    sim.register_job(frame["uuid"], frame)
    await sim.send_raw(json.dumps(frame))
    return frame


async def test_a_job_signed_by_an_untrusted_signatory_is_rejected_and_never_dispatched() -> None:
    dispatcher = Recorder()
    async with FacilitatorSimulator(seed=31) as sim:
        async with running_client(fast_config(sim.url, trusted_signatories=(BOB.ss58_address,)), dispatcher) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            untrusted = await _send(sim, sign_job(job_body(), CHARLIE))
            trusted = await _send(sim, sign_job(job_body(), BOB))
            own = await _send(sim, sign_job(job_body(), ALICE))  # the validator's own hotkey
            done = [untrusted["uuid"], trusted["uuid"], own["uuid"]]
            await sim.wait_for(lambda: all(sim.stored[u][-1] in ("rejected", "completed") for u in done), 10, "final")
            assert sim.stored[untrusted["uuid"]] == ["sent", "rejected"]
            assert sim.stored_metadata[untrusted["uuid"]][-1] == untrusted_rejection(CHARLIE.ss58_address)
            assert sim.stored[trusted["uuid"]][-1] == sim.stored[own["uuid"]][-1] == "completed"
            assert dispatcher.jobs == [trusted["uuid"], own["uuid"]]
            (event,) = run.events_of("JOB_REJECTED")
            assert event.subtype == "untrusted_signatory"
            assert event.data["job_uuid"] == untrusted["uuid"]
            assert event.data["signatory"] == CHARLIE.ss58_address
            assert run.counters["jobs.rejected"] == 1
            assert run.counters["jobs.dispatched"] == 2
            assert not run.events_of("CONFIG_WARNING")  # verification is on


@pytest.mark.parametrize(
    ("tamper", "says"),
    [
        (lambda job: {**job, "signature": None}, "carries no signature"),
        (lambda job: {**job, "signature": {**job["signature"], "signature": "@@@"}}, "not valid base64"),
        (lambda job: {**job, "docker_image": "evil/miner:latest"}, "the signed fields do not match"),
        # the facilitator's known bug: it strips args items after the signature was made
        (lambda job: {**job, "args": [a.strip() for a in job["args"]]}, "the signed fields do not match"),
    ],
    ids=["missing", "bad-base64", "tampered", "args-stripped"],
)
async def test_a_job_whose_signature_fails_is_rejected_with_what_failed(tamper: Any, says: str) -> None:
    dispatcher = Recorder()
    async with FacilitatorSimulator(seed=32) as sim:
        async with running_client(fast_config(sim.url), dispatcher) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            job = await _send(sim, tamper(sign_job(job_body(args=[" --hello", "world "]))))
            await sim.wait_for(lambda: sim.stored[job["uuid"]][-1] == "rejected", 10, "rejected stored")
            details = sim.stored_metadata[job["uuid"]][-1]["job_rejection_details"]
            assert (details["rejected_by"], details["reason"]) == ("validator", "invalid_signature")
            assert says in details["message"]
            assert dispatcher.jobs == []
            assert run.events_of("JOB_REJECTED")[0].data["message"] == details["message"]


async def test_cheat_reports_that_fail_verification_are_events_not_on_cheat_calls() -> None:
    seen: list[V0JobCheated] = []

    async def on_cheat(report: V0JobCheated) -> None:
        seen.append(report)

    async with FacilitatorSimulator(seed=33) as sim:
        config = fast_config(sim.url, trusted_signatories=(BOB.ss58_address,))
        async with running_client(config, on_cheat=on_cheat) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            good = sign_cheat(cheat_body())
            dict_form = sign_cheat(cheat_body(details=None), dict_form=True)
            forged = {**sign_cheat(cheat_body()), "details": {"reason": "changed"}}
            untrusted = sign_cheat(cheat_body(), CHARLIE)
            for report in (good, forged, untrusted, dict_form):
                await sim.send_raw(json.dumps(report))
            await wait_until(lambda: len(seen) == 2 and len(run.events_of("CHEAT_REJECTED")) == 2, 5, "all handled")
            assert [r.job_uuid for r in seen] == [good["job_uuid"], dict_form["job_uuid"]]
            rejected = run.events_of("CHEAT_REJECTED")
            assert [e.data["job_uuid"] for e in rejected] == [forged["job_uuid"], untrusted["job_uuid"]]
            assert [e.subtype for e in rejected] == ["invalid", "untrusted_signatory"]
            assert run.counters["cheat.rejected"] == 2


async def test_with_no_trusted_signatories_only_jobs_signed_by_the_own_hotkey_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The safe default: a valid signature from another key (even the facilitator's signer) is not enough."""
    dispatcher = Recorder()
    caplog.set_level(logging.INFO, logger="streams.client")
    async with FacilitatorSimulator(seed=34) as sim:
        async with running_client(fast_config(sim.url, trusted_signatories=()), dispatcher) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            foreign = [await _send(sim, sign_job(job_body(), key)) for key in (CHARLIE, BOB)]
            own = await _send(sim, sign_job(job_body(), ALICE))  # the validator's own hotkey
            await sim.wait_for(lambda: sim.stored[own["uuid"]][-1] == "completed", 10, "own job completed")
            await sim.wait_for(lambda: all(sim.stored[j["uuid"]][-1] == "rejected" for j in foreign), 10, "rejected")
            await sim.drop()
            await wait_until(lambda: len(run.events_of("CONNECTED")) == 2, 5, "reconnected")
    assert dispatcher.jobs == [own["uuid"]]
    assert sim.stored[own["uuid"]] == ["sent", "received", "completed"]
    for job, key in zip(foreign, (CHARLIE, BOB), strict=True):
        assert sim.stored[job["uuid"]] == ["sent", "rejected"]
        assert sim.stored_metadata[job["uuid"]][-1] == untrusted_rejection(key.ss58_address)
    rejected = run.events_of("JOB_REJECTED")
    assert [(e.subtype, e.data["job_uuid"], e.data["signatory"]) for e in rejected] == [
        ("untrusted_signatory", job["uuid"], key.ss58_address) for job, key in zip(foreign, (CHARLIE, BOB), strict=True)
    ]
    assert run.counters["jobs.rejected"] == 2 and run.counters["jobs.dispatched"] == 1
    # Said once at start, at INFO, with what to configure; the safe default is no CONFIG_WARNING event.
    assert not run.events_of("CONFIG_WARNING")
    said = [r for r in caplog.records if r.name == "streams.client" and "trusted signatories" in r.message]
    assert [r.levelno for r in said] == [logging.INFO]
    assert "only jobs signed by this validator's own hotkey will run" in said[0].message
    assert "trusted_signatories" in said[0].message and "--trusted-signer" in said[0].message


async def test_with_no_trusted_signatories_only_cheat_reports_signed_by_the_own_hotkey_reach_on_cheat() -> None:
    seen: list[V0JobCheated] = []

    async def on_cheat(report: V0JobCheated) -> None:
        seen.append(report)

    async with FacilitatorSimulator(seed=37) as sim:
        async with running_client(fast_config(sim.url, trusted_signatories=()), on_cheat=on_cheat) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            foreign = [sign_cheat(cheat_body(), key) for key in (CHARLIE, BOB)]
            own = sign_cheat(cheat_body(), ALICE)
            for report in (*foreign, own):  # handled in order: the foreign ones are refused before `own` arrives
                await sim.send_raw(json.dumps(report))
            await wait_until(lambda: len(seen) == 1, 5, "the own hotkey's report handled")
            assert [r.job_uuid for r in seen] == [own["job_uuid"]]
            rejected = run.events_of("CHEAT_REJECTED")
            assert [(e.subtype, e.data["job_uuid"], e.data["signatory"]) for e in rejected] == [
                ("untrusted_signatory", report["job_uuid"], key.ss58_address)
                for report, key in zip(foreign, (CHARLIE, BOB), strict=True)
            ]
            assert all("neither this validator's hotkey nor a trusted signatory" in e.data["message"] for e in rejected)
            assert run.counters["cheat.rejected"] == 2


async def test_verify_signatures_false_runs_unsigned_jobs_and_says_so_loudly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dispatcher = Recorder()
    caplog.set_level(logging.WARNING, logger="streams.client")
    async with FacilitatorSimulator(seed=35) as sim:
        async with running_client(fast_config(sim.url, verify_signatures=False), dispatcher) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            job = await _send(sim, {**job_body(), "signature": None})
            await sim.wait_for(lambda: sim.stored[job["uuid"]][-1] == "completed", 10, "completed")
    (warning,) = run.events_of("CONFIG_WARNING")
    assert warning.subtype == "signatures_not_verified"
    assert_event_shape(warning)
    assert any("verification is OFF" in r.message for r in caplog.records)
    assert run.client._verifier is None


async def test_signature_max_age_rejects_an_old_signature() -> None:
    dispatcher = Recorder()
    async with FacilitatorSimulator(seed=36) as sim:
        async with running_client(fast_config(sim.url, signature_max_age=30.0), dispatcher) as run:
            await wait_until(lambda: run.client.is_connected, 5, "connected")
            old = sign_job(job_body(), timestamp_ns=1_700_000_000 * 10**9)
            fresh = sign_job(job_body())
            await _send(sim, old)
            await _send(sim, fresh)
            await sim.wait_for(lambda: sim.stored[fresh["uuid"]][-1] == "completed", 10, "fresh completed")
            await sim.wait_for(lambda: sim.stored[old["uuid"]][-1] == "rejected", 10, "old rejected")
            assert "beyond the 30 s bound" in sim.stored_metadata[old["uuid"]][-1]["job_rejection_details"]["message"]
            assert dispatcher.jobs == [fresh["uuid"]]
            assert run.events_of("JOB_REJECTED")[0].subtype == "stale"


def test_flipping_a_signature_bit_of_a_signed_job_is_caught_by_the_helper() -> None:
    """Guard for the tests above: the signing helper's output is not accidentally unverifiable."""
    from streams.protocol import decode
    from streams.signatures import SignatureVerifier

    signed = sign_job(job_body())
    bob = SignatureVerifier(trusted_signatories=[BOB.ss58_address])
    assert bob.verify_job(decode(json.dumps(signed))).ok  # type: ignore[arg-type]
    raw = bytearray(base64.b64decode(signed["signature"]["signature"]))
    raw[0] ^= 1
    broken = {**signed, "signature": {**signed["signature"], "signature": base64.b64encode(bytes(raw)).decode()}}
    assert not bob.verify_job(decode(json.dumps(broken))).ok  # type: ignore[arg-type]
