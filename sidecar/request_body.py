"""The client's request body: read bounded in size and time, parsed once."""

from __future__ import annotations

from typing import Any

from common import deadlines
from common.json_codec import loads
from sidecar.errors import BodyTooLarge, InvalidBody, RequestBodyTimeout
from sidecar.server import Request

__all__ = ["parse_json_object", "read_body"]


async def read_body(request: Request, limit: int, deadline_s: float) -> bytes:
    """The whole request body: at most ``limit`` bytes, arriving within ``deadline_s``."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge(limit)
    content = request.content
    if content.is_eof():
        # The whole body already arrived (the usual case for small bodies): no timer.
        whole = content.read_nowait()
        if len(whole) > limit:
            raise BodyTooLarge(limit)
        return whole
    chunks: list[bytes] = []
    size = 0
    try:
        async with deadlines.timeout(deadline_s):
            async for chunk in request.content.iter_any():
                size += len(chunk)
                if size > limit:
                    raise BodyTooLarge(limit)
                chunks.append(chunk)
    except TimeoutError:
        raise RequestBodyTimeout(deadline_s, size) from None
    return b"".join(chunks)


def parse_json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = loads(raw)
    except ValueError as exc:
        raise InvalidBody(f"request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidBody("request body nests too deeply") from None
    if not isinstance(body, dict):
        raise InvalidBody("request body must be a JSON object")
    return body
