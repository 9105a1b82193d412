"""OpenAI's legacy echo scoring on /v1/completions (``echo`` with ``max_tokens`` 0 or 1, as
lm-evaluation-harness asks for it): each prompt's own tokens with their log-probabilities, under
the mean adapter, or under the token predictive of draws 0..n_models-1 when the request names
``n_models``. It runs as scoring does (``score.serving.ScoringService.run``)."""

from __future__ import annotations

import uuid
from typing import Any

from ivonserve.engine import Scored, TokenScores
from ivonserve.server.limits import Ticket
from ivonserve.server.openai.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
)
from ivonserve.server.score.serving import (
    ScorePlan,
    ScoringService,
    predictive_top,
    token_predictive,
)
from ivonserve.server.serving import tokens_of, usage


def plan_echo(service: ScoringService, req: CompletionRequest) -> ScorePlan:
    """Legacy echo scoring: the mean adapter unless the request names n_models."""
    engine = service.require_engine()
    pool = engine.pool(req.model)
    sequences = [tokens_of(engine, prompt, service.limits) for prompt in req.prompts]
    plan = ScorePlan(
        pool=pool,
        sequences=sequences,
        starts=[1] * len(sequences),  # nothing predicts the first token
        n_draws=0 if req.n_models is None else service.limits.n_draws(req.n_models, pool),
        top=req.logprobs or 0,
        next_token=req.max_tokens == 1,
    )
    service.limits.scored(plan.sequences, "prompt", engine.max_model_len)
    return plan


async def echo(
    service: ScoringService, plan: ScorePlan, ticket: Ticket, log: dict[str, Any]
) -> CompletionResponse:
    run = await service.run(plan, ticket, log)
    scored: Scored = run.result
    decode = service.require_engine().tokenizer.decode
    choices = [
        echo_choice(i, sequence, adapters, plan.next_token, plan.top, decode)
        for i, (sequence, adapters) in enumerate(zip(plan.sequences, scored.sequences, strict=True))
    ]
    completion = len(choices) if plan.next_token else 0
    return CompletionResponse(
        id=f"cmpl-{uuid.uuid4().hex}",
        model=plan.pool.name,
        choices=choices,
        usage=usage(scored.prompt_tokens, completion),
    )


def echo_choice(
    index: int,
    sequence: list[int],
    adapters: list[TokenScores],
    with_next_token: bool,
    top: int | None,
    decode: Any,
) -> CompletionChoice:
    """OpenAI's legacy echo: the prompt's tokens with their (predictive) log-probabilities, the
    first one None; with max_tokens 1 also the greedy next token of the first adapter (vLLM
    decodes one token; with several draws it is draw 0's)."""
    logprobs: list[float | None] = [None]
    logprobs += token_predictive(adapters)
    tops: list[dict[int, float] | None] = [None]
    tops += [predictive_top(adapters, t) for t in range(len(sequence) - 1)] if top else []
    ids = list(sequence)
    if with_next_token:
        token, logprob, alternatives = adapters[0].next_token
        ids.append(token)
        logprobs.append(logprob)
        tops.append(alternatives)
    texts = [decode([t]) for t in ids]
    offsets, at = [], 0
    for text in texts:
        offsets.append(at)
        at += len(text)
    return CompletionChoice(
        index=index,
        text="".join(texts),
        finish_reason="length",
        logprobs=CompletionLogprobs(
            tokens=texts,
            token_logprobs=logprobs,
            top_logprobs=(
                [None if d is None else {decode([t]): v for t, v in d.items()} for d in tops]
                if top
                else [None] * len(ids)
            ),
            text_offset=offsets,
        ),
    )
