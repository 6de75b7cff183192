"""The plugin registry: the recipe is checked at registration; entry points load."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import BaseModel

from epp.config import load_config
from epp.plugins.base import Plugin, PluginParams, Scorer
from epp.plugins.registry import (
    ENTRY_POINT_GROUP,
    PluginRegistrationError,
    load_entry_points,
    lookup,
    register,
    registered_types,
    unregister,
)


def test_register_rejects_classes_off_recipe() -> None:
    class NoType(Plugin):
        pass

    with pytest.raises(PluginRegistrationError, match="NoType has no type_name"):
        register(NoType)

    class Loose(Plugin):
        type_name = "loose-test-plugin"

        class Params(BaseModel):  # type: ignore[assignment]
            x: int = 1

    with pytest.raises(PluginRegistrationError, match=r"loose-test-plugin.*extra='forbid'"):
        register(Loose)

    class Clash(Plugin):
        type_name = "queue-scorer"

    assert "queue-scorer" in registered_types()

    with pytest.raises(PluginRegistrationError, match="registered twice"):
        register(Clash)
    with pytest.raises(PluginRegistrationError, match="not a subclass"):
        register(int)  # type: ignore[type-var]


ROOT = str(Path(__file__).resolve().parents[2])

PLUGIN_SOURCE = """
from __future__ import annotations
from epp.plugins.base import PluginParams, Scorer

class ConstantScorer(Scorer):
    type_name = "constant-test-scorer"

    class Params(PluginParams):
        value: float = 0.5

    def score(self, cycle, endpoints):
        return [self.params.value] * len(endpoints)

class NotAPlugin:
    pass
"""


@pytest.fixture
def third_party(tmp_path: Path) -> Iterator[Path]:
    (tmp_path / "acme_epp_plugins.py").write_text(PLUGIN_SOURCE)
    dist = tmp_path / "acme_epp_plugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-epp-plugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        textwrap.dedent(f"""
        [{ENTRY_POINT_GROUP}]
        constant = acme_epp_plugins:ConstantScorer
    """)
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield dist
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("acme_epp_plugins", None)
        unregister("constant-test-scorer")
        load_entry_points(force=True)


def test_entry_point_plugin_is_usable_in_config(third_party: Path) -> None:
    assert "constant-test-scorer" in load_entry_points(force=True)
    cls = lookup("constant-test-scorer")
    assert cls is not None and issubclass(cls, Scorer)
    cfg = load_config("""
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: constant-test-scorer
  parameters: {value: 0.25}
schedulingProfiles:
- name: default
  plugins: [{pluginRef: constant-test-scorer}]
""")
    scorer = cfg.scheduler.profiles["default"].scorers[0].scorer
    assert scorer.params.value == 0.25  # type: ignore[attr-defined]


def test_bad_entry_point_names_itself(third_party: Path) -> None:
    (third_party / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nbroken = acme_epp_plugins:NotAPlugin\n"
    )
    with pytest.raises(PluginRegistrationError, match="entry point 'broken'"):
        load_entry_points(force=True)
    (third_party / "entry_points.txt").write_text(
        f"[{ENTRY_POINT_GROUP}]\nmissing = acme_epp_plugins:Nope\n"
    )
    with pytest.raises(PluginRegistrationError, match=r"entry point 'missing'.*failed to load"):
        load_entry_points(force=True)


def test_plugins_are_constructible_directly() -> None:
    class P(PluginParams):
        n: int = 2

    assert P.model_validate({"n": 3}).n == 3
    with pytest.raises(ValueError, match="extra"):
        P.model_validate({"m": 1})


async def test_every_plugin_module_imports_first_in_a_fresh_interpreter() -> None:
    # Import cycles only show when a module is the first one imported.
    from epp.plugins.registry import _BUILTIN_MODULES

    modules = [*_BUILTIN_MODULES, "epp.config", "epp.director", "epp.discovery.kubernetes"]

    async def run(module: str) -> tuple[str, int, bytes]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            f"import {module}",
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
        _, err = await proc.communicate()
        return module, proc.returncode or 0, err

    results = await asyncio.gather(*(run(m) for m in modules))
    failed = {m: err.decode()[-300:] for m, rc, err in results if rc != 0}
    assert failed == {}
