"""``./dev stack``: run the local stack until Ctrl-C."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from .stack import KV_CONNECTORS, LocalStack, StackOptions


def parse_options(argv: list[str] | None = None) -> StackOptions:
    p = argparse.ArgumentParser(
        prog="./dev stack",
        description="P/D on loopback: simulated vLLM engines, a pd-sidecar per decode "
        "engine, the EPP with file discovery, and Envoy in front.",
    )
    p.add_argument("--prefill", type=int, default=1, help="simulated prefill engines (1)")
    p.add_argument("--decode", type=int, default=1, help="simulated decode engines (1)")
    p.add_argument("--model", default="sim-model", help="served model name (sim-model)")
    p.add_argument(
        "--kv-connector", default="nixlv2", choices=KV_CONNECTORS,
        help="sidecar KV connector; the simulators are started to match (nixlv2)",
    )  # fmt: skip
    p.add_argument("--encode", type=int, default=0, help="simulated encode engines, E/P/D (0)")
    p.add_argument(
        "--ec-connector", default="ec-nixl", choices=("ec-nixl", "ec-example"),
        help="encoder output transfer when --encode > 0 (ec-nixl)",
    )  # fmt: skip
    p.add_argument("--gateway-port", type=int, default=8080, help="Envoy port; 0 = any (8080)")
    p.add_argument(
        "--prefill-engine", action="append", default=[], metavar="HOST:PORT",
        help="use this running engine as a prefill pod instead of simulators (repeatable)",
    )  # fmt: skip
    p.add_argument(
        "--decode-engine-port", action="append", type=int, default=[], metavar="PORT",
        help="put a sidecar in front of this local engine instead of simulators (repeatable)",
    )  # fmt: skip
    p.add_argument("--zero-latency", action="store_true", help="simulators answer at once")
    p.add_argument(
        "--non-cached-tokens", type=int, default=16,
        help="prefix-based-pd-decider threshold of the default EPP config (16)",
    )  # fmt: skip
    p.add_argument("--epp-config", type=Path, help="use this EndpointPickerConfig instead")
    p.add_argument(
        "--flow-control", action="store_true",
        help="flow control on, with example InferenceObjectives (critical, standard, batch) "
        "and a rewrite of model 'chat'",
    )  # fmt: skip
    p.add_argument("--workdir", type=Path, help="where configs and logs go (a temp dir)")
    p.add_argument(
        "--sidecar-arg", action="append", default=[], metavar="FLAG",
        help="extra pd-sidecar flag, e.g. --sidecar-arg=--prefill-fallback=local",
    )  # fmt: skip
    p.add_argument(
        "--sim-arg", action="append", default=[], metavar="FLAG",
        help="extra vllm-sim flag, e.g. --sim-arg=--itl-ms=20",
    )  # fmt: skip
    a = p.parse_args(argv)
    if a.prefill < 0 or a.decode < 0 or a.encode < 0:
        p.error("--prefill, --decode and --encode must be >= 0")
    if a.kv_connector in ("sglang", "mooncake") and max(a.prefill, len(a.prefill_engine)) > 1:
        p.error(f"--kv-connector={a.kv_connector} runs with one prefill engine here")
    if a.decode == 0 and not a.decode_engine_port:
        p.error("at least one decode engine is needed")
    return StackOptions(
        prefill=a.prefill,
        decode=a.decode,
        model=a.model,
        kv_connector=a.kv_connector,
        encode=a.encode,
        ec_connector=a.ec_connector,
        gateway_port=a.gateway_port,
        prefill_engines=a.prefill_engine,
        decode_engine_ports=a.decode_engine_port,
        zero_latency=a.zero_latency,
        non_cached_tokens=a.non_cached_tokens,
        epp_config=a.epp_config,
        flow_control=a.flow_control,
        sidecar_args=a.sidecar_arg,
        sim_args=a.sim_arg,
        workdir=a.workdir,
    )


async def run(options: StackOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stack = LocalStack(options)
    try:
        await stack.start()
        print(stack.summary(), flush=True)
        await stop.wait()
        print("stopping...", flush=True)
    finally:
        await stack.stop()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    options = parse_options(argv)
    try:
        asyncio.run(run(options))
    except (RuntimeError, TimeoutError, ValueError) as exc:
        print(f"local stack failed: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
