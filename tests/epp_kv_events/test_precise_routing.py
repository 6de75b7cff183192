"""Precise prefix routing end to end through Director.decide with simulated engines that
publish KV events: a prompt cached on decode pod B (sent there directly, not through
the EPP) routes to B decode-only although the approximate index points at A; once B
evicts it, routing follows."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from epp.config import ConfigError, load_config
from epp.director import DirectorSettings, build_director
from epp.metrics import EppMetrics
from epp.plugins.precise_prefix_producer import PrecisePrefixCacheProducer
from epp.plugins.prefix_producer import ApproxPrefixCacheProducer
from tests.conftest import RunningSim, StartSim
from tests.epp_scheduling.fixtures import pd_config, wait_until, write_endpoints

CHAT = "/v1/chat/completions"
LONG = "Summarise the following report in detail. " + "lorem ipsum dolor sit amet " * 80


def _plugins(kv_port: int, replay_port: int) -> str:
    return f"""
- type: decode-filter
- type: prefill-filter
- type: encode-filter
- type: precise-prefix-cache-producer
  parameters: {{kvEventsPort: {kv_port}, replayPort: {replay_port}, blockSize: 16}}
- type: prefix-cache-scorer
- type: queue-scorer
- type: kv-cache-utilization-scorer
- type: active-request-scorer
- type: max-score-picker
- type: prefix-based-pd-decider
  parameters: {{nonCachedTokens: 64}}
- type: disagg-profile-handler
  parameters:
    deciders: {{prefill: prefix-based-pd-decider}}
"""


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


def _chat(text: str) -> dict[str, Any]:
    return {"model": "m", "messages": [{"role": "user", "content": text}], "max_tokens": 1}


async def _send(sim: RunningSim, text: str) -> None:
    async with sim.session.post(f"{sim.url}/v1/chat/completions", json=_chat(text)) as resp:
        assert resp.status == 200, await resp.text()


async def test_precise_routing_follows_the_engines_cache(
    start_sim: StartSim, tmp_path: Path
) -> None:
    # Pods get their own loopback addresses so that, as in a cluster, every engine
    # publishes on the same KV-events port.
    hosts = {"a": "127.0.0.2", "b": "127.0.0.3", "p": "127.0.0.4"}
    kv_port, replay_port = _free_port("127.0.0.2"), _free_port("127.0.0.2")
    roles = {"a": "decode", "b": "decode", "p": "prefill"}
    sims: dict[str, RunningSim] = {}
    for name, host in hosts.items():
        sims[name] = await start_sim(
            host=host,
            role=roles[name],
            served_model_name="m",
            zero_latency=True,
            num_blocks=64,
            kv_events_port=kv_port,
            kv_events_replay_port=replay_port,
        )
    endpoints_file = tmp_path / "endpoints.yaml"
    write_endpoints(
        endpoints_file, [(n, hosts[n], sims[n].port, roles[n]) for n in ("a", "b", "p")]
    )
    metrics = EppMetrics()
    settings = DirectorSettings(
        config_text=pd_config(endpoints_file, plugins=_plugins(kv_port, replay_port)),
        refresh_metrics_interval_s=0.02,
        metrics_staleness_threshold_s=2.0,
    )
    director = await build_director(settings, metrics)
    producer = next(p for p in director.config.plugins if isinstance(p, PrecisePrefixCacheProducer))
    assert not [p for p in director.config.plugins if type(p) is ApproxPrefixCacheProducer]
    await director.start()
    try:
        key = {n: f"{hosts[n]}:{sims[n].port}" for n in hosts}
        # Every engine publishes something until its subscriber has heard from it.
        for i in range(200):
            missing = [n for n in hosts if not producer.index.knows(key[n])]
            if not missing:
                break
            for n in missing:
                await _send(sims[n], f"warm up {n} {i} " + "padding " * 20)
            try:
                await wait_until(lambda: all(producer.index.knows(key[n]) for n in hosts), 0.1)
            except AssertionError:
                continue
        assert all(producer.index.knows(key[n]) for n in hosts)

        body = json.dumps(_chat(LONG)).encode()
        first = await director.decide(CHAT, {}, body, None)
        first.on_finished()
        assert first.decision_type == "prefill-decode"
        a = next(n for n in ("a", "b") if key[n] == first.decode)
        b = "b" if a == "a" else "a"
        # The approximate index now believes ``a`` holds the prompt (recorded once the
        # decision is out); nobody really does.
        await wait_until(lambda: producer.fallback.index.size(key[a]) > 0)
        assert producer.fallback.index.size(key[b]) == 0

        await _send(sims[b], LONG)  # cached on b behind the EPP's back
        await wait_until(lambda: producer.index.engine_blocks(key[b]) >= 20)
        second = await director.decide(CHAT, {}, body, None)
        second.on_finished()
        assert second.decode == key[b]
        assert second.decision_type == "decode-only"

        # b's small cache evicts the prompt under other traffic; routing follows.
        for i in range(6):
            await _send(sims[b], f"other traffic {i} " + "filler words here " * 60)
        keys = producer_keys(producer, body)
        await wait_until(lambda: producer.index.match(keys, [key[b]], 1) == {})
        third = await director.decide(CHAT, {}, body, None)
        third.on_finished()
        assert third.decision_type == "prefill-decode"
        reg = metrics.registry
        assert (
            reg.get_sample_value(
                "disagg_epp_prefix_producer_decisions_total", {"producer": "precise"}
            )
            >= 2
        )
        assert (reg.get_sample_value("disagg_epp_kv_events_events_total") or 0) > 0
        assert (reg.get_sample_value("disagg_epp_kv_events_index_blocks") or 0) > 0
        assert (
            reg.get_sample_value("disagg_epp_kv_events_lookup_duration_seconds_count") or 0
        ) >= 2
    finally:
        await director.stop()


def producer_keys(producer: PrecisePrefixCacheProducer, body: bytes) -> list[int]:
    """The prompt's index keys, computed the way the producer does (tokens from the sim)."""
    from epp.kv_events import block_hashes, external_hash
    from vllm_sim.tokens import chat_prompt, tokenize

    tokens = tokenize(chat_prompt(json.loads(body)["messages"]))
    return [external_hash(h) for h in block_hashes(tokens, producer.params.block_size)]


def test_unknown_parameter_is_a_config_error() -> None:
    text = (
        "apiVersion: llm-d.ai/v1alpha1\nkind: EndpointPickerConfig\nplugins:\n"
        "- type: precise-prefix-cache-producer\n  parameters: {kvEventPort: 1}\n"
        "- type: decode-filter\nschedulingProfiles:\n- name: decode\n  plugins:\n"
        "  - pluginRef: decode-filter\n"
    )
    with pytest.raises(ConfigError, match="kvEventPort"):
        load_config(text, pool_configured=True)


async def test_falls_back_to_approximate_without_events_or_tokens(start_sim: StartSim) -> None:
    from epp.datastore import Endpoint
    from epp.plugins.prefix_producer import PREFIX_MATCH
    from epp.request import parse_request
    from epp.scheduling.cycle import CycleState

    producer = PrecisePrefixCacheProducer(PrecisePrefixCacheProducer.Params(kvEventsPort=1))
    closed = Endpoint("dead", "127.0.0.1", _free_port("127.0.0.1"))
    try:
        body = json.dumps(_chat(LONG)).encode()
        # No engine has published: approximate.
        cycle = CycleState(parse_request(CHAT, {}, body), 0.0, 1.0)
        await producer.prefetch(cycle, [closed])
        producer.prepare(cycle, [closed])
        match = cycle.get(PREFIX_MATCH)
        assert match is not None and match.source == "approximate"
        # The engine is live but cannot tokenize: approximate, with a log line.
        producer.index.store(closed.key, [])
        cycle = CycleState(parse_request(CHAT, {"x-request-id": "r1"}, body), 0.0, 1.0)
        await producer.prefetch(cycle, [closed])
        producer.prepare(cycle, [closed])
        match = cycle.get(PREFIX_MATCH)
        assert match is not None and match.source == "approximate"
        # Token ids in the request need no tokenizer at all.
        ids = json.dumps({"model": "m", "prompt": list(range(40))}).encode()
        cycle = CycleState(parse_request("/v1/completions", {}, ids), 0.0, 1.0)
        await producer.prefetch(cycle, [closed])
        producer.prepare(cycle, [closed])
        match = cycle.get(PREFIX_MATCH)
        assert match is not None and match.source == "precise"
        assert len(match.hashes) == 2
        assert cycle.request.token_estimate == 40
    finally:
        await producer.aclose()


async def test_a_long_prompt_tokenized_by_the_engine_is_hashed_from_its_packed_ids(
    start_sim: StartSim,
) -> None:
    from array import array

    from epp.datastore import Endpoint
    from epp.kv_events import block_hashes
    from epp.plugins.precise_prefix_producer import PRECISE_PROMPT
    from epp.request import parse_request
    from epp.scheduling.cycle import CycleState
    from vllm_sim.tokens import chat_prompt, tokenize

    sim = await start_sim(served_model_name="m", zero_latency=True, max_model_len=100_000)
    engine = Endpoint("e", "127.0.0.1", sim.port)
    text = " ".join(f"w{i % 5000}" for i in range(40_000))  # an answer of over 64 KB
    body = json.dumps(_chat(text)).encode()
    tokens = tokenize(chat_prompt(json.loads(body)["messages"]))
    assert len(json.dumps({"tokens": tokens})) > 64 * 1024
    producer = PrecisePrefixCacheProducer(
        PrecisePrefixCacheProducer.Params(kvEventsPort=1, speculativeIndexing=True)
    )
    try:
        producer.index.store(engine.key, [1])  # it has published: precise is used
        cycle = CycleState(parse_request(CHAT, {}, body), 0.0, 1.0)
        await producer.prefetch(cycle, [engine])
        prompt = cycle.get(PRECISE_PROMPT)
        assert prompt is not None and prompt.tokens == len(tokens)
        assert prompt.hashes == block_hashes(tokens, 16, max_blocks=4096)
        assert cycle.request.token_estimate == len(tokens)
        # The answer's ids were read packed, and the memo keys their 64-bit packing.
        assert any(key[3] == "q" for key in producer._hashed._runs)
        assert array("q", tokens[: 16 * 256]).tobytes() in {k[4] for k in producer._hashed._runs}
    finally:
        await producer.aclose()
