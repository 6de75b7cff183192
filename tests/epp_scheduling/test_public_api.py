"""Every module of the scheduling half declares an ``__all__`` that resolves."""

from __future__ import annotations

import importlib

import pytest

from epp.plugins.registry import _BUILTIN_MODULES

MODULES = [
    "epp.request",
    "epp.config",
    "epp.director",
    "epp.datastore",
    "epp.scraper",
    "epp.scheduling",
    "epp.scheduling.cycle",
    "epp.scheduling.profile",
    "epp.scheduling.result",
    "epp.scheduling.scheduler",
    "epp.plugins",
    "epp.plugins.base",
    "epp.plugins.registry",
    "epp.plugins.prefix_index",
    "epp.discovery",
    "epp.discovery.file",
    "epp.discovery.kubernetes",
    *_BUILTIN_MODULES,
]


@pytest.mark.parametrize("name", MODULES)
def test_all_is_declared_and_resolves(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert isinstance(exported, list) and exported, f"{name} has no __all__"
    missing = [n for n in exported if not hasattr(module, n)]
    assert missing == []
    assert len(set(exported)) == len(exported)
