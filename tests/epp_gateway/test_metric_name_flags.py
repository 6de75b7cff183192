"""llm-d's metric-name flags: the series pods without an engine-type label are read with."""

from __future__ import annotations

import pytest

from epp.engine_metrics import BUILTIN_ENGINES, ENGINE_LABEL, MetricSpec
from epp.settings import parse_args


def test_by_default_unlabelled_pods_are_read_as_vllm() -> None:
    engines = parse_args([]).engine_metrics()
    assert engines.default == BUILTIN_ENGINES["vllm"]
    assert engines.for_labels({ENGINE_LABEL: "sglang"}) == BUILTIN_ENGINES["sglang"]


def test_the_flags_name_the_default_engines_series() -> None:
    s = parse_args(
        [
            "--total-queued-requests-metric", "sglang:num_queue_reqs",
            "-total-running-requests-metric=sglang:num_running_reqs",
            "--kv-cache-usage-percentage-metric", "sglang:token_usage{tp_rank=0}",
            "--lora-info-metric=",
            "--cache-info-metric", "sglang:cache_config_info",
        ]
    )  # fmt: skip
    default = s.engine_metrics().for_labels({})
    assert default.queued == MetricSpec("sglang:num_queue_reqs")
    assert default.running == MetricSpec("sglang:num_running_reqs")
    assert default.kv_usage == (MetricSpec("sglang:token_usage", (("tp_rank", "0"),)),)
    assert default.lora is None  # an empty name: not read


@pytest.mark.parametrize(
    "flag",
    [
        "--total-queued-requests-metric",
        "--total-running-requests-metric",
        "--kv-cache-usage-percentage-metric",
        "--lora-info-metric",
        "--cache-info-metric",
    ],
)
def test_a_bad_selector_exits_2_naming_the_flag(
    flag: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        parse_args([flag, "vllm:x{label"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert flag in err and "not a metric selector" in err
