"""The models each endpoint serves: ``models-data-source`` and ``models-data-extractor``.

``models-data-source`` polls ``<scheme>://<endpoint>/v1/models`` (parameters as llm-d:
``scheme``, ``path`` (``/v1/models``), ``insecureSkipVerify`` (true), ``caCertPath``,
``clientCertPath``/``clientKeyPath``, ``interval``) and hands the OpenAI-format list
to its extractors; a body that is not such a list is a failed poll.

``models-data-extractor`` stores the list (``id``, ``object``, ``created``,
``owned_by``, ``parent``) as the endpoint attribute ``/v1/models`` of producer
``models-data-extractor``; ``served_models`` reads it.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, ValidationError

from epp.datalayer.attributes import AttributeKey, put_attribute, read_attribute
from epp.datalayer.base import ModelData, ModelsExtractor
from epp.datalayer.polling import HttpSourceParams, PollingSource
from epp.datastore import Endpoint
from epp.plugins.base import Plugin
from epp.plugins.registry import register

__all__ = ["MODELS", "ModelsDataSource", "ModelsExtractorPlugin", "served_models"]

MODELS: AttributeKey = ("/v1/models", "models-data-extractor")


class _ModelList(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    object: str = "list"
    data: tuple[ModelData, ...]


@register
class ModelsDataSource(PollingSource):
    type_name = "models-data-source"
    delivers = "the endpoint's /v1/models list"
    accepts = (ModelsExtractor,)

    class Params(HttpSourceParams):
        path: str = "/v1/models"

    params: Params

    def url(self, endpoint: Endpoint) -> str:
        return self.endpoint_url(endpoint.address, endpoint.port)

    def deliver(self, endpoint: Endpoint, body: bytes, expires_at: float) -> None:
        try:
            models = _ModelList.model_validate(json.loads(body)).data
        except (ValueError, ValidationError) as exc:
            raise ValueError(f"not an OpenAI model list: {exc}") from None

        def each(extractor: Plugin) -> None:
            if isinstance(extractor, ModelsExtractor):
                extractor.extract_models(endpoint, models, expires_at)

        self.run_extractors(endpoint, each)


@register
class ModelsExtractorPlugin(ModelsExtractor):
    """No parameters."""

    type_name = "models-data-extractor"

    def extract_models(
        self, endpoint: Endpoint, models: tuple[ModelData, ...], expires_at: float
    ) -> None:
        put_attribute(endpoint, MODELS, models, expires_at=expires_at)


def served_models(endpoint: Endpoint, now: float) -> tuple[ModelData, ...] | None:
    """The endpoint's last model list (None when never read or expired)."""
    return read_attribute(endpoint, MODELS, tuple, now)
