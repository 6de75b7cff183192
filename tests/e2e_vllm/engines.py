"""Real vLLM CPU engines (NIXL connector unless told otherwise), as child process groups,
and their metrics."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from examples.local_stack.processes import ManagedProcess, free_port, wait_until

__all__ = [
    "KV_TRANSFER_CONFIG",
    "READY_DEADLINE_S",
    "SERVED_MODEL",
    "Metrics",
    "VllmEngine",
    "by_source",
    "client_session",
    "scrape",
]

SERVED_MODEL = "tiny"
# Two engines start in about 90 s on an idle machine; CI machines are shared and slower.
READY_DEADLINE_S = 600.0
KV_TRANSFER_CONFIG: Mapping[str, Any] = {
    "kv_connector": "NixlConnector",
    "kv_role": "kv_both",
    "kv_buffer_device": "cpu",
}
# What the sidecar sends on a prefill leg (reference section 2).
PREFILL_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}


# vLLM closes a keep-alive connection idle for 5 s (VLLM_HTTP_TIMEOUT_KEEP_ALIVE). On
# this busy machine the engines' processes can starve the tests' loop for longer than
# that between an answer's arrival and the next request, so a reused connection may be
# one the engine already closed ("Cannot write to closing transport"). The tests' client
# opens a connection per request: nothing here measures connection reuse.


def client_session() -> aiohttp.ClientSession:
    """The tests' client for the engines and the stack (60 s per request)."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=60, sock_connect=2),
        connector=aiohttp.TCPConnector(force_close=True),
    )


class VllmEngine(ManagedProcess):
    """``vllm.entrypoints.openai.api_server`` for the tiny model, NIXL-enabled unless
    ``kv_transfer_config`` names another connector.

    The API server forks an engine-core process (and a worker); they share the process
    group the child starts in, which :meth:`stop` kills last, so nothing outlives the test.
    """

    def __init__(
        self,
        name: str,
        python: str,
        model_dir: Path,
        logdir: Path,
        cpus: str = "auto",
        extra_args: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
        kv_transfer_config: Mapping[str, Any] = KV_TRANSFER_CONFIG,
    ) -> None:
        self.port = free_port()
        self.side_channel_port = free_port()
        argv = [
            python, "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir),
            "--served-model-name", SERVED_MODEL,
            "--max-model-len", "512",
            "--enforce-eager",
            # Not bfloat16: on a host with AMX, vLLM 0.32 picks its AMX attention kernel
            # for bfloat16, and there the decode worker died of SIGILL in the first step
            # after a KV pull. float32 takes the vector kernels on every host.
            "--dtype", "float32",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            "--kv-transfer-config", json.dumps(kv_transfer_config),
            # Without it usage has no prompt_tokens_details, and there is no cached-token
            # count for the sidecar to correct.
            "--enable-prompt-tokens-details",
            *extra_args,
        ]  # fmt: skip
        env = {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "VLLM_NIXL_SIDE_CHANNEL_HOST": "127.0.0.1",
            "VLLM_NIXL_SIDE_CHANNEL_PORT": str(self.side_channel_port),
            "UCX_TLS": "tcp,self,sm",
            # "auto" binds every engine to all cores but wants a spare one for the NIXL
            # threads; on a small machine two engines then starve each other's side
            # channel, whose handshake gives up after 5 s. Disjoint cores avoid that.
            "VLLM_CPU_OMP_THREADS_BIND": cpus,
            # Stable block hashes across engines and runs (prefix-hash work relies on it).
            "PYTHONHASHSEED": "0",
            **(extra_env or {}),
        }
        super().__init__(name, argv, logdir, env)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def host_port(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def wait_healthy(self, session: aiohttp.ClientSession) -> None:
        async def healthy() -> bool:
            async with session.get(f"{self.url}/health") as resp:
                return resp.status == 200

        await wait_until(healthy, self.name, READY_DEADLINE_S, self.check_alive)

    async def warm_up_nixl(self, prefill: VllmEngine, session: aiohttp.ClientSession) -> None:
        """Pull one prefill's KV from ``prefill`` directly, so the NIXL handshake is done.

        The first transfer between two engines opens the side channel; doing it here
        keeps the handshake's fixed 5 s timeout out of the measured requests. A failed
        handshake is retried a few times (the next request starts a new one).
        """
        body = {"model": SERVED_MODEL, "prompt": "warm up the side channel", "max_tokens": 2}
        errors = []
        for attempt in range(3):
            headers = {"x-request-id": f"nixl-warm-up-{attempt}"}
            leg = {**body, "max_tokens": 1, "kv_transfer_params": PREFILL_PARAMS}
            async with session.post(
                f"{prefill.url}/v1/completions", json=leg, headers=headers
            ) as resp:
                resp.raise_for_status()
                params = (await resp.json())["kv_transfer_params"]
            decode_body = {**body, "kv_transfer_params": params}
            async with session.post(
                f"{self.url}/v1/completions", json=decode_body, headers=headers
            ) as resp:
                if resp.status == 200:
                    return
                errors.append(f"{resp.status} {await resp.text()}")
        raise RuntimeError(f"no NIXL transfer between the engines: {errors}")

    async def stop(self, grace_s: float = 30.0) -> None:
        proc = self.proc
        if proc is None:
            return
        # The API server shuts its engine core down on SIGTERM; signalling the whole
        # group at once would kill the core under it mid-shutdown.
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(proc.wait(), grace_s)
        # Whatever is left of the group (the engine core, a stuck server) dies now;
        # start_new_session made the child the leader of its own group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


@dataclass(frozen=True)
class Metrics:
    """One scrape: sample name -> value summed over label sets.

    Samples with a ``source`` label (``vllm:prompt_tokens_by_source``) are also summed
    per source, under ``name{source="<value>"}`` (see :func:`by_source`).
    """

    values: Mapping[str, float]

    def get(self, name: str) -> float:
        return self.values.get(name, 0.0)

    def delta(self, before: Metrics, name: str) -> float:
        return self.get(name) - before.get(name)

    def names(self, prefix: str) -> list[str]:
        return sorted(n for n in self.values if n.startswith(prefix))


def by_source(name: str, source: str) -> str:
    """The :class:`Metrics` key of ``name``'s samples labelled ``source``."""
    return f'{name}{{source="{source}"}}'


async def scrape(session: aiohttp.ClientSession, url: str) -> Metrics:
    async with session.get(f"{url}/metrics") as resp:
        resp.raise_for_status()
        text = await resp.text()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
            source = sample.labels.get("source")
            if source is not None:
                key = by_source(sample.name, source)
                totals[key] = totals.get(key, 0.0) + sample.value
    return Metrics(totals)
