"""``topology-extractor``: where each endpoint runs (host, rack, zone, region).

Each field is read from a pod label, by default ``kubernetes.io/hostname``,
``topology.kubernetes.io/rack``, ``topology.kubernetes.io/zone`` and
``topology.kubernetes.io/region`` (parameters ``hostname``, ``rack``, ``zone``,
``region`` name other labels). A pod without the hostname label falls back to its
``spec.hostname`` (from Kubernetes discovery). An endpoint with no field at all has no
``Topology`` attribute. The attribute is computed from the endpoint's current labels
whenever it is read, so a relabelled pod is seen at once. It is published under the
plugin's name as producer; readers name it with ``topologyProducerName`` (default
``topology-extractor``).

``compare`` gives the tightest level two topologies share; an empty field never
matches, not even another empty one.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from epp.datalayer.attributes import AttributeKey, put_dynamic_attribute
from epp.datastore import Endpoint
from epp.plugins.base import Plugin, PluginParams
from epp.plugins.registry import register

__all__ = ["Level", "Topology", "TopologyExtractor", "compare", "topology_key"]

TOPOLOGY = "Topology"


def topology_key(producer: str) -> AttributeKey:
    return (TOPOLOGY, producer or TopologyExtractor.type_name)


@dataclass(frozen=True, slots=True)
class Topology:
    hostname: str = ""
    rack: str = ""
    zone: str = ""
    region: str = ""


class Level(enum.IntEnum):
    """Tightest first: same host implies same rack, zone and region."""

    HOST = 0
    RACK = 1
    ZONE = 2
    REGION = 3
    NONE = 4


def compare(peer: Topology | None, candidate: Topology | None) -> Level:
    if peer is None or candidate is None:
        return Level.NONE
    pairs = (
        (peer.hostname, candidate.hostname, Level.HOST),
        (peer.rack, candidate.rack, Level.RACK),
        (peer.zone, candidate.zone, Level.ZONE),
        (peer.region, candidate.region, Level.REGION),
    )
    for a, b, level in pairs:
        if a and a == b:
            return level
    return Level.NONE


@register
class TopologyExtractor(Plugin):
    type_name = "topology-extractor"

    class Params(PluginParams):
        hostname: str = "kubernetes.io/hostname"
        rack: str = "topology.kubernetes.io/rack"
        zone: str = "topology.kubernetes.io/zone"
        region: str = "topology.kubernetes.io/region"

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        p = self.params
        # An empty parameter means the default label, as in llm-d.
        defaults = self.Params()
        self._labels = (
            p.hostname or defaults.hostname,
            p.rack or defaults.rack,
            p.zone or defaults.zone,
            p.region or defaults.region,
        )
        self.key = topology_key(self.name)

    def topology_of(self, endpoint: Endpoint) -> Topology | None:
        labels = endpoint.labels
        host_label, rack_label, zone_label, region_label = self._labels
        topo = Topology(
            hostname=labels.get(host_label) or endpoint.pod_hostname,
            rack=labels.get(rack_label, ""),
            zone=labels.get(zone_label, ""),
            region=labels.get(region_label, ""),
        )
        return None if topo == Topology() else topo

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        for ep in added:
            put_dynamic_attribute(ep, self.key, self._reader(ep))

    def _reader(self, endpoint: Endpoint) -> Callable[[], object]:
        return lambda: self.topology_of(endpoint)
