"""The shapes of the answers: /generate's, OpenAI's chat and completion (whole or as chunks),
/score's, and the legacy echo-scoring completion. Here the code's draws become the wire's
``model`` fields (``chosen_model``, a candidate's ``model``)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np

from ivonserve import calibration, predictive
from ivonserve import choices as mc
from ivonserve.answers import extract_answer
from ivonserve.engine import STOPPED, Generated, Scored, TokenScores
from ivonserve.protocol import (
    AssistantMessage,
    CandidateOut,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChoiceScoreResponse,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Consensus,
    ContinuationScore,
    DeltaMessage,
    ErrorResponse,
    GenerateResponse,
    ScoreResponse,
    ScoreTiming,
)
from ivonserve.server.serving import Outcome, Plan, usage


# --- generation -------------------------------------------------------------------------------
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
        **_consensus_fields(outcome),
    )


def consensus(outcome: Outcome) -> Consensus:
    return Consensus(**_consensus_fields(outcome))


def _consensus_fields(outcome: Outcome) -> dict[str, Any]:
    plan, chosen, winner = outcome.plan, outcome.chosen, outcome.winner
    return {
        "answer": chosen.answer,
        "confidence": float(chosen.confidence),
        "chosen_model": winner.draw,
        "chosen_sample": winner.sample,
        "n_models": plan.n_draws,
        "n_samples": plan.n_samples,
        "selection": plan.selection,
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
        model=c.draw,
        sample=c.sample,
        text=c.text,
        answer=answer,
        logprob=c.logprob,
        tokens=c.tokens,
        finish_reason=c.finish_reason,
        score=score,
    )


def chat_response(outcome: Outcome) -> ChatCompletionResponse:
    return ChatCompletionResponse(
        id=f"chatcmpl-{uuid.uuid4().hex}",
        model=outcome.plan.pool.name,
        choices=[
            ChatChoice(
                message=AssistantMessage(content=outcome.chosen.text),
                finish_reason=outcome.winner.finish_reason,
            )
        ],
        usage=outcome.usage,
        ivonserve=consensus(outcome),
    )


def completion_response(outcome: Outcome) -> CompletionResponse:
    return CompletionResponse(
        id=f"cmpl-{uuid.uuid4().hex}",
        model=outcome.plan.pool.name,
        choices=[
            CompletionChoice(text=outcome.chosen.text, finish_reason=outcome.winner.finish_reason)
        ],
        usage=outcome.usage,
        ivonserve=consensus(outcome),
    )


class _OpenAIStream:
    """What every chunk of one OpenAI stream shares: its id, creation time and model."""

    prefix = ""

    def __init__(self, plan: Plan, include_usage: bool) -> None:
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = plan.pool.name
        self.include_usage = include_usage

    @staticmethod
    def error(body: ErrorResponse) -> dict[str, Any]:
        """OpenAI's error object as a stream event (its client raises on it)."""
        return body.model_dump()


class ChatStream(_OpenAIStream):
    """OpenAI's chat chunk sequence: the role at once, the consensus text once chosen, the
    finish reason with ivonserve's consensus object, and usage if asked for."""

    prefix = "chatcmpl"

    def chunk(self, choices: list[ChatChunkChoice], **extra: Any) -> ChatCompletionChunk:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=choices, **extra
        )

    def opening(self) -> list[ChatCompletionChunk]:
        return [self.chunk([ChatChunkChoice(delta=DeltaMessage(role="assistant", content=""))])]

    def keepalive(self) -> ChatCompletionChunk:
        """A chunk with no text while the candidates are generated (see serving.stream)."""
        return self.chunk([ChatChunkChoice(delta=DeltaMessage(content=""))])

    def closing(self, outcome: Outcome) -> list[ChatCompletionChunk]:
        text = ChatChunkChoice(delta=DeltaMessage(content=outcome.chosen.text))
        end = ChatChunkChoice(delta=DeltaMessage(), finish_reason=outcome.winner.finish_reason)
        chunks = [self.chunk([text]), self.chunk([end], ivonserve=consensus(outcome))]
        if self.include_usage:
            chunks.append(self.chunk([], usage=outcome.usage))
        return chunks


class CompletionStream(_OpenAIStream):
    """OpenAI's completion chunks: an empty text at once (as the chat role chunk, the client
    sees at once that its request runs), the consensus text with its finish reason once
    chosen, then usage."""

    prefix = "cmpl"

    def chunk(self, choices: list[CompletionChoice], **extra: Any) -> CompletionResponse:
        return CompletionResponse(
            id=self.id, created=self.created, model=self.model, choices=choices, **extra
        )

    def keepalive(self) -> CompletionResponse:
        """A chunk with no text while the candidates are generated (see serving.stream)."""
        return self.chunk([CompletionChoice(text="", finish_reason=None)])

    def opening(self) -> list[CompletionResponse]:
        return [self.keepalive()]

    def closing(self, outcome: Outcome) -> list[CompletionResponse]:
        choice = CompletionChoice(
            text=outcome.chosen.text, finish_reason=outcome.winner.finish_reason
        )
        chunks = [self.chunk([choice], ivonserve=consensus(outcome))]
        if self.include_usage:
            chunks.append(self.chunk([], usage=outcome.usage))
        return chunks


def progress_event(candidates: list[Generated]) -> dict[str, Any]:
    """One /generate progress event: a draw's candidates, as soon as that draw finished (with
    early stopping, or was stopped: its stopped candidates have finish_reason early_stop)."""
    return {
        "type": "candidates",
        "candidates": [
            candidate_out(
                c, None if c.finish_reason == STOPPED else extract_answer(c.text), None
            ).model_dump()
            for c in candidates
        ],
    }


def result_event(outcome: Outcome) -> list[dict[str, Any]]:
    return [{"type": "result", "result": generate_response(outcome).model_dump()}]


def generate_error_event(body: ErrorResponse) -> dict[str, Any]:
    """/generate's typed events end with ``{"type": "error", "error": {...}}`` on failure."""
    return {"type": "error", **body.model_dump()}


# --- scoring ----------------------------------------------------------------------------------
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
        token_logprobs=(
            None
            if token_ids is None
            else predictive.token_predictive([a.logprobs for a in adapters])
        ),
    )


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
    logprobs += predictive.token_predictive([a.logprobs for a in adapters])
    tops: list[dict[int, float] | None] = [None]
    tops += [_predictive_top(adapters, t) for t in range(len(sequence) - 1)] if top else []
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


def _predictive_top(adapters: list[TokenScores], position: int) -> dict[int, float]:
    """The token predictive of the tokens every adapter lists at ``position`` (each adapter
    returns its own likeliest; only tokens all of them list have an exact average)."""
    listed = [a.top[position] for a in adapters]  # type: ignore[index]
    shared = set(listed[0]).intersection(*listed[1:])
    return {t: predictive.sequence_predictive([d[t] for d in listed]) for t in sorted(shared)}


def echo_response(
    model: str, choices: list[CompletionChoice], prompt: int, completion: int
) -> CompletionResponse:
    return CompletionResponse(
        id=f"cmpl-{uuid.uuid4().hex}",
        model=model,
        choices=choices,
        usage=usage(prompt, completion),
    )
