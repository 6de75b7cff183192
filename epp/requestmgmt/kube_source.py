"""InferenceObjective and InferenceModelRewrite objects from the Kubernetes API
(``llm-d.ai/v1alpha2``): one list+watch loop per kind in the pool's namespace. A cluster
without the CRDs (404) is retried slowly and logged once."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Mapping
from typing import Any

from kubernetes_asyncio import client as k8s_client

from common.kube import WATCH_SECONDS, api_client, keep_watching
from epp.requestmgmt.objects import ObjectiveSpec, ObjectStore, RewriteSpec, parse_object

__all__ = ["ObjectsWatch"]

log = logging.getLogger(__name__)

GROUP, VERSION = "llm-d.ai", "v1alpha2"
PLURALS = {
    "InferenceObjective": "inferenceobjectives",
    "InferenceModelRewrite": "inferencemodelrewrites",
}
_MISSING_BACKOFF_S = 30.0


class ObjectsWatch:
    SOURCE = "kubernetes"

    def __init__(
        self,
        store: ObjectStore,
        *,
        namespace: str,
        api_server: str | None = None,
        kubeconfig: str | None = None,
        watch_timeout_s: int = WATCH_SECONDS,
    ) -> None:
        self.store = store
        self.namespace = namespace
        self.api_server = api_server
        self.kubeconfig = kubeconfig
        self.watch_timeout_s = watch_timeout_s
        self._api: Any = None
        self._tasks: list[asyncio.Task[None]] = []
        self._objects: dict[str, dict[str, ObjectiveSpec | RewriteSpec]] = {k: {} for k in PLURALS}
        self.synced = {k: asyncio.Event() for k in PLURALS}

    async def start(self) -> None:
        self._api = await api_client(self.api_server, self.kubeconfig)
        for kind in PLURALS:
            self._tasks.append(asyncio.create_task(self._loop(kind), name=f"{kind} watch"))

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        if self._api is not None:
            await self._api.close()
            self._api = None

    def _publish(self) -> None:
        objects = [o for table in self._objects.values() for o in table.values()]
        self.store.replace(self.SOURCE, objects)

    def _parse(self, obj: Mapping[str, Any]) -> ObjectiveSpec | RewriteSpec | None:
        try:
            return parse_object(obj)
        except ValueError as exc:
            log.warning("ignoring %s", exc)
            return None

    async def _loop(self, kind: str) -> None:
        api = k8s_client.CustomObjectsApi(self._api)
        await keep_watching(
            kind,
            functools.partial(
                api.list_namespaced_custom_object, GROUP, VERSION, self.namespace, PLURALS[kind]
            ),
            on_list=functools.partial(self._on_list, kind),
            on_event=functools.partial(self._on_event, kind),
            watch_timeout_s=self.watch_timeout_s,
            missing_backoff_s=_MISSING_BACKOFF_S,
        )

    def _on_list(self, kind: str, items: list[dict[str, Any]]) -> None:
        table: dict[str, ObjectiveSpec | RewriteSpec] = {}
        for item in items:
            item.setdefault("kind", kind)
            parsed = self._parse(item)
            if parsed is not None:
                table[parsed.name] = parsed
        self._objects[kind] = table
        self._publish()
        self.synced[kind].set()

    def _on_event(self, kind: str, etype: str, obj: Mapping[str, Any]) -> None:
        name = (obj.get("metadata") or {}).get("name", "")
        if etype == "DELETED":
            self._objects[kind].pop(name, None)
        elif etype in ("ADDED", "MODIFIED"):
            parsed = self._parse({"kind": kind, **obj})
            if parsed is None:
                return
            self._objects[kind][name] = parsed
        else:
            return
        self._publish()
