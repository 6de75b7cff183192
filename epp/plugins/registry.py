"""One registry: plugin ``type`` name -> plugin class.

Built-in plugins register exactly like third-party ones; third-party packages add
theirs through the entry point group ``disagg.epp.plugins`` (each entry point loads a
plugin class). A class is checked when it registers, and the error names it.
"""

from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from typing import Any, TypeVar

from pydantic import BaseModel

from epp.plugins.base import Plugin, PluginParams

__all__ = [
    "ENTRY_POINT_GROUP",
    "PluginRegistrationError",
    "create_plugin",
    "load_entry_points",
    "lookup",
    "register",
    "registered_types",
    "unregister",
]

log = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "disagg.epp.plugins"

_BUILTIN_MODULES = (
    "epp.plugins.filters",
    "epp.plugins.queue_scorer",
    "epp.plugins.kv_cache_scorer",
    "epp.plugins.token_producer",
    "epp.plugins.prefix_producer",
    "epp.plugins.precise_prefix_producer",
    "epp.plugins.prefix_scorer",
    "epp.plugins.prefix_burst_producer",
    "epp.plugins.no_hit_lru_scorer",
    "epp.plugins.mm_embeddings_cache",
    "epp.plugins.load_aware_scorer",
    "epp.plugins.active_request_scorer",
    "epp.plugins.session_affinity_scorer",
    "epp.plugins.pickers",
    "epp.plugins.deciders",
    "epp.plugins.profile_handlers",
    "epp.plugins.file_discovery",
    "epp.plugins.llm_d_compat",
    "epp.plugins.topology_affinity",
    "epp.plugins.endpoint_attribute",
    "epp.plugins.lora_affinity_scorer",
    "epp.plugins.running_requests_scorer",
    "epp.plugins.header_label_affinity_scorer",
    "epp.plugins.inflight_load",
    "epp.plugins.token_load_scorer",
    "epp.plugins.prefill_backlog_scorer",
    "epp.plugins.utilization_filter",
    "epp.plugins.session_id_producer",
    "epp.plugins.session_affinity_filter",
    "epp.plugins.parsers",
    "epp.plugins.dp_profile_handler",
    "epp.plugins.header_profile_handler",
    "epp.plugins.context_length_aware",
    "epp.plugins.prefix_cache_affinity_filter",
    "epp.plugins.p2p_source_producer",
    "epp.plugins.deprecated_aliases",
    "epp.plugins.conformance",
    "epp.plugins.predicted_latency",
    "epp.plugins.latency_scorer",
    "epp.plugins.slo_headroom_tier_filter",
    "epp.datalayer.metrics_source",
    "epp.datalayer.dcgm",
    "epp.datalayer.models",
    "epp.datalayer.notifications",
    "epp.datalayer.topology",
)

_registry: dict[str, type[Plugin]] = {}
_builtins_loaded = False
_entry_points_loaded = False

P = TypeVar("P", bound=type[Plugin])


class PluginRegistrationError(Exception):
    """A plugin class that does not follow the recipe."""


def register(cls: P) -> P:
    """Class decorator: add a plugin class under its ``type_name``.

    A type name registered twice is an error whichever class came first, so a
    third-party class can never silently shadow a built-in (or the reverse).
    """
    if not isinstance(cls, type) or not issubclass(cls, Plugin):
        raise PluginRegistrationError(f"{cls!r} is not a subclass of epp.plugins.base.Plugin")
    type_name = getattr(cls, "type_name", "")
    if not isinstance(type_name, str) or not type_name:
        raise PluginRegistrationError(f"plugin class {cls.__qualname__} has no type_name")
    params = getattr(cls, "Params", None)
    if not (isinstance(params, type) and issubclass(params, BaseModel)):
        raise PluginRegistrationError(
            f"plugin '{type_name}' ({cls.__qualname__}): Params must be a pydantic model"
        )
    if params.model_config.get("extra") != "forbid":
        raise PluginRegistrationError(
            f"plugin '{type_name}' ({cls.__qualname__}): Params must set extra='forbid'"
        )
    existing = _registry.get(type_name)
    if existing is not None and existing is not cls:
        raise PluginRegistrationError(
            f"plugin type '{type_name}' registered twice: {existing.__qualname__} and "
            f"{cls.__qualname__}"
        )
    _registry[type_name] = cls
    return cls


def _ensure_builtins() -> None:
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True
        for module in _BUILTIN_MODULES:
            importlib.import_module(module)


def load_entry_points(*, force: bool = False) -> list[str]:
    """Register third-party plugins from the entry point group; returns their types."""
    global _entry_points_loaded
    _ensure_builtins()
    loaded: list[str] = []
    if _entry_points_loaded and not force:
        return loaded
    _entry_points_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            obj = ep.load()
        except Exception as exc:
            raise PluginRegistrationError(
                f"entry point '{ep.name}' ({ep.value}) failed to load: {exc}"
            ) from exc
        try:
            register(obj)
        except PluginRegistrationError as exc:
            raise PluginRegistrationError(f"entry point '{ep.name}': {exc}") from None
        loaded.append(obj.type_name)
        log.info("registered plugin type %s from entry point %s", obj.type_name, ep.name)
    return loaded


def unregister(type_name: str) -> None:
    """Remove a plugin type (tests; a process normally registers once at start)."""
    _registry.pop(type_name, None)


def lookup(type_name: str) -> type[Plugin] | None:
    _ensure_builtins()
    return _registry.get(type_name)


def registered_types() -> list[str]:
    _ensure_builtins()
    return sorted(_registry)


def create_plugin(type_name: str, name: str | None, parameters: Any) -> Plugin:
    """Build one plugin; raises ``KeyError`` for an unknown type, pydantic errors for bad
    parameters."""
    cls = lookup(type_name)
    if cls is None:
        raise KeyError(type_name)
    params: PluginParams = cls.Params.model_validate(parameters or {})
    return cls(params, name=name)
