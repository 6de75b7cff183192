"""One way to reach the Kubernetes API: in-cluster, a kubeconfig, or a given URL."""

from __future__ import annotations

import json
from typing import Any

from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.client.exceptions import ApiException

from common.errors import ConfigError

__all__ = ["api_client", "read_json"]


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
