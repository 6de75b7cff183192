"""Kubernetes pods serving an InferencePool, kept current by list+watch.

Two sources, as llm-d's ``--pool-name`` and ``--endpoint-selector``:

- ``InferencePoolWatcher``: an InferencePool (``inference.networking.k8s.io/v1``, or
  the older ``inference.networking.x-k8s.io/v1alpha2``) gives the pod selector
  (``spec.selector.matchLabels``) and the engine ports (``spec.targetPorts[].number``).
  Two loops run: one list+watch on the pool (its selector or ports may change), one
  list+watch on the pods it selects (restarted when the pool changes).
- ``PodSelectorWatcher``: a fixed label selector (any Kubernetes selector syntax; the
  API server evaluates it) and fixed ports; only the pod loop runs.

Every ready pod contributes one :class:`PodPort` per target port; after every change the
watcher hands the whole list to its ``on_change`` callback (the EPP fills its datastore,
the pd-sidecar its SSRF allowlist). A watch that ends is resumed from the last
resourceVersion; a 410 Gone or any error relists after a short backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kubernetes_asyncio import client as k8s_client

from common.kube import WATCH_SECONDS, api_client, keep_watching
from common.roles import ROLE_LABEL

__all__ = [
    "POOL_GROUP",
    "ROLE_LABEL",
    "InferencePoolWatcher",
    "PodPort",
    "PodSelectorWatcher",
    "PoolSpec",
    "pod_ports",
    "pool_version",
]

log = logging.getLogger(__name__)

POOL_GROUP = "inference.networking.k8s.io"
POOL_VERSION = "v1"
POOL_PLURAL = "inferencepools"
# The API version of each InferencePool group read.
_POOL_VERSIONS = {POOL_GROUP: POOL_VERSION, "inference.networking.x-k8s.io": "v1alpha2"}


def pool_version(group: str) -> str:
    """The InferencePool API version read for ``group`` (``--pool-group``)."""
    try:
        return _POOL_VERSIONS[group]
    except KeyError:
        raise ValueError(f"unsupported InferencePool group {group!r}") from None


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """Which pods (a label selector, as the API server takes it) and which of their ports."""

    label_selector: str
    ports: tuple[int, ...]

    @classmethod
    def from_object(cls, obj: Mapping[str, Any]) -> PoolSpec:
        spec = obj.get("spec") or {}
        selector = spec.get("selector") or {}
        labels = selector.get("matchLabels") or {}
        ports = tuple(int(p["number"]) for p in spec.get("targetPorts") or [] if "number" in p)
        if not ports and spec.get("targetPortNumber"):
            # v1alpha2 pools carry a single port under this name.
            ports = (int(spec["targetPortNumber"]),)
        pairs = sorted((str(k), str(v)) for k, v in labels.items())
        selector = ",".join(f"{k}={v}" for k, v in pairs)
        return cls(selector, ports)


@dataclass(frozen=True, slots=True)
class PodPort:
    """One ready pod's target port (a pod contributes one per port of the pool)."""

    name: str
    address: str
    port: int
    namespace: str = "default"
    labels: Mapping[str, str] = field(default_factory=dict)
    # The node's IP (status.hostIP) and the pod's spec.hostname, when known.
    node_address: str = ""
    pod_hostname: str = ""

    @property
    def role(self) -> str | None:
        """The ``llm-d.ai/role`` label, or None when the pod has none."""
        return self.labels.get(ROLE_LABEL)


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    meta = pod.get("metadata") or {}
    status = pod.get("status") or {}
    if meta.get("deletionTimestamp") or not status.get("podIP"):
        return False
    if status.get("phase") not in (None, "Running"):
        return False
    return any(
        c.get("type") == "Ready" and c.get("status") == "True"
        for c in status.get("conditions") or []
    )


def pod_ports(pod: Mapping[str, Any], ports: tuple[int, ...]) -> list[PodPort]:
    """The ports of one pod: one per target port when ready, none otherwise."""
    if not _pod_ready(pod):
        return []
    meta = pod.get("metadata") or {}
    name = str(meta.get("name", ""))
    labels = {str(k): str(v) for k, v in (meta.get("labels") or {}).items()}
    ip = str(pod["status"]["podIP"])
    node_ip = str(pod["status"].get("hostIP") or "")
    hostname = str((pod.get("spec") or {}).get("hostname") or "")
    multi = len(ports) > 1
    return [
        PodPort(
            name=f"{name}-rank-{i}" if multi else name,
            namespace=str(meta.get("namespace", "default")),
            address=ip,
            port=port,
            labels=labels,
            node_address=node_ip,
            pod_hostname=hostname,
        )
        for i, port in enumerate(ports)
    ]


OnChange = Callable[[list[PodPort]], None]


class InferencePoolWatcher:
    """The ready pods of one InferencePool; ``synced`` is set after the first listing."""

    def __init__(
        self,
        *,
        pool_name: str,
        on_change: OnChange,
        namespace: str = "default",
        pool_group: str = POOL_GROUP,
        api_server: str | None = None,
        kubeconfig: str | None = None,
        watch_timeout_s: int = WATCH_SECONDS,
        sync_timeout_s: float = 5.0,
    ) -> None:
        self.name = f"inferencepool:{namespace}/{pool_name}"
        self.pool_name = pool_name
        self.namespace = namespace
        self.pool_group = pool_group
        self.pool_version = pool_version(pool_group)
        self.api_server = api_server
        self.kubeconfig = kubeconfig
        self.watch_timeout_s = watch_timeout_s
        self.sync_timeout_s = sync_timeout_s
        self._api: k8s_client.ApiClient | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._pool: PoolSpec | None = None
        self._pool_changed = asyncio.Event()
        self._pool_listed = False
        self._pods: dict[str, dict[str, Any]] = {}
        self._on_change = on_change
        self.synced = asyncio.Event()

    async def start(self) -> None:
        self._api = await api_client(self.api_server, self.kubeconfig)
        self._start_loops()
        # Wait briefly for the first full sync so start() returns with endpoints known;
        # if the API is slow the loops keep trying and readiness follows later.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.sync_timeout_s):
                await self.synced.wait()

    def _start_loops(self) -> None:
        self._tasks.append(asyncio.create_task(self._pool_loop(), name=self.name + " pool"))
        self._tasks.append(asyncio.create_task(self._pod_loop(), name=self.name + " pods"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._api is not None:
            await self._api.close()
            self._api = None

    # -- the pool -----------------------------------------------------------------

    def _set_pool(self, spec: PoolSpec | None) -> None:
        first = not self._pool_listed
        self._pool_listed = True
        if first or spec != self._pool:
            log.info("InferencePool %s/%s: %s", self.namespace, self.pool_name, spec)
            self._pool = spec
            self._pool_changed.set()

    async def _pool_loop(self) -> None:
        assert self._api is not None
        api = k8s_client.CustomObjectsApi(self._api)
        await keep_watching(
            "InferencePool",
            functools.partial(
                api.list_namespaced_custom_object,
                self.pool_group,
                self.pool_version,
                self.namespace,
                POOL_PLURAL,
            ),
            on_list=lambda items: self._set_pool(PoolSpec.from_object(items[0]) if items else None),
            on_event=self._on_pool_event,
            watch_timeout_s=self.watch_timeout_s,
            field_selector=f"metadata.name={self.pool_name}",
        )

    def _on_pool_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        if kind == "DELETED":
            self._set_pool(None)
        elif kind in ("ADDED", "MODIFIED"):
            self._set_pool(PoolSpec.from_object(obj))

    # -- the pods -------------------------------------------------------------------

    async def _pod_loop(self) -> None:
        assert self._api is not None
        core = k8s_client.CoreV1Api(self._api)
        while True:
            self._pool_changed.clear()
            pool = self._pool
            if pool is None:
                if self._pool_listed:
                    self._pods.clear()
                    self._publish()
                await self._pool_changed.wait()
                continue
            watcher = asyncio.create_task(self._watch_pods(core, pool))
            changed = asyncio.create_task(self._pool_changed.wait())
            try:
                await asyncio.wait({watcher, changed}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for t in (watcher, changed):
                    t.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await t

    async def _watch_pods(self, core: k8s_client.CoreV1Api, pool: PoolSpec) -> None:
        await keep_watching(
            "pod",
            functools.partial(core.list_namespaced_pod, self.namespace),
            on_list=self._on_pod_list,
            on_event=self._on_pod_event,
            watch_timeout_s=self.watch_timeout_s,
            label_selector=pool.label_selector,
        )

    def _on_pod_list(self, items: list[dict[str, Any]]) -> None:
        self._pods = {str(p["metadata"]["name"]): p for p in items}
        self._publish()

    def _on_pod_event(self, kind: str, obj: Mapping[str, Any]) -> None:
        name = str((obj.get("metadata") or {}).get("name", ""))
        if kind == "DELETED":
            self._pods.pop(name, None)
        elif kind in ("ADDED", "MODIFIED"):
            self._pods[name] = dict(obj)
        else:
            return
        self._publish()

    def _publish(self) -> None:
        ports = self._pool.ports if self._pool is not None else ()
        self._on_change([pp for pod in self._pods.values() for pp in pod_ports(pod, ports)])
        self.synced.set()


class PodSelectorWatcher(InferencePoolWatcher):
    """The pods a label selector picks, on fixed ports: no InferencePool
    (``--endpoint-selector`` and ``--endpoint-target-ports``)."""

    def __init__(
        self,
        *,
        selector: str,
        ports: tuple[int, ...],
        on_change: OnChange,
        namespace: str = "default",
        api_server: str | None = None,
        kubeconfig: str | None = None,
        watch_timeout_s: int = WATCH_SECONDS,
        sync_timeout_s: float = 5.0,
    ) -> None:
        super().__init__(
            pool_name=selector,
            on_change=on_change,
            namespace=namespace,
            api_server=api_server,
            kubeconfig=kubeconfig,
            watch_timeout_s=watch_timeout_s,
            sync_timeout_s=sync_timeout_s,
        )
        self.name = f"pods:{namespace}/{selector}"
        self._pool = PoolSpec(selector, ports)
        self._pool_listed = True

    def _start_loops(self) -> None:
        self._tasks.append(asyncio.create_task(self._pod_loop(), name=self.name + " pods"))
