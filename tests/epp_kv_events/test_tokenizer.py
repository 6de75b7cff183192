"""The local tokenizer: a model directory's tokenizer.json and chat template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors

from epp.datastore import Endpoint
from epp.kv_events.tokenizer import LocalTokenizer, TokenizerError
from epp.plugins.precise_prefix_producer import PrecisePrefixCacheProducer
from epp.plugins.prefix_producer import PREFIX_MATCH
from epp.request import parse_request
from epp.scheduling.cycle import CycleState

VOCAB = {"<s>": 0, "</s>": 1, "<unk>": 2, "<|user|>": 3, "<|assistant|>": 4, "hello": 5, "world": 6}
TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n"
    "{{ message['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def _model_dir(tmp_path: Path, *, template_in_config: bool = False) -> Path:
    tok = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>", "<|user|>", "<|assistant|>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(tmp_path / "tokenizer.json"))
    config: dict[str, object] = {"bos_token": "<s>", "eos_token": {"content": "</s>"}}
    if template_in_config:
        config["chat_template"] = [{"name": "default", "template": TEMPLATE}]
    else:
        (tmp_path / "chat_template.jinja").write_text(TEMPLATE)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


def test_prompt_gets_special_tokens_chat_does_not_twice(tmp_path: Path) -> None:
    tok = LocalTokenizer(_model_dir(tmp_path))
    assert tok.encode_prompt("hello world") == [0, 5, 6]
    messages = [{"role": "user", "content": "hello world"}]
    assert tok.render_chat(messages) == "<s><|user|>\nhello world\n<|assistant|>\n"
    assert tok.encode_chat(messages) == [0, 3, 5, 6, 4]
    assert tok.encode_chat(messages, add_generation_prompt=False) == [0, 3, 5, 6]


def test_content_parts_and_template_from_config(tmp_path: Path) -> None:
    tok = LocalTokenizer(_model_dir(tmp_path, template_in_config=True))
    parts = [{"type": "text", "text": "hello"}, {"type": "text", "text": "world"}]
    assert tok.encode_chat([{"role": "user", "content": parts}]) == [0, 3, 5, 6, 4]


async def test_encode_body(tmp_path: Path) -> None:
    tok = LocalTokenizer(_model_dir(tmp_path))
    assert await tok.encode_body({"prompt": "world"}) == [0, 6]
    assert await tok.encode_body({"messages": [{"role": "user", "content": "hello"}]}) == [
        0, 3, 5, 4,
    ]  # fmt: skip
    assert await tok.encode_body({"input": "x"}) is None


def test_errors(tmp_path: Path) -> None:
    with pytest.raises(TokenizerError, match=r"tokenizer\.json"):
        LocalTokenizer(tmp_path)
    d = _model_dir(tmp_path)
    (d / "chat_template.jinja").write_text("{{ raise_exception('no system role') }}")
    with pytest.raises(TokenizerError, match="no system role"):
        LocalTokenizer(d).encode_chat([{"role": "system", "content": "x"}])
    (d / "chat_template.jinja").unlink()
    with pytest.raises(TokenizerError, match="no chat template"):
        LocalTokenizer(d).encode_chat([])


def test_local_needs_a_path() -> None:
    with pytest.raises(ValueError, match="tokenizerPath"):
        PrecisePrefixCacheProducer.Params(tokenizer="local")


async def test_producer_with_local_tokenizer(tmp_path: Path) -> None:
    params = PrecisePrefixCacheProducer.Params(
        tokenizer="local", tokenizerPath=str(_model_dir(tmp_path)), blockSize=2
    )
    producer = PrecisePrefixCacheProducer(params)
    ep = Endpoint("e", "127.0.0.1", 1)
    producer.index.store(ep.key, [])  # the engine is publishing
    try:
        body = json.dumps(
            {"model": "m", "messages": [{"role": "user", "content": "hello world"}]}
        ).encode()
        cycle = CycleState(parse_request("/v1/chat/completions", {}, body), 0.0, 1.0)
        await producer.prefetch(cycle, [ep])
        producer.prepare(cycle, [ep])
        match = cycle.get(PREFIX_MATCH)
        assert match is not None
        assert match.source == "precise"
        assert len(match.hashes) == 2  # 5 tokens, blocks of 2
        assert cycle.request.token_estimate == 5
    finally:
        await producer.aclose()
