"""``epp`` console script: parse flags, then serve until SIGTERM, or validate and exit.

``epp --validate-config --config-file FILE`` (or ``--config-text``) loads and builds the
whole configuration exactly as serving would, prints the resolved plugins and profiles
and exits 0; a bad configuration exits 2 with the message naming the field.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Sequence
from typing import TextIO

from common import event_loop
from epp.config import ConfigError, SchedulerConfig, load_config
from epp.logs import configure_logging
from epp.settings import EppSettings, parse_args
from epp.stability import check_plugin_stability
from epp.tls import grpc_cipher_suites

__all__ = ["describe_config", "main", "validate_config"]

log = logging.getLogger("epp")


def describe_config(config: SchedulerConfig, source: str) -> str:
    """The resolved configuration, one plugin or profile per line."""
    lines = [f"configuration: {source} ({config.document.apiVersion})", "plugins:"]
    for plugin in config.plugins:
        lines.append(f"  {plugin.name} (type {plugin.type_name})")
    scheduler = config.scheduler
    handler = scheduler.handler
    lines.append(f"profile handler: {handler.name} (type {handler.type_name})")
    lines.append("scheduling profiles:")
    for name, profile in scheduler.profiles.items():
        filters = ", ".join(f.name for f in profile.filters) or "-"
        scorers = ", ".join(f"{w.scorer.name}*{w.weight:g}" for w in profile.scorers) or "-"
        lines.append(
            f"  {name}: filters [{filters}] scorers [{scorers}] picker {profile.picker.name}"
        )
    if scheduler.producers:
        lines.append("data producers: " + ", ".join(p.name for p in scheduler.producers))
    lines.append("request parsers: " + ", ".join(p.name for p in config.parsers.parsers))
    if config.discovery is not None:
        lines.append(f"discovery: {config.discovery.name} (type {config.discovery.type_name})")
    return "\n".join(lines)


def validate_config(settings: EppSettings, out: TextIO = sys.stdout) -> int:
    """``--validate-config``: 0 and the resolved configuration, or 2 and the problem."""
    source = settings.config_file or ("--config-text" if settings.config_text else "default")
    try:
        config = load_config(
            settings.config_text,
            settings.config_file,
            pool_configured=bool(settings.pool_name or settings.endpoint_selector),
        )
        check_plugin_stability(
            ((p.instance_name, p.type) for p in config.document.plugins),
            settings.allow_experimental_plugins,
        )
    except (ConfigError, ValueError) as err:
        print(f"epp: error: configuration: {err}", file=sys.stderr)
        return 2
    print(describe_config(config, source), file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_args(argv)
    configure_logging(settings)
    if settings.tls_cipher_suites:
        suites = grpc_cipher_suites(settings.tls_cipher_suites)
        if suites:
            # gRPC reads it once, when it is loaded: set before epp.app imports grpc.
            os.environ["GRPC_SSL_CIPHER_SUITES"] = suites
    if settings.validate_config:
        return validate_config(settings)
    from epp.app import StartupError, run

    try:
        event_loop.run(run(settings))  # grpc.aio serves on uvloop too
    except StartupError as err:
        print(f"epp: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
