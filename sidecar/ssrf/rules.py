"""The SSRF decision: pure, no I/O. Members in, the first rule a target breaks out.

Rules, checked in this order (the name is what the 403 answer and the metric carry):

``not-in-pool``           the host is not a pod of the pool (or not in the allowlist file)
``port-not-target-port``  the host is, but the port is not one of the pool's target ports
``role-not-prefill``      a prefill target whose ``llm-d.ai/role`` cannot prefill
``role-not-encode``       an encode target whose role cannot encode

KV-source targets need only the first two: any pool member may hold cached KV.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

from common.roles import ROLE_LABEL
from sidecar.routing import HostPort

__all__ = [
    "ENCODE_ROLES",
    "PREFILL_ROLES",
    "ROLE_LABEL",
    "Decision",
    "Member",
    "Members",
    "Stage",
    "decide",
    "normalize_host",
]

# The same role sets as the EPP's prefill-filter and encode-filter: a pod without a role
# label is decode-only there, so it is no prefill or encode target here either.
PREFILL_ROLES = frozenset(
    {"prefill", "encode-prefill", "prefill-decode", "both", "encode-prefill-decode"}
)
ENCODE_ROLES = frozenset({"encode", "encode-prefill", "encode-prefill-decode"})

Stage = Literal["prefill", "encode", "kv-source", "data-parallel"]
_ROLE_RULES: Mapping[str, tuple[frozenset[str], str]] = {
    "prefill": (PREFILL_ROLES, "role-not-prefill"),
    "encode": (ENCODE_ROLES, "role-not-encode"),
}


@functools.lru_cache(maxsize=4096)  # per request on the hot path; hosts repeat
def normalize_host(host: str) -> str:
    """One spelling per address: compressed IPs, lower-case names, no brackets."""
    text = host.strip().strip("[]")
    try:
        return ipaddress.ip_address(text).compressed
    except ValueError:
        return text.lower().rstrip(".")


@dataclass(frozen=True, slots=True)
class Member:
    """One allowed host: the ports it may be reached on and the roles it holds."""

    host: str
    ports: frozenset[int]
    roles: frozenset[str]


class Members:
    """Members by normalised host; several entries for one host merge."""

    def __init__(self, members: Iterable[Member] = ()) -> None:
        by_host: dict[str, Member] = {}
        for member in members:
            key = normalize_host(member.host)
            old = by_host.get(key)
            if old is not None:
                member = Member(key, old.ports | member.ports, old.roles | member.roles)
            by_host[key] = Member(key, member.ports, member.roles)
        self._by_host = by_host

    def get(self, host: str) -> Member | None:
        return self._by_host.get(normalize_host(host))

    def __len__(self) -> int:
        return len(self._by_host)


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str  # "allowed" or the rule broken
    reason: str

    @property
    def label(self) -> str:
        return "allow" if self.allowed else "deny"


_ALLOWED = Decision(True, "allowed", "member of the pool")


def decide(members: Members, target: HostPort, stage: Stage, source: str) -> Decision:
    member = members.get(target.host)
    if member is None:
        return Decision(False, "not-in-pool", f"{target.host} is not a member of {source}")
    if target.port not in member.ports:
        ports = ",".join(str(p) for p in sorted(member.ports)) or "none"
        return Decision(
            False,
            "port-not-target-port",
            f"port {target.port} of {target.host} is not a target port of {source} ({ports})",
        )
    role_rule = _ROLE_RULES.get(stage)
    if role_rule is not None:
        allowed_roles, rule = role_rule
        if not member.roles & allowed_roles:
            roles = ",".join(sorted(member.roles)) or "no role label"
            return Decision(False, rule, f"{target} ({roles}) cannot serve as {stage} target")
    return _ALLOWED
