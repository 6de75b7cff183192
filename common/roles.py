"""The pod label naming a pod's role in disaggregated serving, as llm-d sets it.

The EPP's role filters read it; the pd-sidecar's SSRF allowlist admits a pool member
only for the routing header its role serves.
"""

from __future__ import annotations

__all__ = ["ROLE_LABEL"]

ROLE_LABEL = "llm-d.ai/role"
