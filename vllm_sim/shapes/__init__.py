"""The API shapes the simulator serves, by path."""

from __future__ import annotations

from .base import ApiShape
from .chat import ChatCompletions
from .completions import Completions
from .generate import Generate
from .messages import Messages
from .responses import Responses

__all__ = ["SHAPES", "ApiShape"]

SHAPES: dict[str, ApiShape] = {
    shape.path: shape
    for shape in (ChatCompletions(), Completions(), Responses(), Messages(), Generate())
}
