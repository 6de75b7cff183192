"""Build the ``RequestManager`` of a Director from its settings and configuration."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from epp.datastore import Endpoint
from epp.flowcontrol.config import FlowControlSetup
from epp.requestmgmt.file_source import ObjectsFile
from epp.requestmgmt.manager import RequestManager, Source
from epp.requestmgmt.objects import ObjectStore

if TYPE_CHECKING:
    from epp.director import DirectorSettings

__all__ = ["build_request_manager"]


def build_request_manager(
    settings: DirectorSettings,
    setup: FlowControlSetup,
    endpoints: Callable[[], Sequence[Endpoint]],
    registry: CollectorRegistry | None,
) -> RequestManager:
    """Objects come from ``--api-objects-file`` when set (all of them apply unless
    ``--pool-name`` names the pool), else from the Kubernetes API when the EPP serves an
    InferencePool (those whose poolRef names it)."""
    store = ObjectStore(pool=settings.pool_name)
    sources: list[Source] = []
    if settings.api_objects_file:
        sources.append(ObjectsFile(settings.api_objects_file, store))
    elif settings.pool_name and settings.watch_api_objects:
        from epp.requestmgmt.kube_source import ObjectsWatch

        sources.append(
            ObjectsWatch(
                store,
                namespace=settings.pool_namespace,
                api_server=settings.kube_api_server,
                kubeconfig=settings.kubeconfig,
            )
        )
    return RequestManager(
        setup, store, endpoints, registry, pool=settings.pool_label, sources=sources
    )
