"""``vllm-sim``: run one simulated engine until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any, Literal, get_args, get_origin

from pydantic import ValidationError

from common import event_loop, heap

from .config import SimConfig
from .fleet import Fleet, FleetOptions
from .server import SimServer

__all__ = ["main", "parse_args", "parse_command"]

_ALIASES = {"served_model_name": ["--model"]}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "t", "true", "yes"):
        return True
    if lowered in ("0", "f", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"not a boolean: {text!r}")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vllm-sim", description="A simulated vLLM engine for tests, benchmarks and demos."
    )
    for name, field in SimConfig.model_fields.items():
        flags = [_flag(name), *_ALIASES.get(name, [])]
        help_text = (
            field.description or f"(default: {field.get_default(call_default_factory=False)})"
        )
        if field.annotation is bool:
            parser.add_argument(
                *flags, dest=name, nargs="?", const=True, type=_parse_bool, help=help_text
            )
        elif name == "faults":
            parser.add_argument(
                "--fault",
                dest="faults",
                action="append",
                metavar="JSON",
                help='arm a fault at start, e.g. \'{"kind": "status", "status": 503, "count": 2}\'',
            )
        else:
            literal = get_origin(field.annotation) is Literal
            choices = get_args(field.annotation) if literal else None
            parser.add_argument(*flags, dest=name, choices=choices, help=help_text)
    fleet = parser.add_argument_group("fleet (many engines in one process)")
    fleet.add_argument(
        "--fleet", type=int, default=None, metavar="N",
        help="run N engines: on consecutive ports from --port (0: any free ports), or on "
        "consecutive loopback addresses with --fleet-distinct-hosts",
    )  # fmt: skip
    fleet.add_argument(
        "--fleet-distinct-hosts", nargs="?", const=True, default=False, type=_parse_bool,
        help="engine i listens on --fleet-host-base + i, every engine on the same ports",
    )  # fmt: skip
    fleet.add_argument("--fleet-host-base", default="127.0.1.1")
    fleet.add_argument(
        "--fleet-control-port", type=int, default=None,
        help="serve /fleet/stats (with the oracle prefix-hit figures) and /fleet/reset here",
    )  # fmt: skip
    fleet.add_argument(
        "--fleet-manifest", default=None, metavar="PATH",
        help="write the engines' addresses here (JSON) once all listen",
    )  # fmt: skip
    return parser


_FLEET_DESTS = (
    "fleet", "fleet_distinct_hosts", "fleet_host_base", "fleet_control_port", "fleet_manifest",
)  # fmt: skip


def parse_args(argv: Sequence[str] | None = None) -> SimConfig:
    """Flags -> validated config; exits 2 naming the field on a bad value."""
    return parse_command(argv)[0]


def parse_command(argv: Sequence[str] | None = None) -> tuple[SimConfig, FleetOptions | None]:
    """Flags -> the engine config and, with ``--fleet N``, the fleet's layout."""
    parser = _parser()
    namespace = parser.parse_args(argv)
    raw = vars(namespace)
    fleet_values = {dest: raw.pop(dest) for dest in _FLEET_DESTS}
    fleet: FleetOptions | None = None
    if fleet_values["fleet"] is not None:
        try:
            fleet = FleetOptions(
                size=fleet_values["fleet"],
                distinct_hosts=fleet_values["fleet_distinct_hosts"],
                host_base=fleet_values["fleet_host_base"],
                control_port=fleet_values["fleet_control_port"],
                manifest=fleet_values["fleet_manifest"],
            )
        except ValidationError as exc:
            problems = "; ".join(
                f"--fleet-{'-'.join(str(p) for p in err['loc'])}: {err['msg']}"
                for err in exc.errors()
            )
            parser.error(problems.replace("--fleet-size", "--fleet"))
    return _engine_config(parser, raw), fleet


def _engine_config(parser: argparse.ArgumentParser, raw: dict[str, Any]) -> SimConfig:
    values: dict[str, Any] = {k: v for k, v in raw.items() if v is not None}
    if "faults" in values:
        values["faults"] = tuple(values["faults"])
    try:
        return SimConfig(**values)
    except ValidationError as exc:
        problems = "; ".join(
            f"{_flag(str(err['loc'][0])) if err['loc'] else 'config'}: {err['msg']}"
            for err in exc.errors()
        )
        parser.error(problems)


async def _serve_fleet(config: SimConfig, options: FleetOptions) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Fleet(config, options) as fleet:
        first, last = fleet.servers[0], fleet.servers[-1]
        print(
            f"vllm-sim fleet of {options.size} engines serving {config.served_model_name!r} "
            f"on {first.url} .. {last.url}"
            + (f"; control on port {fleet.control_port}" if fleet.control_port else ""),
            flush=True,
        )
        heap.settle()
        await stop.wait()


async def _serve(config: SimConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with SimServer(config) as sim:
        print(
            f"vllm-sim {config.engine_id} serving {config.served_model_name!r} on {sim.url}",
            flush=True,
        )
        heap.settle()
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config, fleet = parse_command(argv)
    if fleet is not None:
        logging.getLogger().setLevel(logging.WARNING)  # a line per engine is noise
        event_loop.run(_serve_fleet(config, fleet))
    else:
        event_loop.run(_serve(config))
    sys.exit(0)


if __name__ == "__main__":
    main()
