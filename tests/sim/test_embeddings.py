"""The simulator's ``POST /v1/embeddings``: vLLM's input forms, deterministic vectors."""

from __future__ import annotations

from typing import Any

from tests.conftest import StartSim


async def _post(sim: Any, body: object) -> tuple[int, Any]:
    async with sim.session.post(f"{sim.url}/v1/embeddings", json=body) as resp:
        return resp.status, await resp.json()


async def test_embeddings_accepts_vllm_input_forms(start_sim: StartSim) -> None:
    sim = await start_sim(zero_latency=True)
    status, one = await _post(sim, {"model": sim.engine.config.served_model_name, "input": "a b"})
    assert status == 200, one
    assert one["object"] == "list" and one["usage"]["prompt_tokens"] == 2
    [item] = one["data"]
    assert item["object"] == "embedding" and len(item["embedding"]) == 8
    status, many = await _post(sim, {"input": ["a b", "c"], "encoding_format": "float"})
    assert status == 200 and [d["index"] for d in many["data"]] == [0, 1]
    assert many["data"][0]["embedding"] == item["embedding"]  # same text, same vector
    assert many["data"][1]["embedding"] != item["embedding"]
    status, ids = await _post(sim, {"input": [[1, 2, 3], [4]]})
    assert status == 200 and ids["usage"]["prompt_tokens"] == 4


async def test_embeddings_refuses_what_vllm_refuses(start_sim: StartSim) -> None:
    sim = await start_sim(zero_latency=True)
    for body in ({}, {"input": 5}, {"input": []}, {"input": [1, "a"]}):
        status, err = await _post(sim, body)
        assert status == 400, body
        assert "input" in err["error"]["message"].lower() or "Field" in err["error"]["message"]
    status, _ = await _post(sim, {"model": "other", "input": "x"})
    assert status == 404
