"""The request-management sections of an EndpointPickerConfig, parsed and resolved.

- ``featureGates``: a list (``name``, ``name=true``, ``name=false``) or a mapping; the
  ``flowControl`` gate turns flow control on.
- ``flowControl``: llm-d's FlowControlConfig (limits, TTLs, priority bands, the
  usage-limit policy and saturation detector references). Set while the gate is off,
  only its ``saturationDetector`` is used (a warning says so), as in llm-d.
- ``saturationDetector`` (top level, deprecated in llm-d): used when
  ``flowControl.saturationDetector`` is not set.
- Flow-control plugins are declared in ``plugins`` like any other; ``split_plugins``
  takes them out before the scheduling plugins are built.

Plugin types and fields this EPP does not implement are refused with a message naming
them, never silently accepted.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from common.durations import parse_duration
from epp.flowcontrol.admitters import Admitter, ProbabilisticAdmitter
from epp.flowcontrol.controller import (
    DEFAULT_BAND_MAX_BYTES,
    DEFAULT_BAND_MAX_REQUESTS,
    DEFAULT_TTL_S,
    BandSpec,
    ControllerConfig,
)
from epp.flowcontrol.eviction import (
    ENGINE_RECLAIM_BUDGET_S,
    LEADING_SENSOR_GRACE_S,
    EvictionFilterPolicy,
    EvictionOrderingPolicy,
    PriorityThenTimeEvictionOrdering,
    RequestEvictor,
    SheddableEvictionFilter,
)
from epp.flowcontrol.fairness import (
    FairnessPolicy,
    GlobalStrictFairness,
    ProgramAwareFairness,
    RoundRobinFairness,
)
from epp.flowcontrol.latency_admitter import LatencySloAdmitter
from epp.flowcontrol.ordering import (
    EdfOrdering,
    FcfsOrdering,
    OrderingPolicy,
    SloDeadlineOrdering,
)
from epp.flowcontrol.quantity import parse_quantity
from epp.flowcontrol.saturation import ConcurrencyDetector, SaturationDetector, UtilizationDetector
from epp.flowcontrol.usage_limits import (
    PriorityHoldback,
    SoftReflectiveCeiling,
    StaticUsageLimit,
    UsageLimitPolicy,
)

__all__ = [
    "FLOW_CONTROL_GATE",
    "FLOW_CONTROL_TYPES",
    "REFUSED_TYPES",
    "EvictionSetup",
    "FlowControlSetup",
    "build_flow_control",
    "gate_enabled",
    "is_flow_control_type",
]

log = logging.getLogger(__name__)

FLOW_CONTROL_GATE = "flowControl"

FLOW_CONTROL_TYPES: dict[str, type[Any]] = {
    cls.type_name: cls
    for cls in (
        UtilizationDetector,
        ConcurrencyDetector,
        GlobalStrictFairness,
        RoundRobinFairness,
        ProgramAwareFairness,
        FcfsOrdering,
        EdfOrdering,
        SloDeadlineOrdering,
        StaticUsageLimit,
        PriorityHoldback,
        SoftReflectiveCeiling,
        ProbabilisticAdmitter,
        LatencySloAdmitter,
        SheddableEvictionFilter,
        PriorityThenTimeEvictionOrdering,
    )
}
# The names llm-d's documentation uses for the eviction policies.
FLOW_CONTROL_TYPES["eviction-sheddable-filter"] = SheddableEvictionFilter
FLOW_CONTROL_TYPES["eviction-priority-then-time-ordering"] = PriorityThenTimeEvictionOrdering

# Known llm-d request-management plugin types this EPP does not implement.
REFUSED_TYPES: dict[str, str] = {}


def is_flow_control_type(type_name: str) -> bool:
    return type_name in FLOW_CONTROL_TYPES or type_name in REFUSED_TYPES


def gate_enabled(gates: Sequence[str] | Mapping[str, bool] | None, name: str) -> bool:
    if gates is None:
        return False
    if isinstance(gates, Mapping):
        return bool(gates.get(name, False))
    enabled = False
    for entry in gates:
        gate, _, value = entry.partition("=")
        if gate.strip() != name:
            continue
        value = value.strip().lower()
        if value not in ("", "true", "false"):
            raise ValueError(f"featureGates: '{entry}': the value must be true or false")
        enabled = value != "false"
    return enabled


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _quantity(v: object) -> int:
    if v is None:
        return 0
    return parse_quantity(v)  # type: ignore[arg-type]


def _seconds(v: object) -> float | None:
    if v is None:
        return None
    return parse_duration(v)  # type: ignore[arg-type]


class PluginRef(_Strict):
    pluginRef: str = ""  # noqa: N815


class PriorityBandSection(_Strict):
    priority: int = 0
    maxBytes: int = 0  # noqa: N815
    maxRequests: int = 0  # noqa: N815
    fairnessPolicyRef: str = ""  # noqa: N815
    orderingPolicyRef: str = ""  # noqa: N815

    @field_validator("maxBytes", "maxRequests", mode="before")
    @classmethod
    def _q(cls, v: object) -> int:
        return _quantity(v)


class FlowControlSection(_Strict):
    maxBytes: int = 0  # noqa: N815
    maxRequests: int = 0  # noqa: N815
    defaultRequestTTL: float | None = None  # noqa: N815
    noEndpointRequestTTL: float | None = None  # noqa: N815
    defaultPriorityBand: PriorityBandSection | None = None  # noqa: N815
    defaultNegativePriorityBand: PriorityBandSection | None = None  # noqa: N815
    priorityBands: list[PriorityBandSection] = Field(default_factory=list)  # noqa: N815
    usageLimitPolicyPluginRef: str = ""  # noqa: N815
    saturationDetector: PluginRef | None = None  # noqa: N815
    enableEviction: bool = False  # noqa: N815

    @field_validator("maxBytes", "maxRequests", mode="before")
    @classmethod
    def _q(cls, v: object) -> int:
        return _quantity(v)

    @field_validator("defaultRequestTTL", "noEndpointRequestTTL", mode="before")
    @classmethod
    def _d(cls, v: object) -> float | None:
        return _seconds(v)


@dataclass(frozen=True)
class FlowControlSetup:
    """What the admission path needs: the gate, the detector, the admitters and, with
    the gate on, the controller's configuration."""

    enabled: bool = False
    detector: SaturationDetector = field(default_factory=UtilizationDetector)
    admitters: tuple[Admitter, ...] = ()
    usage_limit: UsageLimitPolicy = field(default_factory=StaticUsageLimit)
    controller: ControllerConfig = field(default_factory=ControllerConfig)
    plugins: dict[str, Any] = field(default_factory=dict)
    # flowControl.enableEviction: the evictor's policies and pacing grace (None: off).
    eviction: EvictionSetup | None = None


@dataclass(frozen=True)
class EvictionSetup:
    filter: EvictionFilterPolicy
    ordering: EvictionOrderingPolicy
    confirmation_grace_s: float

    def build(self, on_revocations: Any = None) -> RequestEvictor:
        return RequestEvictor(
            self.ordering,
            self.filter,
            confirmation_grace_s=self.confirmation_grace_s,
            on_revocations=on_revocations,
        )


def _fmt(exc: ValidationError, prefix: str) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        parts.append(f"{prefix}.{loc}: {err['msg']}" if loc else f"{prefix}: {err['msg']}")
    return "; ".join(parts)


def build_plugin(index: int, type_name: str, name: str, parameters: dict[str, Any] | None) -> Any:
    where = f"plugins[{index}] (type '{type_name}', name '{name}')"
    if type_name in REFUSED_TYPES:
        raise ValueError(f"{where}: not supported by this EPP: {REFUSED_TYPES[type_name]}")
    cls = FLOW_CONTROL_TYPES[type_name]
    try:
        params = cls.Params.model_validate(parameters or {})
    except ValidationError as exc:
        raise ValueError(f"{where}: {_fmt(exc, 'parameters')}") from None
    return cls(params, name)


def _resolve(
    plugins: Mapping[str, Any], ref: str, kind: type[Any], where: str, auto: bool = True
) -> Any:
    found = plugins.get(ref)
    if found is None and auto and ref in FLOW_CONTROL_TYPES:
        cls = FLOW_CONTROL_TYPES[ref]
        if issubclass(cls, kind):
            return cls()  # llm-d injects these with their defaults
    if found is None and auto and ref in FLOW_CONTROL_TYPES:
        raise ValueError(f"{where}: '{ref}' is not a {kind.__name__}")
    if found is None:
        raise ValueError(f"{where}: '{ref}' names no plugin")
    if not isinstance(found, kind):
        raise ValueError(f"{where}: plugin '{ref}' is not a {kind.__name__}")
    return found


def _band(
    section: PriorityBandSection | None,
    plugins: Mapping[str, Any],
    where: str,
    shared: dict[str, Any],
) -> BandSpec:
    s = section or PriorityBandSection()

    def policy(ref: str, kind: type[Any], default: type[Any], field_name: str) -> Any:
        if not ref:
            return shared.setdefault(default.type_name, default())
        return _resolve(plugins, ref, kind, f"{where}.{field_name}")

    return BandSpec(
        max_requests=s.maxRequests or DEFAULT_BAND_MAX_REQUESTS,
        max_bytes=s.maxBytes or DEFAULT_BAND_MAX_BYTES,
        fairness=policy(
            s.fairnessPolicyRef, FairnessPolicy, GlobalStrictFairness, "fairnessPolicyRef"
        ),
        ordering=policy(s.orderingPolicyRef, OrderingPolicy, FcfsOrdering, "orderingPolicyRef"),
    )


def build_flow_control(
    feature_gates: Sequence[str] | Mapping[str, bool] | None,
    flow_control: Mapping[str, Any] | None,
    saturation_detector: Mapping[str, Any] | None,
    plugins: Mapping[str, Any],
) -> FlowControlSetup:
    """Resolve the sections against the flow-control plugins; ``ValueError`` names the
    field at fault."""
    enabled = gate_enabled(feature_gates, FLOW_CONTROL_GATE)
    try:
        section = FlowControlSection.model_validate(flow_control or {})
    except ValidationError as exc:
        raise ValueError(_fmt(exc, "flowControl")) from None
    inline: SaturationDetector | None = None
    legacy_doc = dict(saturation_detector or {})
    if legacy_doc and "pluginRef" not in legacy_doc:
        # The older inline form: the utilization detector's parameters themselves.
        try:
            inline = UtilizationDetector(UtilizationDetector.Params.model_validate(legacy_doc))
        except ValidationError as exc:
            raise ValueError(_fmt(exc, "saturationDetector")) from None
        legacy_doc = {}
    try:
        legacy = PluginRef.model_validate(legacy_doc)
    except ValidationError as exc:
        raise ValueError(_fmt(exc, "saturationDetector")) from None
    detector_ref = (section.saturationDetector and section.saturationDetector.pluginRef) or (
        legacy.pluginRef
    )
    detectors = [p for p in plugins.values() if isinstance(p, SaturationDetector)]
    if detector_ref:
        where = (
            "flowControl.saturationDetector.pluginRef"
            if section.saturationDetector and section.saturationDetector.pluginRef
            else "saturationDetector.pluginRef"
        )
        detector = _resolve(plugins, detector_ref, SaturationDetector, where)
    elif inline is not None:
        detector = inline
    elif len(detectors) == 1:
        detector = detectors[0]
    elif len(detectors) > 1:
        raise ValueError(
            "plugins: several saturation detectors; choose one with "
            "flowControl.saturationDetector.pluginRef"
        )
    else:
        detector = UtilizationDetector()
    admitters = tuple(p for p in plugins.values() if isinstance(p, Admitter))
    usage_limit: UsageLimitPolicy = StaticUsageLimit()
    if section.usageLimitPolicyPluginRef:
        usage_limit = _resolve(
            plugins,
            section.usageLimitPolicyPluginRef,
            UsageLimitPolicy,
            "flowControl.usageLimitPolicyPluginRef",
        )
    shared: dict[str, Any] = {}
    bands: dict[int, BandSpec] = {}
    for i, band in enumerate(section.priorityBands):
        if band.priority in bands:
            raise ValueError(f"flowControl.priorityBands[{i}]: duplicate priority {band.priority}")
        bands[band.priority] = _band(band, plugins, f"flowControl.priorityBands[{i}]", shared)
    default_band = _band(
        section.defaultPriorityBand, plugins, "flowControl.defaultPriorityBand", shared
    )
    negative = (
        _band(
            section.defaultNegativePriorityBand,
            plugins,
            "flowControl.defaultNegativePriorityBand",
            shared,
        )
        if section.defaultNegativePriorityBand is not None
        else None
    )
    default_ttl = section.defaultRequestTTL
    no_ep_ttl = section.noEndpointRequestTTL
    if default_ttl is None:
        default_ttl = DEFAULT_TTL_S
    if no_ep_ttl is None:
        no_ep_ttl = default_ttl
    controller = ControllerConfig(
        default_ttl_s=default_ttl,
        no_endpoint_ttl_s=no_ep_ttl,
        max_requests=section.maxRequests,
        max_bytes=section.maxBytes,
        bands=bands,
        default_band=default_band,
        default_negative_band=negative,
    )
    eviction: EvictionSetup | None = None
    if section.enableEviction:
        eviction = _eviction(plugins, detector)
    ignored = {k for k in (flow_control or {}) if k != "saturationDetector"}
    if not enabled and ignored:
        log.warning(
            "flowControl: the %s feature gate is off, so only flowControl.saturationDetector "
            "is used; ignored: %s",
            FLOW_CONTROL_GATE,
            ", ".join(sorted(ignored)),
        )
    return FlowControlSetup(
        enabled=enabled,
        detector=detector,
        admitters=admitters,
        usage_limit=usage_limit,
        controller=controller,
        plugins=dict(plugins),
        eviction=eviction,
    )


def _eviction(plugins: Mapping[str, Any], detector: SaturationDetector) -> EvictionSetup:
    """The eviction policies (a configured instance, else llm-d's defaults) and the
    pacing grace, derived from how soon the detector sees freed capacity."""
    filters = [p for p in plugins.values() if isinstance(p, EvictionFilterPolicy)]
    orderings = [p for p in plugins.values() if isinstance(p, EvictionOrderingPolicy)]
    if isinstance(detector, ConcurrencyDetector):
        grace = LEADING_SENSOR_GRACE_S
    else:
        stale = getattr(detector.params, "metricsStalenessThreshold", 0.0)
        grace = float(stale) + ENGINE_RECLAIM_BUDGET_S
    return EvictionSetup(
        filter=filters[0] if filters else SheddableEvictionFilter(),
        ordering=orderings[0] if orderings else PriorityThenTimeEvictionOrdering(),
        confirmation_grace_s=grace,
    )
