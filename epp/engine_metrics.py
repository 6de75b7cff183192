"""Which inference engine a pod runs, and how that engine names its signals on /metrics.

A pod's ``llm-d.ai/engine-type`` label (or the older
``inference.networking.k8s.io/engine-type``) names its engine; a pod without one runs the
default engine (vLLM unless configured otherwise). Each engine's mapping names the series
the scheduler reads: the waiting queue, the running batch, KV-cache usage, LoRA adapters
and the KV-cache geometry. The built-in engines and their names are those of llm-d's core
metrics extractor (vLLM, SGLang, trtllm-serve, Triton with TensorRT-LLM, Triton), and so is
the spec syntax, a PromQL instant selector: ``name`` or ``name{label=value,...}``.
``EngineMetricsParams`` is that extractor's parameter block (camelCase, as in an
``EndpointPickerConfig``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import Field, field_validator, model_validator

from epp.plugins.base import PluginParams

__all__ = [
    "BUILTIN_ENGINES",
    "ENGINE_LABEL",
    "LEGACY_ENGINE_LABEL",
    "EngineConfig",
    "EngineMapping",
    "EngineMappings",
    "EngineMetricsParams",
    "MetricSpec",
]

ENGINE_LABEL = "llm-d.ai/engine-type"
LEGACY_ENGINE_LABEL = "inference.networking.k8s.io/engine-type"
# Reserved by llm-d for the mapping of pods without an engine label.
_RESERVED_ENGINE = "default"

_SPEC = re.compile(r"\s*([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(?:\{(.*)\})?\s*")
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*(?:"([^"]*)"|([^",}\s]+))\s*')


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """One series selector: a metric name and label values its samples must carry."""

    name: str
    labels: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, text: str) -> MetricSpec | None:
        """``name`` or ``name{label=value,label="value"}``; empty text is no spec (the
        signal is not read). Raises ``ValueError`` naming what is wrong."""
        if not text.strip():
            return None
        match = _SPEC.fullmatch(text)
        if match is None:
            raise ValueError(f"not a metric selector: {text!r} (expected name{{label=value}})")
        name, block = match.group(1), match.group(2)
        labels: list[tuple[str, str]] = []
        for part in (block or "").split(","):
            if not part.strip():
                continue
            pair = _MATCHER.fullmatch(part)
            if pair is None:
                raise ValueError(f"invalid label matcher {part.strip()!r} in {text!r}")
            quoted, bare = pair.group(2), pair.group(3)
            labels.append((pair.group(1), quoted if quoted is not None else bare))
        return cls(name, tuple(labels))

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(key) == value for key, value in self.labels)

    def __str__(self) -> str:
        if not self.labels:
            return self.name
        return self.name + "{" + ",".join(f"{k}={v}" for k, v in self.labels) + "}"


@dataclass(frozen=True, slots=True)
class EngineMapping:
    """Where one engine keeps each signal; None: the engine does not export it."""

    name: str
    queued: MetricSpec | None = None
    running: MetricSpec | None = None
    # Alternatives, first present wins (vLLM renamed its usage gauge).
    kv_usage: tuple[MetricSpec, ...] = ()
    lora: MetricSpec | None = None
    cache_info: MetricSpec | None = None
    block_size_label: str = "block_size"
    num_blocks_label: str = "num_gpu_blocks"
    cache_block_size: MetricSpec | None = None
    cache_num_blocks: MetricSpec | None = None
    # Every metric name the mapping reads (derived).
    metric_names: tuple[str, ...] = field(init=False, compare=False)

    def __post_init__(self) -> None:
        specs = [
            self.queued,
            self.running,
            *self.kv_usage,
            self.lora,
            self.cache_info,
            self.cache_block_size,
            self.cache_num_blocks,
        ]
        names = dict.fromkeys(spec.name for spec in specs if spec is not None)
        object.__setattr__(self, "metric_names", tuple(names))

    @property
    def load_signal_count(self) -> int:
        """How many of the queue, running and usage signals the engine exports: a page
        with none of them is not this engine's."""
        return (self.queued is not None) + (self.running is not None) + bool(self.kv_usage)


def _spec(text: str) -> MetricSpec | None:
    return MetricSpec.parse(text)


def _specs(*texts: str) -> tuple[MetricSpec, ...]:
    return tuple(spec for text in texts if (spec := MetricSpec.parse(text)) is not None)


BUILTIN_ENGINES: dict[str, EngineMapping] = {
    m.name: m
    for m in (
        EngineMapping(
            "vllm",
            queued=_spec("vllm:num_requests_waiting"),
            running=_spec("vllm:num_requests_running"),
            # The name before vLLM 0.10 as a fallback, for older engines.
            kv_usage=_specs("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"),
            lora=_spec("vllm:lora_requests_info"),
            cache_info=_spec("vllm:cache_config_info"),
        ),
        EngineMapping(
            "sglang",
            queued=_spec("sglang:num_queue_reqs"),
            running=_spec("sglang:num_running_reqs"),
            kv_usage=_specs("sglang:token_usage"),
            cache_info=_spec("sglang:cache_config_info"),
            block_size_label="page_size",
            num_blocks_label="num_pages",
        ),
        EngineMapping(
            "trtllm-serve",
            queued=_spec("trtllm_num_requests_waiting"),
            running=_spec("trtllm_num_requests_running"),
            kv_usage=_specs("trtllm_kv_cache_utilization"),
            cache_block_size=_spec("trtllm_kv_cache_tokens_per_block"),
            cache_num_blocks=_spec("trtllm_kv_cache_max_blocks"),
        ),
        EngineMapping(
            "triton-tensorrt-llm",
            queued=_spec("nv_trt_llm_request_metrics{request_type=waiting}"),
            running=_spec("nv_trt_llm_request_metrics{request_type=scheduled}"),
            kv_usage=_specs("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=fraction}"),
            cache_block_size=_spec(
                "nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=tokens_per}"
            ),
            cache_num_blocks=_spec("nv_trt_llm_kv_cache_block_metrics{kv_cache_block_type=max}"),
        ),
        EngineMapping(
            "triton",
            queued=_spec("nv_inference_pending_request_count"),
            running=_spec("nv_inference_exec_count"),
        ),
    )
}


class EngineConfig(PluginParams):
    """One engine's series, as an ``engineConfigs`` entry of llm-d's extractor."""

    name: str = Field(min_length=1)
    queued_requests_spec: str = ""
    running_requests_spec: str = ""
    kv_usage_spec: str = ""
    lora_spec: str = ""
    cache_info_spec: str = ""
    cache_block_size_label_name: str = ""
    cache_num_blocks_label_name: str = ""
    cache_block_size_spec: str = ""
    cache_num_blocks_spec: str = ""
    custom_metrics: list[Any] = Field(default_factory=list)

    @field_validator(
        "queued_requests_spec",
        "running_requests_spec",
        "kv_usage_spec",
        "lora_spec",
        "cache_info_spec",
        "cache_block_size_spec",
        "cache_num_blocks_spec",
    )
    @classmethod
    def _selector(cls, value: str) -> str:
        MetricSpec.parse(value)
        return value

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, value: str) -> str:
        if value == _RESERVED_ENGINE:
            raise ValueError(f"engine name '{_RESERVED_ENGINE}' is reserved")
        return value

    @field_validator("custom_metrics")
    @classmethod
    def _no_custom(cls, value: list[Any]) -> list[Any]:
        if value:
            raise ValueError("customMetrics is not supported: no scorer here reads them")
        return value

    def mapping(self) -> EngineMapping:
        return EngineMapping(
            self.name,
            queued=MetricSpec.parse(self.queued_requests_spec),
            running=MetricSpec.parse(self.running_requests_spec),
            kv_usage=_specs(self.kv_usage_spec),
            lora=MetricSpec.parse(self.lora_spec),
            cache_info=MetricSpec.parse(self.cache_info_spec),
            block_size_label=self.cache_block_size_label_name or "block_size",
            num_blocks_label=self.cache_num_blocks_label_name or "num_gpu_blocks",
            cache_block_size=MetricSpec.parse(self.cache_block_size_spec),
            cache_num_blocks=MetricSpec.parse(self.cache_num_blocks_spec),
        )


class EngineMetricsParams(PluginParams):
    """llm-d's ``core-metrics-extractor`` parameters. Entries of ``engineConfigs`` named
    like a built-in engine replace it; the others are added."""

    engine_label_key: str = ENGINE_LABEL
    default_engine: str = "vllm"
    engine_configs: list[EngineConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> EngineMetricsParams:
        names = [c.name for c in self.engine_configs]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"engineConfigs: engines named more than once: {dupes}")
        if self.default_engine not in {*names, *BUILTIN_ENGINES}:
            raise ValueError(f"defaultEngine: no engine named '{self.default_engine}'")
        return self

    def build(self) -> EngineMappings:
        engines = dict(BUILTIN_ENGINES)
        engines.update({c.name: c.mapping() for c in self.engine_configs})
        return EngineMappings(
            label_key=self.engine_label_key or ENGINE_LABEL,
            default=engines[self.default_engine],
            engines=engines,
        )


@dataclass(frozen=True, slots=True)
class EngineMappings:
    """Every engine's mapping and the rule that picks one for a pod."""

    label_key: str = ENGINE_LABEL
    default: EngineMapping = BUILTIN_ENGINES["vllm"]
    engines: Mapping[str, EngineMapping] = field(default_factory=lambda: dict(BUILTIN_ENGINES))

    def engine_type(self, labels: Mapping[str, str]) -> str | None:
        """The engine a pod's labels name, or None when they name none."""
        return labels.get(self.label_key) or labels.get(LEGACY_ENGINE_LABEL) or None

    def for_labels(self, labels: Mapping[str, str]) -> EngineMapping:
        """The pod's engine mapping; an unknown or missing engine type gets the default
        (as llm-d does)."""
        engine = self.engine_type(labels)
        return self.engines.get(engine, self.default) if engine else self.default

    def with_default_names(
        self,
        *,
        queued: str,
        running: str,
        kv_usage: str,
        lora: str,
        cache_info: str,
    ) -> EngineMappings:
        """The default engine with the series the metric-name flags give (llm-d's
        ``--total-queued-requests-metric`` and siblings, which define the mapping of pods
        without an engine label). Raises ``ValueError`` on a bad selector."""
        base = self.default
        # The default usage name keeps its fallback; another name replaces both.
        keep_usage = bool(base.kv_usage) and kv_usage == str(base.kv_usage[0])
        named = replace(
            base,
            queued=MetricSpec.parse(queued),
            running=MetricSpec.parse(running),
            kv_usage=base.kv_usage if keep_usage else _specs(kv_usage),
            lora=MetricSpec.parse(lora),
            cache_info=MetricSpec.parse(cache_info),
        )
        engines = {**self.engines, base.name: named}
        return EngineMappings(label_key=self.label_key, default=named, engines=engines)
