"""Build the kustomizations with ``kubectl kustomize`` and look inside the objects.

Every directory under ``manifests/`` and ``examples/`` holding a ``kustomization.yaml``
is built. The helpers resolve what a pod would see at run time: a container's
``$(VAR)`` references from its own ``env``, and the files its volumes mount from
ConfigMaps.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "POD_FIELDS",
    "REPO",
    "Built",
    "Container",
    "build",
    "containers",
    "kustomizations",
    "mounted_file",
    "resolve_args",
]

REPO = Path(__file__).resolve().parents[2]
_ROOTS = ("manifests", "examples")
_VAR_REF = re.compile(r"\$\((\w+)\)")

Obj = dict[str, Any]


def kustomizations() -> list[str]:
    """Repository-relative directories that hold a kustomization."""
    found = []
    for root in _ROOTS:
        for path in sorted((REPO / root).rglob("kustomization.yaml")):
            found.append(str(path.parent.relative_to(REPO)))
    return found


@dataclass(frozen=True)
class Built:
    """The objects one kustomization renders."""

    directory: str
    objects: tuple[Obj, ...]

    def of_kind(self, kind: str) -> list[Obj]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str) -> Obj:
        matches = [o for o in self.of_kind(kind) if o["metadata"]["name"] == name]
        if len(matches) != 1:
            raise LookupError(f"{self.directory}: {len(matches)} {kind} named {name!r}")
        return matches[0]

    def workloads(self) -> list[Obj]:
        return self.of_kind("Deployment")


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        raise RuntimeError(
            "kubectl is not on PATH: the machine image ships it (Debian package kubectl); "
            "install it to build the kustomizations"
        )
    return path


@functools.cache
def build(directory: str) -> Built:
    result = subprocess.run(
        [kubectl(), "kustomize", str(REPO / directory)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(f"kubectl kustomize {directory} failed:\n{result.stderr}")
    objects = tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)
    return Built(directory, objects)


@dataclass(frozen=True)
class Container:
    workload: Obj
    spec: Obj
    init: bool

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def where(self) -> str:
        return f"{self.workload['kind']}/{self.workload['metadata']['name']} container {self.name}"

    @property
    def pod(self) -> Obj:
        return dict(self.workload["spec"]["template"]["spec"])

    @property
    def program(self) -> str | None:
        command = self.spec.get("command") or []
        return str(command[0]) if command else None

    def env_value(self, name: str) -> Any:
        for item in self.spec.get("env") or []:
            if item["name"] == name:
                return item.get("value", item.get("valueFrom"))
        raise KeyError(f"{self.where}: no env {name}")


def containers(built: Built) -> Iterator[Container]:
    for workload in built.workloads():
        pod = workload["spec"]["template"]["spec"]
        for spec in pod.get("initContainers") or []:
            yield Container(workload, spec, init=True)
        for spec in pod.get("containers") or []:
            yield Container(workload, spec, init=False)


def _configmap_value(built: Built, ref: Mapping[str, Any]) -> str:
    cm = built.get("ConfigMap", ref["name"])
    return str(cm["data"][ref["key"]])


# Downward-API fields as a pod would see them (the IP is never contacted).
POD_FIELDS = {
    "status.podIP": "192.0.2.10",
    "metadata.namespace": "disagg",
    "metadata.name": "pod-0",
}


def resolve_args(
    built: Built, container: Container, fields: Mapping[str, str] | None = None
) -> list[str]:
    """The container's args with ``$(VAR)`` expanded as the kubelet would.

    Literal values and ConfigMap keys are substituted; a fieldRef takes its value from
    ``fields`` (default ``POD_FIELDS``). An undefined variable is an error here,
    although the kubelet would leave it verbatim: that is always a mistake in ours.
    """
    values: dict[str, str] = {}
    for item in container.spec.get("env") or []:
        if "value" in item:
            values[item["name"]] = _VAR_REF.sub(lambda m: values[m.group(1)], item["value"])
            continue
        source = item.get("valueFrom") or {}
        if "configMapKeyRef" in source:
            values[item["name"]] = _configmap_value(built, source["configMapKeyRef"])
        elif "fieldRef" in source:
            path = source["fieldRef"]["fieldPath"]
            values[item["name"]] = {**POD_FIELDS, **(fields or {})}[path]
        else:
            raise AssertionError(f"{container.where}: unsupported env source {source}")

    def sub(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in values:
            raise AssertionError(f"{container.where}: $({name}) is not defined in env")
        return values[name]

    return [_VAR_REF.sub(sub, str(arg)) for arg in container.spec.get("args") or []]


def mounted_file(built: Built, container: Container, path: str) -> str:
    """The text of ``path`` as the container sees it, from a ConfigMap volume."""
    volumes = {v["name"]: v for v in container.pod.get("volumes") or []}
    for mount in container.spec.get("volumeMounts") or []:
        prefix = mount["mountPath"].rstrip("/") + "/"
        if not path.startswith(prefix):
            continue
        volume = volumes[mount["name"]]
        if "configMap" not in volume:
            raise AssertionError(f"{container.where}: {path} is not on a ConfigMap volume")
        cm = built.get("ConfigMap", volume["configMap"]["name"])
        key = path[len(prefix) :]
        if key not in cm.get("data", {}):
            raise AssertionError(
                f"{container.where}: ConfigMap {cm['metadata']['name']} has no {key}"
            )
        return str(cm["data"][key])
    raise AssertionError(f"{container.where}: nothing is mounted at {path}")


def dump(obj: Obj) -> str:
    return yaml.safe_dump(obj, sort_keys=False)
