"""session-affinity-filter: pin a session's requests to the pod that served it (a hard
constraint; the filter never empties the candidate set).

``strategy: encoded_endpoint_header`` (default, stateless): the request header
``encodedEndpointHeaderConfig.header`` (default ``x-session-token``) carries the
base64 of ``namespace/name`` of the pod to use; when that pod is a candidate it is the
only one kept, otherwise (no header, undecodable, pod gone) every candidate is. The
response carries the same header naming the pod chosen, for the client to send back.

``strategy: session_id`` (stateful): the session identifier comes from
``sessionIdConfig.sources``, tried in order (each ``{header: name}`` or ``{attribute:
key, producer: name}`` for a request attribute such as ``session-id-producer``'s;
default one header source ``x-session-id``); the filter remembers which pod served each
session (forgotten after ``evictionTtlSeconds`` unused, default 300, checked every
``evictionSweepSeconds``, default 10). A bound pod among the candidates is the only one
kept; a session whose pod is gone passes every candidate and is rebound to wherever it
is routed. Nothing is written back to the client. At most 100,000 sessions are
remembered; past that the least recently used are forgotten first.

``profileName`` (default: the primary, decode profile) names the profile whose pick is
written (``encoded_endpoint_header``) or bound (``session_id``): one instance per
profile pins both stages of a disaggregated session.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from epp.datalayer.attributes import read_request_attribute
from epp.datastore import Endpoint
from epp.plugins.base import Filter, PluginParams, Release, RequestTracker
from epp.plugins.registry import register
from epp.scheduling.cycle import RESPONSE_HEADERS, CycleState, StateKey
from epp.scheduling.result import SchedulingResult

__all__ = ["SessionAffinityFilter", "endpoint_id", "session_token"]

log = logging.getLogger(__name__)

_MAX_SESSIONS = 100_000


def endpoint_id(endpoint: Endpoint) -> str:
    """``namespace/name``, as llm-d names an endpoint."""
    return f"{endpoint.namespace}/{endpoint.name}"


def session_token(endpoint: Endpoint) -> str:
    return base64.b64encode(endpoint_id(endpoint).encode()).decode()


class _EncodedHeaderConfig(PluginParams):
    header: str = "x-session-token"


class _Source(PluginParams):
    header: str = ""
    attribute: str = ""
    producer: str = ""

    @model_validator(mode="after")
    def _one(self) -> _Source:
        if bool(self.header) == bool(self.attribute):
            raise ValueError("set exactly one of header and attribute")
        return self


class _SessionIdConfig(PluginParams):
    sources: list[_Source] = Field(default_factory=list)
    # 0 means the default, as in llm-d.
    eviction_ttl_seconds: float = Field(default=0.0, ge=0)
    eviction_sweep_seconds: float = Field(default=0.0, ge=0)


@dataclass(slots=True)
class _Binding:
    pod: str
    last_seen: float


def _noop() -> None:
    return None


@register
class SessionAffinityFilter(Filter, RequestTracker):
    type_name = "session-affinity-filter"

    class Params(PluginParams):
        strategy: Literal["encoded_endpoint_header", "session_id"] = "encoded_endpoint_header"
        profile_name: str = ""
        encoded_endpoint_header_config: _EncodedHeaderConfig = _EncodedHeaderConfig()
        session_id_config: _SessionIdConfig = _SessionIdConfig()

    params: Params

    def __init__(self, params: Params | None = None, name: str | None = None) -> None:
        super().__init__(params, name)
        p = self.params
        self._encoded = p.strategy == "encoded_endpoint_header"
        self._header = p.encoded_endpoint_header_config.header.strip().lower() or "x-session-token"
        cfg = p.session_id_config
        self._sources = cfg.sources or [_Source(header="x-session-id")]
        self._ttl = cfg.eviction_ttl_seconds or 300.0
        self._sweep_every = cfg.eviction_sweep_seconds or 10.0
        self._next_sweep = 0.0
        self.bindings: OrderedDict[str, _Binding] = OrderedDict()
        self._present: StateKey[bool] = StateKey(f"{self.name}/bound-pod-present")
        unused = "session_id_config" if self._encoded else "encoded_endpoint_header_config"
        if unused in p.model_fields_set:
            log.warning(
                "%s: parameters.%s is not used with strategy %s",
                self.name, "sessionIdConfig" if self._encoded else "encodedEndpointHeaderConfig",
                p.strategy,
            )  # fmt: skip

    # -- encoded_endpoint_header -------------------------------------------------------

    def _token_pod(self, cycle: CycleState) -> str:
        token = cycle.request.headers.get(self._header, "")
        if not token:
            return ""
        try:
            return base64.b64decode(token, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            log.info(
                "request %s: %s: header %s is not a base64 endpoint token",
                cycle.request.request_id or "-", self.name, self._header,
            )  # fmt: skip
            return ""

    # -- session_id -------------------------------------------------------------------

    def _session_id(self, cycle: CycleState) -> str:
        headers = cycle.request.headers
        for source in self._sources:
            if source.header:
                value = headers.get(source.header.strip().lower(), "").strip()
            else:
                found = read_request_attribute(cycle, (source.attribute, source.producer))
                value = found.strip() if isinstance(found, str) else ""
            if value:
                return value
        return ""

    def _bound_pod(self, session: str, now: float) -> str:
        self._sweep(now)
        binding = self.bindings.get(session)
        if binding is None or now - binding.last_seen > self._ttl:
            return ""
        return binding.pod

    def _sweep(self, now: float) -> None:
        if now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_every
        expired = [s for s, b in self.bindings.items() if now - b.last_seen > self._ttl]
        for session in expired:
            del self.bindings[session]

    def _bind(self, session: str, pod: str, now: float) -> None:
        self.bindings[session] = _Binding(pod, now)
        self.bindings.move_to_end(session)
        while len(self.bindings) > _MAX_SESSIONS:
            self.bindings.popitem(last=False)

    # -- the extension points ---------------------------------------------------------

    def filter(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        if self._encoded:
            pod = self._token_pod(cycle)
        else:
            session = self._session_id(cycle)
            pod = self._bound_pod(session, cycle.now) if session else ""
        if not pod:
            return endpoints
        target = next((ep for ep in endpoints if endpoint_id(ep) == pod), None)
        if not self._encoded:
            cycle.put(self._present, target is not None)
        return endpoints if target is None else [target]

    def _picked(self, result: SchedulingResult) -> Endpoint | None:
        targets = result.targets(self.params.profile_name or result.primary)
        return targets[0] if targets else None

    def track(self, cycle: CycleState, result: SchedulingResult) -> tuple[Release, Release]:
        picked = self._picked(result)
        if picked is None:
            return _noop, _noop
        if self._encoded:
            headers = cycle.get(RESPONSE_HEADERS)
            if headers is None:
                headers = {}
                cycle.put(RESPONSE_HEADERS, headers)
            headers[self._header] = session_token(picked)
            return _noop, _noop
        session = self._session_id(cycle)
        if not session:
            return _noop, _noop
        pod = endpoint_id(picked)
        now = cycle.now
        bound = self._bound_pod(session, now)
        # Rebind only when the bound pod was not a candidate: a session routed elsewhere
        # by a later filter keeps its pod.
        if not bound or bound == pod or cycle.get(self._present) is False:
            self._bind(session, pod, now)
        return _noop, _noop
