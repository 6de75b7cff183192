"""``topology-affinity-filter`` and ``topology-affinity-scorer``: keep the second stage
of a disaggregated request close to the endpoint the first stage chose.

The disaggregating profile handler publishes its decode pick before it runs the
prefill profile; these plugins, in the prefill profile, compare each candidate's
``Topology`` (from ``topology-extractor``) with that pick's.

Filter (``minAffinity``: ``host`` (default), ``rack``, ``zone`` or ``region``): keeps
the candidates sharing at least that level with the peer. It never restricts routing
on missing knowledge: no peer, or a peer without topology, keeps every candidate; no
candidate at the level keeps every candidate. A candidate without topology is dropped
when others qualify.

Scorer: a fixed curve by the tightest shared level, shaped by KV-transfer bandwidth:
host 1.0, rack 0.2, zone 0.05, region 0.02, none 0; 0 for all without a peer topology
and for a candidate without one.

Both read the attribute of ``topologyProducerName`` (default ``topology-extractor``);
with no such extractor configured they log a warning at start and act as above.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Literal

from epp.datalayer.attributes import AttributeKey, read_attribute
from epp.datalayer.topology import Level, Topology, TopologyExtractor, compare, topology_key
from epp.datastore import Endpoint
from epp.plugins.base import Filter, Plugin, PluginParams, PluginSet, Scorer
from epp.plugins.registry import register
from epp.scheduling.cycle import PEER_ENDPOINT, CycleState

__all__ = ["TopologyAffinityFilter", "TopologyAffinityScorer"]

log = logging.getLogger(__name__)

_LEVEL_SCORES = {
    Level.HOST: 1.0,
    Level.RACK: 0.2,
    Level.ZONE: 0.05,
    Level.REGION: 0.02,
    Level.NONE: 0.0,
}


class _TopologyReader(Plugin):
    params: PluginParams

    def __init__(self, params: PluginParams | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        producer: str = getattr(self.params, "topology_producer_name", "")
        self.key: AttributeKey = topology_key(producer)

    def bind(self, plugins: PluginSet) -> None:
        producers = [p for p in plugins.of_kind(TopologyExtractor) if p.key == self.key]
        if not producers:
            log.warning(
                "%s: no topology-extractor named '%s' is configured; without topology it %s",
                self.name,
                self.key[1],
                "keeps every candidate" if isinstance(self, Filter) else "scores every candidate 0",
            )

    def topology(self, endpoint: Endpoint, now: float) -> Topology | None:
        return read_attribute(endpoint, self.key, Topology, now)

    def peer_topology(self, cycle: CycleState) -> Topology | None:
        peer = cycle.get(PEER_ENDPOINT)
        return None if peer is None else self.topology(peer, cycle.now)


@register
class TopologyAffinityFilter(_TopologyReader, Filter):
    type_name = "topology-affinity-filter"

    class Params(PluginParams):
        min_affinity: Literal["host", "rack", "zone", "region"] = "host"
        topology_producer_name: str = ""

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        self.min_level = Level[self.params.min_affinity.upper()]

    def filter(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        peer = self.peer_topology(cycle)
        if peer is None:
            return endpoints
        kept = [
            ep for ep in endpoints if compare(peer, self.topology(ep, cycle.now)) <= self.min_level
        ]
        return kept or endpoints


@register
class TopologyAffinityScorer(_TopologyReader, Scorer):
    type_name = "topology-affinity-scorer"

    class Params(PluginParams):
        topology_producer_name: str = ""

    params: Params

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        peer = self.peer_topology(cycle)
        if peer is None:
            return [0.0] * len(endpoints)
        now = cycle.now
        return [_LEVEL_SCORES[compare(peer, self.topology(ep, now))] for ep in endpoints]
