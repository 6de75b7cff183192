"""Fairness policies: which flow of a priority band dispatches next."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field

from epp.flowcontrol.item import FlowItem
from epp.flowcontrol.queues import Band, FlowQueue

__all__ = [
    "FairnessPolicy",
    "GlobalStrictFairness",
    "ProgramAwareFairness",
    "RoundRobinFairness",
    "las_pick",
]


class _NoParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FairnessPolicy:
    type_name: ClassVar[str] = ""
    Params: ClassVar[type[BaseModel]] = _NoParams

    def __init__(self, params: BaseModel | None = None, name: str | None = None) -> None:
        self.params = params if params is not None else self.Params()
        self.name = name or self.type_name

    def select(self, band: Band, now: float) -> FlowQueue | None:
        raise NotImplementedError

    def on_dispatch(self, item: FlowItem, now: float) -> None:
        return None

    def on_finished(self, item: FlowItem, output_tokens: int, now: float) -> None:
        return None

    def on_usage(self, item: FlowItem, output_tokens: int, now: float) -> None:
        """The finished request's response reported its output tokens."""
        return None


class GlobalStrictFairness(FairnessPolicy):
    """No fairness: the flow holding the band's best head (by the ordering policy)."""

    type_name = "global-strict-fairness-policy"

    def select(self, band: Band, now: float) -> FlowQueue | None:
        best: FlowQueue | None = None
        best_key: tuple[float, float, int] | None = None
        for q in band.active():
            key = q.head_key()
            if key is not None and (best_key is None or key < best_key):
                best, best_key = q, key
        return best


class RoundRobinFairness(FairnessPolicy):
    """One turn per non-empty flow, in sorted flow-id order, from a per-band cursor."""

    type_name = "round-robin-fairness-policy"

    def __init__(self, params: BaseModel | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        self._cursor: dict[int, str] = {}

    def select(self, band: Band, now: float) -> FlowQueue | None:
        flows = sorted(band.active(), key=lambda q: q.fairness_id)
        if not flows:
            return None
        last = self._cursor.get(band.priority)
        chosen = flows[0]
        if last is not None:
            chosen = next((q for q in flows if q.fairness_id > last), flows[0])
        self._cursor[band.priority] = chosen.fairness_id
        return chosen


class ProgramAwareParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    strategy: Literal["las"] = "las"
    lasWeightService: float = Field(0.8, ge=0.0)  # noqa: N815
    lasWeightHeadWait: float = Field(0.2, ge=0.0)  # noqa: N815
    lasHalfLifeSeconds: float = Field(60.0, ge=0.0)  # noqa: N815
    evictionTtlSeconds: float = Field(3600.0, gt=0.0)  # noqa: N815
    evictionSweepSeconds: float = Field(300.0, gt=0.0)  # noqa: N815


@dataclass
class _Program:
    service: float = 0.0
    updated: float = 0.0
    in_flight: int = 0
    last_done: float = 0.0


def _decayed(p: _Program, now: float, half_life: float) -> float:
    if half_life <= 0 or p.service == 0.0:
        return p.service
    return p.service * math.pow(0.5, max(0.0, now - p.updated) / half_life)


def _normalize(v: float, lo: float, hi: float) -> float:
    return 0.0 if hi <= lo else (v - lo) / (hi - lo)


def las_pick(
    candidates: list[tuple[str, float, float]], w_service: float, w_wait: float
) -> str | None:
    """Least attained service: ``(program, service, head_wait)`` -> the program whose
    ``w_service * (1 - norm(service)) + w_wait * norm(head_wait)`` is highest."""
    if not candidates:
        return None
    services = [c[1] for c in candidates]
    waits = [c[2] for c in candidates]
    lo_s, hi_s, lo_w, hi_w = min(services), max(services), min(waits), max(waits)
    best, best_score = None, -math.inf
    for program, service, wait in candidates:
        score = w_service * (1 - _normalize(service, lo_s, hi_s)) + w_wait * _normalize(
            wait, lo_w, hi_w
        )
        if score > best_score:
            best, best_score = program, score
    return best


class ProgramAwareFairness(FairnessPolicy):
    """Least attained service between programs (the fairness id): attained service is
    input tokens plus twice the output tokens, decayed with a wall-clock half-life."""

    type_name = "program-aware-fairness"
    Params = ProgramAwareParams
    params: ProgramAwareParams

    def __init__(
        self,
        params: BaseModel | None = None,
        name: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(params, name)
        self._programs: dict[str, _Program] = {}
        self._clock = clock
        self._last_sweep = clock()

    def service(self, program: str, now: float) -> float:
        p = self._programs.get(program)
        return 0.0 if p is None else _decayed(p, now, self.params.lasHalfLifeSeconds)

    def _add(self, program: str, amount: float, now: float) -> _Program:
        p = self._programs.setdefault(program, _Program(updated=now))
        p.service = _decayed(p, now, self.params.lasHalfLifeSeconds) + amount
        p.updated = now
        return p

    def select(self, band: Band, now: float) -> FlowQueue | None:
        self._sweep(now)
        flows = {q.fairness_id: q for q in band.active()}
        candidates = []
        for fid, q in flows.items():
            head = q.peek()
            wait = now - head.enqueued if head is not None else 0.0
            candidates.append((fid, self.service(fid, now), wait))
        p = self.params
        chosen = las_pick(sorted(candidates), p.lasWeightService, p.lasWeightHeadWait)
        return flows[chosen] if chosen is not None else None

    def on_dispatch(self, item: FlowItem, now: float) -> None:
        prog = self._add(item.key.fairness_id, float(item.tokens), now)
        prog.in_flight += 1

    def on_finished(self, item: FlowItem, output_tokens: int, now: float) -> None:
        prog = self._add(item.key.fairness_id, 2.0 * output_tokens, now)
        prog.in_flight = max(0, prog.in_flight - 1)
        prog.last_done = now

    def on_usage(self, item: FlowItem, output_tokens: int, now: float) -> None:
        if output_tokens > 0:
            self._add(item.key.fairness_id, 2.0 * output_tokens, now)

    def _sweep(self, now: float) -> None:
        p = self.params
        if now - self._last_sweep < p.evictionSweepSeconds:
            return
        self._last_sweep = now
        for program, state in list(self._programs.items()):
            if state.in_flight == 0 and now - max(state.last_done, state.updated) > (
                p.evictionTtlSeconds
            ):
                del self._programs[program]

    @property
    def programs(self) -> int:
        return len(self._programs)
