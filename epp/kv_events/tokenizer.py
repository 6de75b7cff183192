"""The model's own tokenizer, loaded from a local model directory, chat template included.

Produces the token ids the engine will hash: a completion prompt is encoded with the
tokenizer's special tokens (BOS...), a chat is rendered with the model's Jinja chat
template (``chat_template.jinja`` or ``tokenizer_config.json``) and the result encoded
without adding special tokens again, as vLLM does for chat requests. Encoding runs in
a worker thread (the Rust tokenizer releases the GIL).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer

__all__ = ["LocalTokenizer", "TokenizerError"]


class TokenizerError(ValueError):
    """The model directory or a request cannot be tokenized."""


def _token_text(value: Any) -> str:
    if isinstance(value, Mapping):
        return str(value.get("content", ""))
    return "" if value is None else str(value)


def _raise(message: str) -> None:
    raise TokenizerError(f"chat template: {message}")


def _plain_content(content: Any) -> Any:
    # Text parts are joined with newlines, the way vLLM flattens them for templates
    # that expect a string.
    if isinstance(content, list):
        texts = [
            p.get("text", "") for p in content if isinstance(p, Mapping) and p.get("type") == "text"
        ]
        return "\n".join(texts)
    return content


class LocalTokenizer:
    def __init__(self, model_dir: str | Path) -> None:
        path = Path(model_dir)
        try:
            self._tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as exc:  # the Rust side raises a plain Exception
            raise TokenizerError(f"cannot load {path / 'tokenizer.json'}: {exc}") from None
        config: dict[str, Any] = {}
        cfg_file = path / "tokenizer_config.json"
        if cfg_file.is_file():
            config = json.loads(cfg_file.read_text())
        template = None
        jinja_file = path / "chat_template.jinja"
        if jinja_file.is_file():
            template = jinja_file.read_text()
        elif isinstance(config.get("chat_template"), str):
            template = config["chat_template"]
        elif isinstance(config.get("chat_template"), list):
            named = {t.get("name"): t.get("template") for t in config["chat_template"]}
            template = named.get("default")
        self.bos_token = _token_text(config.get("bos_token"))
        self.eos_token = _token_text(config.get("eos_token"))
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(template) if template else None

    def encode_prompt(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> str:
        if self._template is None:
            raise TokenizerError("the model has no chat template")
        plain = [{**m, "content": _plain_content(m.get("content"))} for m in messages]
        try:
            return self._template.render(
                messages=plain,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
                **(extra or {}),
            )
        except jinja2.TemplateError as exc:
            raise TokenizerError(f"chat template: {exc}") from None

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        extra: Mapping[str, Any] | None = None,
    ) -> list[int]:
        text = self.render_chat(messages, add_generation_prompt=add_generation_prompt, extra=extra)
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    async def encode_body(self, body: Mapping[str, Any]) -> list[int] | None:
        """Token ids for a chat or completions body; None when it has neither shape."""
        messages = body.get("messages")
        if isinstance(messages, list) and all(isinstance(m, Mapping) for m in messages):
            extra = body.get("chat_template_kwargs")
            return await asyncio.to_thread(
                self.encode_chat,
                messages,
                add_generation_prompt=body.get("add_generation_prompt", True) is not False,
                extra=extra if isinstance(extra, Mapping) else None,
            )
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            return await asyncio.to_thread(self.encode_prompt, prompt)
        return None
