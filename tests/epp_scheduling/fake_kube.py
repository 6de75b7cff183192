"""A small fake Kubernetes API server.

- list and watch for InferencePools and Pods (label selectors: ``k=v``, ``k==v``,
  ``k!=v``, ``k in (a,b)``, ``k notin (a,b)``, ``k``, ``!k``);
- Leases (``coordination.k8s.io/v1``): get, create, replace, with resourceVersion
  conflicts (409) as the API server checks them;
- TokenReviews and SubjectAccessReviews: ``tokens`` maps a bearer token to a user,
  ``allowed`` holds the (user, path, verb) triples that may be read.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

from aiohttp import web

POOLS = "/apis/inference.networking.k8s.io/v1/namespaces/{ns}/inferencepools"
PODS = "/api/v1/namespaces/{ns}/pods"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/{ns}/leases"
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
ACCESS_REVIEWS = "/apis/authorization.k8s.io/v1/subjectaccessreviews"

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
        return all(_term_holds(term.strip(), have) for term in _terms(labels))
    return True


def _terms(selector: str) -> list[str]:
    """Split on the commas outside parentheses."""
    terms, depth, current = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += ch
    return [*terms, current]


def _term_holds(term: str, have: dict[str, str]) -> bool:
    for op in (" notin ", " in "):
        if op in term:
            key, _, rest = term.partition(op)
            values = {v.strip() for v in rest.strip().strip("()").split(",")}
            inside = have.get(key.strip()) in values
            return inside if op == " in " else not inside
    if "!=" in term:
        key, _, value = term.partition("!=")
        return have.get(key.strip()) != value.strip()
    if "=" in term:
        key, _, value = term.replace("==", "=").partition("=")
        return have.get(key.strip()) == value.strip()
    if term.startswith("!"):
        return term[1:].strip() not in have
    return term in have


class FakeKube:
    def __init__(self) -> None:
        self.rv = 0
        # kind -> (namespace, name) -> object
        self.objects: dict[str, dict[tuple[str, str], dict[str, Any]]] = {
            "pool": {},
            "pod": {},
            "objective": {},
            "rewrite": {},
        }
        self.history: list[tuple[str, int, str, dict[str, Any]]] = []
        self.watchers: list[tuple[str, str, Any, asyncio.Queue[Any]]] = []
        self.watch_requests = 0
        self.list_requests = {"pool": 0, "pod": 0, "objective": 0, "rewrite": 0}
        # When set, the next watch request is answered with 410 Gone (history compacted).
        self.gone_next_watch = False
        self.gone_sent = 0
        self.runner: web.AppRunner | None = None
        self.url = ""
        # (namespace, name) -> Lease; every write bumps its resourceVersion.
        self.leases: dict[tuple[str, str], dict[str, Any]] = {}
        self.lease_writes = 0
        # When set, every Lease request fails with 503 (an API server outage).
        self.leases_unavailable = False
        self.tokens: dict[str, dict[str, Any]] = {}
        self.allowed: set[tuple[str, str, str]] = set()
        self.reviews: list[dict[str, Any]] = []

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

    def set_api_object(self, obj: dict[str, Any]) -> None:
        """Add or change an InferenceObjective or InferenceModelRewrite (llm-d.ai)."""
        kind = "objective" if obj["kind"] == "InferenceObjective" else "rewrite"
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        event = "MODIFIED" if (kind, (meta["namespace"], meta["name"])) in self._keys() else "ADDED"
        self._emit(kind, event, obj)

    def delete_api_object(self, kind: str, name: str, ns: str = "default") -> None:
        key = "objective" if kind == "InferenceObjective" else "rewrite"
        obj = self.objects[key].get((ns, name))
        if obj is not None:
            self._emit(key, "DELETED", obj)

    async def objectives(self, request: web.Request) -> web.StreamResponse:
        return await self._list_or_watch("objective", request)

    async def rewrites(self, request: web.Request) -> web.StreamResponse:
        return await self._list_or_watch("rewrite", request)

    async def pools(self, request: web.Request) -> web.StreamResponse:
        return await self._list_or_watch("pool", request)

    async def pods(self, request: web.Request) -> web.StreamResponse:
        return await self._list_or_watch("pod", request)

    # -- leases ---------------------------------------------------------------------------

    def _lease_unavailable(self) -> web.Response | None:
        if self.leases_unavailable:
            return web.json_response({"kind": "Status", "code": 503}, status=503)
        return None

    async def get_lease(self, request: web.Request) -> web.Response:
        if (down := self._lease_unavailable()) is not None:
            return down
        lease = self.leases.get((request.match_info["ns"], request.match_info["name"]))
        if lease is None:
            status = {"kind": "Status", "code": 404, "reason": "NotFound"}
            return web.json_response(status, status=404)
        return web.json_response(lease)

    async def create_lease(self, request: web.Request) -> web.Response:
        if (down := self._lease_unavailable()) is not None:
            return down
        body = await request.json()
        key = (request.match_info["ns"], body["metadata"]["name"])
        if key in self.leases:
            return web.json_response({"kind": "Status", "code": 409}, status=409)
        return web.json_response(self._store_lease(key, body), status=201)

    async def replace_lease(self, request: web.Request) -> web.Response:
        if (down := self._lease_unavailable()) is not None:
            return down
        body = await request.json()
        key = (request.match_info["ns"], request.match_info["name"])
        current = self.leases.get(key)
        if current is None:
            return web.json_response({"kind": "Status", "code": 404}, status=404)
        sent_rv = (body.get("metadata") or {}).get("resourceVersion")
        if sent_rv != current["metadata"]["resourceVersion"]:
            return web.json_response({"kind": "Status", "code": 409}, status=409)
        return web.json_response(self._store_lease(key, body))

    def _store_lease(self, key: tuple[str, str], body: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        self.lease_writes += 1
        lease = json.loads(json.dumps(body))
        meta = {"namespace": key[0], "name": key[1], "resourceVersion": str(self.rv)}
        lease["metadata"].update(meta)
        self.leases[key] = lease
        return lease

    def lease_holder(self, ns: str, name: str) -> str:
        lease = self.leases.get((ns, name))
        return str(((lease or {}).get("spec") or {}).get("holderIdentity") or "")

    # -- authentication and authorisation reviews --------------------------------------

    async def token_review(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.reviews.append(body)
        user = self.tokens.get(body["spec"]["token"])
        status: dict[str, Any] = {"authenticated": user is not None}
        if user is not None:
            status["user"] = user
        return web.json_response({**body, "status": status}, status=201)

    async def access_review(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.reviews.append(body)
        spec = body["spec"]
        attrs = spec.get("nonResourceAttributes") or {}
        allowed = (spec.get("user"), attrs.get("path"), attrs.get("verb")) in self.allowed
        return web.json_response({**body, "status": {"allowed": allowed}}, status=201)

    async def start(self) -> FakeKube:
        app = web.Application()
        app.router.add_get(POOLS.replace("{ns}", "{ns}"), self.pools)
        app.router.add_get(PODS, self.pods)
        llm_d = "/apis/llm-d.ai/v1alpha2/namespaces/{ns}/"
        app.router.add_get(llm_d + "inferenceobjectives", self.objectives)
        app.router.add_get(llm_d + "inferencemodelrewrites", self.rewrites)
        app.router.add_get(LEASES + "/{name}", self.get_lease)
        app.router.add_put(LEASES + "/{name}", self.replace_lease)
        app.router.add_post(LEASES, self.create_lease)
        app.router.add_post(TOKEN_REVIEWS, self.token_review)
        app.router.add_post(ACCESS_REVIEWS, self.access_review)
        self.runner = web.AppRunner(app, shutdown_timeout=1.0)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        assert site._server is not None
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def kubeconfig(self, path: Any) -> str:
        """Write a kubeconfig that points at this server (no credentials); its path."""
        config = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake", "user": {}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "current-context": "fake",
        }
        path.write_text(json.dumps(config))
        return str(path)

    def break_watches(self) -> None:
        """End every open watch stream (as an API server restart would)."""
        for *_, queue in list(self.watchers):
            queue.put_nowait(_STOP)

    async def stop(self) -> None:
        for *_, queue in list(self.watchers):
            queue.put_nowait(_STOP)
        if self.runner is not None:
            await self.runner.cleanup()
