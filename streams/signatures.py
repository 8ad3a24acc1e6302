"""Verify who signed a job request or a cheat report, as the real validator does (PROTOCOL.md "Signatures").

Nothing from the network runs before this says yes. The scheme, for a payload P (a JSON value):

    digest = blake2b(timestamp_ns as 8 bytes big-endian ‖ UTF-8 of json.dumps(P, sort_keys=True))
    Keypair(ss58_address=signatory).verify(digest, signature)

- a job request signs P = the compact JSON *string* of its "signed fields" (`job_signed_payload`),
  whatever its `signature_scope` says;
- a cheat report signs P = the string ``json.dumps({job_uuid, trusted_job_uuid, details}, sort_keys=True)``
  (real SDK traffic), or P = that object itself (what the real validator checks): either is accepted.

`SignatureVerifier` adds the trust policy (the validator's own hotkey, plus any trusted signatories:
with none configured, only its own hotkey) and an optional freshness bound, and returns a
`Verification` that says what failed. An sr25519 verify costs ~65 µs here (`python -m bench.verify`),
so it runs inline on the event loop: a thread hop would cost about as much as the check.
"""

from __future__ import annotations

import base64
import binascii
import enum
import functools
import hashlib
import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final

import pydantic_core
from bittensor_wallet import Keypair
from pydantic import BaseModel

from streams.protocol import V0JobCheated, V2JobRequest, json_kind

__all__ = [
    "SIGNATURE_TYPE",
    "SignatureFailure",
    "SignatureVerifier",
    "Verification",
    "cheat_payloads",
    "job_signed_fields",
    "job_signed_payload",
    "public_key_of",
    "signature_digest",
]

SIGNATURE_TYPE: Final = "bittensor"
_SIGNATURE_BYTES: Final = 64
_SCOPES: Final = frozenset({"SignedFields", "FullRequest"})
_KEYS: Final = frozenset({"signature_type", "signatory", "timestamp_ns", "signature", "signature_scope"})
_MAX_TIMESTAMP: Final = 2**64 - 1  # it is hashed as 8 unsigned big-endian bytes


class SignatureFailure(enum.StrEnum):
    """Why a signature was not accepted (the `failure` of a `Verification`)."""

    MISSING = "missing"
    MALFORMED = "malformed"
    BAD_ENCODING = "bad_encoding"
    WRONG_TYPE = "wrong_signature_type"
    UNTRUSTED = "untrusted_signatory"
    STALE = "stale"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class Verification:
    """The outcome of one check: `ok`, or the `failure` and a `message` saying what failed."""

    failure: SignatureFailure | None
    message: str
    signatory: str | None = None
    timestamp_ns: int | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None


class _Refused(Exception):
    def __init__(self, failure: SignatureFailure, message: str) -> None:
        super().__init__(message)
        self.failure = failure
        self.message = message


@dataclass(frozen=True, slots=True)
class _Signature:
    signatory: str
    public_key: bytes
    timestamp_ns: int
    signature: bytes


# --------------------------------------------------------------------------- payloads


def signature_digest(timestamp_ns: int, payload: Any) -> bytes:
    """blake2b (64 bytes) of the timestamp (8 bytes big-endian) and ``json.dumps(payload, sort_keys=True)``."""
    return hashlib.blake2b(
        timestamp_ns.to_bytes(8, "big") + json.dumps(payload, sort_keys=True).encode("utf-8")
    ).digest()


def _declared(spec: BaseModel) -> dict[str, Any]:
    """A volume/upload spec with all its type's fields in declaration order (extras are not signed)."""
    return spec.model_dump(mode="json", include=set(type(spec).model_fields))


def job_signed_fields(job: V2JobRequest) -> dict[str, Any]:
    """The "signed fields" object of a job request, keys in the order the signer writes them."""
    volume, upload, streaming = job.volume, job.output_upload, job.streaming_details
    if volume is None:
        volumes = []
    elif volume.volume_type == "multi_volume":
        volumes = [_declared(v) for v in volume.volumes]
    else:
        volumes = [_declared(volume)]
    if upload is None:
        uploads = []
    elif upload.output_upload_type == "multi_upload":
        uploads = [_declared(u) for u in upload.uploads]  # its system_output is not signed
    else:
        uploads = [_declared(upload)]
    return {
        "executor_class": job.executor_class,
        "docker_image": job.docker_image,
        "args": job.args,
        "env": job.env,
        "use_gpu": job.use_gpu,
        "artifacts_dir": job.artifacts_dir or "",
        "on_trusted_miner": job.on_trusted_miner,
        "download_time_limit": job.download_time_limit,
        "execution_time_limit": job.execution_time_limit,
        "upload_time_limit": job.upload_time_limit,
        "streaming_start_time_limit": job.streaming_start_time_limit,
        "streaming_details": None
        if streaming is None
        else {"public_key": streaming.public_key, "executor_ip": streaming.executor_ip},
        "volumes": volumes,
        "uploads": uploads,
    }


def job_signed_payload(job: V2JobRequest) -> str:
    """P for a job request: the signed fields as compact JSON, non-ASCII kept (pydantic's JSON)."""
    return pydantic_core.to_json(job_signed_fields(job)).decode("utf-8")


def cheat_payloads(report: V0JobCheated) -> tuple[str, dict[str, Any]]:
    """The two P a cheat report may have been signed with: the SDK's string form, the dict form."""
    fields = {"job_uuid": report.job_uuid, "trusted_job_uuid": report.trusted_job_uuid, "details": report.details}
    return json.dumps(fields, sort_keys=True), fields


# --------------------------------------------------------------------------- parsing


@functools.lru_cache(maxsize=1024)
def _keypair(ss58_address: str) -> Keypair:
    return Keypair(ss58_address=ss58_address)


def public_key_of(ss58_address: str) -> bytes:
    """The public key behind an ss58 address; ValueError (saying why) if it is not one."""
    if not isinstance(ss58_address, str):
        raise ValueError(f"an ss58 address must be a string, got {type(ss58_address).__name__}")
    try:
        key = _keypair(ss58_address).public_key
    except Exception as exc:
        raise ValueError(f"{_short(ss58_address)} is not a valid ss58 address ({exc})") from None
    if key is None:  # pragma: no cover - Keypair always derives it from an address
        raise ValueError(f"{_short(ss58_address)} has no public key")
    return bytes(key)


def _parse(obj: object) -> _Signature:
    if obj is None:
        raise _Refused(SignatureFailure.MISSING, "the request carries no signature")
    if not isinstance(obj, dict):
        raise _Refused(SignatureFailure.MALFORMED, f"`signature` must be an object, got {json_kind(obj)}")
    missing = [k for k in ("signature_type", "signatory", "timestamp_ns", "signature") if k not in obj]
    if missing:
        raise _Refused(SignatureFailure.MALFORMED, f"`signature` lacks {', '.join(missing)}")
    unknown = sorted(str(k) for k in obj if k not in _KEYS)
    if unknown:  # upstream's Signature model forbids extra keys: the real validator could not parse it
        raise _Refused(SignatureFailure.MALFORMED, f"`signature` has unknown key {', '.join(map(repr, unknown))}")
    signature_type = obj["signature_type"]
    if signature_type != SIGNATURE_TYPE:
        raise _Refused(
            SignatureFailure.WRONG_TYPE,
            f"signature_type is {_short(signature_type)}, only {SIGNATURE_TYPE!r} is accepted",
        )
    scope = obj.get("signature_scope", "SignedFields")
    if scope not in _SCOPES:
        raise _Refused(SignatureFailure.MALFORMED, f"signature_scope {_short(scope)} is not one of {sorted(_SCOPES)}")
    signatory = obj["signatory"]
    try:
        public_key = public_key_of(signatory)
    except ValueError as exc:
        raise _Refused(SignatureFailure.MALFORMED, f"signatory: {exc}") from None
    timestamp_ns = obj["timestamp_ns"]
    if isinstance(timestamp_ns, bool) or not isinstance(timestamp_ns, int) or not 0 <= timestamp_ns <= _MAX_TIMESTAMP:
        raise _Refused(
            SignatureFailure.MALFORMED, f"timestamp_ns must be an integer in [0, 2**64), got {_short(timestamp_ns)}"
        )
    encoded = obj["signature"]
    if not isinstance(encoded, str):
        raise _Refused(SignatureFailure.MALFORMED, f"`signature.signature` must be a string, got {json_kind(encoded)}")
    try:
        signature = base64.b64decode(encoded, validate=True)
    except (binascii.Error, ValueError):
        raise _Refused(SignatureFailure.BAD_ENCODING, "`signature.signature` is not valid base64") from None
    if len(signature) != _SIGNATURE_BYTES:
        raise _Refused(
            SignatureFailure.BAD_ENCODING,
            f"`signature.signature` decodes to {len(signature)} bytes, an sr25519 signature has {_SIGNATURE_BYTES}",
        )
    return _Signature(signatory, public_key, timestamp_ns, signature)


def _verifies(parsed: _Signature, payload: Any) -> bool:
    try:
        return bool(_keypair(parsed.signatory).verify(signature_digest(parsed.timestamp_ns, payload), parsed.signature))
    except (ValueError, TypeError):
        return False


# --------------------------------------------------------------------------- policy


class SignatureVerifier:
    """Checks signatures and who made them.

    A signatory is trusted only when it is `own_hotkey` (the validator's hotkey: ss58 or public key)
    or one of `trusted_signatories` (the validator's whitelist); with none configured, only the own
    hotkey is. There is no "anyone" mode: a verifier given neither would trust nobody, so that is a
    ValueError. `max_age` (seconds) bounds how far the signature's timestamp may be from now, either
    way; None means no bound.
    """

    def __init__(
        self,
        *,
        own_hotkey: str | bytes | None = None,
        trusted_signatories: Iterable[str] = (),
        max_age: float | None = None,
        clock_ns: Callable[[], int] = time.time_ns,
    ) -> None:
        trusted = tuple(trusted_signatories)
        keys: dict[bytes, str] = {}
        for index, address in enumerate(trusted):
            try:
                keys[public_key_of(address)] = address
            except ValueError as exc:
                raise ValueError(f"trusted_signatories[{index}]: {exc}") from None
        try:
            own = own_hotkey if isinstance(own_hotkey, bytes) or own_hotkey is None else public_key_of(own_hotkey)
        except ValueError as exc:
            raise ValueError(f"own_hotkey: {exc}") from None
        if own is not None:
            keys[own] = own_hotkey if isinstance(own_hotkey, str) else "own hotkey"
        if not keys:
            raise ValueError(
                "SignatureVerifier needs own_hotkey or at least one of trusted_signatories: "
                "with neither it would trust no signatory and refuse every job"
            )
        if max_age is not None and not max_age > 0:
            raise ValueError(f"max_age must be > 0 seconds or None, got {max_age!r}")
        self._trusted = keys
        self._only_own = keys.keys() == {own}
        self._max_age_ns = None if max_age is None else int(max_age * 1e9)
        self._clock_ns = clock_ns

    @property
    def only_own_hotkey(self) -> bool:
        """True when no trusted signatories are configured: only jobs signed by the own hotkey pass."""
        return self._only_own

    def verify_job(self, job: V2JobRequest) -> Verification:
        """Check a job request's signature over its signed fields."""
        return self._verify(job.signature, lambda parsed: _verifies(parsed, job_signed_payload(job)),
                            "the signed fields do not match the signature")

    def verify_cheat(self, report: V0JobCheated) -> Verification:
        """Check a cheat report's signature, in the SDK's string form or the validator's dict form."""
        as_string, as_dict = cheat_payloads(report)
        return self._verify(
            report.signature,
            lambda parsed: _verifies(parsed, as_string) or _verifies(parsed, as_dict),
            "the signed report fields do not match the signature",
        )

    def _verify(self, obj: object, check: Callable[[_Signature], bool], mismatch: str) -> Verification:
        try:
            parsed = _parse(obj)
        except _Refused as refused:
            return Verification(refused.failure, refused.message)

        def fail(failure: SignatureFailure, message: str) -> Verification:
            return Verification(failure, message, parsed.signatory, parsed.timestamp_ns)

        if parsed.public_key not in self._trusted:
            return fail(
                SignatureFailure.UNTRUSTED,
                f"signatory {parsed.signatory} is neither this validator's hotkey nor a trusted signatory"
                " (to run its jobs, add it to trusted_signatories / run --trusted-signer)",
            )
        if self._max_age_ns is not None:
            age_ns = self._clock_ns() - parsed.timestamp_ns
            if abs(age_ns) > self._max_age_ns:
                when = f"{age_ns / 1e9:.1f} s old" if age_ns > 0 else f"{-age_ns / 1e9:.1f} s in the future"
                bound = f"{self._max_age_ns / 1e9:g} s"
                return fail(SignatureFailure.STALE, f"signature timestamp is {when}, beyond the {bound} bound")
        try:
            matches = check(parsed)
        except Exception as exc:  # e.g. a payload json cannot write: refused, never dispatched
            return fail(SignatureFailure.INVALID, f"the signed fields cannot be computed ({type(exc).__name__}: {exc})")
        if not matches:
            return fail(SignatureFailure.INVALID, f"{mismatch} (signatory {parsed.signatory})")
        return Verification(None, "verified", parsed.signatory, parsed.timestamp_ns)



def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:60] + "…"
