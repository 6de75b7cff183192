"""YAML/JSON files parsed into pydantic models, and files watched for changes.

Used wherever a file configures a running server: the EPP's endpoints file and the
sidecar's SSRF allowlist. Reading happens off the event loop; a change is noticed by
polling the file's (mtime, size, inode); a reload that fails to read or parse keeps the
previous value and is counted, so a half-written file never empties what was loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

__all__ = ["WatchedFile", "parse_yaml_model"]

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")


def parse_yaml_model(text: str, model: type[M], source: str) -> M:
    """``model`` from YAML (or JSON) text; ``ValueError`` naming the source and fields."""
    try:
        doc: Any = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{source}: not valid YAML or JSON: {exc}") from None
    try:
        return model.model_validate(doc or {})
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ValueError(f"{source}: {problems}") from None


def _signature(path: str) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _read(path: str) -> tuple[tuple[int, int, int] | None, str]:
    signature = _signature(path)
    with open(path, encoding="utf-8") as f:
        return signature, f.read()


class WatchedFile(Generic[T]):
    """A file parsed into ``T``; ``on_change`` gets each successfully reloaded value."""

    def __init__(
        self,
        path: str,
        parse: Callable[[str], T],
        *,
        interval_s: float,
        on_change: Callable[[T], None],
        on_error: Callable[[Exception], None],
    ) -> None:
        self.path = path
        self.interval_s = interval_s
        self.reloads = 0
        self.reload_errors = 0
        self._parse = parse
        self._on_change = on_change
        self._on_error = on_error
        self._last: tuple[int, int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    async def load(self) -> T:
        """Read and parse once; ``OSError`` or ``ValueError`` when that fails."""
        self._last, text = await asyncio.to_thread(_read, self.path)
        return self._parse(text)

    def watch(self, name: str) -> None:
        self._task = asyncio.create_task(self._poll(), name=name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s)
            signature = await asyncio.to_thread(_signature, self.path)
            if signature is None or signature == self._last:
                continue
            self._last = signature
            try:
                self._last, text = await asyncio.to_thread(_read, self.path)
                value = self._parse(text)
            except (OSError, ValueError) as exc:
                self.reload_errors += 1
                self._on_error(exc)
                continue
            self.reloads += 1
            self._on_change(value)
