"""One way to reach the Kubernetes API (in-cluster, a kubeconfig, or a given URL), and one
list+watch loop for every collection a component follows."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn

from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

from common.errors import ConfigError

__all__ = ["api_client", "describe", "keep_watching", "read_json"]

log = logging.getLogger(__name__)

# A list call of the generated client with its positional arguments bound
# (``functools.partial(api.list_namespaced_pod, namespace)``); called with keyword
# arguments for the listing and for each watch.
ListCall = Callable[..., Awaitable[Any]]
OnList = Callable[[list[dict[str, Any]]], None]
OnEvent = Callable[[str, Mapping[str, Any]], None]

# Server-side watch duration; a finished watch simply resumes.
WATCH_SECONDS = 60
_BACKOFF_S = 0.5


async def api_client(api_server: str | None = None, kubeconfig: str | None = None) -> Any:
    """An ``ApiClient``: ``api_server`` (tests, proxies) skips all configuration; else the
    in-cluster service account unless ``kubeconfig`` is given, then the kubeconfig."""
    cfg = k8s_client.Configuration()
    if api_server is not None:
        cfg.host = api_server
        return k8s_client.ApiClient(cfg)
    if kubeconfig is None:
        try:
            k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
            return k8s_client.ApiClient(cfg)
        except k8s_config.ConfigException:
            pass
    try:
        await k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    except Exception as exc:  # kubeconfig loading raises many kinds (YAML, IO, auth)
        where = kubeconfig or "the default kubeconfig"
        raise ConfigError(
            f"Kubernetes API: not in a cluster and {where} is unusable: {exc}"
        ) from None
    return k8s_client.ApiClient(cfg)


async def read_json(resp: Any) -> Any:
    """The JSON body of a ``_preload_content=False`` response, released after.

    Such responses are not checked by the client: a status other than 2xx raises
    ``ApiException`` here.
    """
    try:
        body = await resp.read()
        status = getattr(resp, "status", 200)
        if not 200 <= status <= 299:
            raise ApiException(status=status, reason=body.decode("utf-8", "replace")[:200])
        return json.loads(body)
    finally:
        resp.release()


async def keep_watching(
    what: str,
    list_call: ListCall,
    *,
    on_list: OnList,
    on_event: OnEvent,
    watch_timeout_s: int = WATCH_SECONDS,
    missing_backoff_s: float | None = None,
    **selectors: str,
) -> NoReturn:
    """List a collection, then watch it from the listing's resourceVersion, forever.

    ``on_list`` gets every item of each (re)listing; ``on_event`` gets each ADDED,
    MODIFIED or DELETED event (bookmarks only advance the resourceVersion). A watch that
    ends resumes where it stopped; an error (410 Gone included) relists after a short
    backoff. With ``missing_backoff_s``, a 404 (the resource is not served: a CRD not
    installed) is logged once and retried that slowly. ``selectors`` (label or field)
    go to every call. Runs until cancelled.
    """
    missing_logged = False
    while True:
        try:
            listing = await read_json(await list_call(**selectors, _preload_content=False))
            on_list(list(listing.get("items") or []))
            rv = (listing.get("metadata") or {}).get("resourceVersion")
            while True:
                resp = await list_call(
                    **selectors,
                    watch=True,
                    resource_version=rv or "",
                    timeout_seconds=watch_timeout_s,
                    allow_watch_bookmarks=True,
                    _preload_content=False,
                )
                rv = await _consume(resp, rv, on_event)
        except asyncio.CancelledError:
            raise
        except ApiException as exc:
            if exc.status == 404 and missing_backoff_s is not None:
                if not missing_logged:
                    log.info("%s: not served by the API server (CRD not installed?)", what)
                    missing_logged = True
                await asyncio.sleep(missing_backoff_s)
                continue
            log.warning("%s watch: %s; relisting", what, describe(exc))
            await asyncio.sleep(_BACKOFF_S)
        except Exception as exc:
            log.warning("%s watch: %s; relisting", what, describe(exc))
            await asyncio.sleep(_BACKOFF_S)


async def _consume(resp: Any, rv: str | None, on_event: OnEvent) -> str | None:
    """Read one watch stream to its end; returns the last resourceVersion seen."""
    try:
        while True:
            line = await resp.content.readline()
            if not line:
                return rv
            event = json.loads(line)
            kind = event.get("type")
            obj = event.get("object") or {}
            if kind == "ERROR":
                raise ApiException(status=obj.get("code"), reason=obj.get("message", "watch error"))
            new_rv = (obj.get("metadata") or {}).get("resourceVersion")
            if new_rv:
                rv = new_rv
            if kind != "BOOKMARK":
                on_event(kind, obj)
    finally:
        resp.release()


def describe(exc: BaseException) -> str:
    """A short log text for an error of the API client."""
    if isinstance(exc, ApiException):
        return f"API error {exc.status}: {exc.reason}"
    if isinstance(exc, TimeoutError):
        return "the API server did not answer in time"
    return f"{type(exc).__name__}: {exc}"
