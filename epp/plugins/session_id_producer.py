"""session-id-producer: publish the request's session identifier as a request attribute.

Exactly one of ``headerName`` (a request header, case-insensitive) or ``cookieName``
(a cookie in the ``Cookie`` header). The value, trimmed, is published as the request
attribute ``SessionIDDataKey`` of this producer (by its name); nothing is published
when the source is absent or empty. ``session-affinity-filter`` reads it with a
``sessionIdConfig.sources`` entry ``{attribute: SessionIDDataKey, producer: <name>}``.
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import model_validator

from epp.datalayer.attributes import AttributeKey, put_request_attribute
from epp.datastore import Endpoint
from epp.plugins.base import DataProducer, PluginParams
from epp.plugins.registry import register
from epp.scheduling.cycle import CycleState

__all__ = ["SESSION_ID_ATTRIBUTE", "SessionIdProducer"]

SESSION_ID_ATTRIBUTE = "SessionIDDataKey"


def cookie_value(header: str, name: str) -> str:
    for pair in header.split(";"):
        key, sep, value = pair.strip().partition("=")
        if sep and key == name:
            return value
    return ""


@register
class SessionIdProducer(DataProducer):
    type_name = "session-id-producer"

    class Params(PluginParams):
        header_name: str = ""
        cookie_name: str = ""

        @model_validator(mode="after")
        def _exactly_one(self) -> SessionIdProducer.Params:
            if bool(self.header_name.strip()) == bool(self.cookie_name.strip()):
                raise ValueError("set exactly one of headerName and cookieName")
            return self

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        if params is None:
            raise ValueError("session-id-producer needs headerName or cookieName")
        super().__init__(params, name)
        self._header = self.params.header_name.strip().lower()
        self._cookie = self.params.cookie_name.strip()
        self.key: AttributeKey = (SESSION_ID_ATTRIBUTE, self.name)

    def prepare(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        headers = cycle.request.headers
        if self._header:
            value = headers.get(self._header, "")
        else:
            value = cookie_value(headers.get("cookie", ""), self._cookie)
        value = value.strip()
        if value:
            put_request_attribute(cycle, self.key, value)
