"""The work behind scoring: /score (continuations given a chat prompt, under the posterior
predictive), /score/choices (a multiple-choice question's choices from one forward pass per
draw) and OpenAI's legacy echo scoring on /v1/completions (a prompt's own tokens, as
lm-evaluation-harness asks for them). Same admission, limits, timeout and metrics as generation.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, NamedTuple

from ivonserve import choices as mc
from ivonserve.engine import Engine, Scored
from ivonserve.pool import Pool
from ivonserve.protocol import (
    ChoiceScoreRequest,
    ChoiceScoreResponse,
    CompletionRequest,
    CompletionResponse,
    ScoreRequest,
    ScoreResponse,
)
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


@dataclass(frozen=True)
class ChoicePlan:
    """A multiple-choice question rendered as training renders it: the prompt and, per choice,
    the tokens that answer with it (its letter, or its text)."""

    pool: Pool
    form: str
    prompt_ids: list[int]
    answers: list[list[int]]
    n_draws: int


class ChoiceScores(NamedTuple):
    per_draw: list[list[float]]  # draws x choices
    prompt_tokens: int  # tokens one draw's forward passes read (the metric's count)
    seconds: float


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

    def plan_choices(self, req: ChoiceScoreRequest) -> ChoicePlan:
        engine = self.require_engine()
        pool = self.named_pool(engine, req.model)
        tokenizer = engine.tokenizer
        if req.form == "letter":
            prompt_ids = mc.prompt_ids(tokenizer, req.question, req.choices)
            answers = [[t] for t in mc.letter_token_ids(tokenizer, len(req.choices))]
        else:
            prompt_ids = mc.text_prompt_ids(tokenizer, req.question)
            answers = [mc.choice_token_ids(tokenizer, choice) for choice in req.choices]
        self.check_prompt(engine, prompt_ids, "question")
        for answer in answers:
            engine.check_length(prompt_ids + answer, 1)
        return ChoicePlan(pool, req.form, prompt_ids, answers, self.n_draws(req.n_models, pool))

    async def choices(
        self, plan: ChoicePlan, ticket: Ticket, log: dict[str, Any]
    ) -> ChoiceScoreResponse:
        log.update(model=plan.pool.name, n_models=plan.n_draws, n_samples=0)
        run = await self.on_engine(
            ticket, lambda e: self._score_choices(e, plan), "scoring request"
        )
        self._observe(plan.pool.name, run, log)
        per_draw, processed, seconds = run.result
        return responses.choice_score_response(
            plan.pool.name, plan.n_draws, plan.form, per_draw, len(plan.prompt_ids), processed,
            seconds, run.queue_s, time.perf_counter() - run.began,
        )  # fmt: skip

    @staticmethod
    async def _score_choices(engine: Engine, plan: ChoicePlan) -> ChoiceScores:
        """Per draw, per choice, the log-probability of answering with it: one next-token
        request per draw (letters), or each choice's text teacher-forced (text)."""
        if plan.form == "letter":
            letters = [answer[0] for answer in plan.answers]
            scored = await engine.score_next(
                [plan.prompt_ids], [letters], plan.n_draws, plan.pool.name
            )
            return ChoiceScores(scored.logprobs[0], scored.prompt_tokens, scored.seconds)
        start = len(plan.prompt_ids)
        sequences = [plan.prompt_ids + answer for answer in plan.answers]
        scored = await engine.score(sequences, [start] * len(sequences), plan.n_draws,
                                    plan.pool.name)  # fmt: skip
        per_draw = [
            list(row) for row in zip(*[[a.total for a in s] for s in scored.sequences], strict=True)
        ]
        return ChoiceScores(per_draw, scored.prompt_tokens, scored.seconds)

    def _observe(self, pool: str, run: EngineRun, log: dict[str, Any]) -> None:
        m = self.metrics
        m.phase.labels("queue").observe(run.queue_s)
        m.phase.labels("score").observe(run.engine_s)
        m.prompt_tokens.labels(pool).inc(run.result.prompt_tokens)
        log.update(
            prompt_tokens=run.result.prompt_tokens,
            queue_s=round(run.queue_s, 4),
            score_s=round(run.engine_s, 4),
        )

    async def _run(self, plan: ScorePlan, ticket: Ticket, log: dict[str, Any]) -> EngineRun:
        log.update(model=plan.pool.name, n_models=plan.n_draws, n_samples=0)

        def score(engine: Engine) -> Awaitable[Scored]:
            return engine.score(plan.sequences, plan.starts, plan.n_draws, plan.pool.name, plan.top)

        run = await self.on_engine(ticket, score, "scoring request")
        self._observe(plan.pool.name, run, log)
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
