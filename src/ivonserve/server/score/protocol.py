"""/score's and /score/choices' requests and responses."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ivonserve.server.protocol import ChatMessage, RequestModel, ResponseModel, Usage


class ScoreRequest(RequestModel):
    """POST /score: the log-likelihood of each continuation given the prompt, under the posterior
    predictive of draws 0..n_models-1 (n_models = 0: the mean adapter)."""

    prompt: str | None = Field(
        None, min_length=1, description="user message; the model's chat template is applied"
    )
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="OpenAI-style chat messages (instead of prompt)"
    )
    continuations: list[str] = Field(
        min_length=1, description="texts to score as the assistant's reply (max_continuations)"
    )
    model: str | None = Field(
        None, description="posterior or adapter name (see /v1/models); default: the first"
    )
    n_models: int | None = Field(
        None, ge=0, description="posterior draws to average, 0..pool size (0: the mean adapter)"
    )
    return_tokens: bool = Field(False, description="per-token ids and log-probabilities too")

    @field_validator("continuations")
    @classmethod
    def _non_empty(cls, value: list[str]) -> list[str]:
        if any(not c for c in value):
            raise ValueError("continuations must not be empty strings")
        return value

    @model_validator(mode="after")
    def _one_prompt(self) -> ScoreRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class ContinuationScore(ResponseModel):
    """One continuation's log-likelihood (natural log) under the posterior predictive."""

    index: int
    tokens: int
    logprob: float = Field(
        description="log((1/n) sum_d p_d(continuation | prompt)) over the n = n_models draws; "
        "n_models=0: the mean's"
    )
    draws: list[float] = Field(description="log p_d(continuation | prompt) of each draw d")
    disagreement: float = Field(
        description="logprob - mean(draws), >= 0 nats: 0 when every draw agrees (epistemic)"
    )
    token_ids: list[int] | None = None
    token_logprobs: list[float] | None = Field(
        None, description="per token, log of the draws' mean probability (token predictive)"
    )


class ScoreTiming(ResponseModel):
    queue_s: float = Field(description="waiting for an engine slot (max_in_flight)")
    score_s: float
    total_s: float


class ScoreResponse(ResponseModel):
    id: str
    object: Literal["ivonserve.score"] = "ivonserve.score"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str = Field(description="the posterior that scored")
    n_models: int
    prompt_tokens: int = Field(description="tokens of the prompt (chat template applied)")
    scores: list[ContinuationScore]
    usage: Usage
    timing: ScoreTiming


class ChoiceScoreRequest(RequestModel):
    """POST /score/choices: the probability of each choice of a multiple-choice question under
    the posterior predictive of draws 0..n_models-1 (0: the mean adapter). The question is shown
    as ivonserve's training shows it (``ivonserve.choices``), in one of two forms: ``letter``
    (lettered choices; each choice read off its letter's next-token probability: one forward
    pass per draw) or ``text`` (the question alone; each choice's text scored as the reply)."""

    question: str = Field(min_length=1, description="the question, without its choices")
    choices: list[str] = Field(
        min_length=2, max_length=5, description="the choices' texts, lettered A, B, ... in order"
    )
    model: str | None = Field(
        None, description="posterior or adapter name (see /v1/models); default: the first"
    )
    n_models: int | None = Field(
        None, ge=0, description="posterior draws to average, 0..pool size (0: the mean adapter)"
    )
    form: Literal["letter", "text"] | None = Field(
        None,
        description="letter: answer with the choice's letter; text: with its text. Default: "
        "the form the posterior was trained in (its training record; /v1/models' mc_form), "
        "else letter",
    )

    @field_validator("choices")
    @classmethod
    def _non_empty_choices(cls, value: list[str]) -> list[str]:
        if any(not c.strip() for c in value):
            raise ValueError("choices must not be empty strings")
        return value


class ChoiceScoreResponse(ResponseModel):
    id: str
    object: Literal["ivonserve.choice_score"] = "ivonserve.choice_score"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str = Field(description="the posterior that scored")
    n_models: int
    form: Literal["letter", "text"]
    letters: list[str]
    probs: list[float] = Field(
        description="posterior predictive over the choices: the mean of the draws' distributions"
    )
    answer: int = Field(description="index of the likeliest choice")
    confidence: float = Field(description="the likeliest choice's probability")
    disagreement: float = Field(
        description="mutual information, nats: entropy of probs minus the draws' mean entropy "
        "(>= 0; 0 when every draw gives the same distribution: the epistemic part)"
    )
    draws: list[list[float]] = Field(
        description="each draw's distribution over the choices (n_models=0: [the mean's])"
    )
    choice_logprobs: list[list[float]] = Field(
        description="each draw's log-probability of each choice (letter: of its letter's token, "
        "over the whole vocabulary; text: of its whole text), before renormalising over the "
        "choices (the logits of temperature scaling)"
    )
    prompt_tokens: int
    usage: Usage
    timing: ScoreTiming
