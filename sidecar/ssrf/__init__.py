"""SSRF protection: a routing target must be a member of the pool, on a target port, in a role.

The EPP writes ``x-prefiller-host-port`` and ``x-encoder-hosts-ports``; a request that
reaches the sidecar without passing the EPP (or an EPP bug) must not make the sidecar
connect wherever those headers point. With ``--enable-ssrf-protection`` every target is
checked against the pool before anything is sent:

- ``rules``           the decision, a pure function: members in, rule out
- ``pool``            members from the InferencePool and its pods (the EPP's watcher)
- ``allowlist_file``  members from a static YAML/JSON file, reloaded on change
- ``guard``           runs the rules for a request, raises, logs and counts
"""

from __future__ import annotations

from sidecar.ssrf.allowlist_file import AllowlistFile, AllowlistSource, parse_allowlist
from sidecar.ssrf.guard import MemberSource, TargetGuard
from sidecar.ssrf.pool import PoolSource
from sidecar.ssrf.rules import (
    ENCODE_ROLES,
    PREFILL_ROLES,
    ROLE_LABEL,
    Decision,
    Member,
    Members,
    Stage,
    decide,
)

__all__ = [
    "ENCODE_ROLES",
    "PREFILL_ROLES",
    "ROLE_LABEL",
    "AllowlistFile",
    "AllowlistSource",
    "Decision",
    "Member",
    "MemberSource",
    "Members",
    "PoolSource",
    "Stage",
    "TargetGuard",
    "decide",
    "parse_allowlist",
]
