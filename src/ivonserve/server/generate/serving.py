"""Generation, for /generate and the OpenAI routes: ``plan`` (defaults and limits, the pool
resolved once), ``run`` (wait for a slot, fan out, select), the consensus and its candidates on
the wire, and /generate's answer. The wire's ``n_models`` is the code's ``n_draws`` and the
wire's ``selection`` the code's ``method``: ``plan`` maps them in, ``consensus_fields`` back out.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

from ivonserve import mbr
from ivonserve.answers import extract_answer
from ivonserve.engine import Engine, FanOut, Generated, SamplingOptions
from ivonserve.errors import InvalidRequest
from ivonserve.mbr.stopping import StopPolicy, Tracker, unsupported
from ivonserve.pool import Pool
from ivonserve.server.generate.protocol import GenerateRequest, GenerateResponse
from ivonserve.server.limits import Ticket
from ivonserve.server.protocol import CandidateOut, Consensus, FanOutOptions, Timing, Usage
from ivonserve.server.serving import Service, render, template_messages, usage


@dataclass(frozen=True)
class Plan:
    """One generation request with every default filled in, every limit checked and its pool
    resolved: what runs it needs nothing else."""

    pool: Pool
    prompt_ids: list[int]
    n_draws: int
    n_samples: int
    sampling: SamplingOptions
    method: str  # the wire's selection
    utility: str
    return_candidates: bool
    early_stop: StopPolicy = dataclass_field(default_factory=StopPolicy)


@dataclass(frozen=True)
class Outcome:
    plan: Plan
    fan: FanOut
    chosen: mbr.Selection
    timing: Timing

    @property
    def winner(self) -> Generated:
        return self.fan.candidates[self.chosen.index]

    @property
    def usage(self) -> Usage:
        return usage(self.fan.prompt_tokens, self.fan.completion_tokens)


class GenerationService(Service):
    """Generation: plan, fan out, select; the routes only translate."""

    def plan(
        self,
        req: FanOutOptions,
        model: str | None,
        max_tokens: int | None,
        prompt: Callable[[Engine], list[int]],
        prompt_field: str,
    ) -> Plan:
        """Defaults from the settings, then every limit; a violation is a 4xx naming it."""
        engine = self.require_engine()
        limits = self.limits
        pool = engine.pool(model)
        n_draws = limits.n_draws(req.n_models, pool)
        n_samples = limits.n_samples(req.n_samples, n_draws)
        max_tokens = limits.max_tokens(max_tokens)
        prompt_ids = prompt(engine)
        limits.prompt(prompt_ids, prompt_field, engine.max_model_len)
        limits.token_ids(req.stop_token_ids or (), engine.vocab_size, "stop_token_ids")
        limits.token_ids([int(t) for t in req.logit_bias or {}], engine.vocab_size, "logit_bias")
        s = self.settings
        sampling = SamplingOptions(
            max_tokens=max_tokens,
            temperature=req.temperature if req.temperature is not None else s.default_temperature,
            top_p=req.top_p if req.top_p is not None else s.default_top_p,
            seed=req.seed,
            ignore_eos=req.ignore_eos,
            stop=tuple(req.stop or ()),
            extra=req.sampling_extensions(),
        )
        limits.context(prompt_ids, sampling.max_tokens, engine.max_model_len)
        method = req.selection or s.default_selection
        utility = req.utility or s.default_utility
        return Plan(
            pool=pool,
            prompt_ids=prompt_ids,
            n_draws=n_draws,
            n_samples=n_samples,
            sampling=sampling,
            method=method,
            utility=utility,
            return_candidates=req.return_candidates,
            early_stop=self.early_stop(req, method, utility),
        )

    def early_stop(self, req: FanOutOptions, method: str, utility: str) -> StopPolicy:
        """The request's rule, else the server's; a rule the method and utility do not allow
        is a 422 when the request names it, and ``off`` when it is only the server default."""
        s = self.settings
        rule = req.early_stop or s.early_stop
        if req.early_stop_threshold is not None and rule != "confidence":
            raise InvalidRequest(
                "early_stop_threshold", f"applies to early_stop 'confidence', not {rule!r}"
            )
        why = unsupported(rule, method, utility)
        if why is not None:
            if req.early_stop is not None:
                raise InvalidRequest("early_stop", why)
            rule = "off"
        threshold = req.early_stop_threshold
        return StopPolicy(
            rule,
            threshold if threshold is not None else s.early_stop_threshold,
            s.early_stop_min_finished,
        )

    def plan_generate(self, req: GenerateRequest) -> Plan:
        messages = template_messages(req.messages) if req.messages else None
        field = "messages" if messages else "prompt"
        return self.plan(
            req, req.model, req.max_tokens, lambda e: render(e, req.prompt, messages), field
        )

    async def run(
        self,
        plan: Plan,
        ticket: Ticket,
        log: dict[str, Any],
        on_draw: Callable[[list[Generated]], None] | None = None,
    ) -> Outcome:
        """Wait for the slot, fan out, select; the timeout covers all of it."""
        log.update(model=plan.pool.name, n_models=plan.n_draws, n_samples=plan.n_samples)

        def fan_out(engine: Engine) -> Awaitable[FanOut]:
            stopper = None
            if plan.early_stop.active and max(1, plan.n_draws) * plan.n_samples > 1:
                stopper = Tracker(
                    plan.early_stop,
                    plan.method,
                    plan.n_draws,
                    plan.n_samples,
                    plan.sampling.max_tokens,
                )
            return engine.fan_out(
                plan.prompt_ids,
                plan.n_draws,
                plan.n_samples,
                plan.sampling,
                plan.pool,
                on_draw,
                stopper,
            )

        run = await self.on_engine(ticket, fan_out, "request")
        fan: FanOut = run.result
        chosen = await asyncio.to_thread(select, fan, plan.method, plan.utility)
        selected = time.perf_counter()
        timing = Timing(
            queue_s=round(run.queue_s, 4),
            generate_s=round(run.engine_s, 4),
            select_s=round(selected - run.began - run.queue_s - run.engine_s, 4),
            total_s=round(selected - run.began, 4),
        )
        self._observe(plan, fan, chosen, timing, log)
        return Outcome(plan=plan, fan=fan, chosen=chosen, timing=timing)

    def _observe(
        self, plan: Plan, fan: FanOut, chosen: mbr.Selection, timing: Timing, log: dict[str, Any]
    ) -> None:
        m, name = self.metrics, plan.pool.name
        for phase in ("queue", "generate", "select"):
            m.phase.labels(phase).observe(getattr(timing, f"{phase}_s"))
        m.candidates.labels(name).inc(len(fan.candidates))
        m.prompt_tokens.labels(name).inc(fan.prompt_tokens)
        m.generated_tokens.labels(name).inc(fan.completion_tokens)
        m.confidence.labels(name).observe(chosen.confidence)
        if fan.stopped:
            m.early_stops.labels(name, plan.early_stop.rule).inc()
            m.stopped_candidates.labels(name).inc(len(fan.stopped))
            # the budget each stopped decode left unspent (greedy: one decode per draw)
            greedy = plan.sampling.temperature == 0
            unspent = [c for c in fan.stopped if not greedy or c.sample == 0]
            cap = plan.sampling.max_tokens
            m.saved_tokens.labels(name).inc(sum(max(0, cap - c.tokens) for c in unspent))
        log.update(
            early_stop=plan.early_stop.rule,
            n_stopped=len(fan.stopped),
            prompt_tokens=fan.prompt_tokens,
            completion_tokens=fan.completion_tokens,
            confidence=round(chosen.confidence, 4),
            **timing.model_dump(exclude={"total_s"}),
        )


def select(fan: FanOut, method: str, utility: str) -> mbr.Selection:
    """The consensus of a fan-out's finished candidates by ``method`` (the wire's selection)."""
    # the mean (draw None) is one hypothesis set of its own, like a draw
    candidates = [
        mbr.Candidate(draw=c.draw or 0, text=c.text, logprob=c.logprob, tokens=c.tokens)
        for c in fan.candidates
    ]
    try:
        return mbr.select(candidates, method=method, utility=utility)
    except ValueError as err:
        raise InvalidRequest("selection", str(err)) from err


# --- the consensus on the wire: the code's draws become the wire's draw (and, deprecated, model)
def consensus(outcome: Outcome) -> Consensus:
    return Consensus(**consensus_fields(outcome))


def consensus_fields(outcome: Outcome) -> dict[str, Any]:
    plan, chosen, winner = outcome.plan, outcome.chosen, outcome.winner
    return {
        "answer": chosen.answer,
        "confidence": float(chosen.confidence),
        "chosen_draw": winner.draw,
        "chosen_model": winner.draw,
        "chosen_sample": winner.sample,
        "n_models": plan.n_draws,
        "n_samples": plan.n_samples,
        "selection": plan.method,
        "utility": plan.utility,
        "seed": outcome.fan.seed,
        "early_stop": plan.early_stop.rule,
        "n_finished": len(outcome.fan.candidates),
        "n_stopped": len(outcome.fan.stopped),
        "candidates": candidates_out(outcome) if plan.return_candidates else None,
        "timing": outcome.timing,
    }


def candidates_out(outcome: Outcome) -> list[CandidateOut]:
    """The finished candidates with their scores, then those early stopping aborted (no answer,
    no score: they were not selected from)."""
    chosen, fan = outcome.chosen, outcome.fan
    answers = chosen.answers or tuple(extract_answer(c.text) for c in fan.candidates)
    finished = [
        candidate_out(c, answers[i], float(chosen.scores[i])) for i, c in enumerate(fan.candidates)
    ]
    return finished + [candidate_out(c, None, None) for c in fan.stopped]


def candidate_out(c: Generated, answer: str | None, score: float | None) -> CandidateOut:
    return CandidateOut(
        draw=c.draw,
        model=c.draw,
        sample=c.sample,
        text=c.text,
        answer=answer,
        logprob=c.logprob,
        tokens=c.tokens,
        finish_reason=c.finish_reason,
        score=score,
    )


def generate_response(outcome: Outcome) -> GenerateResponse:
    sampling = outcome.plan.sampling
    return GenerateResponse(
        id=f"gen-{uuid.uuid4().hex}",
        model=outcome.plan.pool.name,
        text=outcome.chosen.text,
        max_tokens=sampling.max_tokens,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        usage=outcome.usage,
        **consensus_fields(outcome),
    )
