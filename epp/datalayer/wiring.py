"""The ``dataLayer`` section (``data`` in older configs): which source feeds which
extractors, checked when the configuration loads.

    dataLayer:
      discovery: {pluginRef: file-discovery}       # read by the config loader
      sources:
      - pluginRef: dcgm-source
        extractors:
        - pluginRef: dcgm-extractor

Every ``pluginRef`` must name a plugin of the right kind, and every source and polled
extractor declared in ``plugins`` must be wired (a source nobody reads, or an extractor
nobody feeds, would silently do nothing). As in llm-d, a ``metrics-data-source`` and a
``core-metrics-extractor`` declared but not listed are wired to each other, and
extractors of endpoint events need no listing (every plugin hears those events).
Features that need several EPP replicas to share state (``peerDiscovery``,
``crossReplicaSyncerPluginRef``) are refused, as is ``injectDefaults: false`` without
a metrics source: this EPP always reads engine metrics.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from epp.datalayer.base import DataSource, ModelsExtractor, PrometheusExtractor
from epp.datalayer.metrics_source import CoreMetricsExtractor, MetricsDataSource
from epp.plugins.base import Plugin, PluginSet

__all__ = ["DataLayerSection", "wire_data_layer"]


class _Ref(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    pluginRef: str = Field(min_length=1)  # noqa: N815 - the document's field name


class _Source(_Ref):
    extractors: list[_Ref] = Field(default_factory=list)


class DataLayerSection(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    injectDefaults: bool | None = None  # noqa: N815
    sources: list[_Source] = Field(default_factory=list)
    discovery: dict[str, Any] | None = None
    peerDiscovery: dict[str, Any] | None = None  # noqa: N815
    crossReplicaSyncerPluginRef: str | None = None  # noqa: N815
    crossReplicaSyncInterval: str | None = None  # noqa: N815


def _parse(raw: dict[str, Any], where: str) -> DataLayerSection:
    try:
        return DataLayerSection.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"{where}.{loc}: {first['msg']}") from None


def _plugin(plugins: PluginSet, name: str, where: str) -> Plugin:
    plugin = plugins.get(name)
    if plugin is None:
        raise ValueError(f"{where}.pluginRef: '{name}' names no plugin")
    return plugin


def wire_data_layer(
    data_layer: dict[str, Any] | None, data: dict[str, Any] | None, plugins: PluginSet
) -> list[DataSource]:
    """Wire sources to extractors; ``ValueError`` naming the field otherwise."""
    if data_layer is not None and data is not None:
        raise ValueError("set only one of 'dataLayer' and its older name 'data'")
    where = "dataLayer" if data is None else "data"
    section = _parse(data_layer or data or {}, where)
    if section.peerDiscovery is not None:
        raise ValueError(
            f"{where}.peerDiscovery: sharing state between EPP replicas is not supported"
        )
    if section.crossReplicaSyncerPluginRef or section.crossReplicaSyncInterval:
        raise ValueError(
            f"{where}.crossReplicaSyncerPluginRef: sharing state between EPP replicas is not "
            "supported"
        )

    wired: list[DataSource] = []
    fed: set[str] = set()
    for i, spec in enumerate(section.sources):
        at = f"{where}.sources[{i}]"
        source = _plugin(plugins, spec.pluginRef, at)
        if not isinstance(source, DataSource):
            raise ValueError(
                f"{at}.pluginRef: '{spec.pluginRef}' (type '{source.type_name}') is not a "
                "data source"
            )
        if any(s is source for s in wired):
            raise ValueError(f"{at}.pluginRef: source '{spec.pluginRef}' is listed twice")
        for j, ref in enumerate(spec.extractors):
            extractor = _plugin(plugins, ref.pluginRef, f"{at}.extractors[{j}]")
            try:
                source.add_extractor(extractor)
            except ValueError as exc:
                raise ValueError(f"{at}.extractors[{j}]: {exc}") from None
            fed.add(extractor.name)
        wired.append(source)

    metrics_sources: list[MetricsDataSource] = plugins.of_kind(MetricsDataSource)
    if not metrics_sources and plugins.of_kind(CoreMetricsExtractor):
        # A core extractor (custom metrics) without a declared source reads the
        # built-in scrape, configured with llm-d's defaults.
        implicit = MetricsDataSource()
        plugins.add(implicit)
        metrics_sources = [implicit]
    if len(metrics_sources) > 1:
        names = ", ".join(s.name for s in metrics_sources)
        raise ValueError(f"plugins: one metrics-data-source at most, got {names}")
    if metrics_sources and not any(s is metrics_sources[0] for s in wired):
        # llm-d's default wiring: the metrics source with the core extractor.
        source = metrics_sources[0]
        for core in plugins.of_kind(CoreMetricsExtractor):
            if core.name not in fed:
                source.add_extractor(core)
                fed.add(core.name)
        wired.append(source)
    if section.injectDefaults is False and not metrics_sources:
        raise ValueError(
            f"{where}.injectDefaults: false would turn off reading engine metrics, which this "
            "EPP always reads; declare a metrics-data-source to configure the scrape instead"
        )

    for plugin in plugins:
        if isinstance(plugin, DataSource) and not any(s is plugin for s in wired):
            raise ValueError(
                f"plugins: data source '{plugin.name}' (type '{plugin.type_name}') is not "
                f"listed in {where}.sources, so nothing would read it"
            )
        polled = isinstance(plugin, PrometheusExtractor | ModelsExtractor)
        if polled and plugin.name not in fed and not isinstance(plugin, CoreMetricsExtractor):
            raise ValueError(
                f"plugins: extractor '{plugin.name}' (type '{plugin.type_name}') is not "
                f"listed under any {where}.sources entry, so nothing would feed it"
            )
    return wired
