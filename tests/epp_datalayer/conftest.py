from __future__ import annotations

from .pool import start_director

__all__ = ["start_director"]
