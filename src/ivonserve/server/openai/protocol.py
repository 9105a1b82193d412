"""OpenAI's chat and completions requests and responses (whole and as stream chunks), with
ivonserve's consensus object, and /v1/models' cards."""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ivonserve.server.protocol import (
    ChatMessage,
    Consensus,
    FanOutOptions,
    RequestModel,
    ResponseModel,
    Usage,
)

MAX_TOP_LOGPROBS = 20  # vLLM's default max_logprobs


class StreamOptions(RequestModel):
    include_usage: bool = False


class OpenAIRequest(FanOutOptions):
    """Fields OpenAI's chat and completions requests share. ``n`` stays 1: the response is the
    one consensus (the fan-out is n_models x n_samples)."""

    model: str | None = Field(
        None, description="posterior name (see /v1/models); default: the first"
    )
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate per sample, at most")
    n: int = Field(1, ge=1, le=1, description="choices returned: 1, the consensus")
    stream: bool = Field(False, description="server-sent events in OpenAI's chunk format")
    stream_options: StreamOptions | None = None
    user: str | None = Field(None, max_length=256, description="the end user (logged only)")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(OpenAIRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's new max_tokens")

    @model_validator(mode="after")
    def _one_max_tokens(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give at most one of max_tokens and max_completion_tokens")
        if self.max_completion_tokens is not None:
            self.max_tokens = self.max_completion_tokens
        return self


class CompletionRequest(OpenAIRequest):
    """POST /v1/completions: the prompt is used as is (no chat template).

    With ``echo`` and ``max_tokens`` 0 or 1 it scores instead of generating (OpenAI's legacy
    scoring, as lm-evaluation-harness uses it): each prompt's tokens come back with their
    log-probabilities, under the mean adapter, or under the token-level posterior predictive of
    draws 0..n_models-1 when the request names ``n_models``. Scoring takes a batch of prompts."""

    prompt: str | list[str] | list[int] | list[list[int]] = Field(
        description="the text to continue: a string or token ids; a list of several for scoring"
    )
    max_tokens: int | None = Field(
        None, ge=0, description="tokens to generate per sample; 0 (scoring only): none"
    )
    echo: bool = Field(False, description="score the prompt: its tokens with logprobs")
    logprobs: int | None = Field(
        None,
        ge=0,
        le=MAX_TOP_LOGPROBS,
        description="with echo: the likeliest alternatives per token to return",
    )

    @field_validator("prompt")
    @classmethod
    def _prompts_not_empty(cls, value: Any) -> Any:
        prompts = cls._as_list(value)
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("give one or more non-empty prompts")
        if any(isinstance(p, list) and any(t < 0 for t in p) for p in prompts):
            raise ValueError("token ids are >= 0")
        return value

    @staticmethod
    def _as_list(value: Any) -> list[str | list[int]]:
        if isinstance(value, str):
            return [value]
        if value and all(isinstance(t, int) for t in value):
            return [list(value)]
        return list(value)

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt: a text, or token ids."""
        return self._as_list(self.prompt)

    @property
    def scoring(self) -> bool:
        return self.echo and self.max_tokens is not None and self.max_tokens <= 1


class AssistantMessage(ResponseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(ResponseModel):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(ResponseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    ivonserve: Consensus


class DeltaMessage(ResponseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(ResponseModel):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(ResponseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    ivonserve: Consensus | None = None


class CompletionLogprobs(ResponseModel):
    """OpenAI's legacy logprobs: per token its text, log-probability (None for the first
    prompt token, which nothing predicts), likeliest alternatives, and character offset."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(ResponseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(ResponseModel):
    """A /v1/completions answer; streamed chunks have the same shape (OpenAI's)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    ivonserve: Consensus | None = None


class ModelCard(ResponseModel):
    """One served posterior (the request's ``model``) and its pool."""

    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ivonserve"
    root: str = Field(description="the posterior (or adapter) folder")
    kind: Literal["posterior", "adapter"]
    base_model: str
    ess: float | None = Field(description="the posterior's effective sample size (None: adapter)")
    pool_size: int
    pool_seed: int
    posterior_temperature: float = Field(description="the posterior temperature T of the draws")
    sampling_temperature: float = Field(
        description="deprecated alias of posterior_temperature (the same value)",
        json_schema_extra={"deprecated": True},
    )
    prune: float
    prune_by: str
    mc_form: Literal["letter", "text"] | None = Field(
        None,
        description="the answer form /score/choices uses for a question that names none: the "
        "one its training record names, else letter (None while the engine starts)",
    )
    default: bool = Field(description="answers requests that name no model")
    ready: bool


class ModelList(ResponseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
