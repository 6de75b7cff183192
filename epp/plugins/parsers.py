"""Request parsers as plugins, and the table that picks one per request path.

A parser claims path suffixes (``chat/completions``, ``messages``, ...) and turns a body
into a ``ParsedRequest``. The ``ParserTable`` is built from ``requestHandler.parsers``
(or the deprecated top-level ``parser``) in order: a parser claiming no paths is the
fallback and ends the list; a second parser of a type already listed is ignored. A path
resolves to the parser with the longest claimed suffix that ends it (on a ``/``
boundary), else to the fallback, else the request is refused with 400.

Without any configured parser the table is ``openai-parser``, ``anthropic-parser``,
``vllmhttp-parser`` then ``passthrough-parser``: a path none of the first three claims
(``/v1/models``, ``/tokenize``, ``/health``) is forwarded unread and scheduled without
a prompt. A request with no body at all (a GET) is never parsed: it is scheduled the
same way whatever the table holds.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import ClassVar

from epp.decision import BadRequest
from epp.plugins.base import Plugin
from epp.plugins.registry import register
from epp.request import ParsedRequest, parse_api, passthrough_request, route_of

__all__ = [
    "DEFAULT_PARSERS",
    "AnthropicParser",
    "OpenAIParser",
    "Parser",
    "ParserTable",
    "PassthroughParser",
    "SGLangHttpParser",
    "VllmHttpParser",
    "claims_path",
]

log = logging.getLogger(__name__)

# The parser types used when the configuration names none, in this order.
DEFAULT_PARSERS = ("openai-parser", "anthropic-parser", "vllmhttp-parser", "passthrough-parser")


def claims_path(route: str, suffix: str) -> bool:
    """Whether ``route`` ends with the claimed ``suffix`` at a path-segment boundary."""
    suffix = suffix.strip().strip("/")
    route = route.strip().rstrip("/")
    return route == f"/{suffix}" or route == suffix or route.endswith(f"/{suffix}")


def _ends_with(route: str, suffixes: Sequence[str]) -> bool:
    return any(claims_path(route, s) for s in suffixes)


class Parser(Plugin, abc.ABC):
    """Turns one request body into a ``ParsedRequest``; ``claims`` are path suffixes
    (empty: the fallback for paths no other parser claims)."""

    claims: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def parse(self, route: str, headers: Mapping[str, str], body: bytes) -> ParsedRequest:
        """Parse or raise ``BadRequest`` naming the problem."""


@register
class OpenAIParser(Parser):
    """The OpenAI-compatible API: completions, chat, responses, conversations,
    embeddings, image generation, and vLLM's ``/render`` variants."""

    type_name = "openai-parser"
    claims = (
        "chat/completions",
        "completions",
        "embeddings",
        "responses",
        "conversations",
        "chat/completions/render",
        "completions/render",
        "images/generations",
    )

    @staticmethod
    def api_of(route: str) -> str:
        """The API a claimed path is, most specific first."""
        table = (
            ("chat/completions/render", "chat-render"),
            ("completions/render", "completions-render"),
            ("conversations", "conversations"),
            ("responses", "responses"),
            ("chat/completions", "chat"),
            ("embeddings", "embeddings"),
            ("images/generations", "images"),
        )
        for suffix, api in table:
            if claims_path(route, suffix):
                return api
        return "completions"

    def parse(self, route: str, headers: Mapping[str, str], body: bytes) -> ParsedRequest:
        return parse_api(self.api_of(route), route, headers, body)


@register
class AnthropicParser(Parser):
    """The Anthropic Messages API; ``messages/count_tokens`` is forwarded unread."""

    type_name = "anthropic-parser"
    claims = ("messages", "messages/count_tokens")

    def parse(self, route: str, headers: Mapping[str, str], body: bytes) -> ParsedRequest:
        if claims_path(route, "messages/count_tokens"):
            return passthrough_request(route, headers, api="count-tokens")
        if not claims_path(route, "messages"):
            raise BadRequest(f"unsupported API endpoint: {route}")
        return parse_api("messages", route, headers, body)


@register
class VllmHttpParser(Parser):
    """vLLM's ``/inference/v1/generate`` (pre-tokenized prompts)."""

    type_name = "vllmhttp-parser"
    claims = ("inference/v1/generate",)

    def parse(self, route: str, headers: Mapping[str, str], body: bytes) -> ParsedRequest:
        if not _ends_with(route, self.claims):
            raise BadRequest(f"unsupported path: {route}")
        return parse_api("generate", route, headers, body)


@register
class SGLangHttpParser(Parser):
    """SGLang's native ``/generate`` with pre-tokenized ``input_ids`` (one or a batch)."""

    type_name = "sglanghttp-parser"
    claims = ("generate",)

    def parse(self, route: str, headers: Mapping[str, str], body: bytes) -> ParsedRequest:
        if route != "/generate":
            raise BadRequest(f"unsupported path: {route}")
        return parse_api("sglang-generate", route, headers, body)


@register
class PassthroughParser(Parser):
    """Claims nothing and reads nothing: the request is scheduled without a prompt
    (load and metric signals only) and forwarded as it came."""

    type_name = "passthrough-parser"

    def parse(self, route: str, headers: Mapping[str, str], body: bytes) -> ParsedRequest:
        return passthrough_request(route, headers)


@dataclass(frozen=True, slots=True)
class _Entry:
    parser: Parser
    suffixes: tuple[str, ...]


class ParserTable:
    """The configured parsers, resolved by longest claimed path suffix."""

    def __init__(self, parsers: Sequence[Parser]) -> None:
        self.entries: list[_Entry] = []
        self.fallback: Parser | None = None
        self.parsers: list[Parser] = []
        seen: set[str] = set()
        for i, parser in enumerate(parsers):
            if parser.type_name in seen:
                log.warning(
                    "parser '%s': a parser of type %s is already listed; ignored",
                    parser.name,
                    parser.type_name,
                )
                continue
            seen.add(parser.type_name)
            self.parsers.append(parser)
            if not parser.claims:
                self.fallback = parser
                for skipped in parsers[i + 1 :]:
                    log.warning(
                        "parser '%s' is listed after the fallback parser '%s'; ignored",
                        skipped.name,
                        parser.name,
                    )
                break
            suffixes = tuple(s.strip().strip("/") for s in parser.claims)
            self.entries.append(_Entry(parser, suffixes))

    def resolve(self, path: str) -> Parser:
        """The parser for ``path``; ``BadRequest`` when none claims it and there is no
        fallback."""
        route = route_of(path)
        best: Parser | None = None
        best_len = 0
        for entry in self.entries:
            for suffix in entry.suffixes:
                if len(suffix) > best_len and claims_path(route, suffix):
                    best, best_len = entry.parser, len(suffix)
        if best is not None:
            return best
        if self.fallback is not None:
            return self.fallback
        raise BadRequest(f"no parser registered matching path suffix for: {route}")

    def parse(
        self,
        path: str,
        headers: Mapping[str, str],
        body: bytes,
        *,
        headers_only: bool = False,
    ) -> ParsedRequest:
        """Parse one request. ``headers_only``: the request has no body (a GET); it is
        scheduled without a prompt, whichever parser would claim its path."""
        if headers_only:
            return passthrough_request(path, headers)
        parser = self.resolve(path)
        t0 = perf_counter()
        try:
            return parser.parse(route_of(path), headers, body)
        finally:
            parser.observe(perf_counter() - t0)
