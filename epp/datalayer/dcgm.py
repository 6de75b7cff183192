"""GPU utilization from NVIDIA's DCGM exporter: ``dcgm-data-source`` and ``dcgm-extractor``.

``dcgm-data-source`` polls ``<scheme>://<pod IP>:<port><path>`` (the exporter as a
sidecar) or, with ``useNodeAddress``, ``<node IP>:<port>`` (the exporter as a
DaemonSet; a pod whose node address is unknown is polled on its own IP, and that is
logged once). Parameters as llm-d: ``scheme``, ``path`` (``/metrics``), ``port``
(9400), ``insecureSkipVerify`` (true), ``useNodeAddress`` (false), ``interval``.

``dcgm-extractor`` reads ``DCGM_FI_DEV_GPU_UTIL``: the samples of this pod (a sample
whose ``pod`` label names another pod is skipped; one without the label is kept), the
highest of them (the busiest GPU), divided by 100, stored as the endpoint attribute
``GPUUtilization`` of producer ``dcgm-extractor`` for ``endpoint-attribute-filter`` and
``endpoint-attribute-scorer``. A page without the series, or without a sample for the
pod, leaves the attribute to expire.
"""

from __future__ import annotations

import logging

from pydantic import Field

from epp.datalayer.attributes import AttributeKey, put_attribute
from epp.datalayer.base import PrometheusExtractor
from epp.datalayer.polling import HttpSourceParams, PollingSource
from epp.datalayer.prom_text import PrometheusPage
from epp.datastore import Endpoint
from epp.plugins.base import Plugin
from epp.plugins.registry import register

__all__ = ["GPU_UTILIZATION", "DcgmDataSource", "DcgmExtractor"]

log = logging.getLogger(__name__)

GPU_UTIL_METRIC = "DCGM_FI_DEV_GPU_UTIL"
GPU_UTILIZATION: AttributeKey = ("GPUUtilization", "dcgm-extractor")


@register
class DcgmDataSource(PollingSource):
    type_name = "dcgm-data-source"
    delivers = "the DCGM exporter's Prometheus page"
    accepts = (PrometheusExtractor,)

    class Params(HttpSourceParams):
        port: int = Field(default=9400, ge=1, le=65535)
        use_node_address: bool = False

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        self._no_node_address: set[str] = set()

    def url(self, endpoint: Endpoint) -> str:
        host = endpoint.address
        if self.params.use_node_address:
            if endpoint.node_address:
                host = endpoint.node_address
            elif endpoint.key not in self._no_node_address:
                self._no_node_address.add(endpoint.key)
                log.warning(
                    "%s: endpoint %s has no known node address; polling its pod IP",
                    self.name,
                    endpoint.key,
                )
        return self.endpoint_url(host, self.params.port)

    def deliver(self, endpoint: Endpoint, body: bytes, expires_at: float) -> None:
        page = PrometheusPage(body.decode("utf-8", errors="replace"))

        def each(extractor: Plugin) -> None:
            if isinstance(extractor, PrometheusExtractor):
                extractor.extract_page(endpoint, page, expires_at)

        self.run_extractors(endpoint, each)


@register
class DcgmExtractor(PrometheusExtractor):
    """No parameters."""

    type_name = "dcgm-extractor"

    def extract_page(self, endpoint: Endpoint, page: PrometheusPage, expires_at: float) -> None:
        samples = page.samples(GPU_UTIL_METRIC)
        if not samples:
            raise ValueError(f"metric {GPU_UTIL_METRIC} not found")
        pod = _pod_name(endpoint)
        mine = [s.value for s in samples if s.labels.get("pod", pod) == pod]
        if not mine:
            raise ValueError(f"metric {GPU_UTIL_METRIC} has no sample for pod {pod!r}")
        put_attribute(endpoint, GPU_UTILIZATION, max(mine) / 100.0, expires_at=expires_at)


def _pod_name(endpoint: Endpoint) -> str:
    """The pod behind an endpoint (one pod's data-parallel ranks are ``<pod>-rank-<i>``)."""
    name = endpoint.name
    head, sep, tail = name.rpartition("-rank-")
    return head if sep and tail.isdigit() else name
