"""Reading a few named series out of a Prometheus text page, and metric specs.

A data source hands its extractors one ``PrometheusPage``; each extractor asks for the
series it needs by name. Only those lines are parsed (found with ``str.find``, in C), so
an engine's page of several hundred histogram lines costs little however many
extractors read it, and each name is parsed once per page.

A metric spec is llm-d's selector syntax: ``name`` or ``name{label=value,...}`` (values
may be quoted); it selects the first sample of that name whose labels include the
given ones (the latest, when samples carry timestamps).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["MetricSpec", "PrometheusPage", "Sample"]

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# labels block, value, optional timestamp (after the metric name).
_REST = re.compile(r'(?:\{((?:[^"}]|"(?:[^"\\]|\\.)*")*)\})?[ \t]+(\S+)(?:[ \t]+(-?\d+))?')
_PAIR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"')
_ESCAPE = re.compile(r"\\(.)")


@dataclass(frozen=True, slots=True)
class Sample:
    labels: dict[str, str]
    value: float
    timestamp_ms: int = 0


def _unescape(value: str) -> str:
    if "\\" not in value:
        return value
    return _ESCAPE.sub(lambda m: "\n" if m.group(1) == "n" else m.group(1), value)


def _parse_line(line: str, name_len: int) -> Sample | None:
    match = _REST.match(line, name_len)
    if match is None:
        return None
    try:
        value = float(match.group(2))
    except ValueError:
        return None
    labels = {k: _unescape(v) for k, v in _PAIR.findall(match.group(1) or "")}
    return Sample(labels, value, int(match.group(3) or 0))


@dataclass
class PrometheusPage:
    """One scraped page; ``samples(name)`` parses that series on first use."""

    text: str
    _cache: dict[str, list[Sample]] = field(default_factory=dict, repr=False)
    _lines: str | None = field(default=None, repr=False)

    def samples(self, name: str) -> list[Sample]:
        cached = self._cache.get(name)
        if cached is not None:
            return cached
        if self._lines is None:
            # A leading newline makes the first line findable like every other one.
            self._lines = "\n" + self.text
        text = self._lines
        needle = "\n" + name
        found: list[Sample] = []
        pos = text.find(needle)
        while pos != -1:
            end = text.find("\n", pos + 1)
            line = text[pos + 1 :] if end == -1 else text[pos + 1 : end]
            if line[len(name) : len(name) + 1] in ("{", " ", "\t"):
                sample = _parse_line(line, len(name))
                if sample is not None:
                    found.append(sample)
            pos = -1 if end == -1 else text.find(needle, end)
        self._cache[name] = found
        return found


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    labels: dict[str, str]

    @classmethod
    def parse(cls, spec: str) -> MetricSpec:
        """``ValueError`` naming the spec when it is not ``name`` or ``name{k=v,...}``."""
        text = spec.strip()
        brace = text.find("{")
        name = (text if brace == -1 else text[:brace]).strip()
        if not _NAME.fullmatch(name):
            raise ValueError(f"not a valid metric specification: {spec!r}")
        labels: dict[str, str] = {}
        if brace != -1:
            if not text.endswith("}"):
                raise ValueError(f"not a valid metric specification: {spec!r}")
            block = text[brace + 1 : -1].strip()
            for pair in filter(None, (p.strip() for p in block.split(","))):
                key, sep, value = pair.partition("=")
                key, value = key.strip(), value.strip()
                if len(value) >= 2 and value[0] == value[-1] == '"':
                    value = value[1:-1]
                if not sep or not _LABEL_NAME.fullmatch(key) or not value or '"' in value:
                    raise ValueError(f"invalid label pair {pair!r} in specification {spec!r}")
                labels[key] = value
        return cls(name, labels)

    def select(self, page: PrometheusPage) -> float | None:
        """The value of the matching sample (latest by timestamp, first on ties)."""
        best: Sample | None = None
        for sample in page.samples(self.name):
            if all(sample.labels.get(k) == v for k, v in self.labels.items()) and (
                best is None or sample.timestamp_ms > best.timestamp_ms
            ):
                best = sample
        return None if best is None else best.value
