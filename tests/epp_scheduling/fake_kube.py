"""A small fake Kubernetes API server: list and watch for InferencePools and Pods."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from aiohttp import web

POOLS = "/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools"
PODS = "/api/v1/namespaces/{ns}/pods"

_STOP = object()


def _selected(obj: dict[str, Any], query: Any) -> bool:
    meta = obj["metadata"]
    fields = query.get("fieldSelector")
    if fields:
        for term in fields.split(","):
            key, _, value = term.partition("=")
            if key == "metadata.name" and meta["name"] != value:
                return False
    labels = query.get("labelSelector")
    if labels:
        have = meta.get("labels") or {}
        for term in labels.split(","):
            key, _, value = term.partition("=")
            if have.get(key) != value:
                return False
    return True


class FakeKube:
    def __init__(self) -> None:
        self.rv = 0
        # kind -> (namespace, name) -> object
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {"pool": {}, "pod": {}}
        self.history: list[tuple[str, int, str, dict[str, Any]]] = []
        self.watchers: list[tuple[str, str, Any, asyncio.Queue[Any]]] = []
        self.watch_requests = 0
        self.list_requests = {"pool": 0, "pod": 0}
        # When set, the next watch request is answered with 410 Gone (history compacted).
        self.gone_next_watch = False
        self.gone_sent = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    # -- state changes ------------------------------------------------------------

    def _emit(self, kind: str, event: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj = json.loads(json.dumps(obj))
        obj["metadata"]["resourceVersion"] = str(self.rv)
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        if event == "DELETED":
            self.objects[kind].pop((ns, name), None)
        else:
            self.objects[kind][(ns, name)] = obj
        self.history.append((kind, self.rv, event, obj))
        for wkind, wns, query, queue in self.watchers:
            if wkind == kind and wns == ns and _selected(obj, query):
                queue.put_nowait((event, obj))

    def set_pool(
        self, name: str, labels: dict[str, str], ports: list[int], ns: str = "default"
    ) -> None:
        event = "MODIFIED" if ("pool", (ns, name)) in self._keys() else "ADDED"
        self._emit(
            "pool",
            event,
            {
                "apiVersion": "inference.networking.k8s.io/v1",
                "kind": "InferencePool",
                "metadata": {"name": name, "namespace": ns},
                "spec": {
                    "selector": {"matchLabels": labels},
                    "targetPorts": [{"number": p} for p in ports],
                    "endpointPickerRef": {"name": "epp", "port": {"number": 9002}},
                },
            },
        )

    def set_pod(
        self, name: str, ip: str, labels: dict[str, str], *, ready: bool = True, ns: str = "default"
    ) -> None:
        event = "MODIFIED" if ("pod", (ns, name)) in self._keys() else "ADDED"
        self._emit(
            "pod",
            event,
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "status": {
                    "phase": "Running",
                    "podIP": ip,
                    "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
                },
            },
        )

    def delete_pod(self, name: str, ns: str = "default") -> None:
        obj = self.objects["pod"][(ns, name)]
        self._emit("pod", "DELETED", obj)

    def _keys(self) -> set[tuple[str, tuple[str, str]]]:
        return {(k, key) for k, objs in self.objects.items() for key in objs}

    # -- HTTP ---------------------------------------------------------------------

    async def _list_or_watch(self, kind: str, request: web.Request) -> web.StreamResponse:
        ns = request.match_info["ns"]
        query = request.query
        if query.get("watch") not in ("true", "1", "True"):
            self.list_requests[kind] += 1
            items = [
                o for (ons, _), o in self.objects[kind].items() if ons == ns and _selected(o, query)
            ]
            return web.json_response(
                {
                    "kind": "List",
                    "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self.rv)},
                    "items": items,
                }
            )
        self.watch_requests += 1
        if self.gone_next_watch and kind == "pod":
            self.gone_next_watch = False
            self.gone_sent += 1
            status = {
                "kind": "Status",
                "code": 410,
                "reason": "Expired",
                "message": "too old resource version",
            }
            return web.Response(
                text=json.dumps({"type": "ERROR", "object": status}) + "\n",
                content_type="application/json",
            )
        since = int(query.get("resourceVersion") or self.rv)
        timeout = float(query.get("timeoutSeconds") or 60)
        queue: asyncio.Queue[Any] = asyncio.Queue()
        for hkind, rv, event, obj in self.history:
            if (
                hkind == kind
                and rv > since
                and obj["metadata"]["namespace"] == ns
                and _selected(obj, query)
            ):
                queue.put_nowait((event, obj))
        entry = (kind, ns, query, queue)
        self.watchers.append(entry)
        resp = web.StreamResponse()
        resp.content_type = "application/json"
        await resp.prepare(request)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    item = await queue.get()
                    if item is _STOP:
                        break
                    event, obj = item
                    line = json.dumps({"type": event, "object": obj}) + "\n"
                    await resp.write(line.encode())
        except (TimeoutError, ConnectionResetError):
            pass
        finally:
            self.watchers.remove(entry)
        with contextlib.suppress(ConnectionResetError):
            await resp.write_eof()
        return resp

    async def pools(self, request: web.Request) -> web.StreamResponse:
        return await self._list_or_watch("pool", request)

    async def pods(self, request: web.Request) -> web.StreamResponse:
        return await self._list_or_watch("pod", request)

    async def start(self) -> FakeKube:
        app = web.Application()
        app.router.add_get(POOLS.replace("{ns}", "{ns}"), self.pools)
        app.router.add_get(PODS, self.pods)
        self.runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def break_watches(self) -> None:
        """End every open watch stream (as an API server restart would)."""
        for *_, queue in list(self.watchers):
            queue.put_nowait(_STOP)

    async def stop(self) -> None:
        for *_, queue in list(self.watchers):
            queue.put_nowait(_STOP)
        if self.runner is not None:
            await self.runner.cleanup()
