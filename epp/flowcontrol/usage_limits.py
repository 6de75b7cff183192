"""Usage-limit policies: one dispatch ceiling per active priority band.

``ceilings(saturation, priorities)`` takes the priorities highest first and returns a
ceiling for each; a band whose ceiling is at or below the saturation is gated (its
requests stay queued), and so are all bands below it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = [
    "PriorityHoldback",
    "SoftReflectiveCeiling",
    "StaticUsageLimit",
    "UsageLimitPolicy",
    "holdback_ceilings",
    "reflective_ceilings",
]


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UsageLimitPolicy:
    type_name: ClassVar[str] = ""
    Params: ClassVar[type[_Params]] = _Params

    def __init__(self, params: _Params | None = None, name: str | None = None) -> None:
        self.params = params if params is not None else self.Params()
        self.name = name or self.type_name

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> list[float]:
        raise NotImplementedError


class StaticParams(_Params):
    threshold: float = Field(1.0, gt=0.0, le=1.0)


class StaticUsageLimit(UsageLimitPolicy):
    type_name = "static-usage-limit-policy"
    Params = StaticParams
    params: StaticParams

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> list[float]:
        return [self.params.threshold] * len(priorities)


class HoldbackParams(_Params):
    shape: Literal["linear"] = "linear"
    domain: Literal["rank", "value"] = "rank"
    minCeiling: float = Field(ge=0.0, lt=1.0)  # noqa: N815
    maxCeiling: float = Field(1.0, gt=0.0, le=1.0)  # noqa: N815

    @model_validator(mode="after")
    def _ordered(self) -> HoldbackParams:
        if self.minCeiling > self.maxCeiling:
            raise ValueError("minCeiling must not exceed maxCeiling")
        return self


def holdback_ceilings(priorities: Sequence[int], domain: str, lo: float, hi: float) -> list[float]:
    n = len(priorities)
    if n == 0:
        return []
    if n == 1:
        return [hi]
    if domain == "value":
        p_max, p_min = max(priorities), min(priorities)
        if p_max == p_min:
            return [hi] * n
        return [lo + (p - p_min) / (p_max - p_min) * (hi - lo) for p in priorities]
    return [hi - i * (hi - lo) / (n - 1) for i in range(n)]


class PriorityHoldback(UsageLimitPolicy):
    type_name = "priority-holdback-policy"
    Params = HoldbackParams
    params: HoldbackParams

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> list[float]:
        p = self.params
        return holdback_ceilings(priorities, p.domain, p.minCeiling, p.maxCeiling)


def reflective_ceilings(saturation: float, n: int, tick: int) -> list[float]:
    """The soft reflective ceiling of each of ``n`` bands on call number ``tick``."""
    out: list[float] = []
    for i in range(n):
        if i == 0:
            out.append(1.0)
            continue
        ceiling = 1.0 - i * saturation / (n - 1)
        if saturation < ceiling:
            out.append(1.0)
        elif saturation >= 1.0:
            out.append(0.0)
        else:
            period = max(1, round(saturation / (1.0 - saturation)))
            out.append(1.0 if tick % period == 0 else 0.0)
    return out


class SoftReflectiveCeiling(UsageLimitPolicy):
    type_name = "soft-reflective-ceiling-policy"

    def __init__(self, params: _Params | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        self._tick = 0

    def ceilings(self, saturation: float, priorities: Sequence[int]) -> list[float]:
        self._tick += 1
        return reflective_ceilings(saturation, len(priorities), self._tick)
