"""The local stack: simulated (or real) engines, sidecars, the EPP and Envoy on loopback."""

from __future__ import annotations

from .processes import EnvoyProcess, ManagedProcess
from .stack import LocalStack, StackOptions

__all__ = ["EnvoyProcess", "LocalStack", "ManagedProcess", "StackOptions"]
