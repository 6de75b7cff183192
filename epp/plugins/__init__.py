"""Scheduling plugins: the extension points, the registry and the built-in plugins.

Built-in plugin modules are imported by the registry on first use; third-party plugins
come in through the ``disagg.epp.plugins`` entry point group.
"""

from __future__ import annotations

from epp.plugins.base import (
    DataProducer,
    Decider,
    Discovery,
    Filter,
    Picker,
    Plugin,
    PluginParams,
    PluginSet,
    ProfileHandler,
    Release,
    RequestTracker,
    ResponseHeaderProcessor,
    ScoredEndpoint,
    Scorer,
)
from epp.plugins.registry import (
    ENTRY_POINT_GROUP,
    PluginRegistrationError,
    create_plugin,
    load_entry_points,
    lookup,
    register,
    registered_types,
    unregister,
)

__all__ = [
    "ENTRY_POINT_GROUP",
    "DataProducer",
    "Decider",
    "Discovery",
    "Filter",
    "Picker",
    "Plugin",
    "PluginParams",
    "PluginRegistrationError",
    "PluginSet",
    "ProfileHandler",
    "Release",
    "RequestTracker",
    "ResponseHeaderProcessor",
    "ScoredEndpoint",
    "Scorer",
    "create_plugin",
    "load_entry_points",
    "lookup",
    "register",
    "registered_types",
    "unregister",
]
