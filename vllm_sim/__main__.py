"""``vllm-sim``: run one simulated engine until SIGINT/SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence
from typing import Any, Literal, get_args, get_origin

from pydantic import ValidationError

from .config import SimConfig
from .server import SimServer

__all__ = ["main", "parse_args"]

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
    return parser


def parse_args(argv: Sequence[str] | None = None) -> SimConfig:
    """Flags -> validated config; exits 2 naming the field on a bad value."""
    parser = _parser()
    namespace = parser.parse_args(argv)
    values: dict[str, Any] = {k: v for k, v in vars(namespace).items() if v is not None}
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
        await stop.wait()


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    config = parse_args(argv)
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()
    asyncio.run(_serve(config))
    sys.exit(0)


if __name__ == "__main__":
    main()
