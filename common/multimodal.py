"""The multimodal content-part types of OpenAI chat messages, as vLLM accepts them.

The EPP schedules on them (prefix hashing, encoder picking, token estimates), the
pd-sidecar decides from them whether a request needs an encode stage, and the simulator
renders them; all read the list here.
"""

from __future__ import annotations

__all__ = [
    "AUDIO_URL",
    "IMAGE_URL",
    "INPUT_AUDIO",
    "MODALITY",
    "MULTIMODAL_PART_TYPES",
    "VIDEO_URL",
]

IMAGE_URL = "image_url"
AUDIO_URL = "audio_url"
VIDEO_URL = "video_url"
# Audio inline as base64 ({"data": ..., "format": ...}).
INPUT_AUDIO = "input_audio"

# Every ``{"type": ...}`` of a message content part that carries media.
MULTIMODAL_PART_TYPES: tuple[str, ...] = (IMAGE_URL, AUDIO_URL, VIDEO_URL, INPUT_AUDIO)

# vLLM's modality of each part type.
MODALITY: dict[str, str] = {
    IMAGE_URL: "image",
    VIDEO_URL: "video",
    AUDIO_URL: "audio",
    INPUT_AUDIO: "audio",
}
