"""InferenceObjective and InferenceModelRewrite (``llm-d.ai/v1alpha2``): parsing, the
store both sources feed, and the per-request lookups.

Rewrite precedence, as llm-d documents it: across every rewrite that applies to the
pool, a rule with an Exact match on the request's model beats a generic rule (no
matches); among equals the oldest object (creationTimestamp, then name) wins; within one
object the first matching rule in list order wins. A rule's targets are chosen by weight
per request.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

__all__ = [
    "API_GROUP",
    "ObjectStore",
    "ObjectiveSpec",
    "RewriteRule",
    "RewriteSpec",
    "choose_target",
    "parse_object",
]

API_GROUP = "llm-d.ai"
API_VERSION = "llm-d.ai/v1alpha2"
KINDS = ("InferenceObjective", "InferenceModelRewrite")


class _Loose(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class PoolRef(_Loose):
    name: str = Field(min_length=1)
    group: str = "inference.networking.k8s.io"
    kind: str = "InferencePool"


class ObjectiveSpecModel(_Loose):
    priority: int = 0
    poolRef: PoolRef  # noqa: N815


class ModelMatch(_Loose):
    type: str = "Exact"
    value: str = Field(min_length=1)


class Match(_Loose):
    model: ModelMatch


class Target(_Loose):
    weight: int | None = Field(default=None, ge=1, le=1_000_000)
    modelRewrite: str = Field(min_length=1)  # noqa: N815


class RuleModel(_Loose):
    matches: list[Match] = Field(default_factory=list)
    targets: list[Target] = Field(min_length=1)

    @model_validator(mode="after")
    def _weights(self) -> RuleModel:
        weighted = [t.weight is not None for t in self.targets]
        if any(weighted) and not all(weighted):
            raise ValueError("if one target sets a weight, all must")
        for m in self.matches:
            if m.model.type != "Exact":
                raise ValueError(f"match type {m.model.type!r} is not supported (only Exact)")
        return self


class RewriteSpecModel(_Loose):
    poolRef: PoolRef  # noqa: N815
    rules: list[RuleModel] = Field(min_length=1)


@dataclass(frozen=True)
class ObjectiveSpec:
    namespace: str
    name: str
    priority: int
    pool: str


@dataclass(frozen=True)
class RewriteRule:
    models: tuple[str, ...]  # empty: generic
    targets: tuple[tuple[str, int], ...]  # (model, weight)


@dataclass(frozen=True)
class RewriteSpec:
    namespace: str
    name: str
    created: str
    pool: str
    rules: tuple[RewriteRule, ...]


def parse_object(doc: Mapping[str, Any], where: str = "") -> ObjectiveSpec | RewriteSpec:
    """One object in its Kubernetes form; ``ValueError`` naming what is wrong."""
    kind = doc.get("kind")
    if kind not in KINDS:
        raise ValueError(f"{where}kind {kind!r} is not one of {', '.join(KINDS)}")
    meta = doc.get("metadata") or {}
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}{kind} without metadata.name")
    ns = str(meta.get("namespace") or "default")
    created = str(meta.get("creationTimestamp") or "")
    label = f"{where}{kind} {ns}/{name}: "
    try:
        if kind == "InferenceObjective":
            o = ObjectiveSpecModel.model_validate(doc.get("spec") or {})
            return ObjectiveSpec(ns, name, o.priority, o.poolRef.name)
        r = RewriteSpecModel.model_validate(doc.get("spec") or {})
    except ValidationError as exc:
        msgs = "; ".join(
            f"spec.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        raise ValueError(label + msgs) from None
    rules = tuple(
        RewriteRule(
            tuple(m.model.value for m in rule.matches),
            tuple((t.modelRewrite, t.weight or 1) for t in rule.targets),
        )
        for rule in r.rules
    )
    return RewriteSpec(ns, name, created, r.poolRef.name, rules)


def choose_target(targets: tuple[tuple[str, int], ...], draw: float) -> str:
    """The target whose weight range holds ``draw`` in [0, 1)."""
    total = sum(w for _, w in targets)
    point = draw * total
    acc = 0.0
    for model, weight in targets:
        acc += weight
        if point < acc:
            return model
    return targets[-1][0]


@dataclass
class ObjectStore:
    """The objects that apply to this EPP's pool (``pool`` None: all), by source."""

    pool: str | None = None
    rng: random.Random = field(default_factory=random.Random)
    _objectives: dict[str, dict[tuple[str, str], ObjectiveSpec]] = field(default_factory=dict)
    _rewrites: dict[str, dict[tuple[str, str], RewriteSpec]] = field(default_factory=dict)
    _by_name: dict[str, ObjectiveSpec] = field(default_factory=dict)
    _exact: dict[str, list[tuple[tuple[str, str], RewriteRule, str]]] = field(default_factory=dict)
    _generic: list[tuple[tuple[str, str], RewriteRule, str]] = field(default_factory=list)

    def applies(self, obj: ObjectiveSpec | RewriteSpec) -> bool:
        return self.pool is None or obj.pool == self.pool

    def replace(self, source: str, objects: Iterable[ObjectiveSpec | RewriteSpec]) -> None:
        """Set everything one source provides (a full listing)."""
        objectives: dict[tuple[str, str], ObjectiveSpec] = {}
        rewrites: dict[tuple[str, str], RewriteSpec] = {}
        for obj in objects:
            if not self.applies(obj):
                continue
            if isinstance(obj, ObjectiveSpec):
                objectives[(obj.namespace, obj.name)] = obj
            else:
                rewrites[(obj.namespace, obj.name)] = obj
        self._objectives[source] = objectives
        self._rewrites[source] = rewrites
        self._rebuild()

    def upsert(self, source: str, obj: ObjectiveSpec | RewriteSpec) -> None:
        key = (obj.namespace, obj.name)
        self._objectives.setdefault(source, {}).pop(key, None)
        self._rewrites.setdefault(source, {}).pop(key, None)
        if self.applies(obj):
            if isinstance(obj, ObjectiveSpec):
                self._objectives[source][key] = obj
            else:
                self._rewrites[source][key] = obj
        self._rebuild()

    def delete(self, source: str, kind: str, namespace: str, name: str) -> None:
        table: Mapping[str, dict[tuple[str, str], Any]] = (
            self._objectives if kind == "InferenceObjective" else self._rewrites
        )
        table.get(source, {}).pop((namespace, name), None)
        self._rebuild()

    def _rebuild(self) -> None:
        by_name: dict[str, ObjectiveSpec] = {}
        for objs in self._objectives.values():
            for o in objs.values():
                by_name[o.name] = o
        rewrites = sorted(
            (r for objs in self._rewrites.values() for r in objs.values()),
            key=lambda r: (r.created, r.namespace, r.name),
        )
        exact: dict[str, list[tuple[tuple[str, str], RewriteRule, str]]] = {}
        generic: list[tuple[tuple[str, str], RewriteRule, str]] = []
        for r in rewrites:
            for rule in r.rules:
                entry = ((r.namespace, r.name), rule, r.name)
                if not rule.models:
                    generic.append(entry)
                for model in dict.fromkeys(rule.models):
                    exact.setdefault(model, []).append(entry)
        self._by_name, self._exact, self._generic = by_name, exact, generic

    @property
    def objectives(self) -> dict[str, ObjectiveSpec]:
        return dict(self._by_name)

    def objective(self, name: str) -> ObjectiveSpec | None:
        return self._by_name.get(name)

    def rule_for(self, model: str) -> tuple[RewriteRule, str] | None:
        """The highest-precedence rule for ``model`` and the rewrite object's name."""
        entries = self._exact.get(model) if model else None
        if entries:
            return entries[0][1], entries[0][2]
        if self._generic:
            return self._generic[0][1], self._generic[0][2]
        return None

    def rewrite(self, model: str) -> tuple[str, str] | None:
        """``(target_model, rewrite_name)`` for this request, or None."""
        found = self.rule_for(model)
        if found is None:
            return None
        rule, name = found
        return choose_target(rule.targets, self.rng.random()), name
