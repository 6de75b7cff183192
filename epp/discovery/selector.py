"""Kubernetes label selectors as ``--endpoint-selector`` takes them.

The syntax of ``kubectl -l`` and llm-d's flag: comma-separated requirements, each
``key``, ``!key``, ``key=value`` (or ``==``), ``key!=value``, ``key in (a,b)``,
``key notin (a,b)``, ``key>N`` or ``key<N``. The API server evaluates the selector; the
EPP parses it at start so that a typo stops it with a message instead of a watch that
fails forever.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["Requirement", "parse_selector"]

_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}$")
_VALUE = re.compile(rf"^({_NAME})?$")
_TOKEN = re.compile(r"\s*(!=|==|=|!|\(|\)|,|<|>|[^\s!=(),<>]+)")


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: str  # exists, !, =, !=, in, notin, gt, lt
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        have = labels.get(self.key)
        if self.op == "exists":
            return have is not None
        if self.op == "!":
            return have is None
        if self.op in ("=", "in"):
            return have is not None and have in self.values
        if self.op in ("!=", "notin"):
            return have is None or have not in self.values
        if have is None or not have.lstrip("-").isdigit():
            return False
        bound = int(self.values[0])
        return int(have) > bound if self.op == "gt" else int(have) < bound


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    text = text.strip()
    while pos < len(text):
        match = _TOKEN.match(text, pos)
        if match is None:  # pragma: no cover - the pattern accepts any non-space char
            raise ValueError(f"cannot read the selector at {text[pos:]!r}")
        out.append(match.group(1))
        pos = match.end()
    return out


def _key(token: str) -> str:
    if not _KEY.match(token):
        raise ValueError(f"invalid label key {token!r}")
    return token


def _value(token: str) -> str:
    if not _VALUE.match(token):
        raise ValueError(f"invalid label value {token!r}")
    return token


def parse_selector(text: str) -> tuple[Requirement, ...]:
    """The requirements of ``text``; ``ValueError`` names what is wrong."""
    tokens = _tokens(text)
    if not tokens:
        raise ValueError("empty selector")
    reqs: list[Requirement] = []
    i = 0

    def take() -> str:
        nonlocal i
        if i >= len(tokens):
            raise ValueError(f"selector {text!r} ends too early")
        i += 1
        return tokens[i - 1]

    while True:
        token = take()
        if token == "!":
            reqs.append(Requirement(_key(take()), "!"))
        else:
            key = _key(token)
            op = tokens[i] if i < len(tokens) else ","
            if op == ",":
                reqs.append(Requirement(key, "exists"))
            elif op in ("=", "==", "!="):
                i += 1
                value = "" if i >= len(tokens) or tokens[i] == "," else take()
                reqs.append(Requirement(key, "!=" if op == "!=" else "=", (_value(value),)))
            elif op in ("in", "notin"):
                i += 1
                if take() != "(":
                    raise ValueError(f"'{op}' needs a parenthesised list of values")
                values: list[str] = []
                while True:
                    item = take()
                    if item == ")" and not values:
                        raise ValueError(f"'{key} {op} ()' needs at least one value")
                    values.append(_value(item))
                    sep = take()
                    if sep == ")":
                        break
                    if sep != ",":
                        raise ValueError(f"expected ',' or ')' after {item!r}, got {sep!r}")
                reqs.append(Requirement(key, op, tuple(values)))
            elif op in (">", "<"):
                i += 1
                bound = take()
                if not bound.lstrip("-").isdigit():
                    raise ValueError(f"'{key} {op}' needs an integer, got {bound!r}")
                reqs.append(Requirement(key, "gt" if op == ">" else "lt", (bound,)))
            else:
                raise ValueError(f"unexpected {op!r} after key {key!r}")
        if i >= len(tokens):
            return tuple(reqs)
        if take() != ",":
            raise ValueError(f"expected ',' between requirements in {text!r}")
