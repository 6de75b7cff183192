"""Seeded request streams for the routing benchmark.

Every generator returns the same list of ``Request`` for the same arguments. Prompts are
made of words the simulator counts as one token each, so a request's ``prompt_tokens`` is
exact. The shapes (defaults; all scale with the arguments):

- ``chat``: multi-turn conversations. Eight system prompts of 1000-2000 tokens, chosen
  with Zipf popularity, are shared by many conversations. A conversation has 2-10 turns
  (geometric, mean about 5); each turn adds the previous answer (100-300 tokens) and a
  new user message (30-200 tokens), so its prompt grows and repeats the last one's.
  Turns of one conversation are at least ``think_s`` apart.
- ``docqa``: long-document Q&A. Sixteen documents of 4000-8000 tokens with Zipf
  popularity; each request is an instruction, one document and a 20-60 token question,
  so several questions hit the same document.
- ``agentic``: agent sessions. Four agent kinds, each with 2500-4000 tokens of
  instructions and tool definitions shared by all its sessions; a session runs 6-16
  steps, each appending a tool result (100-600 tokens); steps are ``step_s`` apart.
- ``mix``: the three together (chat 50%, docqa 25%, agentic 25% of requests).

Arrivals are open loop: ``poisson`` at ``rate`` requests/s, or ``burst``: each 10 s
period starts with 2 s at three times the rate, the rest at half the rate (the same mean).
A session's next turn is taken by the first arrival after it is ready, so the arrival
process is exactly the one asked for.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = [
    "ARRIVALS",
    "WORKLOADS",
    "Request",
    "arrival_times",
    "generate",
    "mean_prompt_tokens",
]

ARRIVALS = ("poisson", "burst")
_BURST_PERIOD_S = 10.0
_BURST_S = 2.0
_BURST_FACTOR = 3.0
_QUIET_FACTOR = (1.0 - _BURST_FACTOR * _BURST_S / _BURST_PERIOD_S) / (
    1 - _BURST_S / _BURST_PERIOD_S
)


@dataclass(frozen=True)
class Request:
    at: float  # seconds from the start of the run
    kind: str  # chat | docqa | agentic
    session: str
    turn: int
    prompt: str
    prompt_tokens: int
    max_tokens: int


def _words(rng: random.Random, n: int, tag: str) -> list[str]:
    # Short lowercase words: one simulator token each; the tag keeps texts apart.
    return [f"{tag}{rng.randrange(36**3):x}" for _ in range(n)]


def arrival_times(rate: float, duration_s: float, arrival: str, rng: random.Random) -> list[float]:
    """Open-loop arrival instants in [0, duration_s)."""
    if rate <= 0:
        raise ValueError("rate must be positive")
    if arrival not in ARRIVALS:
        raise ValueError(f"unknown arrival process {arrival!r} (known: {', '.join(ARRIVALS)})")
    times: list[float] = []
    t = 0.0
    while True:
        if arrival == "poisson":
            t += rng.expovariate(rate)
        else:
            # Thinning against the peak rate: exact for a piecewise-constant rate.
            peak = rate * _BURST_FACTOR
            t += rng.expovariate(peak)
            in_burst = (t % _BURST_PERIOD_S) < _BURST_S
            local = rate * (_BURST_FACTOR if in_burst else _QUIET_FACTOR)
            if rng.random() > local / peak:
                if t >= duration_s:
                    break
                continue
        if t >= duration_s:
            break
        times.append(t)
    return times


def _zipf_index(rng: random.Random, n: int, s: float = 1.1) -> int:
    weights = [1.0 / (k + 1) ** s for k in range(n)]
    return rng.choices(range(n), weights=weights)[0]


@dataclass
class _Session:
    name: str
    kind: str
    context: list[str]
    turns_left: int
    ready_at: float = 0.0
    turn: int = 0
    extra: dict[str, int] = field(default_factory=dict)


class _Builder:
    """Turns arrivals into requests: continue a ready session, or start a new one."""

    def __init__(self, rng: random.Random, scale: float) -> None:
        self.rng = rng
        self.scale = scale
        self.active: list[_Session] = []
        self.count = 0
        sys_n = 8
        self.system_prompts = [_words(rng, self._n(1000, 2000), f"s{i}") for i in range(sys_n)]
        self.documents = [_words(rng, self._n(4000, 8000), f"d{i}") for i in range(16)]
        self.agent_contexts = [_words(rng, self._n(2500, 4000), f"a{i}") for i in range(4)]

    def _n(self, lo: int, hi: int) -> int:
        return max(1, int(self.rng.randint(lo, hi) * self.scale))

    def _name(self, kind: str) -> str:
        self.count += 1
        return f"{kind}-{self.count}"

    def take_ready(self, kind: str, t: float, p_continue: float) -> _Session | None:
        ready = [s for s in self.active if s.kind == kind and s.ready_at <= t]
        if ready and self.rng.random() < p_continue:
            return self.rng.choice(ready)
        return None

    def finish_turn(self, session: _Session, t: float, gap_s: float) -> None:
        session.turn += 1
        session.turns_left -= 1
        session.ready_at = t + gap_s * (0.5 + self.rng.random())
        if session.turns_left <= 0 and session in self.active:
            self.active.remove(session)

    def chat(self, t: float, think_s: float) -> Request:
        rng = self.rng
        session = self.take_ready("chat", t, 0.75)
        if session is None:
            turns = min(10, max(2, math.ceil(math.log(1 - rng.random()) / math.log(0.8))))
            system = self.system_prompts[_zipf_index(rng, len(self.system_prompts))]
            session = _Session(self._name("chat"), "chat", ["system:", *system], turns)
            self.active.append(session)
        elif session.turn > 0:
            session.context += ["assistant:", *_words(rng, self._n(100, 300), "r")]
        session.context += ["user:", *_words(rng, self._n(30, 200), "u")]
        request = self._request(t, session, self.rng.randint(64, 160))
        self.finish_turn(session, t, think_s)
        return request

    def docqa(self, t: float) -> Request:
        rng = self.rng
        doc = _zipf_index(rng, len(self.documents))
        context = ["read", "the", "document", "and", "answer:", *self.documents[doc], "question:"]
        context += _words(rng, self._n(20, 60), "q")
        session = _Session(self._name("docqa"), "docqa", context, 1)
        return self._request(t, session, self.rng.randint(32, 128))

    def agentic(self, t: float, step_s: float) -> Request:
        rng = self.rng
        session = self.take_ready("agentic", t, 0.85)
        if session is None:
            kind = _zipf_index(rng, len(self.agent_contexts))
            task = _words(rng, self._n(50, 150), "k")
            steps = rng.randint(6, 16)
            context = ["agent:", *self.agent_contexts[kind], "task:", *task]
            session = _Session(self._name("agent"), "agentic", context, steps)
            self.active.append(session)
        else:
            session.context += ["tool:", *_words(rng, self._n(100, 600), "o")]
        request = self._request(t, session, self.rng.randint(24, 96))
        self.finish_turn(session, t, step_s)
        return request

    def _request(self, t: float, session: _Session, max_tokens: int) -> Request:
        return Request(
            at=round(t, 6),
            kind=session.kind,
            session=session.name,
            turn=session.turn,
            prompt=" ".join(session.context),
            prompt_tokens=len(session.context),
            max_tokens=max_tokens,
        )


WORKLOADS = ("chat", "docqa", "agentic", "mix")


def generate(
    workload: str,
    *,
    rate: float,
    duration_s: float,
    seed: int = 0,
    arrival: str = "poisson",
    scale: float = 1.0,
    think_s: float = 4.0,
    step_s: float = 1.0,
) -> list[Request]:
    """The requests of one run, in arrival order. ``scale`` multiplies every prompt length."""
    if workload not in WORKLOADS:
        raise ValueError(f"unknown workload {workload!r} (known: {', '.join(WORKLOADS)})")
    rng = random.Random(seed)
    builder = _Builder(random.Random(seed + 1), scale)
    pick: Callable[[float], Request]
    if workload == "chat":
        pick = lambda t: builder.chat(t, think_s)  # noqa: E731
    elif workload == "docqa":
        pick = builder.docqa
    elif workload == "agentic":
        pick = lambda t: builder.agentic(t, step_s)  # noqa: E731
    else:
        choose = random.Random(seed + 2)

        def pick(t: float) -> Request:
            u = choose.random()
            if u < 0.5:
                return builder.chat(t, think_s)
            if u < 0.75:
                return builder.docqa(t)
            return builder.agentic(t, step_s)

    return [pick(t) for t in arrival_times(rate, duration_s, arrival, rng)]


def mean_prompt_tokens(workload: str, *, seed: int = 0, scale: float = 1.0) -> float:
    """The mean prompt length of a workload (from a long sample at a moderate rate)."""
    sample = generate(workload, rate=10.0, duration_s=100.0, seed=seed + 7919, scale=scale)
    return sum(r.prompt_tokens for r in sample) / len(sample)
