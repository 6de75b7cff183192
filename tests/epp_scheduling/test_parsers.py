"""Parser plugins and the parser table: which parser a path gets, what it reads, and how
``requestHandler.parsers`` (or the deprecated ``parser``) chooses them."""

from __future__ import annotations

import json

import pytest

from epp.config import ConfigError, load_config
from epp.decision import BadRequest
from epp.plugins.parsers import (
    AnthropicParser,
    OpenAIParser,
    ParserTable,
    PassthroughParser,
    SGLangHttpParser,
    VllmHttpParser,
    claims_path,
)

CHAT = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()

HEAD = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: decode-filter
- type: max-score-picker
schedulingProfiles:
- name: default
  plugins: [{pluginRef: decode-filter}, {pluginRef: max-score-picker}]
"""


def _types(table: ParserTable) -> list[str]:
    return [p.type_name for p in table.parsers]


def test_suffix_claims_match_whole_segments() -> None:
    assert claims_path("/v1/chat/completions", "chat/completions")
    assert claims_path("/prefix/v1/chat/completions/", "/chat/completions/")
    assert claims_path("/generate", "generate")
    assert not claims_path("/v1/xcompletions", "completions")
    assert not claims_path("/v1/models", "completions")


def test_default_table_is_openai_anthropic_vllmhttp_then_passthrough() -> None:
    table = load_config(HEAD).parsers
    assert _types(table) == [
        "openai-parser",
        "anthropic-parser",
        "vllmhttp-parser",
        "passthrough-parser",
    ]
    assert isinstance(table.resolve("/v1/chat/completions"), OpenAIParser)
    assert isinstance(table.resolve("/v1/completions?x=1"), OpenAIParser)
    assert isinstance(table.resolve("/v1/embeddings"), OpenAIParser)
    assert isinstance(table.resolve("/v1/messages"), AnthropicParser)
    assert isinstance(table.resolve("/v1/messages/count_tokens"), AnthropicParser)
    assert isinstance(table.resolve("/inference/v1/generate"), VllmHttpParser)
    for path in ("/v1/models", "/tokenize", "/health", "/v1/unknown"):
        assert isinstance(table.resolve(path), PassthroughParser), path


def test_unclaimed_path_is_parsed_without_a_prompt() -> None:
    table = load_config(HEAD).parsers
    req = table.parse("/tokenize", {"x-request-id": "r"}, b'{"prompt": "not read"}')
    assert (req.api, req.model, req.prompt, req.token_estimate) == ("passthrough", "", b"", 0)
    assert req.generation is False and req.request_id == "r"
    # Not even JSON: the passthrough parser never reads the body.
    assert table.parse("/v1/audio", {}, b"\x00\xff").api == "passthrough"


def test_bodyless_request_skips_every_parser() -> None:
    only_openai = load_config(HEAD + "requestHandler:\n  parsers: [{pluginRef: openai-parser}]\n")
    req = only_openai.parsers.parse("/v1/models", {}, b"", headers_only=True)
    assert req.api == "passthrough" and not req.generation


def test_explicit_list_gains_no_fallback_and_refuses_unclaimed_paths() -> None:
    table = load_config(HEAD + "requestHandler:\n  parsers: [{pluginRef: openai-parser}]\n").parsers
    assert _types(table) == ["openai-parser"]
    with pytest.raises(BadRequest, match="no parser registered matching path suffix") as err:
        table.parse("/tokenize", {}, b'{"prompt": "x"}')
    assert err.value.status == 400
    with pytest.raises(BadRequest):
        table.parse("/v1/messages", {}, CHAT)
    assert table.parse("/v1/chat/completions", {}, CHAT).api == "chat"


def test_deprecated_parser_field_and_declared_plugins() -> None:
    text = (
        HEAD.replace("plugins:\n", "plugins:\n- type: vllmhttp-parser\n  name: vh\n", 1)
        + "parser: {pluginRef: vh}\n"
    )
    table = load_config(text).parsers
    assert [p.name for p in table.parsers] == ["vh"]
    # requestHandler.parsers wins over the deprecated field.
    both = text + "requestHandler:\n  parsers: [{pluginRef: anthropic-parser}]\n"
    assert _types(load_config(both).parsers) == ["anthropic-parser"]


def test_parsers_after_the_fallback_and_repeated_types_are_ignored() -> None:
    table = ParserTable(
        [
            OpenAIParser(),
            OpenAIParser(name="again"),
            PassthroughParser(),
            AnthropicParser(),
        ]
    )
    assert [p.name for p in table.parsers] == ["openai-parser", "passthrough-parser"]
    assert isinstance(table.resolve("/v1/messages"), PassthroughParser)


def test_longest_claim_wins_whatever_the_order() -> None:
    table = ParserTable([SGLangHttpParser(), VllmHttpParser()])
    assert isinstance(table.resolve("/inference/v1/generate"), VllmHttpParser)
    assert isinstance(table.resolve("/generate"), SGLangHttpParser)
    # sglang claims any .../generate, but reads only /generate itself.
    only_sglang = ParserTable([SGLangHttpParser()])
    with pytest.raises(BadRequest, match="unsupported path"):
        only_sglang.parse("/inference/v1/generate", {}, b'{"input_ids": [1]}')


@pytest.mark.parametrize(
    "text",
    [
        "requestHandler:\n  parsers: [{pluginRef: nope}]\n",
        "requestHandler:\n  parsers: [{pluginRef: decode-filter}]\n",
        "requestHandler:\n  parsers: [{pluginRef: openai-parser, extra: 1}]\n",
        "requestHandler:\n  other: 1\n",
        "parser: {}\n",
    ],
)
def test_bad_parser_sections_fail_at_load(text: str) -> None:
    with pytest.raises(ConfigError, match=r"requestHandler|parser"):
        load_config(HEAD + text)


def test_parsers_take_no_parameters() -> None:
    text = HEAD.replace("plugins:\n", "plugins:\n- type: openai-parser\n  parameters: {x: 1}\n", 1)
    with pytest.raises(ConfigError, match="openai-parser"):
        load_config(text)


def test_openai_parser_apis() -> None:
    p = OpenAIParser()
    emb = p.parse("/v1/embeddings", {}, b'{"model": "e", "input": ["a", "b"]}')
    assert (emb.api, emb.model, emb.prompt, emb.generation) == ("embeddings", "e", b"ab", False)
    ids = p.parse("/v1/embeddings", {}, b'{"input": [[1, 2], [3]]}')
    assert ids.token_estimate == 3
    with pytest.raises(BadRequest, match="'input'"):
        p.parse("/v1/embeddings", {}, b'{"model": "e"}')
    render = p.parse("/v1/chat/completions/render", {}, CHAT)
    assert render.api == "chat-render" and not render.generation and render.prompt
    img = p.parse("/v1/images/generations", {}, b'{"prompt": "a cat"}')
    assert img.api == "images" and img.prompt == b"a cat"
    with pytest.raises(BadRequest, match="'prompt'"):
        p.parse("/v1/images/generations", {}, b"{}")
    conv = p.parse("/v1/conversations", {}, b'{"items": [{"role": "user", "content": "yo"}]}')
    assert conv.api == "conversations" and b"yo" in conv.prompt
    with pytest.raises(BadRequest, match="'items'"):
        p.parse("/v1/conversations", {}, b'{"items": []}')
    chat = p.parse("/v1/chat/completions", {}, CHAT)
    assert chat.api == "chat" and chat.generation and chat.model == "m"


def test_anthropic_count_tokens_is_forwarded_unread() -> None:
    p = AnthropicParser()
    assert p.parse("/v1/messages/count_tokens", {}, b"not json").api == "count-tokens"
    assert p.parse("/v1/messages", {}, CHAT).api == "messages"


def test_sglang_generate_reads_input_ids() -> None:
    p = SGLangHttpParser()
    req = p.parse("/generate", {}, b'{"input_ids": [[1, 2, 3], [4]], "extra_key": "s"}')
    assert req.api == "sglang-generate" and req.token_estimate == 4 and req.generation
    for bad in (b'{"text": "x"}', b'{"input_ids": []}', b'{"input_ids": [-1]}'):
        with pytest.raises(BadRequest, match="input_ids"):
            p.parse("/generate", {}, bad)
    with pytest.raises(BadRequest, match="extra_key"):
        p.parse("/generate", {}, b'{"input_ids": [1], "extra_key": 5}')


def test_validate_config_lists_the_parsers() -> None:
    from epp.__main__ import describe_config

    text = describe_config(load_config(HEAD), "x")
    assert (
        "request parsers: openai-parser, anthropic-parser, vllmhttp-parser, passthrough-parser"
        in text
    )
