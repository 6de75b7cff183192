"""llm-d's data-parallel and header profile handlers, and the disagg handler's
``stageOrder``, as their READMEs describe them; the DP handler and unclaimed paths also
end to end through ``Director.decide``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
from pydantic import ValidationError

from epp.config import ConfigError, load_config
from epp.datastore import Endpoint
from epp.decision import BadRequest, NoEndpoints
from epp.plugins.base import PluginSet, Scorer
from epp.plugins.dp_profile_handler import DATA_PARALLEL_HEADER, DataParallelProfileHandler
from epp.plugins.filters import DecodeFilter, EncodeFilter, PrefillFilter
from epp.plugins.header_profile_handler import HeaderProfileHandler, profile_for
from epp.plugins.pickers import MaxScorePicker
from epp.plugins.profile_handlers import DisaggProfileHandler
from epp.request import passthrough_request
from epp.scheduling.cycle import PEER_ENDPOINT, REQUEST_HEADERS, CycleState
from epp.scheduling.profile import Profile, WeightedScorer
from epp.scheduling.scheduler import Scheduler

from .fixtures import PD_PLUGINS, PD_PROFILES, MakePool, pd_config
from .helpers import STALENESS_S, chat_body, cycle, endpoint

LLMD = next(
    (
        root / "llm-d" / "configs"
        for root in (Path(__file__).resolve().parents[2] / ".." / "shared", Path("/work/shared"))
        if (root / "llm-d").is_dir()
    ),
    Path("/nonexistent"),
)
needs_llmd = pytest.mark.skipif(not LLMD.is_dir(), reason="llm-d's shipped configs are absent")
EPS = [endpoint("d", 1, "decode"), endpoint("p", 2, "prefill"), endpoint("e", 3, "encode")]
MM = chat_body("x", extra_parts=[{"type": "image_url", "image_url": {"url": "u"}}])


def _profiles(*roles: str) -> dict[str, Profile]:
    filters = {"decode": DecodeFilter(), "prefill": PrefillFilter(), "encode": EncodeFilter()}
    return {r: Profile(r, (filters[r],), (), MaxScorePicker()) for r in roles}


# -- data-parallel-profile-handler ----------------------------------------------------


def test_dp_handler_routes_to_primary_port_and_names_the_rank() -> None:
    handler = DataParallelProfileHandler(
        DataParallelProfileHandler.Params.model_validate({"primaryPort": 9000})
    )
    handler.check_profiles(["default"])
    ranks = [endpoint("r0", 8000, "decode", waiting=5), endpoint("r1", 8001, "decode")]
    profile = Profile(
        "default", (DecodeFilter(),), (WeightedScorer(_Waiting(), 1.0),), MaxScorePicker()
    )
    sched = Scheduler(handler=handler, profiles={"default": profile})
    c = cycle("x")
    result = sched.schedule(c, ranks)
    assert result.targets("default")[0].name == "r1"  # the least loaded rank
    assert result.destination_port == 9000
    assert c.get(REQUEST_HEADERS) == {DATA_PARALLEL_HEADER: "10.0.0.1:8001"}


class _Waiting(Scorer):
    type_name = "waiting-test-scorer"

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        return [1.0 / (1.0 + cycle.signals(ep).waiting) for ep in endpoints]


def test_dp_handler_needs_one_profile_and_a_valid_port() -> None:
    assert DataParallelProfileHandler().params.primary_port == 8000
    with pytest.raises(ValueError, match="exactly one"):
        DataParallelProfileHandler().check_profiles(["a", "b"])
    for bad in (0, 65536, "x"):
        with pytest.raises(ValidationError):
            DataParallelProfileHandler.Params.model_validate({"primaryPort": bad})
    with pytest.raises(ValidationError):
        DataParallelProfileHandler.Params.model_validate({"port": 1})


def test_dp_handler_no_endpoint_is_no_endpoints() -> None:
    handler = DataParallelProfileHandler()
    sched = Scheduler(handler=handler, profiles=_profiles("decode"))
    with pytest.raises(NoEndpoints):
        sched.schedule(cycle("x"), [endpoint("p", 1, "prefill")])


@needs_llmd
@pytest.mark.parametrize("project", ["llm-d-router", "llm-d-inference-scheduler"])
def test_shipped_dp_config_loads(project: str) -> None:
    config = load_config(config_file=str(LLMD / project / "dp-epp-config.yaml"))
    handler = config.scheduler.handler
    assert isinstance(handler, DataParallelProfileHandler)
    assert handler.params.primary_port == 8000


@needs_llmd
async def test_dp_config_routes_through_the_director(make_pool: MakePool, tmp_path: Path) -> None:
    text = (LLMD / "llm-d-router" / "dp-epp-config.yaml").read_text()
    disc = (
        "- type: file-discovery\n"
        f"  parameters: {{path: '{tmp_path / 'endpoints.yaml'}', watchFile: true, "
        "watchIntervalSeconds: 0.02}\n"
    )
    text = text.replace("plugins:\n", f"plugins:\n{disc}", 1).replace("8000", "18000")
    pool = await make_pool({"r0": "decode", "r1": "decode"}, config=text)
    decision = await pool.director.decide("/v1/chat/completions", {}, chat_body("hello"), None)
    picked = decision.headers[DATA_PARALLEL_HEADER]
    assert picked in (pool.keys["r0"], pool.keys["r1"])
    assert decision.decode == "127.0.0.1:18000"
    assert decision.decision_type == "decode-only"
    decision.on_finished()


# -- header-profile-handler -----------------------------------------------------------


def test_profile_for_follows_the_readme() -> None:
    three = ["encode", "prefill", "decode"]
    assert profile_for(["only"], "whatever", "decode") == "only"
    assert profile_for(["only"], None, "decode") == "only"
    assert profile_for(three, "prefill", "decode") == "prefill"
    assert profile_for(three, None, "decode") == "decode"
    assert profile_for(three, "  ", "decode") == "decode"
    assert profile_for(three, "Prefill", "decode") is None  # matched verbatim
    assert profile_for(three, "other", "decode") is None
    assert profile_for(three, None, "missing") is None


def _header_sched(params: dict[str, str] | None = None) -> Scheduler:
    handler = HeaderProfileHandler(HeaderProfileHandler.Params.model_validate(params or {}))
    return Scheduler(handler=handler, profiles=_profiles("encode", "prefill", "decode"))


def test_header_handler_runs_the_named_profile_alone() -> None:
    sched = _header_sched()
    result = sched.schedule(cycle("x", headers={"epp-profile": "prefill"}), EPS)
    assert result.primary == "prefill" and list(result.results) == ["prefill"]
    assert result.targets("prefill")[0].name == "p"
    result = sched.schedule(cycle("x"), EPS)
    assert result.primary == "decode" and result.targets("decode")[0].name == "d"


def test_header_handler_custom_header_and_default() -> None:
    sched = _header_sched({"headerName": "X-Stage", "defaultProfile": "encode"})
    assert sched.schedule(cycle("x", headers={"x-stage": "decode"}), EPS).primary == "decode"
    assert sched.schedule(cycle("x"), EPS).primary == "encode"
    # The bodyless GET /models case: no header, the default profile.
    c = CycleState(passthrough_request("/v1/models", {}), 0.0, STALENESS_S)
    assert sched.schedule(c, EPS).primary == "encode"


def test_header_handler_unknown_profile_is_refused() -> None:
    with pytest.raises(BadRequest, match="'other' names no scheduling profile"):
        _header_sched().schedule(cycle("x", headers={"epp-profile": "other"}), EPS)
    with pytest.raises(NoEndpoints, match="no EPP-Profile header"):
        _header_sched({"defaultProfile": "nope"}).schedule(cycle("x"), EPS)


def test_header_handler_with_one_profile_ignores_the_header() -> None:
    handler = HeaderProfileHandler()
    sched = Scheduler(handler=handler, profiles=_profiles("prefill"))
    result = sched.schedule(cycle("x", headers={"epp-profile": "decode"}), EPS)
    assert result.primary == "prefill"


def test_header_handler_config_loads_with_three_profiles() -> None:
    text = """\
apiVersion: llm-d.ai/v1alpha1
kind: EndpointPickerConfig
plugins:
- type: encode-filter
- type: prefill-filter
- type: decode-filter
- type: header-profile-handler
  parameters: {defaultProfile: prefill}
schedulingProfiles:
- name: encode
  plugins: [{pluginRef: encode-filter}]
- name: prefill
  plugins: [{pluginRef: prefill-filter}]
- name: decode
  plugins: [{pluginRef: decode-filter}]
"""
    handler = load_config(text).scheduler.handler
    assert isinstance(handler, HeaderProfileHandler)
    with pytest.raises(ConfigError, match="defaultProfil"):
        load_config(text.replace("defaultProfile: prefill", "defaultProfil: prefill"))


# -- disagg-profile-handler stageOrder ------------------------------------------------


class _PeerRecorder(Scorer):
    type_name = "peer-recorder-test-scorer"

    def __init__(self) -> None:
        super().__init__()
        self.peers: list[str | None] = []

    def score(self, cycle: CycleState, endpoints: Sequence[Endpoint]) -> Sequence[float]:
        peer = cycle.get(PEER_ENDPOINT)
        self.peers.append(None if peer is None else peer.name)
        return [0.0 for _ in endpoints]


def _disagg(
    params: dict[str, object], plugins: PluginSet | None = None
) -> tuple[Scheduler, _PeerRecorder]:
    handler = DisaggProfileHandler(DisaggProfileHandler.Params.model_validate(params))
    handler.bind(plugins or PluginSet())
    recorder = _PeerRecorder()
    profiles = _profiles("decode", "prefill", "encode")
    decode = profiles["decode"]
    profiles["decode"] = Profile(
        "decode", decode.filters, (WeightedScorer(recorder, 1.0),), MaxScorePicker()
    )
    handler.check_profiles(list(profiles))
    return Scheduler(handler=handler, profiles=profiles), recorder


def test_prefill_first_runs_prefill_then_decode_with_the_prefill_pick() -> None:
    sched, recorder = _disagg({"stageOrder": "prefill-first"})
    c = cycle("hi")
    result = sched.schedule(c, EPS)
    assert list(result.results) == ["prefill", "decode"]
    assert result.primary == "decode" and result.prefill_profile == "prefill"
    assert recorder.peers == ["p"]


def test_prefill_first_consults_the_encode_decider_without_a_decode_pick() -> None:
    sched, _ = _disagg({"stageOrder": "prefill-first"})
    result = sched.schedule(cycle(body=MM), EPS)
    assert list(result.results) == ["prefill", "encode", "decode"]
    assert result.encode_profile == "encode"


def test_decode_first_is_the_default_order() -> None:
    sched, recorder = _disagg({})
    assert DisaggProfileHandler().params.stage_order == "decode-first"
    result = sched.schedule(cycle("hi"), EPS)
    assert next(iter(result.results)) == "decode"
    assert recorder.peers == [None]


def test_prefill_first_rejects_a_prefill_decider_and_unknown_orders() -> None:
    handler = DisaggProfileHandler(
        DisaggProfileHandler.Params.model_validate(
            {"stageOrder": "prefill-first", "deciders": {"prefill": "x"}}
        )
    )
    with pytest.raises(ValueError, match="prefill-first"):
        handler.bind(PluginSet())
    with pytest.raises(ValidationError):
        DisaggProfileHandler.Params.model_validate({"stageOrder": "encode-first"})


@pytest.mark.parametrize("order", [{}, {"stageOrder": "prefill-first"}])
def test_requests_that_generate_nothing_run_decode_alone(order: dict[str, object]) -> None:
    sched, _ = _disagg(order)
    c = CycleState(passthrough_request("/tokenize", {}), 0.0, STALENESS_S)
    result = sched.schedule(c, EPS)
    assert list(result.results) == ["decode"] and result.prefill_profile is None


# -- unclaimed paths through the Director ----------------------------------------------

ALWAYS_PD = PD_PLUGINS.replace(
    "- type: prefix-based-pd-decider\n  parameters: {nonCachedTokens: 64}\n",
    "- type: always-disagg-pd-decider\n",
).replace("prefill: prefix-based-pd-decider", "prefill: always-disagg-pd-decider")


async def test_unclaimed_paths_reach_a_decode_pod_without_stages(
    make_pool: MakePool, tmp_path: Path
) -> None:
    config = pd_config(tmp_path / "endpoints.yaml", ALWAYS_PD, PD_PROFILES)
    pool = await make_pool({"d1": "decode", "p1": "prefill"}, config=config)
    director = pool.director
    chat = await director.decide("/v1/chat/completions", {}, chat_body("hi"), None)
    assert chat.decision_type == "prefill-decode"  # the config does split generation
    chat.on_finished()
    for path, body, bodyless in (
        ("/v1/models", b"", True),
        ("/health", b"", True),
        ("/tokenize", b'{"prompt": "hi"}', False),
        ("/v1/embeddings", b'{"model": "m", "input": "hi"}', False),
    ):
        decision = await director.decide(path, {}, body, None, headers_only=bodyless)
        assert decision.decode == pool.keys["d1"], path
        assert decision.decision_type == "decode-only", path
        assert decision.prefill is None, path
        decision.on_finished()
    parsed = {
        parser: pool.metrics.registry.get_sample_value(
            "llm_d_epp_plugin_duration_seconds_count",
            {"extension_point": "RequestParsing", "plugin_type": parser, "plugin_name": parser},
        )
        for parser in ("openai-parser", "passthrough-parser")
    }
    # chat and embeddings by openai-parser; /tokenize alone by passthrough (GETs unparsed).
    assert parsed == {"openai-parser": 2, "passthrough-parser": 1}


async def test_only_openai_parser_refuses_unclaimed_paths(
    make_pool: MakePool, tmp_path: Path
) -> None:
    config = pd_config(tmp_path / "endpoints.yaml") + (
        "requestHandler:\n  parsers:\n  - pluginRef: openai-parser\n"
    )
    pool = await make_pool({"d1": "decode"}, config=config)
    with pytest.raises(
        BadRequest, match="no parser registered matching path suffix for: /tokenize"
    ):
        await pool.director.decide("/tokenize", {}, b'{"prompt": "x"}', None)
    # A bodyless GET is never parsed, as in llm-d.
    decision = await pool.director.decide("/v1/models", {}, b"", None, headers_only=True)
    assert decision.decode == pool.keys["d1"]
    decision.on_finished()
