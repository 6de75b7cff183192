"""Role filters (by the ``llm-d.ai/role`` label) and the label-selector filter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

from pydantic import Field

from epp.datastore import Endpoint
from epp.plugins.base import Filter, PluginParams
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState

__all__ = [
    "DecodeFilter",
    "EncodeFilter",
    "LabelSelectorFilter",
    "LabelSelectorRequirement",
    "PrefillFilter",
]


class _RoleFilter(Filter):
    """Accepts endpoints whose role is in ``roles``; ``accept_unlabelled`` for no label."""

    roles: ClassVar[frozenset[str]] = frozenset()
    accept_unlabelled: ClassVar[bool] = False

    def filter(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        roles = self.roles
        unlabelled = self.accept_unlabelled
        out = []
        for ep in endpoints:
            role = ep.role
            if (role is None and unlabelled) or role in roles:
                out.append(ep)
        return out


@register
class DecodeFilter(_RoleFilter):
    """Decode-capable pods; a pod without a role label serves as decode."""

    type_name = "decode-filter"
    roles = frozenset({"decode", "prefill-decode", "both", "encode-prefill-decode"})
    accept_unlabelled = True


@register
class PrefillFilter(_RoleFilter):
    type_name = "prefill-filter"
    roles = frozenset(
        {"prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"}
    )


@register
class EncodeFilter(_RoleFilter):
    type_name = "encode-filter"
    roles = frozenset({"encode", "encode-prefill", "encode-prefill-decode"})


class LabelSelectorRequirement(PluginParams):
    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        if self.operator == "Exists":
            return present
        if self.operator == "DoesNotExist":
            return not present
        if self.operator == "In":
            return present and labels[self.key] in self.values
        return not present or labels[self.key] not in self.values


@register
class LabelSelectorFilter(Filter):
    """Kubernetes label selector semantics: all matchLabels and all expressions hold."""

    type_name = "label-selector-filter"

    class Params(PluginParams):
        match_labels: dict[str, str] = Field(default_factory=dict)
        match_expressions: list[LabelSelectorRequirement] = Field(default_factory=list)

    params: Params

    def filter(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        want = self.params.match_labels.items()
        exprs = self.params.match_expressions
        return [
            ep
            for ep in endpoints
            if all(ep.labels.get(k) == v for k, v in want)
            and all(e.matches(ep.labels) for e in exprs)
        ]
