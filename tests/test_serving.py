"""The server's work without vLLM: generation's plan and run, the consensus on the wire,
/generate's events and OpenAI's answers, on a fake engine that returns made-up candidates (the
real engine behind them is tests/test_server.py's and tests/test_api.py's; the limits and the
pool alone are tests/test_limits.py's)."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import fake_pool

from ivonserve.config import Settings
from ivonserve.engine import FanOut, Generated, SamplingOptions
from ivonserve.errors import InvalidRequest, UnknownPosterior, api_error
from ivonserve.pool import Pool
from ivonserve.server.generate.protocol import GenerateRequest
from ivonserve.server.generate.serving import GenerationService, generate_response
from ivonserve.server.generate.stream import progress_event, result_event
from ivonserve.server.limits import Admission
from ivonserve.server.metrics import Metrics
from ivonserve.server.openai.protocol import ChatCompletionRequest
from ivonserve.server.openai.serving import ChatStream, chat_response, plan_chat

CONTEXT = 64
VOCAB = 100


class FakeEngine:
    """What the server asks of ``Engine``: pools by name, tokens, and a fan-out whose candidates
    say which adapter made them (draw d's samples answer "d", the mean's "m")."""

    def __init__(self) -> None:
        self.pools = {"tiny": fake_pool("tiny"), "other": fake_pool("other", 2)}
        self.max_model_len = CONTEXT
        self.vocab_size = VOCAB
        self.calls: list[tuple] = []

    def pool(self, name: str | None = None) -> Pool:
        key = name or "tiny"
        if key not in self.pools:
            raise UnknownPosterior(key, self.pools)
        return self.pools[key]

    def render(self, prompt=None, messages=None) -> list[int]:
        text = prompt if prompt is not None else " ".join(m["content"] for m in messages)
        return self.encode(text)

    def encode(self, text: str) -> list[int]:
        return [len(word) % VOCAB for word in text.split()]

    async def fan_out(self, prompt, n_draws, n_samples, sampling, pool, on_draw, stopper):
        self.calls.append((tuple(prompt), n_draws, n_samples, sampling, pool))
        adapters = pool.adapters(n_draws)  # the very pool the plan resolved
        candidates = []
        for draw, _ in adapters:
            said = "m" if draw is None else str(draw % 2)  # draws 0, 2 say 0; 1, 3 say 1
            cands = [
                Generated(draw, s, f"The answer is {said}", -1.0 - s, 3, (1, 2, 3), "stop")
                for s in range(n_samples)
            ]
            if on_draw is not None:
                on_draw(cands)
            candidates += cands
        return FanOut(candidates, len(prompt), 3 * len(candidates), ["r"], sampling.seed or 5, 0.1)


def service(**settings) -> tuple[GenerationService, FakeEngine]:
    engine = FakeEngine()
    values = {"default_n_models": 2, "default_n_samples": 2, "max_candidates": 8,
              "max_tokens_limit": 32, "default_max_tokens": 8, "max_prompt_tokens": 16,
              "default_selection": "majority", "default_utility": "answer", **settings}  # fmt: skip
    made = GenerationService(Settings.build(**values), lambda: engine, Admission(2, 0), Metrics())
    return made, engine


# --- generation: plan, run, the consensus on the wire --------------------------------------------
def test_the_plan_holds_what_it_resolved_and_the_engine_gets_the_pool_itself():
    gen, engine = service()
    plan = gen.plan_generate(GenerateRequest(prompt="two words", model="other", n_models=2))
    assert plan.pool is engine.pools["other"]
    assert (plan.n_draws, plan.n_samples, plan.method, plan.utility) == (2, 2, "majority", "answer")
    assert plan.sampling.max_tokens == 8 and plan.prompt_ids == engine.encode("two words")
    default = gen.plan_generate(GenerateRequest(prompt="x"))
    assert default.pool is engine.pools["tiny"] and default.n_draws == 2
    outcome = asyncio.run(_run(gen, plan))
    ((prompt_ids, n_draws, n_samples, sampling, pool),) = engine.calls
    assert pool is plan.pool and (n_draws, n_samples) == (2, 2)  # no name looked up again
    assert list(prompt_ids) == plan.prompt_ids
    assert isinstance(sampling, SamplingOptions) and outcome.chosen.answer in {"0", "1"}
    with pytest.raises(UnknownPosterior) as unknown:
        gen.plan_generate(GenerateRequest(prompt="x", model="nope"))
    assert api_error(unknown.value).status == 404
    for body, field in [({"n_models": 3, "model": "other"}, "n_models"),
                        ({"n_models": 4, "n_samples": 3}, "n_samples"),
                        ({"max_tokens": 33}, "max_tokens"),
                        ({"stop_token_ids": [VOCAB]}, "stop_token_ids"),
                        ({"early_stop_threshold": 0.9}, "early_stop_threshold")]:  # fmt: skip
        with pytest.raises(InvalidRequest) as err:
            gen.plan_generate(GenerateRequest(prompt="x", **body))
        assert err.value.field == field


async def _run(gen: GenerationService, plan, on_draw=None):
    ticket = gen.admit()
    try:
        return await gen.run(plan, ticket, {}, on_draw)
    finally:
        ticket.release()


def test_the_wire_says_draw_and_keeps_model_as_its_alias():
    gen, _ = service()
    plan = gen.plan_generate(
        GenerateRequest(prompt="q", n_models=3, n_samples=2, return_candidates=True, seed=9)
    )
    seen: list[list[Generated]] = []
    outcome = asyncio.run(_run(gen, plan, seen.append))
    answer = generate_response(outcome).model_dump()
    winner = outcome.winner
    assert answer["chosen_draw"] == answer["chosen_model"] == winner.draw
    assert answer["answer"] == "0" and answer["selection"] == "majority"  # 4 of 6 say 0
    assert (answer["n_models"], answer["n_samples"], answer["seed"]) == (3, 2, 9)
    cands = answer["candidates"]
    assert [(c["draw"], c["sample"]) for c in cands] == [(d, s) for d in range(3) for s in range(2)]
    assert all(c["model"] == c["draw"] for c in cands)
    # /generate's stream: a draw's candidates as it finishes, then the same result
    assert len(seen) == 3
    event = progress_event(seen[1])
    assert event["type"] == "candidates"
    assert [(c["draw"], c["model"], c["answer"]) for c in event["candidates"]] == [
        (1, 1, "1"), (1, 1, "1")
    ]  # fmt: skip
    (result,) = result_event(outcome)
    assert result["result"]["chosen_draw"] == winner.draw
    # the mean alone: draw null
    mean = asyncio.run(_run(gen, gen.plan_generate(GenerateRequest(prompt="q", n_models=0))))
    shaped = generate_response(mean)
    assert shaped.chosen_draw is None and shaped.chosen_model is None and shaped.text.endswith("m")


def test_openais_answers_carry_the_same_consensus():
    gen, _ = service()
    request = ChatCompletionRequest(
        messages=[{"role": "user", "content": "hi there"}], n_models=2, n_samples=1
    )
    plan = plan_chat(gen, request)
    outcome = asyncio.run(_run(gen, plan))
    answer = chat_response(outcome)
    assert answer.choices[0].message.content == outcome.chosen.text
    assert answer.ivonserve.chosen_draw == answer.ivonserve.chosen_model == outcome.winner.draw
    chunks = ChatStream(plan, include_usage=True).closing(outcome)
    assert [c.choices[0].delta.content if c.choices else None for c in chunks] == [
        outcome.chosen.text, None, None
    ]  # fmt: skip
    assert chunks[1].ivonserve.chosen_draw == outcome.winner.draw and chunks[2].usage
    assert json.loads(chunks[1].model_dump_json())["ivonserve"]["selection"] == "majority"
