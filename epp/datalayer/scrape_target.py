"""Where and how the metrics scraper fetches each endpoint's metrics page."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass

from epp.datastore import Endpoint, format_host_port

__all__ = ["ScrapeTarget"]


@dataclass(frozen=True, slots=True)
class ScrapeTarget:
    """``<scheme>://<endpoint IP>:<port or the endpoint's port><path>``."""

    scheme: str = "http"
    path: str = "/metrics"
    port: int | None = None
    ssl: ssl.SSLContext | None = None
    # Every page scraped, for extractors beyond the built-in signals; must not raise.
    on_page: Callable[[Endpoint, str, float], None] | None = None

    def url(self, endpoint: Endpoint) -> str:
        if self.port is None:
            return f"{self.scheme}://{endpoint.key}{self.path}"
        return f"{self.scheme}://{format_host_port(endpoint.address, self.port)}{self.path}"
