from __future__ import annotations

from .fixtures import make_pool

__all__ = ["make_pool"]
