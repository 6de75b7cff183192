"""``--api-objects-file``: InferenceObjective and InferenceModelRewrite objects from a
multi-document YAML file, re-read when it changes."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from common.yaml_file import WatchedFile
from epp.requestmgmt.objects import ObjectiveSpec, ObjectStore, RewriteSpec, parse_object

__all__ = ["ObjectsFile", "read_objects"]

log = logging.getLogger(__name__)


def parse_objects(text: str, source: str) -> list[ObjectiveSpec | RewriteSpec]:
    """Every object in ``text``; ``ValueError`` naming the source and document at fault."""
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not valid YAML: {exc}") from None
    out: list[ObjectiveSpec | RewriteSpec] = []
    for i, doc in enumerate(docs):
        if not isinstance(doc, dict):
            raise ValueError(f"{source}: document {i}: expected a mapping")
        items = (doc.get("items") or []) if doc.get("kind") == "List" else [doc]
        for item in items:
            out.append(parse_object(item, f"{source}: document {i}: "))
    return out


def read_objects(path: Path) -> list[ObjectiveSpec | RewriteSpec]:
    """Every object in the file; ``ValueError`` naming the file and document at fault."""
    source = f"--api-objects-file {path}"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{source}: {exc.strerror}") from None
    return parse_objects(text, source)


class ObjectsFile:
    """The file's objects in ``store`` (source ``file``), re-read when it changes; a bad
    version is logged once and the objects loaded before are kept."""

    SOURCE = "file"

    def __init__(self, path: str | Path, store: ObjectStore, poll_s: float = 1.0) -> None:
        self.path = Path(path)
        self.store = store
        self._file = WatchedFile(
            str(self.path),
            lambda text: parse_objects(text, f"--api-objects-file {self.path}"),
            interval_s=poll_s,
            on_change=self._apply,
            on_error=lambda exc: log.error("%s; keeping the objects loaded before", exc),
        )
        self.loads = 0

    def _apply(self, objects: list[ObjectiveSpec | RewriteSpec]) -> None:
        self.store.replace(self.SOURCE, objects)
        self.loads += 1
        log.info("api objects file %s: %d objects", self.path, len(objects))

    async def start(self) -> None:
        from epp.config import ConfigError

        try:
            objects = await self._file.load()
        except OSError as exc:
            raise ConfigError(f"--api-objects-file {self.path}: {exc.strerror}") from None
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        self._apply(objects)
        self._file.watch("api objects file")

    async def stop(self) -> None:
        await self._file.stop()
