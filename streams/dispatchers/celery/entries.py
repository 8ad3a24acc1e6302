"""The status stream entry format: what a worker XADDs and the validator's client reads back."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import orjson

from streams.dispatchers.base import Metadata
from streams.protocol import JobStatus, JobStatusMetadata, JobStatusUpdate

if TYPE_CHECKING:
    pass

log = logging.getLogger(__name__)

__all__ = [
    "as_metadata",
    "decode_entry",
    "encode_entry",
]




def encode_entry(job_uuid: str, status: JobStatus | str, metadata: Metadata = None) -> dict[str, str]:
    """Validate a status update (as the client will) and turn it into stream entry fields.

    Validating here, on the worker, keeps a bad update out of the stream: the task fails instead.
    """
    update = JobStatusUpdate(uuid=job_uuid, status=JobStatus(status), metadata=as_metadata(metadata))
    if update.metadata is None:
        encoded = b"null"
    elif isinstance(metadata, JobStatusMetadata) or metadata is None:
        encoded = orjson.dumps(update.metadata.model_dump(mode="json", exclude_none=True))
    else:
        encoded = orjson.dumps(dict(metadata))  # the host's own object, as it gave it
    return {"job_uuid": job_uuid, "status": update.status.value, "metadata": encoded.decode()}


def decode_entry(fields: Mapping[str, str]) -> JobStatusUpdate:
    """Stream entry fields back into a JobStatusUpdate; ValueError if they do not make one."""
    try:
        job_uuid, status, metadata = fields["job_uuid"], fields["status"], fields.get("metadata", "null")
        parsed = orjson.loads(metadata) if metadata else None
        return JobStatusUpdate(uuid=job_uuid, status=JobStatus(status), metadata=as_metadata(parsed))
    except (KeyError, TypeError, ValueError, orjson.JSONDecodeError) as exc:
        raise ValueError(f"not a status entry ({type(exc).__name__}: {exc})"[:500]) from None


def as_metadata(metadata: Any) -> JobStatusMetadata | None:
    if metadata is None or isinstance(metadata, JobStatusMetadata):
        return metadata
    if not isinstance(metadata, Mapping):
        raise TypeError(f"metadata must be a mapping or None, got {type(metadata).__name__}")
    return JobStatusMetadata.model_validate(dict(metadata))
