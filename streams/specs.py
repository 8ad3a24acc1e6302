"""The facilitator's hardware schema, to check machine specs before they are queued.

The real facilitator parses ``V0MachineSpecsUpdate.specs`` with pydantic models; specs that do not fit
make its handler **crash** (no Response, TCP drop), and again on every later connection that carries
the same update (PROTOCOL.md, "Machine specs"). So the client checks them first and never sends
specs that would not parse. The models below follow that schema field by field, parsed the way
pydantic parses them upstream (lax mode: ``"3"`` is an int, ``2`` is a number), so whatever passes
here the facilitator can store, and nothing it could store is refused here.

    validate_specs({"cpu": {"count": 8}, "ram": {"total": ""}, "hard_disk": {}})   # -> []
    validate_specs({"cpu": {"count": 8, "cores": 4}, "ram": {}, "hard_disk": {}})
    # -> ["cpu.cores: Extra inputs are not permitted"]
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

__all__ = ["CpuSpecs", "GpuDetailSpecs", "GpuSpecs", "HardDiskSpecs", "MachineSpecs", "RamSpecs", "validate_specs"]


class _Part(BaseModel):
    """A sub-object of the specs: the facilitator forbids keys it does not know."""

    model_config = ConfigDict(extra="forbid")


class _EmptyIsNull(_Part):
    """``ram`` and ``hard_disk``: upstream reads ``""`` as null (tools print empty strings for unknowns)."""

    @field_validator("*", mode="before")
    @classmethod
    def _empty_is_null(cls, value: object) -> object:
        return None if value == "" else value


class CpuSpecs(_Part):
    count: int
    model: str | None = None
    frequency: Decimal | None = None
    clocks: list[float] | None = None


class GpuDetailSpecs(_Part):
    name: str
    capacity: float | None = None
    cuda: str | None = None
    driver: str | None = None
    graphics_speed: int | None = None
    memory_speed: int | None = None
    power_limit: float | None = None
    uuid: str | None = None
    serial: str | None = None

    @field_validator("power_limit", mode="before")
    @classmethod
    def _unparsable_is_null(cls, value: object) -> float | None:
        """Upstream turns any power limit it cannot read as a number (``"[N/A]"``) into null."""
        if value is None or isinstance(value, bool):
            return None
        try:
            return float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return None


class GpuSpecs(_Part):
    capacity: float | None = None
    count: int | None = None
    details: list[GpuDetailSpecs] = Field(default_factory=list)
    graphics_speed: int | None = None
    memory_speed: int | None = None


class RamSpecs(_EmptyIsNull):
    """Sizes in kiB."""

    total: float | None = None
    free: float | None = None
    available: float | None = None
    used: float | None = None
    read_speed: Decimal | None = None
    write_speed: Decimal | None = None
    swap_free: int | None = None
    swap_total: int | None = None
    swap_used: int | None = None


class HardDiskSpecs(_EmptyIsNull):
    """Sizes in kiB."""

    total: float | None = None
    free: float | None = None
    used: float | None = None
    read_speed: Decimal | None = None
    write_speed: Decimal | None = None


class MachineSpecs(BaseModel):
    """The top level: ``cpu``, ``ram`` and ``hard_disk`` required; other top-level keys are allowed."""

    model_config = ConfigDict(extra="allow")

    cpu: CpuSpecs
    gpu: GpuSpecs | None = None
    hard_disk: HardDiskSpecs
    has_docker: bool | None = None
    os: str | None = None
    ram: RamSpecs
    virtualization: str | None = None


def validate_specs(specs: object) -> list[str]:
    """The reasons the facilitator could not parse ``specs``, as ``"field.path: problem"``; [] if it can."""
    if not isinstance(specs, dict):
        return [f"specs: must be a JSON object, got {type(specs).__name__}"]
    try:
        MachineSpecs.model_validate(specs)
    except ValidationError as exc:
        return [_describe(error) for error in exc.errors(include_url=False, include_context=False)]
    return []


def _describe(error: Any) -> str:
    where = ".".join(str(part) for part in error["loc"]) or "specs"
    text = f"{where}: {error['msg']}"
    if error["type"] not in ("missing", "extra_forbidden") and "input" in error:
        shown = repr(error["input"])
        text += f" (got {shown if len(shown) <= 60 else shown[:60] + '…'})"
    return text
