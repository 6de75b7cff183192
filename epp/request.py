"""Parsing of the inference API shapes into what scheduling needs.

Scheduling needs four things from a request body: the model, the text the prefix index
hashes, the multimodal items (for the encode stage) and a token estimate. Each API shape
has one small extractor; all of them produce a ``ParsedRequest``. Anything that is not
a JSON object of the expected shape raises ``BadRequest`` naming the offending field.
Which extractor a path gets is the parser plugins' business (``epp.plugins.parsers``).

The hot path is parsing (``common.json_codec``, in C) plus list joins and one
``str.encode`` (C); no loop over characters happens in Python, so a 200 KB body costs
about a millisecond.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeGuard

from common.json_codec import loads_packed, small_ints
from common.multimodal import INPUT_AUDIO, MULTIMODAL_PART_TYPES
from epp.decision import BadRequest

__all__ = [
    "API_EXTRACTORS",
    "CHARS_PER_TOKEN",
    "MultimodalItem",
    "ParsedRequest",
    "is_token_ids",
    "parse_api",
    "parse_request",
    "passthrough_request",
    "route_of",
    "supported_paths",
]

# The usual rule of thumb for English text and BPE tokenisers; only used for estimates.
CHARS_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class MultimodalItem:
    """One multimodal part of a request. ``key`` identifies it (URL, or a data hash)."""

    kind: str
    key: str


@dataclass(slots=True)
class ParsedRequest:
    """What the scheduler knows about one request."""

    path: str
    api: str
    model: str
    # The prompt's bytes (``prompt``), or for token ids the ids or their 64-bit packing,
    # turned into those bytes on first use: most configurations never read them then.
    prompt_source: bytes | array[int] | list[int]
    token_estimate: int
    multimodal: list[MultimodalItem] = field(default_factory=list)
    stream: bool = False
    headers: Mapping[str, str] = field(default_factory=dict)
    request_id: str = ""
    # The parsed JSON body, for producers that need more than the prompt text.
    body: Mapping[str, Any] = field(default_factory=dict)
    # False for requests that generate nothing (embeddings, token counts, requests no
    # parser claimed): they are scheduled to one endpoint, never split into stages.
    generation: bool = True
    # The model the client asked for when ``model`` is the name it was rewritten to.
    requested_model: str = ""
    # ``client_token_ids()``'s answer once asked (False: not asked yet).
    client_ids: Sequence[int] | Literal[False] | None = field(
        default=False, repr=False, compare=False
    )

    def client_token_ids(self) -> Sequence[int] | None:
        """``body["prompt"]`` when it is token ids (``is_token_ids``), else None; checked
        once per request (a 240K-token list takes milliseconds), whoever asks."""
        ids = self.client_ids
        if ids is False:
            prompt = self.body.get("prompt")
            ids = self.client_ids = prompt if is_token_ids(prompt) else None
        return ids

    @property
    def prompt(self) -> bytes:
        """Bytes hashed by the prefix index: the prompt as the engine would see its
        prefix (token ids: the hex of their little-endian 64-bit packing)."""
        source = self.prompt_source
        if not isinstance(source, bytes):
            source = self.prompt_source = _hex(source)
        return source


def _hex(ids: array[int] | list[int]) -> bytes:
    """Token ids as the prefix index hashes them: the hex of their little-endian 64-bit
    packing."""
    packed = ids if isinstance(ids, array) else array("q", ids)
    return packed.tobytes().hex().encode("ascii")


class _Prompt:
    """Collects prompt text pieces; joined once at the end."""

    __slots__ = ("client_ids", "items", "packed", "parts")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.items: dict[str, MultimodalItem] = {}
        # A prompt of token ids: their 64-bit packing, or the ids when they are known to
        # fit it (packed when first read).
        self.packed: array[int] | list[int] | None = None
        # ``body["prompt"]`` once it passed ``is_token_ids`` here.
        self.client_ids: Sequence[int] | None = None

    def add_mm(self, kind: str, key: str) -> None:
        # Identical items are encoded once, so they count once.
        if key not in self.items:
            self.items[key] = MultimodalItem(kind, key)
        # The item's position shapes the engine's prefix, so it is part of the hashed text.
        self.parts.append(f"<{kind}:{key}>")


def _bad(msg: str) -> BadRequest:
    return BadRequest(msg)


def _sha256_key(text: str) -> str:
    # surrogatepass: JSON lets a client send a lone surrogate (\ud800), which has no UTF-8.
    return "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _str_field(body: Mapping[str, Any], name: str, *, required: bool) -> str:
    value = body.get(name)
    if value is None:
        if required:
            raise _bad(f"missing required field '{name}'")
        return ""
    if not isinstance(value, str):
        raise _bad(f"field '{name}' must be a string")
    try:
        value.encode()
    except UnicodeEncodeError:
        # The model name becomes a metrics label, which must be valid UTF-8.
        raise _bad(f"field '{name}' is not valid Unicode (a lone surrogate)") from None
    return value


def _mm_key(kind: str, part: Mapping[str, Any], where: str) -> str:
    inner = part.get(kind)
    if kind == INPUT_AUDIO:
        if not isinstance(inner, Mapping) or not isinstance(inner.get("data"), str):
            raise _bad(f"{where}.input_audio.data must be a string")
        data: str = inner["data"]
        return _sha256_key(data)
    if isinstance(inner, str):
        return inner
    if isinstance(inner, Mapping) and isinstance(inner.get("url"), str):
        url: str = inner["url"]
        if url.startswith("data:") and len(url) > 256:
            # Inline data is identified by its hash so the hashed prompt stays small.
            return _sha256_key(url)
        return url
    raise _bad(f"{where}.{kind}.url must be a string")


def _chat_content(content: Any, out: _Prompt, where: str) -> None:
    if content is None:
        return
    if isinstance(content, str):
        out.parts.append(content)
        return
    if not isinstance(content, list):
        raise _bad(f"{where} must be a string or a list of parts")
    for j, part in enumerate(content):
        if not isinstance(part, Mapping):
            raise _bad(f"{where}[{j}] must be an object")
        ptype = part.get("type")
        if ptype in ("text", "input_text", "output_text"):
            text = part.get("text")
            if not isinstance(text, str):
                raise _bad(f"{where}[{j}].text must be a string")
            out.parts.append(text)
        elif ptype in MULTIMODAL_PART_TYPES:
            out.add_mm(ptype, _mm_key(ptype, part, f"{where}[{j}]"))
        elif ptype == "input_image":
            # Responses API image part: image_url is a plain string there.
            url = part.get("image_url") or part.get("file_id")
            if not isinstance(url, str):
                raise _bad(f"{where}[{j}].image_url must be a string")
            out.add_mm("image_url", url)
        elif ptype == "image":
            # Anthropic messages: {"type": "image", "source": {...}}.
            source = part.get("source")
            if not isinstance(source, Mapping):
                raise _bad(f"{where}[{j}].source must be an object")
            raw = source.get("url") or source.get("data")
            if not isinstance(raw, str):
                raise _bad(f"{where}[{j}].source needs a url or data string")
            key = raw if len(raw) <= 256 else _sha256_key(raw)
            out.add_mm("image_url", key)
        elif isinstance(ptype, str):
            # Tool results, thinking blocks, ...: not multimodal; their text still counts.
            text = part.get("text")
            if isinstance(text, str):
                out.parts.append(text)
        else:
            raise _bad(f"{where}[{j}].type must be a string")


def _messages(messages: Any, out: _Prompt, name: str = "messages") -> None:
    if not isinstance(messages, list):
        raise _bad(f"field '{name}' must be a list")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise _bad(f"{name}[{i}] must be an object")
        role = msg.get("role", "")
        if not isinstance(role, str):
            raise _bad(f"{name}[{i}].role must be a string")
        out.parts.append(f"\n<|{role}|>\n")
        _chat_content(msg.get("content"), out, f"{name}[{i}].content")


def _chat(body: Mapping[str, Any], out: _Prompt) -> int | None:
    if "messages" not in body:
        raise _bad("missing required field 'messages'")
    _messages(body["messages"], out)
    return None


def _completions(body: Mapping[str, Any], out: _Prompt) -> int | None:
    if "prompt" not in body:
        raise _bad("missing required field 'prompt'")
    prompt = body["prompt"]
    if isinstance(prompt, str):
        out.parts.append(prompt)
        return None
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        out.parts.extend(prompt)
        return None
    if isinstance(prompt, list | array):
        return _token_ids(prompt, out, "prompt")
    raise _bad("field 'prompt' must be a string, a list of strings or token ids")


def _token_ids(ids: list[Any] | array[int], out: _Prompt, name: str) -> int:
    if isinstance(ids, array):
        # Read packed (``loads_packed``): a flat list of 64-bit ints.
        out.packed = ids
        if name == "prompt":
            out.client_ids = ids
        return len(ids)
    if ids and small_ints(ids):
        # Ints below 2^53: packing them cannot fail, so it waits for a reader.
        out.packed = ids
        if name == "prompt":
            out.client_ids = ids
        return len(ids)
    flat: list[Any] = ids
    if ids and isinstance(ids[0], list):
        flat = [t for seq in ids if isinstance(seq, list) for t in seq]
    try:
        packed = array("q", flat)
    except (TypeError, OverflowError):
        raise _bad(f"field '{name}' must be a list of token ids") from None
    # Token ids hash as the hex of their little-endian bytes (made when first read).
    out.packed = packed
    return len(packed)


def _responses(body: Mapping[str, Any], out: _Prompt) -> int | None:
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise _bad("field 'instructions' must be a string")
        out.parts.append(f"\n<|system|>\n{instructions}")
    if "input" not in body:
        raise _bad("missing required field 'input'")
    data = body["input"]
    if isinstance(data, str):
        out.parts.append(f"\n<|user|>\n{data}")
        return None
    if not isinstance(data, list):
        raise _bad("field 'input' must be a string or a list of items")
    for i, item in enumerate(data):
        if not isinstance(item, Mapping):
            raise _bad(f"input[{i}] must be an object")
        role = item.get("role")
        if isinstance(role, str):
            out.parts.append(f"\n<|{role}|>\n")
            _chat_content(item.get("content"), out, f"input[{i}].content")
        else:
            # function_call / function_call_output / reasoning items: their text counts.
            for key in ("output", "arguments", "text"):
                value = item.get(key)
                if isinstance(value, str):
                    out.parts.append(value)
    return None


def _anthropic(body: Mapping[str, Any], out: _Prompt) -> int | None:
    system = body.get("system")
    if isinstance(system, str):
        out.parts.append(f"\n<|system|>\n{system}")
    elif isinstance(system, list):
        out.parts.append("\n<|system|>\n")
        _chat_content(system, out, "system")
    elif system is not None:
        raise _bad("field 'system' must be a string or a list of blocks")
    if "messages" not in body:
        raise _bad("missing required field 'messages'")
    _messages(body["messages"], out)
    return None


def _generate(body: Mapping[str, Any], out: _Prompt) -> int | None:
    ids = body.get("token_ids")
    if ids is None:
        prompt = body.get("prompt")
        if isinstance(prompt, str):
            out.parts.append(prompt)
            return None
        raise _bad("missing required field 'token_ids'")
    if not isinstance(ids, list | array):
        raise _bad("field 'token_ids' must be a list of integers")
    return _token_ids(ids, out, "token_ids")


def _embeddings(body: Mapping[str, Any], out: _Prompt) -> int | None:
    if "input" not in body:
        raise _bad("missing required field 'input'")
    data = body["input"]
    if isinstance(data, str):
        out.parts.append(data)
        return None
    if isinstance(data, list) and data and all(isinstance(p, str) for p in data):
        out.parts.extend(data)
        return None
    if isinstance(data, list | array) and data:
        return _token_ids(data, out, "input")
    raise _bad("field 'input' must be a string, a list of strings or token ids")


def _conversations(body: Mapping[str, Any], out: _Prompt) -> int | None:
    items = body.get("items")
    if not isinstance(items, list) or not items:
        raise _bad("field 'items' must be a non-empty list")
    for i, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise _bad(f"items[{i}] must be an object")
        role = item.get("role")
        if isinstance(role, str):
            out.parts.append(f"\n<|{role}|>\n")
            _chat_content(item.get("content"), out, f"items[{i}].content")
    return None


def _images(body: Mapping[str, Any], out: _Prompt) -> int | None:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        raise _bad("field 'prompt' must be a non-empty string")
    out.parts.append(prompt)
    return None


def _sglang_generate(body: Mapping[str, Any], out: _Prompt) -> int | None:
    ids = body.get("input_ids")
    if not isinstance(ids, list | array) or not ids:
        raise _bad("field 'input_ids' must be a non-empty list of token ids")
    flat = [t for seq in ids for t in seq] if isinstance(ids[0], list) else ids
    if not flat or not all(isinstance(t, int) and 0 <= t < 2**32 for t in flat):
        raise _bad("field 'input_ids' must hold token ids (integers in [0, 2^32))")
    extra_key = body.get("extra_key")
    if extra_key is not None and not isinstance(extra_key, str):
        raise _bad("field 'extra_key' must be a string")
    return _token_ids(ids, out, "input_ids")


_Extractor = Callable[[Mapping[str, Any], _Prompt], "int | None"]

_EXTRACTORS: dict[str, str] = {
    # path -> api name (the five generation paths of ``parse_request``)
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/responses": "responses",
    "/v1/messages": "messages",
    "/inference/v1/generate": "generate",
}


# api name -> (extractor, model required, generates output); the parsers pick the api.
API_EXTRACTORS: dict[str, tuple[_Extractor, bool, bool]] = {
    "chat": (_chat, True, True),
    "completions": (_completions, True, True),
    "responses": (_responses, True, True),
    "messages": (_anthropic, True, True),
    "generate": (_generate, False, True),
    "embeddings": (_embeddings, False, False),
    "conversations": (_conversations, False, False),
    "images": (_images, False, False),
    "chat-render": (_chat, False, False),
    "completions-render": (_completions, False, False),
    "sglang-generate": (_sglang_generate, False, True),
}


# api name -> the fields whose token ids are read packed (an ``array``, not a list of
# ints) in a long body: what the extractor and every reader of the field accept.
_ID_FIELDS: dict[str, tuple[str, ...]] = {
    "completions": ("prompt",),
    "completions-render": ("prompt",),
    "generate": ("token_ids",),
    "embeddings": ("input",),
    "sglang-generate": ("input_ids",),
}


def supported_paths() -> tuple[str, ...]:
    """The request paths the parser understands."""
    return tuple(_EXTRACTORS)


def route_of(path: str) -> str:
    """The path without its query and trailing slash."""
    return path.split("?", 1)[0].rstrip("/") or "/"


def parse_request(path: str, headers: Mapping[str, str], body: bytes) -> ParsedRequest:
    """Parse one body of the five generation paths (exact match), or raise ``BadRequest``
    with a message naming the problem. Configured parsers go through ``parse_api``."""
    route = route_of(path)
    spec = _EXTRACTORS.get(route)
    if spec is None:
        raise _bad(f"unsupported path '{route}'; expected one of {', '.join(_EXTRACTORS)}")
    return parse_api(spec, route, headers, body)


def is_token_ids(value: object) -> TypeGuard[Sequence[int]]:
    """A non-empty list of ints (bools excluded), checked in C when every item is an int
    (below 2^53 in magnitude: one call); or such a list read packed (``loads_packed``)."""
    if isinstance(value, array):
        return value.typecode == "q" and len(value) > 0
    if not isinstance(value, list) or not value:
        return False
    if small_ints(value) or set(map(type, value)) == {int}:
        return True
    return all(isinstance(t, int) and not isinstance(t, bool) for t in value)


def _json_object(body: bytes, id_fields: tuple[str, ...]) -> dict[str, Any]:
    if not body:
        raise _bad("empty request body")
    try:
        doc = loads_packed(body, id_fields)
    except (UnicodeDecodeError, ValueError) as exc:
        raise _bad(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise _bad("request body nests too deeply") from None
    if not isinstance(doc, dict):
        raise _bad("request body must be a JSON object")
    return doc


def parse_api(api: str, route: str, headers: Mapping[str, str], body: bytes) -> ParsedRequest:
    """Parse a body as API ``api`` (a key of ``API_EXTRACTORS``)."""
    extract, model_required, generation = API_EXTRACTORS[api]
    doc = _json_object(body, _ID_FIELDS.get(api, ()))
    model = _str_field(doc, "model", required=model_required)
    out = _Prompt()
    token_count = extract(doc, out)
    prompt: bytes | array[int] | list[int]
    if out.packed is not None and not out.parts:
        prompt = out.packed
    else:
        if out.packed is not None:
            out.parts.append(_hex(out.packed).decode("ascii"))
        prompt = "".join(out.parts).encode("utf-8", "surrogatepass")
    if token_count is None:
        token_count = -(-len(prompt) // CHARS_PER_TOKEN)
    stream = doc.get("stream", False)
    return ParsedRequest(
        path=route,
        api=api,
        model=model,
        prompt_source=prompt,
        token_estimate=token_count,
        multimodal=list(out.items.values()),
        stream=stream is True,
        headers=headers,
        request_id=headers.get("x-request-id", ""),
        body=doc,
        generation=generation,
        client_ids=False if out.client_ids is None else out.client_ids,
    )


def passthrough_request(
    path: str, headers: Mapping[str, str], api: str = "passthrough"
) -> ParsedRequest:
    """A request forwarded without reading its body: no model, no prompt, one stage."""
    return ParsedRequest(
        path=route_of(path),
        api=api,
        model="",
        prompt_source=b"",
        token_estimate=0,
        headers=headers,
        request_id=headers.get("x-request-id", ""),
        generation=False,
    )
