"""``--metrics-endpoint-auth``: who may read ``/metrics``, decided by the API server.

As controller-runtime's ``WithAuthenticationAndAuthorization`` filter: the caller's
bearer token goes to a TokenReview (``authentication.k8s.io/v1``); the user it names
goes to a SubjectAccessReview (``authorization.k8s.io/v1``) for the non-resource URL
of the request with the verb of its method (``GET /metrics`` -> ``get``). No token or
a token the API server does not accept: 401. A user without the permission: 403. The
API server unreachable for the review: 401 when authenticating, 500 when authorising.

Answers are cached (bounded, keyed by a hash of the token; tokens are never logged):
an authenticated token for 1 minute, an allowed request for 5 minutes, a denied one for
30 seconds, as controller-runtime's delegating authenticator and authoriser do.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from kubernetes_asyncio import client as k8s_client

from common.kube import describe, read_json

__all__ = ["MetricsAuthorizer", "User"]

log = logging.getLogger("epp.metrics_auth")

_AUTHN_TTL_S = 60.0
_ALLOWED_TTL_S = 300.0
_DENIED_TTL_S = 30.0
_CACHE_SIZE = 1024
_REVIEW_TIMEOUT_S = 10.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class User:
    name: str
    uid: str = ""
    groups: tuple[str, ...] = ()
    extra: dict[str, list[str]] = field(default_factory=dict)


class _TtlCache:
    """A small LRU whose entries expire."""

    def __init__(self, size: int, clock: Callable[[], float]) -> None:
        self._size = size
        self._clock = clock
        self._items: OrderedDict[str, tuple[float, Any]] = OrderedDict()

    def get(self, key: str) -> Any:
        item = self._items.get(key)
        if item is None:
            return None
        expires, value = item
        if expires < self._clock():
            del self._items[key]
            return None
        self._items.move_to_end(key)
        return value

    def put(self, key: str, value: Any, ttl: float) -> None:
        self._items[key] = (self._clock() + ttl, value)
        self._items.move_to_end(key)
        while len(self._items) > self._size:
            self._items.popitem(last=False)


def _token_key(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class MetricsAuthorizer:
    """aiohttp middleware deciding each request by TokenReview + SubjectAccessReview."""

    def __init__(self, api: Any, clock: Callable[[], float] = time.monotonic) -> None:
        self._api = k8s_client.CustomObjectsApi(api)
        self._users = _TtlCache(_CACHE_SIZE, clock)
        self._decisions = _TtlCache(_CACHE_SIZE, clock)
        self.reviews = 0  # TokenReviews + SubjectAccessReviews sent (not cached)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return web.Response(status=401, text="Unauthorized\n")
        try:
            user = await self._authenticate(token)
        except Exception as exc:
            log.error("metrics: authentication failed: %s", describe(exc))
            return web.Response(status=401, text="Authentication failed\n")
        if user is None:
            return web.Response(status=401, text="Unauthorized\n")
        verb = request.method.lower()
        try:
            allowed = await self._authorize(token, user, request.path, verb)
        except Exception as exc:
            message = f"Authorization for user {user.name} failed"
            log.error("metrics: %s: %s", message, describe(exc))
            return web.Response(status=500, text=message + "\n")
        if not allowed:
            log.debug("metrics: %s %s denied for user %s", verb, request.path, user.name)
            return web.Response(status=403, text=f"Authorization denied for user {user.name}\n")
        return await handler(request)

    async def _authenticate(self, token: str) -> User | None:
        key = _token_key(token)
        cached = self._users.get(key)
        if cached is not None:
            return cached if isinstance(cached, User) else None
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "spec": {"token": token},
        }
        review = await self._create("authentication.k8s.io", "tokenreviews", body)
        status = review.get("status") or {}
        if not status.get("authenticated"):
            self._users.put(key, False, _AUTHN_TTL_S)
            return None
        info = status.get("user") or {}
        user = User(
            name=str(info.get("username", "")),
            uid=str(info.get("uid", "")),
            groups=tuple(str(g) for g in info.get("groups") or ()),
            extra={str(k): [str(v) for v in vs] for k, vs in (info.get("extra") or {}).items()},
        )
        self._users.put(key, user, _AUTHN_TTL_S)
        return user

    async def _authorize(self, token: str, user: User, path: str, verb: str) -> bool:
        key = f"{_token_key(token)} {verb} {path}"
        cached = self._decisions.get(key)
        if cached is not None:
            return bool(cached)
        spec: dict[str, Any] = {
            "user": user.name,
            "groups": list(user.groups),
            "nonResourceAttributes": {"path": path, "verb": verb},
        }
        if user.uid:
            spec["uid"] = user.uid
        if user.extra:
            spec["extra"] = user.extra
        body = {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SubjectAccessReview",
            "spec": spec,
        }
        review = await self._create("authorization.k8s.io", "subjectaccessreviews", body)
        allowed = bool((review.get("status") or {}).get("allowed"))
        self._decisions.put(key, allowed, _ALLOWED_TTL_S if allowed else _DENIED_TTL_S)
        return allowed

    async def _create(self, group: str, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        self.reviews += 1
        resp = await self._api.create_cluster_custom_object(
            group, "v1", plural, body, _preload_content=False, _request_timeout=_REVIEW_TIMEOUT_S
        )
        review: dict[str, Any] = await read_json(resp)
        return review
