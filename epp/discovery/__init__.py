"""Endpoint discovery sources: a watched file (llm-d shape) and Kubernetes."""

from __future__ import annotations

from epp.discovery.file import EndpointsFile, FileWatcher, parse_endpoints_file

__all__ = ["EndpointsFile", "FileWatcher", "parse_endpoints_file"]
