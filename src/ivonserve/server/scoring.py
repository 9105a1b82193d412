"""The work behind scoring: /score (continuations given a chat prompt, under the posterior
predictive) and OpenAI's legacy echo scoring on /v1/completions (a prompt's own tokens, as
lm-evaluation-harness asks for them). Same admission, limits, timeout and metrics as generation.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any

from ivonserve.engine import Engine, Scored
from ivonserve.pool import Pool
from ivonserve.protocol import CompletionRequest, CompletionResponse, ScoreRequest, ScoreResponse
from ivonserve.server import responses
from ivonserve.server.errors import ApiError
from ivonserve.server.limits import Ticket
from ivonserve.server.serving import EngineRun, Service, render, template_messages, tokens_of


@dataclass(frozen=True)
class ScorePlan:
    """Sequences to score from ``starts`` on, under n_draws draws (0: the mean) of ``pool``."""

    pool: Pool
    sequences: list[list[int]]
    starts: list[int]
    n_draws: int
    top: int = 0  # echo: the likeliest alternatives per token
    return_tokens: bool = False  # /score: per-token ids and log-probabilities
    next_token: bool = False  # echo with max_tokens 1: the greedy token after the prompt


class ScoringService(Service):
    def _checked(self, engine: Engine, plan: ScorePlan, field: str) -> ScorePlan:
        if len(plan.sequences) > self.settings.max_continuations:
            raise ApiError(
                422,
                f"{field}: {len(plan.sequences)} texts to score exceed max_continuations "
                f"{self.settings.max_continuations}",
                field,
            )
        for sequence in plan.sequences:
            self.check_prompt(engine, sequence, field)
            engine.check_length(sequence, 1)
        return plan

    def plan_score(self, req: ScoreRequest) -> ScorePlan:
        engine = self.require_engine()
        pool = self.named_pool(engine, req.model)
        messages = template_messages(req.messages) if req.messages else None
        prompt_ids = render(engine, req.prompt, messages)
        continuations = [engine.encode(text) for text in req.continuations]
        if any(not ids for ids in continuations):
            raise ApiError(
                422, "continuations: a continuation encodes to no token", "continuations"
            )
        plan = ScorePlan(
            pool=pool,
            sequences=[prompt_ids + ids for ids in continuations],
            starts=[len(prompt_ids)] * len(continuations),
            n_draws=self.n_draws(req.n_models, pool),
            return_tokens=req.return_tokens,
        )
        return self._checked(engine, plan, "continuations")

    def plan_echo(self, req: CompletionRequest) -> ScorePlan:
        """Legacy echo scoring: the mean adapter unless the request names n_models."""
        engine = self.require_engine()
        pool = self.named_pool(engine, req.model)
        sequences = [tokens_of(engine, prompt) for prompt in req.prompts]
        plan = ScorePlan(
            pool=pool,
            sequences=sequences,
            starts=[1] * len(sequences),  # nothing predicts the first token
            n_draws=0 if req.n_models is None else self.n_draws(req.n_models, pool),
            top=req.logprobs or 0,
            next_token=req.max_tokens == 1,
        )
        return self._checked(engine, plan, "prompt")

    async def _run(self, plan: ScorePlan, ticket: Ticket, log: dict[str, Any]) -> EngineRun:
        log.update(model=plan.pool.name, n_models=plan.n_draws, n_samples=0)

        def score(engine: Engine) -> Awaitable[Scored]:
            return engine.score(plan.sequences, plan.starts, plan.n_draws, plan.pool.name, plan.top)

        run = await self.on_engine(ticket, score, "scoring request")
        m = self.metrics
        m.phase.labels("queue").observe(run.queue_s)
        m.phase.labels("score").observe(run.engine_s)
        m.prompt_tokens.labels(plan.pool.name).inc(run.result.prompt_tokens)
        log.update(
            prompt_tokens=run.result.prompt_tokens,
            queue_s=round(run.queue_s, 4),
            score_s=round(run.engine_s, 4),
        )
        return run

    async def score(self, plan: ScorePlan, ticket: Ticket, log: dict[str, Any]) -> ScoreResponse:
        run = await self._run(plan, ticket, log)
        return responses.score_response(
            plan.pool.name,
            plan.n_draws,
            plan.starts[0],
            run.result,
            [s[start:] for s, start in zip(plan.sequences, plan.starts, strict=True)],
            plan.return_tokens,
            run.queue_s,
            time.perf_counter() - run.began,
        )

    async def echo(
        self, plan: ScorePlan, ticket: Ticket, log: dict[str, Any]
    ) -> CompletionResponse:
        run = await self._run(plan, ticket, log)
        scored: Scored = run.result
        decode = self.require_engine().tokenizer.decode
        choices = [
            responses.echo_choice(i, sequence, adapters, plan.next_token, plan.top, decode)
            for i, (sequence, adapters) in enumerate(
                zip(plan.sequences, scored.sequences, strict=True)
            )
        ]
        completion = len(choices) if plan.next_token else 0
        return responses.echo_response(plan.pool.name, choices, scored.prompt_tokens, completion)
