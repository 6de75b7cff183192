"""The data-layer contracts: sources poll or observe endpoints, extractors turn what a
source delivers into endpoint attributes.

- ``DataSource``: started with the datastore, keeps its data current until stopped;
  ``add_extractor`` wires one extractor (from ``dataLayer.sources``) and refuses one
  that cannot read what the source delivers.
- ``PrometheusExtractor``: reads a Prometheus text page (``metrics-data-source``,
  ``dcgm-data-source``).
- ``ModelsExtractor``: reads an OpenAI ``/v1/models`` list (``models-data-source``).
- Endpoint lifecycle events reach every plugin through ``Plugin.endpoints_changed``;
  ``endpoint-notification-source`` names that stream in a config.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, ClassVar

from pydantic import BaseModel, ConfigDict

from epp.plugins.base import Plugin, PluginParams

if TYPE_CHECKING:
    from epp.datalayer.prom_text import PrometheusPage
    from epp.datastore import Datastore, Endpoint

__all__ = [
    "DataSource",
    "ExtractorGuard",
    "ModelData",
    "ModelsExtractor",
    "PrometheusExtractor",
]

log = logging.getLogger(__name__)


class ExtractorGuard:
    """Runs a source's extractors so one cannot stop the others or the source's loop.

    An extractor that finds nothing to read raises ``ValueError``: counted, logged at
    debug level (it recurs every poll). Any other exception is a bug: counted and
    logged with its traceback, once per extractor.
    """

    def __init__(self, source: str) -> None:
        self.source = source
        self.errors = 0
        self._crashed: set[str] = set()

    def run(self, extractor: Plugin, endpoint: Endpoint, call: Callable[[], None]) -> None:
        try:
            call()
        except ValueError as exc:
            self.errors += 1
            log.debug("%s -> %s for %s: %s", self.source, extractor.name, endpoint.key, exc)
        except Exception:
            self.errors += 1
            if extractor.name not in self._crashed:
                self._crashed.add(extractor.name)
                log.exception(
                    "%s -> %s for %s: extractor failed (logged once)",
                    self.source, extractor.name, endpoint.key,
                )  # fmt: skip


class DataSource(Plugin, abc.ABC):
    """A plugin that feeds extractors; ``accepts`` names the extractor kinds it feeds."""

    accepts: ClassVar[tuple[type[Plugin], ...]] = ()
    # What the source delivers, for error messages.
    delivers: ClassVar[str] = ""

    def __init__(self, params: PluginParams | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        self.extractors: list[Plugin] = []

    def add_extractor(self, extractor: Plugin) -> None:
        """Wire ``extractor``; ``ValueError`` when it cannot read this source's data."""
        if not isinstance(extractor, self.accepts):
            raise ValueError(
                f"plugin '{extractor.name}' (type '{extractor.type_name}') cannot extract "
                f"from '{self.name}' (type '{self.type_name}'), which delivers {self.delivers}"
            )
        if any(e is extractor for e in self.extractors):
            raise ValueError(f"extractor '{extractor.name}' is listed twice under '{self.name}'")
        self.extractors.append(extractor)

    @abc.abstractmethod
    async def start(self, datastore: Datastore, base_interval_s: float) -> None:
        """Begin collecting for the datastore's endpoints (the interval is the EPP's
        ``--refresh-metrics-interval``, the tick polled intervals are rounded to)."""

    async def aclose(self) -> None:
        await self.stop()

    @abc.abstractmethod
    async def stop(self) -> None:
        """Cancel background work; safe to call more than once."""


class PrometheusExtractor(Plugin, abc.ABC):
    @abc.abstractmethod
    def extract_page(self, endpoint: Endpoint, page: PrometheusPage, expires_at: float) -> None:
        """Store attributes read from ``page`` on ``endpoint``; ``ValueError`` when the
        page lacks what this extractor needs (the source counts and logs it)."""


class ModelData(BaseModel):
    """One entry of ``/v1/models`` (unknown fields ignored, as clients do)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: str
    object: str = ""
    created: int = 0
    owned_by: str = ""
    parent: str | None = None
    root: str | None = None


class ModelsExtractor(Plugin, abc.ABC):
    @abc.abstractmethod
    def extract_models(
        self, endpoint: Endpoint, models: tuple[ModelData, ...], expires_at: float
    ) -> None:
        """Store attributes read from an endpoint's model list."""
