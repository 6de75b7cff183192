"""InferenceObjective and InferenceModelRewrite objects from the Kubernetes API
(``llm-d.ai/v1alpha2``): one list+watch loop per kind in the pool's namespace. A cluster
without the CRDs (404) is retried slowly and logged once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio.client.exceptions import ApiException

from common.kube import api_client, read_json
from epp.requestmgmt.objects import ObjectiveSpec, ObjectStore, RewriteSpec, parse_object

__all__ = ["ObjectsWatch"]

log = logging.getLogger(__name__)

GROUP, VERSION = "llm-d.ai", "v1alpha2"
PLURALS = {
    "InferenceObjective": "inferenceobjectives",
    "InferenceModelRewrite": "inferencemodelrewrites",
}
_WATCH_SECONDS = 60
_BACKOFF_S = 0.5
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
        watch_timeout_s: int = _WATCH_SECONDS,
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

    def _parse(self, obj: dict[str, Any]) -> ObjectiveSpec | RewriteSpec | None:
        try:
            return parse_object(obj)
        except ValueError as exc:
            log.warning("ignoring %s", exc)
            return None

    async def _loop(self, kind: str) -> None:
        api = k8s_client.CustomObjectsApi(self._api)
        plural = PLURALS[kind]
        missing_logged = False
        while True:
            try:
                listing = await read_json(
                    await api.list_namespaced_custom_object(
                        GROUP, VERSION, self.namespace, plural, _preload_content=False
                    )
                )
                table: dict[str, ObjectiveSpec | RewriteSpec] = {}
                for item in listing.get("items") or []:
                    item.setdefault("kind", kind)
                    parsed = self._parse(item)
                    if parsed is not None:
                        table[parsed.name] = parsed
                self._objects[kind] = table
                self._publish()
                self.synced[kind].set()
                rv = (listing.get("metadata") or {}).get("resourceVersion")
                while True:
                    resp = await api.list_namespaced_custom_object(
                        GROUP,
                        VERSION,
                        self.namespace,
                        plural,
                        watch=True,
                        resource_version=rv or "",
                        timeout_seconds=self.watch_timeout_s,
                        allow_watch_bookmarks=True,
                        _preload_content=False,
                    )
                    rv = await self._consume(kind, resp, rv)
            except asyncio.CancelledError:
                raise
            except ApiException as exc:
                if exc.status == 404:
                    if not missing_logged:
                        log.info("%s: not served by the API server (CRD not installed?)", kind)
                        missing_logged = True
                    await asyncio.sleep(_MISSING_BACKOFF_S)
                    continue
                log.warning("%s watch: %s; relisting", kind, exc.status)
                await asyncio.sleep(_BACKOFF_S)
            except Exception as exc:
                log.warning("%s watch: %s; relisting", kind, type(exc).__name__)
                await asyncio.sleep(_BACKOFF_S)

    async def _consume(self, kind: str, resp: Any, rv: str | None) -> str | None:
        try:
            while True:
                line = await resp.content.readline()
                if not line:
                    return rv
                event = json.loads(line)
                etype = event.get("type")
                obj = event.get("object") or {}
                if etype == "ERROR":
                    raise ApiException(status=obj.get("code"), reason=obj.get("message"))
                new_rv = (obj.get("metadata") or {}).get("resourceVersion")
                if new_rv:
                    rv = new_rv
                if etype == "BOOKMARK":
                    continue
                name = (obj.get("metadata") or {}).get("name", "")
                if etype == "DELETED":
                    self._objects[kind].pop(name, None)
                else:
                    obj.setdefault("kind", kind)
                    parsed = self._parse(obj)
                    if parsed is None:
                        continue
                    self._objects[kind][name] = parsed
                self._publish()
        finally:
            resp.release()
