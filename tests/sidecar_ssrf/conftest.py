"""SSRF fixtures: the sidecar fixtures, and the EPP tests' fake Kubernetes API server."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from tests.conftest import eventually
from tests.epp_scheduling.fake_kube import FakeKube
from tests.sidecar.conftest import client, start_sidecar

__all__ = ["client", "eventually", "kube", "start_sidecar"]


@pytest.fixture
async def kube() -> AsyncIterator[FakeKube]:
    fake = await FakeKube().start()
    try:
        yield fake
    finally:
        await fake.stop()
