"""Admitters: refuse a request before it is queued or scheduled."""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from epp.datastore import Endpoint

if TYPE_CHECKING:
    from epp.scheduling.cycle import CycleState

__all__ = ["Admitter", "ProbabilisticAdmitter", "shed_probability"]


class Admitter:
    """An admitter decides before the request is queued (``admit``), or, with
    ``after_producers``, once flow control dispatched it and the data producers ran on
    its candidates (``admit_request``), as llm-d orders its admission plugins."""

    type_name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = BaseModel
    after_producers: ClassVar[bool] = False

    def __init__(self, params: BaseModel | None = None, name: str | None = None) -> None:
        self.params = params if params is not None else self.Params()
        self.name = name or self.type_name

    def admit(self, priority: int, endpoints: Sequence[Endpoint], now: float) -> str | None:
        """None to admit, else the reason for the refusal."""
        raise NotImplementedError

    def admit_request(
        self, priority: int, cycle: CycleState, endpoints: Sequence[Endpoint]
    ) -> str | None:
        """With ``after_producers``: None to admit, else the reason for the refusal."""
        return None


class ProbabilisticParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    queueDepthThreshold: int = Field(5, gt=0)  # noqa: N815
    kvCacheUtilThreshold: float = Field(0.8, gt=0.0, le=1.0)  # noqa: N815
    power: float = Field(5.0, gt=0.0)
    k: float = Field(300.0, gt=0.0)


def shed_probability(saturation: float, power: float, k: float) -> float:
    return min(saturation**power * k, 1.0) if saturation > 0 else 0.0


class ProbabilisticAdmitter(Admitter):
    """Sheddable requests (priority < 0) are refused with probability
    ``min(saturation^power * k, 1)``; the saturation is the roofline average over the
    endpoints, an endpoint without metrics counting as fully saturated."""

    type_name = "probabilistic-admitter"
    Params = ProbabilisticParams
    params: ProbabilisticParams

    def __init__(
        self,
        params: BaseModel | None = None,
        name: str | None = None,
        rng: random.Random | None = None,
    ) -> None:
        super().__init__(params, name)
        self.rng = rng or random.Random()

    def saturation(self, endpoints: Sequence[Endpoint]) -> float:
        p = self.params
        total = 0.0
        for ep in endpoints:
            m = ep.metrics
            if m.updated_at <= 0:
                total += 1.0
                continue
            total += max(m.waiting / p.queueDepthThreshold, m.kv_usage / p.kvCacheUtilThreshold)
        return total / len(endpoints)

    def admit(self, priority: int, endpoints: Sequence[Endpoint], now: float) -> str | None:
        if priority >= 0 or not endpoints:
            return None
        p = self.params
        prob = shed_probability(self.saturation(endpoints), p.power, p.k)
        if prob > 0 and self.rng.random() < prob:
            return "rejected-saturated"
        return None
