"""Endpoints from Kubernetes pods: the :mod:`common.inference_pool` watchers, feeding the
EPP's datastore.

``InferencePoolDiscovery`` follows an InferencePool (``--pool-name``);
``PodSelectorDiscovery`` a label selector on fixed ports (``--endpoint-selector``). Each
ready pod's target port becomes one :class:`~epp.datastore.Endpoint`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

from common.inference_pool import (
    POOL_GROUP,
    InferencePoolWatcher,
    PodPort,
    PodSelectorWatcher,
    PoolSpec,
    pod_ports,
    pool_version,
)
from common.kube import WATCH_SECONDS
from epp.datastore import Datastore, Endpoint
from epp.plugins.base import Discovery

__all__ = [
    "InferencePoolDiscovery",
    "PodSelectorDiscovery",
    "PoolSpec",
    "pod_endpoints",
    "pool_version",
]


def _endpoint(pp: PodPort) -> Endpoint:
    return Endpoint(
        name=pp.name,
        namespace=pp.namespace,
        address=pp.address,
        port=pp.port,
        labels=pp.labels,
        node_address=pp.node_address,
        pod_hostname=pp.pod_hostname,
    )


def pod_endpoints(pod: Mapping[str, Any], ports: tuple[int, ...]) -> list[Endpoint]:
    """The endpoints of one pod: one per target port when ready, none otherwise."""
    return [_endpoint(pp) for pp in pod_ports(pod, ports)]


class _WatcherDiscovery(Discovery):
    """A watcher whose every listing replaces this source's endpoints in the datastore."""

    def __init__(self, watcher: InferencePoolWatcher) -> None:
        super().__init__(name=watcher.name)
        self._watcher = watcher
        self._datastore: Datastore | None = None

    @property
    def synced(self) -> asyncio.Event:
        return self._watcher.synced

    def _publish(self, pods: list[PodPort]) -> None:
        if self._datastore is not None:
            self._datastore.replace_source(self.name, [_endpoint(pp) for pp in pods])

    async def start(self, datastore: Datastore) -> None:
        self._datastore = datastore
        await self._watcher.start()

    async def stop(self) -> None:
        await self._watcher.stop()


class InferencePoolDiscovery(_WatcherDiscovery):
    """Not a configurable plugin: the Director creates it from --pool-name/namespace."""

    type_name = "kubernetes-inferencepool-discovery"

    def __init__(
        self,
        *,
        pool_name: str,
        namespace: str = "default",
        pool_group: str = POOL_GROUP,
        api_server: str | None = None,
        kubeconfig: str | None = None,
        watch_timeout_s: int = WATCH_SECONDS,
        sync_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(
            InferencePoolWatcher(
                pool_name=pool_name,
                on_change=lambda pods: self._publish(pods),
                namespace=namespace,
                pool_group=pool_group,
                api_server=api_server,
                kubeconfig=kubeconfig,
                watch_timeout_s=watch_timeout_s,
                sync_timeout_s=sync_timeout_s,
            )
        )


class PodSelectorDiscovery(_WatcherDiscovery):
    """The pods a label selector picks, on fixed ports: discovery without an InferencePool
    (``--endpoint-selector`` and ``--endpoint-target-ports``)."""

    type_name = "kubernetes-pod-selector-discovery"

    def __init__(
        self,
        *,
        selector: str,
        ports: tuple[int, ...],
        namespace: str = "default",
        api_server: str | None = None,
        kubeconfig: str | None = None,
        watch_timeout_s: int = WATCH_SECONDS,
        sync_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(
            PodSelectorWatcher(
                selector=selector,
                ports=ports,
                on_change=lambda pods: self._publish(pods),
                namespace=namespace,
                api_server=api_server,
                kubeconfig=kubeconfig,
                watch_timeout_s=watch_timeout_s,
                sync_timeout_s=sync_timeout_s,
            )
        )
