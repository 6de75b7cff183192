"""The pure parts of the sidecar's tracing: names, usage reading, the flag."""

from __future__ import annotations

from sidecar.settings import load_settings
from sidecar.tracing import Stage, span_names, usage_attributes


def test_the_flag_is_accepted_and_off_by_default() -> None:
    assert load_settings(["--tracing"], env={}).tracing is True
    assert load_settings(["--tracing=false"], env={}).tracing is False
    assert load_settings([], env={}).tracing is False


def test_span_names_follow_llm_ds_connectors() -> None:
    assert span_names("nixlv2") == {
        Stage.ENCODE: "encode",
        Stage.PREFILL: "prefill",
        Stage.DECODE: "decode",
        Stage.DECODE_FIRST: "decode_first",
    }
    assert span_names("sglang")[Stage.PREFILL] == "prefill"
    mooncake = span_names("mooncake")
    assert mooncake[Stage.PREFILL] == "llm_d.pd_proxy.prefill"
    assert mooncake[Stage.DECODE] == "llm_d.pd_proxy.decode"


def test_usage_is_read_from_every_api_shape() -> None:
    openai = {"usage": {"prompt_tokens": 12, "completion_tokens": 3}}
    assert usage_attributes(openai) == {
        "gen_ai.usage.input_tokens": 12,
        "gen_ai.usage.output_tokens": 3,
    }
    responses = {"response": {"usage": {"input_tokens": 7, "output_tokens": 2}}}
    assert usage_attributes(responses) == {
        "gen_ai.usage.input_tokens": 7,
        "gen_ai.usage.output_tokens": 2,
    }
    anthropic = {"message": {"usage": {"input_tokens": 5}}}
    assert usage_attributes(anthropic) == {"gen_ai.usage.input_tokens": 5}
    assert usage_attributes({"usage": {"prompt_tokens": True}}) == {}
    assert usage_attributes({"usage": None}) == {}
    assert usage_attributes([1, 2]) == {}
