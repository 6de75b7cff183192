"""ec-shared-storage: encoders write their outputs to storage the prefill engine reads
back by mm_hash; nothing about them travels in the bodies (E/P/D over simulated engines)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.settings import SettingsError, load_settings
from tests.sidecar.conftest import StartSidecar
from tests.sidecar_connectors.test_encode import (
    AUDIO_PART,
    CAT,
    DOG,
    PATH,
    chat,
    encoder_header,
    encoders,
    hashes,
    image,
)

EC = "ec-shared-storage"


def test_the_name_is_accepted() -> None:
    assert load_settings([f"--ec-connector={EC}"], env={}).ec_connector == EC
    with pytest.raises(SettingsError, match="ec-shared-storage"):
        load_settings(["--ec-connector=ec-teleport"], env={})


async def test_epd_outputs_go_through_the_storage_not_the_bodies(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    es = await encoders(start_sim, 2, EC, shared_storage_path=str(tmp_path))
    p = await start_sim(zero_latency=True, ec_connector=EC, shared_storage_path=str(tmp_path))
    d = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(model_server_port=d.port, ec_connector=EC)
    parts = (image(CAT), image(DOG), AUDIO_PART)
    headers = {
        "x-prefiller-host-port": p.host_port,
        "x-encoder-hosts-ports": encoder_header(es),
    }
    async with client.post(sidecar.url + PATH, json=chat(*parts), headers=headers) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["choices"][0]["message"]["content"]
    # One encode per distinct item, spread over both encoders, each stored by its hash.
    assert sum([(await e.stats())["encodes"] for e in es]) == 3
    assert {f.name for f in (tmp_path / "ec").iterdir()} == hashes(*parts)
    p_stats, d_stats = await p.stats(), await d.stats()
    assert (p_stats["ec_loads_ok"], p_stats["ec_loads_failed"]) == (3, 0)
    for stats in (p_stats, d_stats):
        assert all("ec_transfer_params" not in r["body"] for r in stats["recorded"])
    assert d_stats["kv_pulls_ok"] == 1


async def test_a_prefill_without_the_stored_outputs_fails(
    start_sim: Any, start_sidecar: StartSidecar, client: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """The encoders write elsewhere: the prefill engine finds nothing and the request
    fails, so the storage is what carries the outputs."""
    es = await encoders(start_sim, 1, EC, shared_storage_path=str(tmp_path / "elsewhere"))
    p = await start_sim(zero_latency=True, ec_connector=EC, shared_storage_path=str(tmp_path))
    d = await start_sim(zero_latency=True)
    sidecar = await start_sidecar(model_server_port=d.port, ec_connector=EC)
    headers = {
        "x-prefiller-host-port": p.host_port,
        "x-encoder-hosts-ports": encoder_header(es),
    }
    async with client.post(sidecar.url + PATH, json=chat(image(CAT)), headers=headers) as r:
        assert r.status >= 500
    assert (await p.stats())["ec_loads_failed"] == 1
