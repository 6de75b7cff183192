"""``metrics-data-source`` and ``core-metrics-extractor``: the engine metrics scrape.

The EPP always scrapes every endpoint's metrics (its scorers need them), so llm-d's
default metrics source is built in; declaring ``metrics-data-source`` configures that
scrape with llm-d's parameters: ``scheme``, ``path`` (``/metrics``), ``port`` (default:
the endpoint's own port), ``insecureSkipVerify`` (true), ``caCertPath``,
``clientCertPath``/``clientKeyPath`` and ``interval`` (rounded to a multiple of
``--refresh-metrics-interval``).

``core-metrics-extractor`` names the built-in reading of the standard signals (queue,
running, KV usage, LoRA, cache geometry), which the scraper does under the engines'
own metric names. Its ``engineConfigs`` may add ``customMetrics``: each maps a metric
spec (``name{label=value}``) to a numeric endpoint attribute of producer
``core-metrics-extractor`` (read by ``endpoint-attribute-filter``/``-scorer`` with
``producer`` unset), for pods whose ``llm-d.ai/engine-type`` label (or the deprecated
``inference.networking.k8s.io/engine-type``), else ``defaultEngine``, names that
engine. Renaming the standard signals is refused at start: the scraper reads them
under the built-in names.

Other Prometheus extractors (e.g. ``dcgm-extractor``, when an engine's page carries
DCGM series) may be wired under ``metrics-data-source`` too; they read the same page.
"""

from __future__ import annotations

import functools

from pydantic import Field, field_validator, model_validator

from epp.datalayer.attributes import AttributeKey, put_attribute
from epp.datalayer.base import DataSource, ExtractorGuard, PrometheusExtractor
from epp.datalayer.polling import HttpSourceParams, client_ssl_context, rounded_period
from epp.datalayer.prom_text import MetricSpec, PrometheusPage
from epp.datalayer.scrape_target import ScrapeTarget
from epp.datastore import Datastore, Endpoint
from epp.plugins.base import PluginParams, PluginSet
from epp.plugins.registry import register

__all__ = ["CoreMetricsExtractor", "MetricsDataSource", "scrape_settings"]

CORE_PRODUCER = "core-metrics-extractor"
ENGINE_LABEL = "llm-d.ai/engine-type"
LEGACY_ENGINE_LABEL = "inference.networking.k8s.io/engine-type"
_LIFETIME_PERIODS = 3
_MIN_LIFETIME_S = 1.0

# The standard-signal specs the scraper reads, as llm-d spells them per engine.
_BUILTIN_SPECS: dict[str, dict[str, str]] = {
    "vllm": {
        "queued_requests_spec": "vllm:num_requests_waiting",
        "running_requests_spec": "vllm:num_requests_running",
        "kv_usage_spec": "vllm:kv_cache_usage_perc",
        "lora_spec": "vllm:lora_requests_info",
        "cache_info_spec": "vllm:cache_config_info",
        "cache_block_size_label_name": "block_size",
        "cache_num_blocks_label_name": "num_gpu_blocks",
    },
}
_STANDARD_FIELDS = (
    "queued_requests_spec",
    "running_requests_spec",
    "kv_usage_spec",
    "lora_spec",
    "cache_info_spec",
    "cache_block_size_label_name",
    "cache_num_blocks_label_name",
    "cache_block_size_spec",
    "cache_num_blocks_spec",
)


class CustomMetric(PluginParams):
    attribute_key: str = Field(min_length=1)
    metric_spec: str

    @field_validator("metric_spec")
    @classmethod
    def _spec(cls, value: str) -> str:
        MetricSpec.parse(value)
        return value


class EngineConfig(PluginParams):
    name: str = Field(min_length=1)
    queued_requests_spec: str | None = None
    running_requests_spec: str | None = None
    kv_usage_spec: str | None = None
    lora_spec: str | None = None
    cache_info_spec: str | None = None
    cache_block_size_label_name: str | None = None
    cache_num_blocks_label_name: str | None = None
    cache_block_size_spec: str | None = None
    cache_num_blocks_spec: str | None = None
    custom_metrics: list[CustomMetric] = Field(default_factory=list)

    @model_validator(mode="after")
    def _standard_specs_builtin(self) -> EngineConfig:
        builtin = _BUILTIN_SPECS.get(self.name, {})
        for field_name in _STANDARD_FIELDS:
            value = getattr(self, field_name)
            if value and value != builtin.get(field_name):
                alias = type(self).model_fields[field_name].alias or field_name
                raise ValueError(
                    f"{alias} {value!r}: the standard signals are read under their built-in "
                    f"names (engines: {', '.join(sorted(_BUILTIN_SPECS))}); only customMetrics "
                    "may be added"
                )
        return self


@register
class CoreMetricsExtractor(PrometheusExtractor):
    type_name = CORE_PRODUCER

    class Params(PluginParams):
        engine_label_key: str = ENGINE_LABEL
        default_engine: str = "vllm"
        engine_configs: list[EngineConfig] = Field(default_factory=list)

        @field_validator("engine_label_key")
        @classmethod
        def _label(cls, value: str) -> str:
            if value not in ("", ENGINE_LABEL):
                raise ValueError(
                    f"only {ENGINE_LABEL!r} (and the deprecated {LEGACY_ENGINE_LABEL!r}) "
                    f"selects the engine, got {value!r}"
                )
            return ENGINE_LABEL

        @field_validator("default_engine")
        @classmethod
        def _default(cls, value: str) -> str:
            if value not in ("", "vllm"):
                raise ValueError(f"unlabelled pods are read as vLLM; got {value!r}")
            return "vllm"

        @model_validator(mode="after")
        def _unique(self) -> CoreMetricsExtractor.Params:
            names = [c.name for c in self.engine_configs]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"engineConfigs: engine {dupes[0]!r} is configured twice")
            return self

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        self.custom: dict[str, list[tuple[AttributeKey, MetricSpec]]] = {
            cfg.name: [
                ((m.attribute_key, CORE_PRODUCER), MetricSpec.parse(m.metric_spec))
                for m in cfg.custom_metrics
            ]
            for cfg in self.params.engine_configs
            if cfg.custom_metrics
        }

    @property
    def reads_page(self) -> bool:
        return bool(self.custom)

    def engine_of(self, endpoint: Endpoint) -> str:
        labels = endpoint.labels
        return labels.get(ENGINE_LABEL) or labels.get(LEGACY_ENGINE_LABEL) or "vllm"

    def extract_page(self, endpoint: Endpoint, page: PrometheusPage, expires_at: float) -> None:
        missing = []
        for key, spec in self.custom.get(self.engine_of(endpoint), ()):
            value = spec.select(page)
            if value is None:
                missing.append(key[0])
            else:
                put_attribute(endpoint, key, value, expires_at=expires_at)
        if missing:
            raise ValueError(f"custom metrics not on the page: {', '.join(missing)}")


@register
class MetricsDataSource(DataSource):
    type_name = "metrics-data-source"
    delivers = "the engine's Prometheus metrics page"
    accepts = (PrometheusExtractor,)

    class Params(HttpSourceParams):
        port: int | None = Field(default=None, ge=1, le=65535)

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        self.ssl = client_ssl_context(self.params)
        self.period_s = 0.0
        self.guard = ExtractorGuard(self.name)

    async def start(self, datastore: Datastore, base_interval_s: float) -> None:
        return None

    async def stop(self) -> None:
        return None

    def _page_readers(self) -> list[PrometheusExtractor]:
        return [
            e
            for e in self.extractors
            if isinstance(e, PrometheusExtractor)
            and (not isinstance(e, CoreMetricsExtractor) or e.reads_page)
        ]

    def target(self, base_interval_s: float) -> ScrapeTarget:
        self.period_s = rounded_period(self.params.interval, base_interval_s)
        readers = self._page_readers()
        lifetime = max(_LIFETIME_PERIODS * self.period_s, _MIN_LIFETIME_S)

        def on_page(endpoint: Endpoint, text: str, now: float) -> None:
            page = PrometheusPage(text)
            expires_at = now + lifetime
            for extractor in readers:
                extract = functools.partial(extractor.extract_page, endpoint, page, expires_at)
                self.guard.run(extractor, endpoint, extract)

        p = self.params
        return ScrapeTarget(
            scheme=p.scheme,
            path=p.path,
            port=p.port,
            ssl=self.ssl,
            on_page=on_page if readers else None,
        )


def scrape_settings(plugins: PluginSet, base_interval_s: float) -> tuple[ScrapeTarget, float]:
    """The scrape target and interval the configuration asks for (defaults without a
    ``metrics-data-source``)."""
    sources: list[MetricsDataSource] = plugins.of_kind(MetricsDataSource)
    if not sources:
        return ScrapeTarget(), base_interval_s
    source = sources[0]
    target = source.target(base_interval_s)
    return target, source.period_s
