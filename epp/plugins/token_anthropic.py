"""An Anthropic Messages request as the equivalent OpenAI chat request, for token
producers: what a vLLM render endpoint takes, and what the estimate packs."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

__all__ = ["anthropic_to_chat"]

_BILLING_HEADER = "x-anthropic-billing-header"


def _system_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    parts = []
    for block in content if isinstance(content, list) else []:
        if isinstance(block, Mapping) and block.get("type") == "text":
            text = block.get("text")
            # Per-request billing text the engine strips before templating.
            if isinstance(text, str) and text and not text.startswith(_BILLING_HEADER):
                parts.append(text)
    return "".join(parts)


def _image_url(source: Any) -> str:
    if not isinstance(source, Mapping):
        return ""
    url = source.get("url")
    if isinstance(url, str) and url:
        return url
    data = source.get("data")
    if not isinstance(data, str) or not data:
        return ""
    media = source.get("media_type") or "image/jpeg"
    return f"data:{media};base64,{data}"


def _tool_result_text(block: Mapping[str, Any]) -> str:
    content = block.get("content")
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    return "".join(
        b["text"]
        for b in content
        if isinstance(b, Mapping) and b.get("type") == "text" and isinstance(b.get("text"), str)
    )


def anthropic_to_chat(body: Mapping[str, Any]) -> dict[str, Any]:
    """An Anthropic Messages request as the chat request a vLLM render endpoint takes:
    the system text first, text and image blocks as content parts, tool uses as tool
    calls, a user's tool results as tool messages, thinking as reasoning."""
    out: list[dict[str, Any]] = []
    system = _system_text(body.get("system"))
    if system:
        out.append({"role": "system", "content": system})
    for msg in body.get("messages") or []:
        if not isinstance(msg, Mapping):
            continue
        role = msg.get("role", "user")
        content = msg.get("content")
        if role == "system":
            text = _system_text(content)
            if text:
                out.append({"role": "system", "content": text})
            continue
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        parts: list[dict[str, Any]] = []
        calls: list[dict[str, Any]] = []
        reasoning = ""
        for block in content if isinstance(content, list) else []:
            if not isinstance(block, Mapping):
                continue
            kind = block.get("type")
            if kind == "text" and block.get("text"):
                parts.append({"type": "text", "text": block["text"]})
            elif kind == "image":
                url = _image_url(block.get("source"))
                if url:
                    parts.append({"type": "image_url", "image_url": {"url": url}})
            elif kind == "thinking" and isinstance(block.get("thinking"), str):
                reasoning += block["thinking"]
            elif kind == "tool_use":
                calls.append(
                    {
                        "id": block.get("id", ""),
                        "type": "function",
                        "function": {
                            "name": block.get("name", ""),
                            "arguments": json.dumps(block.get("input", {}), sort_keys=True),
                        },
                    }
                )
            elif kind == "tool_result":
                text = _tool_result_text(block)
                if role == "user":
                    out.append(
                        {
                            "role": "tool",
                            "tool_call_id": block.get("tool_use_id", ""),
                            "content": text,
                        }
                    )
                else:
                    parts.append({"type": "text", "text": "Tool result: " + text})
        message: dict[str, Any] = {"role": role}
        if len(parts) == 1 and parts[0]["type"] == "text":
            message["content"] = parts[0]["text"]
        elif parts:
            message["content"] = parts
        if calls:
            message["tool_calls"] = calls
        if reasoning:
            message["reasoning"] = reasoning
        if len(message) > 1:
            out.append(message)
    chat: dict[str, Any] = {"messages": out}
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        chat["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.get("name", ""),
                    "description": t.get("description", ""),
                    "parameters": t.get("input_schema", {}),
                },
            }
            for t in tools
            if isinstance(t, Mapping)
        ]
    return chat
