"""The ``EndpointPickerConfig`` document: load, validate, and build the plugins.

Loading is strict: unknown top-level fields, unknown plugin types, unknown plugin
parameters and dangling references all raise ``ConfigError`` naming the field and
the plugin. The sections real llm-d configs carry that this EPP does not act on
(``requestHandler``'s other fields) are accepted so those configs load unchanged;
``requestHandler.parsers`` (or the deprecated ``parser``) chooses the request
parsers (``epp.plugins.parsers``); ``featureGates``, ``flowControl``,
``saturationDetector`` and the flow-control plugins are resolved by
``epp.flowcontrol.config``; ``dataLayer.discovery`` selects the
discovery plugin and ``dataLayer.sources`` (``data.sources`` in older configs) wires
the data layer (``epp.datalayer.wiring``).

Defaults as llm-d applies them: a plugin's name defaults to its type; a profile with
no picker gets ``max-score-picker``; a scorer with no weight gets 1; no document at
all gives one default profile; a single profile with no handler gets
``single-profile-handler``; a prefix scorer or decider with no producer gets an
``approx-prefix-cache-producer``; a plugin that reads the prompt's tokens with no
``token-producer`` declared gets one in estimate mode. Token producers run first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from common.errors import ConfigError
from epp.datalayer.latency import DEFAULT_PREDICTION_PRODUCER
from epp.datalayer.wiring import wire_data_layer
from epp.flowcontrol import config as fc_config
from epp.flowcontrol.admitters import Admitter
from epp.flowcontrol.detector_filter import as_filter
from epp.flowcontrol.saturation import SaturationDetector
from epp.plugins.base import (
    DataProducer,
    Discovery,
    Filter,
    Picker,
    Plugin,
    PluginSet,
    ProfileHandler,
    RequestTracker,
    ResponseBodyProcessor,
    ResponseHeaderProcessor,
    Scorer,
)
from epp.plugins.parsers import DEFAULT_PARSERS, Parser, ParserTable
from epp.plugins.pickers import MaxScorePicker
from epp.plugins.predicted_latency import PredictedLatencyProducer
from epp.plugins.prefix_producer import ApproxPrefixCacheProducer, PrefixParams
from epp.plugins.profile_handlers import SingleProfileHandler
from epp.plugins.registry import create_plugin, load_entry_points, lookup, registered_types
from epp.plugins.token_producer import TokenProducer
from epp.scheduling.profile import Profile, WeightedScorer
from epp.scheduling.scheduler import Scheduler

__all__ = [
    "API_VERSIONS",
    "ConfigError",
    "EndpointPickerConfig",
    "SchedulerConfig",
    "build_scheduler_config",
    "load_config",
    "parse_config_text",
]

API_VERSIONS = (
    "llm-d.ai/v1alpha1",
    "llm-d.ai/v1",
    "inference.networking.x-k8s.io/v1alpha1",
)

DEFAULT_CONFIG_TEXT = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: single-profile-handler
- type: decode-filter
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: prefix-cache-scorer
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins:
  - pluginRef: decode-filter
  - pluginRef: queue-scorer
  - pluginRef: kv-cache-utilization-scorer
  - pluginRef: prefix-cache-scorer
  - pluginRef: max-score-picker
"""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PluginSpec(_Strict):
    type: str = Field(min_length=1)
    name: str | None = None
    parameters: dict[str, Any] | None = None

    @property
    def instance_name(self) -> str:
        return self.name or self.type


class ProfilePluginRef(_Strict):
    pluginRef: str = Field(min_length=1)  # noqa: N815 - the document's field name
    weight: float | None = None


class SchedulingProfileSpec(_Strict):
    name: str = Field(min_length=1)
    plugins: list[ProfilePluginRef] = Field(default_factory=list)


class ParserRef(_Strict):
    pluginRef: str = Field(min_length=1)  # noqa: N815 - the document's field name


class RequestHandlerSpec(_Strict):
    parsers: list[ParserRef] = Field(default_factory=list)


class EndpointPickerConfig(_Strict):
    apiVersion: Literal[  # noqa: N815
        "llm-d.ai/v1alpha1", "llm-d.ai/v1", "inference.networking.x-k8s.io/v1alpha1"
    ]
    kind: Literal["EndpointPickerConfig"]
    plugins: list[PluginSpec] = Field(default_factory=list)
    schedulingProfiles: list[SchedulingProfileSpec] = Field(default_factory=list)  # noqa: N815
    # featureGates, saturationDetector and flowControl: see epp.flowcontrol.config.
    featureGates: list[str] | dict[str, bool] | None = None  # noqa: N815
    dataLayer: dict[str, Any] | None = None  # noqa: N815
    data: dict[str, Any] | None = None
    saturationDetector: dict[str, Any] | None = None  # noqa: N815
    flowControl: dict[str, Any] | None = None  # noqa: N815
    requestHandler: RequestHandlerSpec | None = None  # noqa: N815
    # Deprecated single parser; used when requestHandler.parsers is empty.
    parser: ParserRef | None = None


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Everything built from one configuration document."""

    document: EndpointPickerConfig
    plugins: PluginSet
    scheduler: Scheduler
    discovery: Discovery | None
    parsers: ParserTable
    flow_control: fc_config.FlowControlSetup = field(default_factory=fc_config.FlowControlSetup)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _format_validation(exc: ValidationError, prefix: str = "") -> str:
    parts = []
    for err in exc.errors():
        where = _loc(tuple(err["loc"]))
        if prefix:
            where = f"{prefix}.{where}" if where else prefix
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def parse_config_text(text: str, source: str = "config") -> EndpointPickerConfig:
    """Parse YAML (a superset of JSON) into the validated document."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        try:
            doc = json.loads(text)
        except ValueError:
            raise ConfigError(f"{source}: not valid YAML or JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{source}: expected a mapping with apiVersion and kind")
    try:
        return EndpointPickerConfig.model_validate(doc)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_format_validation(exc)}") from None


def _build_plugin(index: int, spec: PluginSpec) -> Plugin:
    where = f"plugins[{index}] (type '{spec.type}', name '{spec.instance_name}')"
    if lookup(spec.type) is None:
        raise ConfigError(
            f"{where}: unknown plugin type '{spec.type}'; known types: "
            f"{', '.join(registered_types())}"
        )
    try:
        return create_plugin(spec.type, spec.instance_name, spec.parameters)
    except ValidationError as exc:
        raise ConfigError(f"{where}: {_format_validation(exc, 'parameters')}") from None
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def _discovery_ref(doc: EndpointPickerConfig) -> str | None:
    layer = doc.dataLayer or {}
    discovery = layer.get("discovery")
    if discovery is None:
        return None
    if not isinstance(discovery, dict):
        raise ConfigError("dataLayer.discovery: expected a mapping")
    # v1alpha1: discovery.pluginRef; v1: discovery.endpoints.pluginRef
    ref = discovery.get("pluginRef")
    endpoints = discovery.get("endpoints")
    if ref is None and isinstance(endpoints, dict):
        ref = endpoints.get("pluginRef")
    if not isinstance(ref, str) or not ref:
        raise ConfigError("dataLayer.discovery: expected pluginRef naming a discovery plugin")
    return ref


def _build_parsers(doc: EndpointPickerConfig, plugins: PluginSet) -> ParserTable:
    """``requestHandler.parsers`` (else the deprecated ``parser``, else the defaults);
    a reference naming no declared plugin creates the parser of that type."""
    refs = [r.pluginRef for r in doc.requestHandler.parsers] if doc.requestHandler else []
    where = "requestHandler.parsers"
    if not refs and doc.parser is not None:
        refs, where = [doc.parser.pluginRef], "parser"
    if not refs:
        refs = list(DEFAULT_PARSERS)
    parsers: list[Parser] = []
    for i, ref in enumerate(refs):
        plugin = plugins.get(ref)
        if plugin is None:
            if lookup(ref) is None:
                raise ConfigError(f"{where}[{i}]: pluginRef '{ref}' names no plugin or type")
            plugin = create_plugin(ref, ref, None)
            plugins.add(plugin)
        if not isinstance(plugin, Parser):
            raise ConfigError(
                f"{where}[{i}]: plugin '{ref}' (type '{plugin.type_name}') is not a parser"
            )
        parsers.append(plugin)
    return ParserTable(parsers)


def _add_implicit_producer(plugins: PluginSet) -> None:
    if plugins.of_kind(ApproxPrefixCacheProducer) or any(
        getattr(p, "provides_prefix_match", False) for p in plugins
    ):
        return
    needers = [p for p in plugins if getattr(p, "needs_prefix_producer", False)]
    if not needers:
        return
    # A prefix scorer's own parameters (llm-d style) configure the implicit producer.
    own = next((p.params for p in needers if isinstance(p.params, PrefixParams)), None)
    params = (
        PrefixParams.model_validate(
            own.model_dump(include=set(PrefixParams.model_fields), exclude_unset=True)
        )
        if own is not None
        else PrefixParams()
    )
    plugins.add(ApproxPrefixCacheProducer(params))


def _add_implicit_latency_producer(plugins: PluginSet, fc_plugins: Mapping[str, Any]) -> None:
    """Plugins reading latency predictions (``prediction_producer``) read a
    predicted-latency-producer's: the one they name, else the default, created when the
    configuration has none (llm-d)."""
    for reader in [*fc_plugins.values(), *plugins]:
        producer = getattr(reader, "prediction_producer", None)
        if not isinstance(producer, str):
            continue
        found = plugins.get(producer)
        if isinstance(found, PredictedLatencyProducer):
            continue
        if producer != DEFAULT_PREDICTION_PRODUCER or found is not None:
            raise ValueError(
                f"plugin '{reader.name}' (type '{reader.type_name}'): "
                f"parameters.latencyPredictionInfoProducerName: '{producer}' is not "
                "a predicted-latency-producer"
            )
        plugins.add(PredictedLatencyProducer())


def _add_implicit_token_producer(plugins: PluginSet) -> None:
    if plugins.of_kind(TokenProducer):
        return
    if any(
        isinstance(p, ApproxPrefixCacheProducer) or getattr(p, "needs_tokens", False)
        for p in plugins
    ):
        plugins.add(TokenProducer(name="token-producer/estimate"))


def _producer_order(plugin: DataProducer) -> int:
    return 0 if isinstance(plugin, TokenProducer) else 1


def _build_profile(
    spec: SchedulingProfileSpec, plugins: PluginSet, admitters: frozenset[str] = frozenset()
) -> Profile:
    filters: list[Filter] = []
    scorers: list[WeightedScorer] = []
    picker: Picker | None = None
    for j, ref in enumerate(spec.plugins):
        where = f"schedulingProfiles '{spec.name}' plugins[{j}]"
        if ref.pluginRef in admitters and ref.weight is None:
            continue  # llm-d lets a profile name an admitter; it has no part in scoring
        plugin = plugins.get(ref.pluginRef)
        if plugin is None:
            raise ConfigError(f"{where}: pluginRef '{ref.pluginRef}' names no plugin")
        used = False
        if isinstance(plugin, Filter):
            filters.append(plugin)
            used = True
        if isinstance(plugin, Scorer):
            weight = 1.0 if ref.weight is None else ref.weight
            if weight < 0:
                raise ConfigError(f"{where}: weight must be >= 0, got {weight}")
            scorers.append(WeightedScorer(plugin, weight))
            used = True
        elif ref.weight is not None:
            raise ConfigError(f"{where}: plugin '{ref.pluginRef}' is not a scorer; drop 'weight'")
        if isinstance(plugin, Picker):
            if picker is not None:
                raise ConfigError(
                    f"{where}: a second picker '{plugin.name}' (already '{picker.name}')"
                )
            picker = plugin
            used = True
        if not used and not isinstance(
            plugin,
            DataProducer | RequestTracker | ResponseHeaderProcessor | ResponseBodyProcessor,
        ):
            raise ConfigError(
                f"{where}: plugin '{ref.pluginRef}' (type '{plugin.type_name}') is not a "
                "filter, scorer or picker"
            )
    if picker is None:
        picker = MaxScorePicker(name=f"{spec.name}/max-score-picker")
    return Profile(spec.name, tuple(filters), tuple(scorers), picker)


def build_scheduler_config(
    doc: EndpointPickerConfig, *, pool_configured: bool = False
) -> SchedulerConfig:
    """Instantiate and wire the plugins of a validated document."""
    load_entry_points()
    plugins = PluginSet()
    fc_plugins: dict[str, Any] = {}
    for i, spec in enumerate(doc.plugins):
        if fc_config.is_flow_control_type(spec.type) and lookup(spec.type) is None:
            try:
                fc_plugin = fc_config.build_plugin(
                    i, spec.type, spec.instance_name, spec.parameters
                )
            except ValueError as exc:
                raise ConfigError(str(exc)) from None
            if spec.instance_name in fc_plugins:
                raise ConfigError(
                    f"plugins[{i}]: duplicate plugin name '{spec.instance_name}'; "
                    "set distinct 'name's"
                )
            fc_plugins[spec.instance_name] = fc_plugin
            continue
        plugin = _build_plugin(i, spec)
        if plugins.get(plugin.name) is not None:
            raise ConfigError(
                f"plugins[{i}]: duplicate plugin name '{plugin.name}'; set distinct 'name's"
            )
        plugins.add(plugin)
    try:
        flow_control = fc_config.build_flow_control(
            doc.featureGates, doc.flowControl, doc.saturationDetector, fc_plugins
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    # A saturation detector is also a scheduling filter a profile may reference by name:
    # each declared one, and the one in use when it was created with its defaults (llm-d
    # injects a utilization-detector when none is named).
    detectors = dict(fc_plugins)
    in_use = flow_control.detector
    if any(r.pluginRef == in_use.name for s in doc.schedulingProfiles for r in s.plugins):
        detectors.setdefault(in_use.name, in_use)
    for fc_name, fc_plugin in detectors.items():
        if isinstance(fc_plugin, SaturationDetector) and plugins.get(fc_name) is None:
            as_plugin = as_filter(fc_plugin)
            if as_plugin is not None:
                plugins.add(as_plugin)
    try:
        _add_implicit_latency_producer(plugins, fc_plugins)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    _add_implicit_producer(plugins)
    _add_implicit_token_producer(plugins)
    parsers = _build_parsers(doc, plugins)
    for plugin in list(plugins):
        try:
            plugin.bind(plugins)
        except ValueError as exc:
            raise ConfigError(
                f"plugin '{plugin.name}' (type '{plugin.type_name}'): parameters.{exc}"
            ) from None
    try:
        wire_data_layer(doc.dataLayer, doc.data, plugins)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None

    names = [p.name for p in doc.schedulingProfiles]
    if not names:
        raise ConfigError("schedulingProfiles: at least one profile is required")
    dupes = {n for n in names if names.count(n) > 1}
    if dupes:
        raise ConfigError(f"schedulingProfiles: duplicate profile names {sorted(dupes)}")
    admitters = frozenset(n for n, p in fc_plugins.items() if isinstance(p, Admitter))
    profiles = {
        spec.name: _build_profile(spec, plugins, admitters) for spec in doc.schedulingProfiles
    }

    handlers: list[ProfileHandler] = plugins.of_kind(ProfileHandler)
    if len(handlers) > 1:
        raise ConfigError(
            f"plugins: more than one profile handler: {', '.join(h.name for h in handlers)}"
        )
    handler = handlers[0] if handlers else SingleProfileHandler()
    try:
        handler.check_profiles(names)
    except ValueError as exc:
        raise ConfigError(f"plugin '{handler.name}' (type '{handler.type_name}'): {exc}") from None

    discovery: Discovery | None = None
    ref = _discovery_ref(doc)
    discoveries: list[Discovery] = plugins.of_kind(Discovery)
    if ref is not None:
        found = plugins.get(ref)
        if not isinstance(found, Discovery):
            raise ConfigError(f"dataLayer.discovery.pluginRef: '{ref}' is not a discovery plugin")
        discovery = found
    elif len(discoveries) == 1:
        discovery = discoveries[0]
    elif len(discoveries) > 1:
        raise ConfigError(
            "plugins: several discovery plugins; choose one with dataLayer.discovery.pluginRef"
        )
    if discovery is not None and pool_configured:
        raise ConfigError(
            f"both --pool-name and the discovery plugin '{discovery.name}' are set; use one"
        )

    scheduler = Scheduler(
        handler=handler,
        profiles=profiles,
        producers=tuple(sorted(plugins.of_kind(DataProducer), key=_producer_order)),
        trackers=tuple(plugins.of_kind(RequestTracker)),
        responders=tuple(plugins.of_kind(ResponseHeaderProcessor)),
        body_processors=tuple(plugins.of_kind(ResponseBodyProcessor)),
    )
    return SchedulerConfig(doc, plugins, scheduler, discovery, parsers, flow_control)


def load_config(
    config_text: str | None = None,
    config_file: str | None = None,
    *,
    pool_configured: bool = False,
) -> SchedulerConfig:
    """Load from text or file (not both); neither gives the default configuration."""
    if config_text is not None and config_file is not None:
        raise ConfigError("set only one of --config-text and --config-file")
    source = "config-text"
    text = config_text
    if config_file is not None:
        source = config_file
        try:
            with open(config_file, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"--config-file {config_file}: {exc.strerror}") from None
    if text is None or not text.strip():
        text, source = DEFAULT_CONFIG_TEXT, "default config"
    return build_scheduler_config(parse_config_text(text, source), pool_configured=pool_configured)
