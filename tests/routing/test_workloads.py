"""The routing benchmark's workload generators: seeded, and shaped as documented."""

from __future__ import annotations

import itertools
import random
from collections import defaultdict

import pytest

from benchmarks.routing_workloads import WORKLOADS, arrival_times, generate


@pytest.mark.parametrize("workload", WORKLOADS)
def test_same_seed_same_requests_other_seed_other(workload: str) -> None:
    a = generate(workload, rate=5, duration_s=30, seed=3)
    b = generate(workload, rate=5, duration_s=30, seed=3)
    c = generate(workload, rate=5, duration_s=30, seed=4)
    assert a == b
    assert a != c
    assert all(x.at <= y.at for x, y in itertools.pairwise(a))
    for r in a:
        assert r.prompt_tokens == len(r.prompt.split())
        assert r.max_tokens >= 1


def test_poisson_rate_and_burst_shape() -> None:
    rng = random.Random(1)
    times = arrival_times(20, 200, "poisson", rng)
    assert 3600 < len(times) < 4400
    burst = arrival_times(20, 200, "burst", random.Random(1))
    assert 3600 < len(burst) < 4400  # the same mean rate
    in_burst = sum(1 for t in burst if t % 10 < 2)
    # 2 s of every 10 at 3x the rate: 60% of the arrivals.
    assert 0.52 < in_burst / len(burst) < 0.68
    with pytest.raises(ValueError, match="arrival"):
        arrival_times(1, 1, "steady", rng)


def test_chat_conversations_grow_and_share_system_prompts() -> None:
    reqs = generate("chat", rate=10, duration_s=120, seed=0)
    sessions: dict[str, list[str]] = defaultdict(list)
    for r in reqs:
        sessions[r.session].append(r.prompt)
    multi = [p for p in sessions.values() if len(p) > 1]
    assert len(multi) > len(sessions) / 3
    for prompts in multi:
        for earlier, later in itertools.pairwise(prompts):
            assert later.startswith(earlier)  # the whole last prompt is repeated
            assert len(later) > len(earlier)
    # System prompts: 8 of 1000-2000 tokens, each shared by several conversations.
    heads: dict[str, int] = defaultdict(int)
    for prompts in sessions.values():
        heads[" ".join(prompts[0].split()[:20])] += 1
    assert 2 <= len(heads) <= 8
    assert max(heads.values()) >= 5
    turns = [len(p) for p in sessions.values()]
    assert max(turns) <= 10


def test_docqa_questions_share_documents() -> None:
    reqs = generate("docqa", rate=10, duration_s=60, seed=0)
    docs: dict[str, int] = defaultdict(int)
    for r in reqs:
        assert 4000 < r.prompt_tokens < 8100
        docs[" ".join(r.prompt.split()[5:25])] += 1
    assert len(docs) <= 16
    assert max(docs.values()) > len(reqs) / 10


def test_agentic_sessions_have_a_long_shared_context() -> None:
    reqs = generate("agentic", rate=10, duration_s=60, seed=0)
    assert min(r.prompt_tokens for r in reqs) > 2500
    steps: dict[str, int] = defaultdict(int)
    for r in reqs:
        steps[r.session] += 1
    assert max(steps.values()) >= 6


def test_mix_has_every_kind_and_scale_shrinks_prompts() -> None:
    reqs = generate("mix", rate=10, duration_s=60, seed=0)
    kinds = {r.kind for r in reqs}
    assert kinds == {"chat", "docqa", "agentic"}
    small = generate("docqa", rate=10, duration_s=20, seed=0, scale=0.1)
    assert max(r.prompt_tokens for r in small) < 900
