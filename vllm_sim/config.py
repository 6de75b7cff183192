"""Settings of one simulated engine: every knob is a CLI flag of the same name."""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["SimConfig"]


class SimConfig(BaseModel):
    """One simulated vLLM engine. Field ``foo_bar`` is the flag ``--foo-bar``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    served_model_name: str = "sim-model"
    role: str = Field(
        default="both",
        description="Role label; 'encode' makes the engine an encoder of multimodal items.",
    )
    engine_id: str = Field(default_factory=lambda: str(uuid.uuid4()))
    advertise_host: str | None = Field(
        default=None, description="Host put in kv_transfer_params.remote_host (default: host)."
    )

    # Prefix cache geometry.
    block_size: int = Field(default=16, ge=1)
    num_blocks: int = Field(default=4096, ge=1)
    max_model_len: int = Field(default=8192, ge=2)

    # Latency model.
    max_num_seqs: int = Field(default=256, ge=1)
    ttft_base_ms: float = Field(default=5.0, ge=0)
    prefill_ms_per_token: float = Field(default=0.05, ge=0)
    itl_ms: float = Field(default=5.0, ge=0)
    itl_ms_per_running: float = Field(
        default=0.0,
        ge=0,
        description="Inter-token latency added per request in the running batch (a decode "
        "step costs more as the batch grows).",
    )
    max_num_batched_tokens: int = Field(
        default=0,
        ge=0,
        description="Tokens one engine step computes (vLLM's chunked prefill budget): a "
        "decode step taken while a prompt is computed also computes up to this many tokens "
        "of it, less one per running request, and takes prefill-ms-per-token longer for "
        "each. 0: decode steps are not slowed by prompts.",
    )
    serial_prefill: bool = Field(
        default=False,
        description="Prompts are computed one at a time (the engine's compute is shared): a "
        "prefill waits for the ones admitted before it.",
    )
    time_scale: float = Field(
        default=1.0,
        gt=0,
        description="Run the latency model this many times faster (2: every delay halved).",
    )
    stream_interval_tokens: int = Field(
        default=1,
        ge=1,
        description="Wake up once per this many output tokens (the sleep covers them all): "
        "the same timing at a fraction of the CPU.",
    )
    zero_latency: bool = False

    # Output length when neither max_tokens nor a stop string ends generation first.
    natural_output_tokens: int = Field(default=128, ge=1)

    # Usage, as vLLM's --enable-prompt-tokens-details (off by default there too): without
    # it usage has no prompt_tokens_details (and messages no cache fields) at all.
    enable_prompt_tokens_details: bool = False
    omit_zero_cached_tokens: bool = Field(
        default=False,
        description="Report prompt_tokens_details only for a non-zero cached count, as some "
        "vLLM versions do (0.32 reports 0).",
    )

    # Data parallelism (Mooncake): this engine answers for N ranks, each with its own
    # engine id, pinned per request by X-data-parallel-rank (else a rank at random).
    data_parallel_size: int = Field(default=1, ge=1, le=64)

    # NIXL stand-in.
    nixl_side_channel_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="KV side channel (VLLM_NIXL_SIDE_CHANNEL_PORT): where decode engines "
        "pull from, advertised as remote_port; never the HTTP port (0: any free port).",
    )
    kv_params_on_stop: bool = Field(
        default=True,
        description="A prefill whose generation stopped (EOS, stop token or string) still "
        "hands its KV over, as vLLM 0.32 does; false: only one stopped at the length cap.",
    )
    kv_lease_seconds: float = Field(default=30.0, gt=0)
    moriio_mode: Literal["", "read", "write"] = Field(
        default="",
        description="Run vLLM's MoRIIOConnector in this mode (read: the decode engine pulls; "
        "write: the prefill engine writes into the decode engine). Its handshake and notify "
        "ports are both the side channel port.",
    )
    kv_load_failure_policy: Literal["fail", "recompute"] = "fail"
    kv_pull_timeout_seconds: float = Field(default=10.0, gt=0)

    # SGLang-style disaggregation: requests carrying bootstrap_room rendezvous through the
    # prefill engine's bootstrap server (also Mooncake's /query endpoint).
    disaggregation_mode: Literal["null", "prefill", "decode"] = "null"
    bootstrap_port: int | None = Field(
        default=None, ge=0, le=65535, description="Serve the bootstrap server here (0: any port)."
    )
    bootstrap_timeout_seconds: float = Field(default=30.0, gt=0)
    # Which engine's /metrics names the simulator exports: SGLang's own (sglang:*) or
    # vLLM's. "auto": SGLang's when in SGLang disaggregation mode, else vLLM's.
    engine_type: Literal["auto", "vllm", "sglang"] = "auto"

    # Shared storage (LMCache-style KV, ec-example encoder outputs), shared by engines.
    shared_storage_path: str | None = None

    # Encoder outputs: role "encode" produces them, other roles consume them.
    # ec-shared-storage: as ec-example (outputs in the shared storage, keyed by mm_hash).
    ec_connector: Literal["", "ec-example", "ec-nixl", "ec-shared-storage"] = ""

    # KV events (vLLM's --kv-events-config with the zmq publisher); off unless a port is set.
    kv_events_port: int | None = Field(
        default=None, ge=0, le=65535, description="Publish KV events (ZMQ PUB) here (0: any)."
    )
    kv_events_replay_port: int | None = Field(
        default=None, ge=0, le=65535, description="Serve KV-event replay (ZMQ ROUTER) here."
    )
    kv_events_topic: str | None = Field(
        default=None, description="Topic of KV events (default kv@<engine-id>@<model>)."
    )
    kv_events_encoding: Literal["map", "array"] = "map"
    kv_events_int_hashes: bool = Field(
        default=True,
        description="Publish block hashes as 64-bit ints, as vLLM 0.32 does by default "
        "(VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES); false publishes the 32-byte digests.",
    )
    # What vLLM takes from PYTHONHASHSEED for its first block's parent hash.
    hash_seed: str | None = Field(
        default=None, description="Block-hash seed (vLLM's PYTHONHASHSEED; default its own)."
    )

    # Faults armed at start, in the control endpoint's JSON form (see faults.py).
    faults: tuple[str, ...] = ()

    @property
    def metrics_engine(self) -> Literal["vllm", "sglang"]:
        if self.engine_type != "auto":
            return self.engine_type
        return "vllm" if self.disaggregation_mode == "null" else "sglang"

    @property
    def remote_host(self) -> str:
        return self.advertise_host or self.host

    def rank_engine_id(self, rank: int) -> str:
        """Engine id of data-parallel rank ``rank`` (rank 0's is ``engine_id``)."""
        return self.engine_id if rank == 0 else f"{self.engine_id}-dp{rank}"

    def delay_s(self, ms: float) -> float:
        return 0.0 if self.zero_latency else ms / 1000.0 / self.time_scale
