"""The plugin recipe and the scheduling extension points.

Every plugin: a ``type_name`` constant, a nested pydantic ``Params`` model that rejects
unknown fields, and a constructor ``Plugin(params=None, name=None)`` tests call
directly. A plugin implements one or more extension points by subclassing them:

- ``Filter.filter`` narrows the candidates;
- ``Scorer.score`` rates each candidate (the framework clamps to [0, 1] and weights);
- ``Picker.pick`` ranks the scored candidates and keeps the best few;
- ``ProfileHandler`` decides which profiles run and what the result is;
- ``Decider.approve`` answers one yes/no question for a profile handler;
- ``DataProducer.prepare`` computes per-request data before any profile runs (its
  ``prefetch`` may first await I/O, its ``settle`` may then await I/O on what every
  producer prepared);
- ``RequestTracker.track`` sees the final result and returns release hooks (its
  ``reassign`` moves the decode's share when the gateway reports another endpoint
  served the request; ``first_token`` hears that the response's first token passed);
- ``Discovery.start/stop`` feeds endpoints into the datastore;
- ``ResponseHeaderProcessor.response_headers`` adds headers to the client's response
  once the gateway has routed it, from what the gateway reports (``envoy.lb``);
- ``ResponseBodyProcessor.response_body`` sees each response body message the gateway
  passes (when it sends the response body to the EPP), the last with ``end_of_stream``.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, ConfigDict
from pydantic.alias_generators import to_camel

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from epp.datastore import Datastore, Endpoint
    from epp.scheduling.cycle import CycleState
    from epp.scheduling.profile import Profile
    from epp.scheduling.result import ProfileResult, SchedulingResult

__all__ = [
    "DataProducer",
    "Decider",
    "Discovery",
    "Filter",
    "Picker",
    "Plugin",
    "PluginParams",
    "PluginSet",
    "ProfileHandler",
    "Release",
    "RequestTracker",
    "ResponseBodyProcessor",
    "ResponseHeaderProcessor",
    "ScoredEndpoint",
    "Scorer",
]


class PluginParams(BaseModel):
    """Base of every plugin's ``Params``: camelCase names, unknown fields rejected."""

    model_config = ConfigDict(
        extra="forbid", alias_generator=to_camel, populate_by_name=True, frozen=True
    )


def _noop_observe(_seconds: float) -> None:
    return None


class Plugin:
    """Base of all plugins."""

    type_name: ClassVar[str] = ""
    Params: ClassVar[type[PluginParams]] = PluginParams

    def __init__(self, params: PluginParams | None = None, name: str | None = None) -> None:
        self.params = params if params is not None else self.Params()
        self.name = name or self.type_name
        # Set by the builder to a bound histogram child; a no-op in unit tests.
        self.observe: Callable[[float], None] = _noop_observe

    def bind(self, plugins: PluginSet) -> None:
        """Resolve references to other plugins after all are built; raise ``ValueError``."""
        return None

    def endpoints_changed(self, added: Sequence[Endpoint], removed: Sequence[Endpoint]) -> None:
        """Membership changed; plugins keeping per-endpoint state drop the removed ones."""
        return None

    def register_metrics(self, registry: CollectorRegistry) -> None:
        """Add the plugin's own metric families to the EPP's registry (once, at start)."""
        return None

    async def aclose(self) -> None:
        """Release sockets and sessions the plugin opened; called when the EPP stops."""
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class PluginSet:
    """The instantiated plugins of one configuration, by name."""

    def __init__(self, plugins: Mapping[str, Plugin] | None = None) -> None:
        self.by_name: dict[str, Plugin] = dict(plugins or {})

    def add(self, plugin: Plugin) -> None:
        if plugin.name in self.by_name:
            raise ValueError(f"duplicate plugin name '{plugin.name}'")
        self.by_name[plugin.name] = plugin

    def get(self, name: str) -> Plugin | None:
        return self.by_name.get(name)

    def of_kind(self, kind: type[Any]) -> list[Any]:
        return [p for p in self.by_name.values() if isinstance(p, kind)]

    def __iter__(self) -> Iterator[Plugin]:
        return iter(self.by_name.values())


@dataclass(slots=True)
class ScoredEndpoint:
    endpoint: Endpoint
    score: float


class Filter(Plugin, abc.ABC):
    @abc.abstractmethod
    def filter(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[Endpoint]:
        """The candidates that may serve this request, in any order."""


class Scorer(Plugin, abc.ABC):
    @abc.abstractmethod
    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        """One score per endpoint (same order); meant to be in [0, 1]."""


class Picker(Plugin, abc.ABC):
    @abc.abstractmethod
    def pick(self, cycle: CycleState, scored: Sequence[ScoredEndpoint]) -> list[Endpoint]:
        """The chosen endpoints, best first (non-empty when ``scored`` is)."""


class Decider(Plugin, abc.ABC):
    @abc.abstractmethod
    def approve(self, cycle: CycleState, decode: Endpoint | None) -> bool:
        """Whether the profile handler should run the optional stage it guards."""


class DataProducer(Plugin, abc.ABC):
    async def prefetch(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        """Optional I/O before scheduling (e.g. asking an engine to tokenize); bounded."""
        return None

    @abc.abstractmethod
    def prepare(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        """Compute per-request data (into the cycle state) before profiles run."""

    async def settle(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> None:
        """Optional I/O that needs the other producers' data (every ``prepare`` ran),
        before admission and the profiles; bounded."""
        return None


Release = Callable[[], None]


class RequestTracker(Plugin, abc.ABC):
    @abc.abstractmethod
    def track(self, cycle: CycleState, result: SchedulingResult) -> tuple[Release, Release]:
        """Record the decision; return (release_prefill, release_all) hooks."""

    def reassign(
        self, cycle: CycleState, served: SchedulingResult, release_decode: Release
    ) -> Release:
        """The gateway reports that another endpoint served the request than the decode
        endpoint ``track`` recorded; ``served`` names only that endpoint (the prefill and
        encode stages keep what ``track`` charged them). Move the decode's share and
        return the hook that releases it when the request ends.

        By default: release the pick's share now and track ``served`` anew.
        """
        release_decode()
        release_stages, release_served = self.track(cycle, served)
        release_stages()  # ``served`` holds no prefill or encode stage
        return release_served

    def first_token(self, cycle: CycleState) -> None:
        """The response's first token went through the gateway: the decode endpoint has
        computed the prompt. ``cycle`` is the one ``track`` saw. Default: nothing."""


class ProfileHandler(Plugin, abc.ABC):
    @abc.abstractmethod
    def pick_profiles(
        self,
        cycle: CycleState,
        profiles: Mapping[str, Profile],
        results: Mapping[str, ProfileResult | None],
    ) -> list[str]:
        """Profiles to run next, given results so far; empty when done."""

    @abc.abstractmethod
    def process_results(
        self, cycle: CycleState, results: Mapping[str, ProfileResult | None]
    ) -> SchedulingResult:
        """Turn profile results into the final result; raise ``NoEndpoints`` if none."""

    def check_profiles(self, names: Sequence[str]) -> None:
        """Validate the configured profile names; raise ``ValueError``."""
        return None

    def destination_profile(self, cycle: CycleState, profiles: Mapping[str, Profile]) -> str | None:
        """The profile whose pick will be the request's destination (the primary), known
        before any profile runs; the gateway's subset hint scopes that profile alone.
        None when unknown: the hint then scopes every profile."""
        return None


class ResponseHeaderProcessor(Plugin, abc.ABC):
    @abc.abstractmethod
    def response_headers(
        self, cycle: CycleState, lb_metadata: Mapping[str, Any] | None
    ) -> Mapping[str, str]:
        """Headers to add to the client's response as its headers pass the gateway.
        ``lb_metadata`` is the ``envoy.lb`` metadata the gateway sent with them (None when
        it sent none)."""


class ResponseBodyProcessor(Plugin, abc.ABC):
    @abc.abstractmethod
    def response_body(self, cycle: CycleState, end_of_stream: bool) -> None:
        """One response body message of the request scheduled in ``cycle`` passed the
        gateway; ``end_of_stream`` on the last. Must not block."""


class Discovery(Plugin, abc.ABC):
    @abc.abstractmethod
    async def start(self, datastore: Datastore) -> None:
        """Load the initial endpoints and keep them current until ``stop``."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Cancel background work."""
