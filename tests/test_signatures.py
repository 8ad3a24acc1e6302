"""Signature verification (streams.signatures): golden real frames, every tamper, trust and freshness."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from bittensor_wallet import Keypair
from hypothesis import given, settings
from hypothesis import strategies as st

from streams.protocol import DecodeError, V0JobCheated, V2JobRequest, decode
from streams.signatures import (
    SignatureFailure,
    SignatureVerifier,
    cheat_payloads,
    job_signed_payload,
)
from tests.signing import (
    BOB,
    captured_inbound,
    cheat_body,
    job_body,
    sign_cheat,
    sign_job,
    signature,
)

ALICE = Keypair.create_from_uri("//Alice")
CHARLIE = Keypair.create_from_uri("//Charlie")
GOLDEN_JOBS = captured_inbound("V2JobRequest")
GOLDEN_CHEATS = captured_inbound("V0JobCheated")
GOLDEN = GOLDEN_JOBS + GOLDEN_CHEATS
SIGNERS = SignatureVerifier(own_hotkey=ALICE.ss58_address, trusted_signatories=[BOB.ss58_address])
"""Trusts //Alice (the own hotkey) and //Bob (the capture's signer): the checks below are cryptographic."""


def _verify(verifier: SignatureVerifier, message: V2JobRequest | V0JobCheated) -> Any:
    return verifier.verify_job(message) if isinstance(message, V2JobRequest) else verifier.verify_cheat(message)


def _decoded(frame: str | dict[str, Any]) -> V2JobRequest | V0JobCheated:
    message = decode(frame if isinstance(frame, str) else json.dumps(frame))
    assert isinstance(message, V2JobRequest | V0JobCheated)
    return message


def _signed_content(message: V2JobRequest | V0JobCheated) -> tuple[Any, ...]:
    """What a signature covers, plus the signature itself: a tamper that changes this must fail."""
    payload: Any = job_signed_payload(message) if isinstance(message, V2JobRequest) else cheat_payloads(message)[0]
    return payload, message.signature


# ----------------------------------------------------------------------------- golden


def test_the_capture_has_the_signed_frames() -> None:
    assert len(GOLDEN_JOBS) == 4 and len(GOLDEN_CHEATS) == 1


@pytest.mark.parametrize("frame", GOLDEN, ids=[f"frame{i}" for i in range(len(GOLDEN))])
def test_every_real_job_request_and_cheat_report_verifies(frame: str) -> None:
    result = _verify(SIGNERS, _decoded(frame))
    assert result.ok, result.message
    assert result.signatory == BOB.ss58_address  # the capture's jobs are signed by //Bob
    assert SignatureVerifier(trusted_signatories=[BOB.ss58_address]).verify_job(_decoded(GOLDEN_JOBS[0])).ok


def test_the_real_cheat_report_is_signed_in_the_string_form_only() -> None:
    report = _decoded(GOLDEN_CHEATS[0])
    assert isinstance(report, V0JobCheated)
    as_string, as_dict = cheat_payloads(report)
    sig = report.signature
    assert sig is not None
    raw = base64.b64decode(sig["signature"])
    from streams.signatures import signature_digest

    assert BOB.verify(signature_digest(sig["timestamp_ns"], as_string), raw)
    assert not BOB.verify(signature_digest(sig["timestamp_ns"], as_dict), raw)


def test_signed_fields_are_written_exactly_as_protocol_md_says() -> None:
    """multi_volume/multi_upload unwrapped, declaration order, nulls, "" for artifacts_dir, use_gpu true."""
    body = job_body(
        executor_class="always_on.llm.a6000",
        docker_image="img",
        args=["--näme", "x y"],
        env={"B": "2", "A": "1"},
        volume={"volume_type": "multi_volume", "volumes": [
            {"volume_type": "inline", "contents": "UEsF"},
            {"volume_type": "zip_url", "relative_path": "d", "contents": "https://z/"},
            {"volume_type": "single_file", "url": "https://f", "relative_path": "f.txt", "added_later": 1},
            {"volume_type": "huggingface_volume", "repo_id": "org/m", "allow_patterns": ["*.json"]},
        ]},
        output_upload={"output_upload_type": "multi_upload", "uploads": [
            {"output_upload_type": "single_file_post", "url": "https://u", "relative_path": "o.txt",
             "form_fields": {"k": "v"}},
            {"output_upload_type": "single_file_put", "url": "https://p", "relative_path": "p.txt",
             "signed_headers": {"h": "1"}},
        ], "system_output": {"output_upload_type": "zip_and_http_post", "url": "https://s"}},
        download_time_limit=1, execution_time_limit=2, upload_time_limit=3, streaming_start_time_limit=4,
        streaming_details={"public_key": "PK"},
    )
    del body["use_gpu"]
    expected = (
        '{"executor_class":"always_on.llm.a6000","docker_image":"img","args":["--näme","x y"],'
        '"env":{"B":"2","A":"1"},"use_gpu":true,"artifacts_dir":"","on_trusted_miner":false,'
        '"download_time_limit":1,"execution_time_limit":2,"upload_time_limit":3,"streaming_start_time_limit":4,'
        '"streaming_details":{"public_key":"PK","executor_ip":null},"volumes":['
        '{"volume_type":"inline","contents":"UEsF","relative_path":null},'
        '{"volume_type":"zip_url","contents":"https://z/","relative_path":"d"},'
        '{"volume_type":"single_file","url":"https://f","relative_path":"f.txt"},'
        '{"volume_type":"huggingface_volume","repo_id":"org/m","repo_type":null,"revision":null,'
        '"relative_path":null,"allow_patterns":["*.json"],"token":null}],"uploads":['
        '{"output_upload_type":"single_file_post","url":"https://u","form_fields":{"k":"v"},'
        '"relative_path":"o.txt","signed_headers":null},'
        '{"output_upload_type":"single_file_put","url":"https://p","relative_path":"p.txt",'
        '"signed_headers":{"h":"1"}}]}'
    )
    job = _decoded(sign_job(body))
    assert isinstance(job, V2JobRequest)
    assert job_signed_payload(job) == expected
    assert SIGNERS.verify_job(job).ok


def test_a_single_volume_and_upload_are_signed_as_one_element_lists() -> None:
    job = _decoded(job_body(
        volume={"volume_type": "zip_url", "contents": "https://z/"},
        output_upload={"output_upload_type": "zip_and_http_put", "url": "https://p"},
        artifacts_dir="/out",
    ))
    assert isinstance(job, V2JobRequest)
    fields = json.loads(job_signed_payload(job))
    assert fields["volumes"] == [{"volume_type": "zip_url", "contents": "https://z/", "relative_path": None}]
    assert fields["uploads"] == [{"output_upload_type": "zip_and_http_put", "url": "https://p"}]
    assert fields["artifacts_dir"] == "/out"


def test_fields_the_facilitator_adds_later_are_not_signed_and_do_not_break_verification() -> None:
    signed = sign_job(job_body())
    later = {**signed, "new_top_level": {"x": 1}, "job_namespace": "ns"}
    assert SIGNERS.verify_job(_decoded(later)).ok


# ----------------------------------------------------------------------------- tampering


def _positions(frame: str) -> list[tuple[int, str]]:
    """Every character position, each replaced by a neighbouring printable character."""
    out = []
    for i, ch in enumerate(frame):
        replacement = chr(ord(ch) ^ 1)
        if not replacement.isprintable():
            replacement = "x" if ch != "x" else "y"
        out.append((i, replacement))
    return out


def _check_tamper(original: str, tampered: str) -> bool:
    """A tamper that changes what is signed must fail; returns whether it decoded and changed what is signed."""
    try:
        message = decode(tampered)
    except DecodeError:
        return False  # never dispatched at all
    if not isinstance(message, V2JobRequest | V0JobCheated):
        return False
    changed = _signed_content(message) != _signed_content(_decoded(original))
    result = _verify(SIGNERS, message)
    if changed:
        assert not result.ok, f"tampered frame verified: {tampered}"
    else:  # only unsigned bytes changed (uuid, job_namespace, key order...): still verifies
        assert result.ok, result.message
    return changed


@pytest.mark.parametrize("frame", GOLDEN, ids=[f"frame{i}" for i in range(len(GOLDEN))])
def test_every_single_byte_tamper_of_a_real_frame_that_changes_what_is_signed_fails(frame: str) -> None:
    changed = sum(_check_tamper(frame, frame[:i] + c + frame[i + 1:]) for i, c in _positions(frame))
    assert changed > len(frame) // 4  # many tampers decode and change what is signed: the check ran on them


@settings(max_examples=200, deadline=None)
@given(
    frame=st.sampled_from(GOLDEN),
    where=st.floats(min_value=0, max_value=1, exclude_max=True),
    byte=st.characters(min_codepoint=32, max_codepoint=0x2FF),
)
def test_any_single_character_replacement_that_changes_what_is_signed_fails(
    frame: str, where: float, byte: str
) -> None:
    i = int(where * len(frame))
    _check_tamper(frame, frame[:i] + byte + frame[i + 1:])


def _tampered(frame: str, **changes: Any) -> dict[str, Any]:
    obj = json.loads(frame)
    for key, value in changes.items():
        if key.startswith("sig_"):
            obj["signature"][key[4:]] = value
        else:
            obj[key] = value
    return obj


JOB_FIELD_TAMPERS: list[tuple[str, Any]] = [
    ("executor_class", "always_on.test"),
    ("docker_image", "evil/image:latest"),
    ("args", ["--hello", "world", "--rm-rf"]),
    ("args", ["--hello"]),
    ("args", ["world", "--hello"]),
    ("env", {"K": "V"}),
    ("use_gpu", True),
    ("artifacts_dir", "/artifacts"),
    ("on_trusted_miner", True),
    ("download_time_limit", 61),
    ("execution_time_limit", 3600),
    ("upload_time_limit", 59),
    ("streaming_start_time_limit", 0),
    ("streaming_details", {"public_key": "k"}),
    ("volume", {"volume_type": "inline", "contents": "UEsF"}),
    ("output_upload", {"output_upload_type": "zip_and_http_put", "url": "https://evil"}),
]


@pytest.mark.parametrize(
    ("field", "value"), JOB_FIELD_TAMPERS, ids=[f"{f}-{i}" for i, (f, _) in enumerate(JOB_FIELD_TAMPERS)]
)
@pytest.mark.parametrize("frame", GOLDEN_JOBS, ids=[f"job{i}" for i in range(len(GOLDEN_JOBS))])
def test_each_signed_field_tamper_of_a_real_job_fails(frame: str, field: str, value: Any) -> None:
    result = SIGNERS.verify_job(_decoded(_tampered(frame, **{field: value})))
    assert result.failure is SignatureFailure.INVALID
    assert "signed fields do not match" in result.message


def _flip_signature_byte(frame: str) -> str:
    sig = bytearray(base64.b64decode(json.loads(frame)["signature"]["signature"]))
    sig[17] ^= 0x01
    return base64.b64encode(bytes(sig)).decode()


@pytest.mark.parametrize("frame", GOLDEN, ids=[f"frame{i}" for i in range(len(GOLDEN))])
@pytest.mark.parametrize(
    ("changes", "failure", "says"),
    [
        ({"signature": None}, SignatureFailure.MISSING, "no signature"),
        ({"signature": "abc"}, SignatureFailure.MALFORMED, "must be an object"),
        ({"signature": {}}, SignatureFailure.MALFORMED, "lacks signature_type, signatory, timestamp_ns, signature"),
        ({"sig_signature_type": "ecdsa"}, SignatureFailure.WRONG_TYPE, "'ecdsa'"),
        ({"sig_signature_scope": "Everything"}, SignatureFailure.MALFORMED, "signature_scope"),
        ({"sig_signed_by": "me"}, SignatureFailure.MALFORMED, "unknown key 'signed_by'"),
        ({"sig_signatory": "5Gnotanaddress"}, SignatureFailure.MALFORMED, "not a valid ss58 address"),
        ({"sig_signatory": ALICE.ss58_address}, SignatureFailure.INVALID, "do not match"),
        ({"sig_timestamp_ns": 1795856893601279667}, SignatureFailure.INVALID, "do not match"),
        ({"sig_timestamp_ns": -1}, SignatureFailure.MALFORMED, "timestamp_ns"),
        ({"sig_timestamp_ns": "1795856893601279666"}, SignatureFailure.MALFORMED, "timestamp_ns"),
        ({"sig_timestamp_ns": 2**64}, SignatureFailure.MALFORMED, "timestamp_ns"),
        ({"sig_signature": "not base64!"}, SignatureFailure.BAD_ENCODING, "not valid base64"),
        ({"sig_signature": base64.b64encode(b"x" * 63).decode()}, SignatureFailure.BAD_ENCODING, "63 bytes"),
        ({"sig_signature": 12}, SignatureFailure.MALFORMED, "must be a string"),
    ],
)
def test_each_signature_tamper_fails_and_says_why(
    frame: str, changes: dict[str, Any], failure: SignatureFailure, says: str
) -> None:
    result = _verify(SIGNERS, _decoded(_tampered(frame, **changes)))
    assert result.failure is failure
    assert says in result.message


@pytest.mark.parametrize("frame", GOLDEN, ids=[f"frame{i}" for i in range(len(GOLDEN))])
def test_one_flipped_signature_bit_fails(frame: str) -> None:
    result = _verify(SIGNERS, _decoded(_tampered(frame, sig_signature=_flip_signature_byte(frame))))
    assert result.failure is SignatureFailure.INVALID


@pytest.mark.parametrize(
    ("field", "value"),
    [("job_uuid", "2dcdf287-e485-408f-b2d2-ad0d3c8f9238"), ("trusted_job_uuid", "x"), ("details", {"reason": "x"}),
     ("details", None)],
)
def test_each_field_tamper_of_the_real_cheat_report_fails(field: str, value: Any) -> None:
    result = SIGNERS.verify_cheat(_decoded(_tampered(GOLDEN_CHEATS[0], **{field: value})))
    assert result.failure is SignatureFailure.INVALID


def test_the_facilitators_args_whitespace_bug_is_rejected_as_a_signed_fields_mismatch() -> None:
    """It strips each args item after the signature was made: the job no longer verifies."""
    signed = sign_job(job_body(args=[" --hello ", "world\n"]))
    arrived = {**signed, "args": ["--hello", "world"]}
    result = SIGNERS.verify_job(_decoded(arrived))
    assert result.failure is SignatureFailure.INVALID
    assert result.message.startswith("the signed fields do not match the signature")


# ----------------------------------------------------------------------------- cheat report forms


@pytest.mark.parametrize("dict_form", [False, True], ids=["string-form", "dict-form"])
@pytest.mark.parametrize("details", [{"reason": "x", "n": [1, 2.5]}, "plain text", 3, ["a"], None])
def test_cheat_reports_verify_in_either_form_with_any_details(dict_form: bool, details: Any) -> None:
    report = _decoded(sign_cheat(cheat_body(details=details), dict_form=dict_form))
    assert SIGNERS.verify_cheat(report).ok


def test_a_cheat_report_without_details_was_signed_as_details_null() -> None:
    signed = sign_cheat(cheat_body(details=None))
    del signed["details"]  # what the facilitator sends when the SDK had none
    report = _decoded(signed)
    assert isinstance(report, V0JobCheated) and report.details is None
    assert SIGNERS.verify_cheat(report).ok
    assert SIGNERS.verify_cheat(_decoded({**signed, "details": {}})).failure is SignatureFailure.INVALID


# ----------------------------------------------------------------------------- trust and freshness


def test_trust_own_hotkey_and_trusted_signatories_only() -> None:
    by_charlie = _decoded(sign_job(job_body(), CHARLIE))
    by_alice = _decoded(sign_job(job_body(), ALICE))
    policy = SignatureVerifier(own_hotkey=ALICE.ss58_address, trusted_signatories=[BOB.ss58_address])
    assert not policy.only_own_hotkey
    assert policy.verify_job(_decoded(GOLDEN_JOBS[0])).ok
    assert policy.verify_job(by_alice).ok
    refused = policy.verify_job(by_charlie)
    assert refused.failure is SignatureFailure.UNTRUSTED
    assert CHARLIE.ss58_address in refused.message and refused.signatory == CHARLIE.ss58_address


@pytest.mark.parametrize("own", [ALICE.ss58_address, ALICE.public_key], ids=["ss58", "public-key"])
def test_with_no_trusted_signatories_only_the_own_hotkey_is_trusted(own: str | bytes) -> None:
    """The safe default: a valid signature from anyone else is refused, saying what to configure."""
    only_own = SignatureVerifier(own_hotkey=own)
    assert only_own.only_own_hotkey
    assert only_own.verify_job(_decoded(sign_job(job_body(), ALICE))).ok
    assert only_own.verify_cheat(_decoded(sign_cheat(cheat_body(), ALICE))).ok
    for foreign in (_decoded(sign_job(job_body(), CHARLIE)), _decoded(GOLDEN_JOBS[0]), _decoded(GOLDEN_CHEATS[0])):
        refused = _verify(only_own, foreign)
        assert refused.failure is SignatureFailure.UNTRUSTED, refused
        assert refused.signatory in refused.message and "trusted_signatories" in refused.message
        assert "--trusted-signer" in refused.message
    # Trusting only yourself explicitly is the same policy.
    assert SignatureVerifier(own_hotkey=own, trusted_signatories=[ALICE.ss58_address]).only_own_hotkey


def test_a_verifier_that_would_trust_nobody_is_refused() -> None:
    for empty in ({}, {"trusted_signatories": ()}, {"trusted_signatories": []}, {"max_age": 60}):
        with pytest.raises(ValueError, match="needs own_hotkey or at least one of trusted_signatories"):
            SignatureVerifier(**empty)
    with pytest.raises(ValueError, match="own_hotkey: 'nope' is not a valid ss58 address"):
        SignatureVerifier(own_hotkey="nope")
    assert not SignatureVerifier(trusted_signatories=[BOB.ss58_address]).only_own_hotkey  # a whitelist alone is fine


def test_an_untrusted_signatory_is_refused_even_with_a_broken_signature_and_a_trusted_one_is_still_checked() -> None:
    policy = SignatureVerifier(trusted_signatories=[BOB.ss58_address])
    forged = _tampered(GOLDEN_JOBS[0], docker_image="evil")
    assert policy.verify_job(_decoded(forged)).failure is SignatureFailure.INVALID


def test_an_invalid_trusted_signatory_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"trusted_signatories\[1\]: 'nope' is not a valid ss58 address"):
        SignatureVerifier(trusted_signatories=[BOB.ss58_address, "nope"])
    with pytest.raises(ValueError, match="max_age"):
        SignatureVerifier(own_hotkey=ALICE.ss58_address, max_age=0)


def test_freshness_bound_refuses_old_and_future_timestamps() -> None:
    now = 1_800_000_000 * 10**9
    fresh = _decoded(sign_job(job_body(), timestamp_ns=now - 5 * 10**9))
    old = _decoded(sign_job(job_body(), timestamp_ns=now - 61 * 10**9))
    future = _decoded(sign_job(job_body(), timestamp_ns=now + 61 * 10**9))
    bounded = SignatureVerifier(trusted_signatories=[BOB.ss58_address], max_age=60, clock_ns=lambda: now)
    assert bounded.verify_job(fresh).ok
    stale = bounded.verify_job(old)
    assert stale.failure is SignatureFailure.STALE and "61.0 s old" in stale.message
    assert bounded.verify_job(future).failure is SignatureFailure.STALE
    unbounded = SignatureVerifier(trusted_signatories=[BOB.ss58_address], clock_ns=lambda: now)
    assert unbounded.verify_job(old).ok  # no bound by default
    report = _decoded(sign_cheat(cheat_body(), timestamp_ns=now - 61 * 10**9))
    assert bounded.verify_cheat(report).failure is SignatureFailure.STALE


def test_signature_helper_signs_arbitrary_payloads() -> None:
    """The tests' signing helper itself: a signature over another payload does not verify."""
    body = job_body()
    other = {**body, "signature": signature(BOB, "something else")}
    assert SIGNERS.verify_job(_decoded(other)).failure is SignatureFailure.INVALID
