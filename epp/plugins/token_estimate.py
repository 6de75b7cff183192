"""The tokenizer-free token estimate: request bytes packed into 4-byte pseudo-tokens.

Chat requests (and Anthropic Messages, as the equivalent chat request) are packed as
tools, then each message's role and content. Pseudo-token ids never equal an engine's
ids; they only keep content locality (equal prefixes give equal leading ids), which is
all the approximate prefix index needs.
Multimodal items occupy an estimated number of placeholder tokens (their content
hash repeated), aligned on a token boundary, and are reported as features.

Image placeholders: ``dynamic`` (width x height / factor, from the image's own header
when it is inline PNG/JPEG/GIF data, else the default resolution) or ``static`` (a
constant). Video: min(frames x tokens-per-frame, maxVideoTokens), frames ``sampled``
(duration x sampleFPS, clamped, merged by temporalPatchSize) or ``strided``
(duration x sourceFPS / frameStride, clamped); duration, resolution and source fps
come from the ``x-llm-d-video-*`` request headers when present.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import struct
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from common.multimodal import AUDIO_URL, IMAGE_URL, INPUT_AUDIO, VIDEO_URL
from epp.plugins.base import PluginParams
from epp.plugins.token_anthropic import anthropic_to_chat
from epp.request import ParsedRequest, is_token_ids

__all__ = [
    "BYTES_PER_TOKEN",
    "EstimateParams",
    "MultiModalFeature",
    "TokenizedPrompt",
    "estimate_prompt",
    "pack_bytes",
]

BYTES_PER_TOKEN = 4

_IMAGE_W, _IMAGE_H, _IMAGE_FACTOR = 640, 360, 1024
_VIDEO_W, _VIDEO_H, _VIDEO_FACTOR = 640, 360, 1024
_VIDEO_DURATION_S = 10.0
_VIDEO_SAMPLE_FPS = 1.0
_VIDEO_SOURCE_FPS = 24.0


@dataclass(frozen=True, slots=True)
class MultiModalFeature:
    modality: str  # "image", "video" or "audio"
    hash: str
    offset: int  # in tokens
    length: int


@dataclass(frozen=True, slots=True)
class TokenizedPrompt:
    """A request's prompt as token ids (real or pseudo) and its multimodal features,
    sorted by offset. ``backend``: ``estimate``, ``vllm`` or ``request`` (the client
    sent token ids)."""

    token_ids: Sequence[int]
    backend: str
    features: list[MultiModalFeature] = field(default_factory=list)

    @property
    def real(self) -> bool:
        """Ids an engine would produce (not pseudo-tokens)."""
        return self.backend != "estimate"


class Resolution(PluginParams):
    width: int = Field(gt=0)
    height: int = Field(gt=0)


class _StaticImage(PluginParams):
    static_token: int = Field(default=0, ge=0)


class _Factor(PluginParams):
    factor: int = Field(default=0, ge=0)


class ImageEstimate(PluginParams):
    mode: Literal["dynamic", "static", ""] = "dynamic"
    default_resolution: Resolution | None = None
    static: _StaticImage | None = None
    dynamic: _Factor | None = None


class _StaticFrame(PluginParams):
    num_tokens_per_frame: int = Field(default=0, ge=0)


class TokensPerFrame(PluginParams):
    mode: Literal["dynamic", "static", ""] = "dynamic"
    static: _StaticFrame | None = None
    dynamic: _Factor | None = None


class _Sampled(PluginParams):
    sample_fps: float = Field(default=0.0, ge=0, alias="sampleFPS")
    temporal_patch_size: int = Field(default=0, ge=0)


class _Strided(PluginParams):
    default_source_fps: float = Field(default=0.0, ge=0, alias="defaultSourceFPS")
    frame_stride: int = Field(default=0, ge=0)


class Frames(PluginParams):
    mode: Literal["sampled", "strided", ""] = "sampled"
    min_frames: int = Field(default=0, ge=0)
    max_frames: int = Field(default=0, ge=0)
    sampled: _Sampled | None = None
    strided: _Strided | None = None


class VideoEstimate(PluginParams):
    default_resolution: Resolution | None = None
    default_duration: float = Field(default=0.0, ge=0)
    tokens_per_frame: TokensPerFrame | None = None
    frames: Frames | None = None
    max_video_tokens: int = Field(default=0, ge=0)


class EstimateParams(PluginParams):
    image: ImageEstimate | None = None
    video: VideoEstimate | None = None


def pack_bytes(raw: bytes) -> list[int]:
    """Little-endian uint32 pseudo-tokens, the tail zero-padded."""
    if not raw:
        return []
    pad = -len(raw) % BYTES_PER_TOKEN
    if pad:
        raw += b"\0" * pad
    view = memoryview(raw).cast("I")
    if sys.byteorder != "little":  # pragma: no cover - every supported host is little-endian
        return list(struct.unpack(f"<{len(raw) // 4}I", raw))
    return view.tolist()


def _align(out: bytearray) -> None:
    pad = -len(out) % BYTES_PER_TOKEN
    if pad:
        out.extend(b"\0" * pad)


def _content_hash(content: str) -> int:
    digest = hashlib.blake2b(content.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class _Assets:
    def __init__(self, params: EstimateParams, headers: Mapping[str, str]) -> None:
        self.image = params.image or ImageEstimate()
        self.video = params.video or VideoEstimate()
        self.headers = headers
        self.features: list[MultiModalFeature] = []

    def append(self, out: bytearray, modality: str, content: str, count: int) -> None:
        _align(out)
        offset = len(out) // BYTES_PER_TOKEN
        h = _content_hash(content)
        out.extend((h & 0xFFFFFFFF).to_bytes(4, "little") * count)
        self.features.append(MultiModalFeature(modality, format(h, "x"), offset, count))

    def image_tokens(self, url: str) -> int:
        img = self.image
        if img.mode == "static":
            return img.static.static_token if img.static and img.static.static_token else 1
        dims = image_dimensions(url)
        if dims is None:
            res = img.default_resolution
            dims = (res.width, res.height) if res else (_IMAGE_W, _IMAGE_H)
        factor = img.dynamic.factor if img.dynamic and img.dynamic.factor else _IMAGE_FACTOR
        return max(1, dims[0] * dims[1] // factor)

    def video_tokens(self) -> int:
        vid = self.video
        duration = _header_float(self.headers, "x-llm-d-video-duration-seconds")
        duration = duration or vid.default_duration or _VIDEO_DURATION_S
        frames = vid.frames or Frames()
        if frames.mode == "strided":
            strided = frames.strided or _Strided()
            fps = _header_float(self.headers, "x-llm-d-video-fps")
            fps = fps or strided.default_source_fps or _VIDEO_SOURCE_FPS
            n = int(duration * fps) // max(1, strided.frame_stride)
            n = _clamp(n, frames.min_frames, frames.max_frames)
        else:
            sampled = frames.sampled or _Sampled()
            n = int(duration * (sampled.sample_fps or _VIDEO_SAMPLE_FPS))
            n = _clamp(n, frames.min_frames, frames.max_frames)
            if sampled.temporal_patch_size > 1:
                n //= sampled.temporal_patch_size
        tpf = vid.tokens_per_frame or TokensPerFrame()
        if tpf.mode == "static":
            per_frame = tpf.static.num_tokens_per_frame if tpf.static else 0
            per_frame = per_frame or 1
        else:
            dims = _header_resolution(self.headers)
            if dims is None:
                res = vid.default_resolution
                dims = (res.width, res.height) if res else (_VIDEO_W, _VIDEO_H)
            factor = tpf.dynamic.factor if tpf.dynamic and tpf.dynamic.factor else _VIDEO_FACTOR
            per_frame = max(1, dims[0] * dims[1] // factor)
        tokens = n * per_frame
        if vid.max_video_tokens and tokens > vid.max_video_tokens:
            tokens = vid.max_video_tokens
        return max(1, tokens)


def _clamp(n: int, low: int, high: int) -> int:
    if low and n < low:
        n = low
    if high and n > high:
        n = high
    return n


def _header_float(headers: Mapping[str, str], name: str) -> float:
    try:
        value = float(headers.get(name, ""))
    except ValueError:
        return 0.0
    return value if value > 0 else 0.0


def _header_resolution(headers: Mapping[str, str]) -> tuple[int, int] | None:
    text = headers.get("x-llm-d-video-resolution", "")
    w, sep, h = text.lower().partition("x")
    try:
        dims = (int(w.strip()), int(h.strip())) if sep else None
    except ValueError:
        return None
    return dims if dims and dims[0] > 0 and dims[1] > 0 else None


def image_dimensions(url: str) -> tuple[int, int] | None:
    """Width and height from an inline ``data:image/...;base64,`` PNG, GIF or JPEG."""
    if not url.startswith("data:image/"):
        return None
    _, sep, payload = url.partition("base64,")
    if not sep:
        return None
    try:
        head = base64.b64decode(payload[: 64 * 1024 // 3 * 4] + "==", validate=False)
    except (binascii.Error, ValueError):
        return None
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24:
        w, h = struct.unpack(">II", head[16:24])
    elif head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        w, h = struct.unpack("<HH", head[6:10])
    elif head.startswith(b"\xff\xd8"):
        found = _jpeg_dimensions(head)
        if found is None:
            return None
        w, h = found
    else:
        return None
    return (w, h) if w > 0 and h > 0 else None


def _jpeg_dimensions(data: bytes) -> tuple[int, int] | None:
    i = 2
    while i + 9 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        length = int.from_bytes(data[i + 2 : i + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            return w, h
        i += 2 + length
    return None


def _part_url(part: Mapping[str, Any], kind: str) -> str:
    inner = part.get(kind)
    if isinstance(inner, str):
        return inner
    if isinstance(inner, Mapping):
        value = inner.get("url") or inner.get("data")
        if isinstance(value, str):
            return value + str(inner.get("format", ""))
    return ""


def _chat_bytes(body: Mapping[str, Any], assets: _Assets) -> bytes:
    out = bytearray()
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        out.extend(json.dumps(tools, separators=(",", ":")).encode("utf-8", "surrogatepass"))
    for msg in body.get("messages") or []:
        if not isinstance(msg, Mapping):
            continue
        role = msg.get("role")
        if isinstance(role, str):
            out.extend(role.encode("utf-8", "surrogatepass"))
        content = msg.get("content")
        if isinstance(content, str):
            out.extend(content.encode("utf-8", "surrogatepass"))
            continue
        for part in content if isinstance(content, list) else []:
            if not isinstance(part, Mapping):
                continue
            kind = part.get("type")
            if kind == "text" and isinstance(part.get("text"), str):
                out.extend(part["text"].encode("utf-8", "surrogatepass"))
            elif kind == IMAGE_URL:
                url = _part_url(part, kind)
                assets.append(out, "image", url, assets.image_tokens(url))
            elif kind == VIDEO_URL:
                assets.append(out, "video", _part_url(part, kind), assets.video_tokens())
            elif kind in (INPUT_AUDIO, AUDIO_URL):
                data = _part_url(part, kind)
                count = max(1, -(-len(data) // BYTES_PER_TOKEN))
                assets.append(out, "audio", data, count)
    return bytes(out)


def request_token_ids(request: ParsedRequest) -> Sequence[int] | None:
    """Token ids the client sent itself (completions or generate): already real."""
    ids = request.client_token_ids()  # the prompt's, checked once per request
    if ids is None:
        other = request.body.get("token_ids")
        if is_token_ids(other):
            return other
    return ids


def estimate_prompt(
    request: ParsedRequest, params: EstimateParams | None = None
) -> TokenizedPrompt:
    """The tokenizer-free tokenization of one request."""
    ids = request_token_ids(request)
    if ids is not None:
        return TokenizedPrompt(ids, "request")
    body: Mapping[str, Any] | None = None
    if request.api == "chat" and isinstance(request.body.get("messages"), list):
        body = request.body
    elif request.api == "messages" and isinstance(request.body.get("messages"), list):
        body = anthropic_to_chat(request.body)
    if body is not None:
        assets = _Assets(params or EstimateParams(), request.headers)
        raw = _chat_bytes(body, assets)
        return TokenizedPrompt(pack_bytes(raw), "estimate", assets.features)
    return TokenizedPrompt(pack_bytes(request.prompt), "estimate")
