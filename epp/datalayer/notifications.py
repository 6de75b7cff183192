"""``endpoint-notification-source``: endpoint lifecycle events, named as a source.

Every plugin already hears each endpoint's arrival and departure
(``Plugin.endpoints_changed``), so this source only lets a configuration say so in
llm-d's words: its extractors must be plugins that react to those events rather
than read a polled payload. No parameters.
"""

from __future__ import annotations

from epp.datalayer.base import DataSource, ModelsExtractor, PrometheusExtractor
from epp.datastore import Datastore
from epp.plugins.base import Plugin
from epp.plugins.registry import register

__all__ = ["EndpointNotificationSource"]


@register
class EndpointNotificationSource(DataSource):
    type_name = "endpoint-notification-source"
    delivers = "endpoint add and remove events"
    accepts = (Plugin,)

    def add_extractor(self, extractor: Plugin) -> None:
        if isinstance(extractor, PrometheusExtractor | ModelsExtractor | DataSource):
            raise ValueError(
                f"plugin '{extractor.name}' (type '{extractor.type_name}') reads a polled "
                f"payload, not the endpoint events '{self.name}' delivers"
            )
        super().add_extractor(extractor)

    async def start(self, datastore: Datastore, base_interval_s: float) -> None:
        return None

    async def stop(self) -> None:
        return None
