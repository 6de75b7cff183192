"""The error a bad start-up configuration raises, shared by every component."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """The configuration is invalid; the message names the field (and plugin, if any)."""
