"""``pd-sidecar`` console script: load settings, serve, drain on SIGTERM, exit 0.

Exit status 2 means the configuration was rejected, or a file or service it names is
unusable (the message names the flag).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from common import event_loop
from sidecar.app import StartupError, run
from sidecar.log import configure_logging
from sidecar.settings import Settings, SettingsError, load_settings

__all__ = ["main"]

_USAGE = """usage: pd-sidecar [--flag=value ...]

Flags are the llm-d pd-sidecar flags (--port, --model-server-port, --kv-connector,
--prefill-max-retries, --prefill-retry-backoff, --enable-prefiller-sampling, ...) plus
this implementation's own; see sidecar/settings.py. --configuration (inline YAML) and
--configuration-file take YAML whose keys are the flag names.
"""


def _flag_table() -> str:
    rows = []
    for name, info in Settings.model_fields.items():
        default = info.get_default(call_default_factory=True)
        rows.append(f"  --{name.replace('_', '-'):<28} default: {default!r}")
    return "\n".join(rows)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in ("-h", "--help", "-help") for arg in args):
        print(_USAGE)
        print(_flag_table())
        return 0
    try:
        settings = load_settings(args)
    except SettingsError as exc:
        print(f"pd-sidecar: invalid configuration: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.effective_log_level)
    try:
        event_loop.run(run(settings))
    except StartupError as exc:
        print(f"pd-sidecar: cannot start: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
