"""``GET /dcgm/metrics``: what NVIDIA's DCGM exporter would report for the simulated GPU.

One GPU per engine, in the exporter's Prometheus format and labels (``gpu``, ``UUID``,
``device``, ``modelName``, ``Hostname``; no ``pod`` label, as a sidecar exporter
without Kubernetes mode writes it):

- ``DCGM_FI_DEV_GPU_UTIL``: percent busy, the share of the batch slots in use
  (running requests over ``max_num_seqs``);
- ``DCGM_FI_DEV_FB_USED`` / ``DCGM_FI_DEV_FB_FREE``: framebuffer MiB, the KV cache's
  share of an 80 GiB card.

The EPP's ``dcgm-data-source`` reads it with ``port`` set to the engine's port and
``path: /dcgm/metrics``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from .engine import SimEngine

__all__ = ["DCGM_PATH", "dcgm_handler", "dcgm_page"]

DCGM_PATH = "/dcgm/metrics"
_FB_TOTAL_MIB = 80 * 1024


def dcgm_page(engine: SimEngine) -> str:
    cfg = engine.config
    util = round(100.0 * min(1.0, engine.running / cfg.max_num_seqs))
    used = round(_FB_TOTAL_MIB * engine.cache.usage)
    labels = (
        f'gpu="0",UUID="GPU-{cfg.engine_id}",device="nvidia0",'
        f'modelName="Simulated GPU",Hostname="{cfg.host}"'
    )
    series = (
        ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", util),
        ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", used),
        ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", _FB_TOTAL_MIB - used),
    )
    return "".join(
        f"# HELP {name} {doc}\n# TYPE {name} gauge\n{name}{{{labels}}} {value}\n"
        for name, doc, value in series
    )


def dcgm_handler(engine: SimEngine) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        return web.Response(text=dcgm_page(engine), content_type="text/plain")

    return handle
