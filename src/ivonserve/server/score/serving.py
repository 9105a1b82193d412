"""Scoring and its Bayesian averaging: /score (continuations given a chat prompt, under the
posterior predictive: ``predictive``) and /score/choices (a multiple-choice question's choices
from one forward pass per draw, averaged over the draws: ``calibration``). The same admission,
limits, timeout and metrics as generation. OpenAI's echo scoring (``openai/echo``) runs through
``ScoringService.run`` and averages with ``token_predictive`` and ``predictive_top``: every
average over the draws is made here.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from ivonserve import calibration, predictive
from ivonserve import choices as mc
from ivonserve.engine import Engine, Scored, TokenScores
from ivonserve.errors import InvalidRequest
from ivonserve.pool import Pool
from ivonserve.server.limits import Ticket
from ivonserve.server.score.protocol import (
    ChoiceScoreRequest,
    ChoiceScoreResponse,
    ContinuationScore,
    ScoreRequest,
    ScoreResponse,
    ScoreTiming,
)
from ivonserve.server.serving import EngineRun, Service, render, template_messages, usage


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
    def plan_score(self, req: ScoreRequest) -> ScorePlan:
        engine = self.require_engine()
        pool = engine.pool(req.model)
        messages = template_messages(req.messages) if req.messages else None
        prompt_ids = render(engine, req.prompt, messages)
        continuations = [engine.encode(text) for text in req.continuations]
        if any(not ids for ids in continuations):
            raise InvalidRequest("continuations", "a continuation encodes to no token")
        plan = ScorePlan(
            pool=pool,
            sequences=[prompt_ids + ids for ids in continuations],
            starts=[len(prompt_ids)] * len(continuations),
            n_draws=self.limits.n_draws(req.n_models, pool),
            return_tokens=req.return_tokens,
        )
        self.limits.scored(plan.sequences, "continuations", engine.max_model_len)
        return plan

    def plan_choices(self, req: ChoiceScoreRequest) -> ChoicePlan:
        engine = self.require_engine()
        pool = engine.pool(req.model)
        tokenizer = engine.tokenizer
        form = req.form or served_form(pool)
        if form == "letter":
            prompt_ids = mc.prompt_ids(tokenizer, req.question, req.choices)
            answers = [[t] for t in mc.letter_token_ids(tokenizer, len(req.choices))]
        else:
            prompt_ids = mc.text_prompt_ids(tokenizer, req.question)
            answers = [mc.choice_token_ids(tokenizer, choice) for choice in req.choices]
        self.limits.prompt(prompt_ids, "question", engine.max_model_len)
        for answer in answers:
            self.limits.context(prompt_ids + answer, 1, engine.max_model_len)
        n_draws = self.limits.n_draws(req.n_models, pool)
        return ChoicePlan(pool, form, prompt_ids, answers, n_draws)

    async def choices(
        self, plan: ChoicePlan, ticket: Ticket, log: dict[str, Any]
    ) -> ChoiceScoreResponse:
        log.update(model=plan.pool.name, n_models=plan.n_draws, n_samples=0)
        run = await self.on_engine(
            ticket, lambda e: self._score_choices(e, plan), "scoring request"
        )
        self._observe(plan.pool.name, run, log)
        per_draw, processed, seconds = run.result
        return choice_score_response(
            plan.pool.name, plan.n_draws, plan.form, per_draw, len(plan.prompt_ids), processed,
            seconds, run.queue_s, time.perf_counter() - run.began,
        )  # fmt: skip

    @staticmethod
    async def _score_choices(engine: Engine, plan: ChoicePlan) -> ChoiceScores:
        """Per draw, per choice, the log-probability of answering with it: one next-token
        request per draw (letters), or each choice's text teacher-forced (text)."""
        if plan.form == "letter":
            letters = [answer[0] for answer in plan.answers]
            scored = await engine.score_next([plan.prompt_ids], [letters], plan.n_draws, plan.pool)
            return ChoiceScores(scored.logprobs[0], scored.prompt_tokens, scored.seconds)
        start = len(plan.prompt_ids)
        sequences = [plan.prompt_ids + answer for answer in plan.answers]
        scored = await engine.score(sequences, [start] * len(sequences), plan.n_draws, plan.pool)
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

    async def run(self, plan: ScorePlan, ticket: Ticket, log: dict[str, Any]) -> EngineRun:
        """Wait for the slot, score the plan's sequences; the timeout covers both."""
        log.update(model=plan.pool.name, n_models=plan.n_draws, n_samples=0)

        def score(engine: Engine) -> Awaitable[Scored]:
            return engine.score(plan.sequences, plan.starts, plan.n_draws, plan.pool, plan.top)

        run = await self.on_engine(ticket, score, "scoring request")
        self._observe(plan.pool.name, run, log)
        return run

    async def score(self, plan: ScorePlan, ticket: Ticket, log: dict[str, Any]) -> ScoreResponse:
        run = await self.run(plan, ticket, log)
        return score_response(
            plan.pool.name,
            plan.n_draws,
            plan.starts[0],
            run.result,
            [s[start:] for s, start in zip(plan.sequences, plan.starts, strict=True)],
            plan.return_tokens,
            run.queue_s,
            time.perf_counter() - run.began,
        )


def served_form(pool: Pool) -> str:
    """The answer form of a question that names none: the posterior's own record (the form it
    was trained in), else the server's default."""
    return pool.info.get("mc_form") or mc.DEFAULT_FORM


# --- the Bayesian averaging of the draws' scores ------------------------------------------------
def continuation_score(
    index: int, adapters: list[TokenScores], token_ids: list[int] | None
) -> ContinuationScore:
    """One continuation: the sequence predictive over the adapters, their spread, and (with
    ``token_ids``) the token predictive."""
    draws = [a.total for a in adapters]
    return ContinuationScore(
        index=index,
        tokens=len(adapters[0].logprobs),
        logprob=predictive.sequence_predictive(draws),
        draws=draws,
        disagreement=predictive.disagreement(draws),
        token_ids=token_ids,
        token_logprobs=None if token_ids is None else token_predictive(adapters),
    )


def token_predictive(adapters: list[TokenScores]) -> list[float]:
    """Per token, the log of the adapters' mean probability (the token predictive)."""
    return predictive.token_predictive([a.logprobs for a in adapters])


def predictive_top(adapters: list[TokenScores], position: int) -> dict[int, float]:
    """The token predictive of the tokens every adapter lists at ``position`` (each adapter
    returns its own likeliest; only tokens all of them list have an exact average)."""
    listed = [a.top[position] for a in adapters]  # type: ignore[index]
    shared = set(listed[0]).intersection(*listed[1:])
    return {t: predictive.sequence_predictive([d[t] for d in listed]) for t in sorted(shared)}


def score_response(
    model: str,
    n_draws: int,
    prompt_tokens: int,
    scored: Scored,
    continuation_ids: list[list[int]],
    return_tokens: bool,
    queue_s: float,
    total_s: float,
) -> ScoreResponse:
    scores = [
        continuation_score(i, adapters, ids if return_tokens else None)
        for i, (adapters, ids) in enumerate(zip(scored.sequences, continuation_ids, strict=True))
    ]
    return ScoreResponse(
        id=f"score-{uuid.uuid4().hex}",
        model=model,
        n_models=n_draws,
        prompt_tokens=prompt_tokens,
        scores=scores,
        usage=usage(scored.prompt_tokens, 0),
        timing=ScoreTiming(
            queue_s=round(queue_s, 4), score_s=round(scored.seconds, 4), total_s=round(total_s, 4)
        ),
    )


def choice_score_response(
    model: str,
    n_draws: int,
    form: str,
    per_draw: list[list[float]],
    prompt_tokens: int,
    processed_tokens: int,
    score_s: float,
    queue_s: float,
    total_s: float,
) -> ChoiceScoreResponse:
    """The posterior predictive over a question's choices: each draw's log-probabilities of the
    choices renormalised over them, then averaged (Bayesian model averaging of the draws)."""
    draws = [calibration.softmax_over(lp) for lp in per_draw]
    probs = calibration.predictive(draws)
    return ChoiceScoreResponse(
        id=f"choices-{uuid.uuid4().hex}",
        model=model,
        n_models=n_draws,
        form=form,
        letters=mc.letters(len(probs)),
        probs=probs.tolist(),
        answer=int(np.argmax(probs)),
        confidence=float(np.max(probs)),
        disagreement=calibration.mutual_information(draws),
        draws=[d.tolist() for d in draws],
        choice_logprobs=per_draw,
        prompt_tokens=prompt_tokens,
        usage=usage(processed_tokens * len(draws), 0),
        timing=ScoreTiming(
            queue_s=round(queue_s, 4), score_s=round(score_s, 4), total_s=round(total_s, 4)
        ),
    )
