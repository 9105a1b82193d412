"""The HTTP contract: pydantic v2 request and response models (vLLM-style protocol module).

Requests forbid unknown fields, so a misspelt option is a 422 naming it rather than silently
ignored. Bounds that depend on the server's settings (pool size, max_candidates, max_tokens
limit) are checked by the serving layer, which answers with the same 422 error shape.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from ivonserve import mbr

MAX_SEED = (1 << 63) - 1


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_registered(kind: str, value: str | None, registry: Any) -> str | None:
    """``value`` if it names an entry of ``registry`` (or is None), else a ValueError listing
    the valid names: one message for requests and settings alike."""
    if value is not None and value not in registry:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(sorted(registry))}")
    return value


class TextPart(_Request):
    """A text part of a message's content (OpenAI's list form)."""

    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    """One OpenAI-style chat message; content as text or a list of text parts."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=256)

    def as_template_message(self) -> dict[str, str]:
        """The message as a chat template expects it: plain text, developer as system."""
        text = (
            self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        )
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class FanOutOptions(_Request):
    """The fan-out and decoding fields every generation route shares, ivonserve's extras
    included (with the OpenAI client: ``extra_body={"n_models": 4, ...}``)."""

    n_models: int | None = Field(
        None, ge=0, description="posterior draws to use, 0..pool size (0: the mean adapter alone)"
    )
    n_samples: int | None = Field(None, ge=1, description="samples per draw")
    temperature: float | None = Field(
        None, ge=0, le=2, description="decoding temperature, 0..2 (OpenAI's range); 0: greedy"
    )
    top_p: float | None = Field(None, gt=0, le=1, description="nucleus sampling mass")
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="request seed (default: random; echoed back)"
    )
    stop: list[str] | None = Field(
        None, max_length=16, description="strings that end a sample (not included in its text)"
    )
    ignore_eos: bool = Field(False, description="keep generating past the end-of-sequence token")
    selection: str | None = Field(None, description="selection method: one of mbr.METHODS")
    utility: str | None = Field(None, description="MBR utility: one of mbr.UTILITIES")
    return_candidates: bool = Field(False, description="include every candidate in the response")

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @field_validator("selection")
    @classmethod
    def _known_selection(cls, value: str | None) -> str | None:
        return check_registered("selection", value, mbr.METHODS)

    @field_validator("utility")
    @classmethod
    def _known_utility(cls, value: str | None) -> str | None:
        return check_registered("utility", value, mbr.UTILITIES)


class GenerateRequest(FanOutOptions):
    """POST /generate: one prompt, fanned out over n_models posterior draws x n_samples samples.

    Every field but the prompt (or messages) has a server default (see ``ivonserve serve --help``).
    """

    prompt: str | None = Field(
        None, min_length=1, description="user message; the model's chat template is applied"
    )
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="OpenAI-style chat messages (instead of prompt)"
    )
    model: str | None = Field(
        None, description="posterior name (see /v1/models); default: the first"
    )
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate per sample, at most")
    stream: bool = Field(
        False,
        description="server-sent events: each draw's candidates as they finish, then the result",
    )

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class StreamOptions(_Request):
    include_usage: bool = False


class _OpenAIRequest(FanOutOptions):
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


class ChatCompletionRequest(_OpenAIRequest):
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


class CompletionRequest(_OpenAIRequest):
    """POST /v1/completions: the prompt is used as is (no chat template)."""

    prompt: str | list[str] = Field(description="the text to continue (a list of exactly one)")

    @field_validator("prompt")
    @classmethod
    def _one_prompt_text(cls, value: str | list[str]) -> str:
        texts = [value] if isinstance(value, str) else value
        if len(texts) != 1 or not texts[0]:
            raise ValueError("give one non-empty prompt (batches are not supported)")
        return texts[0]


class CandidateOut(_Response):
    """One sampled completion and its MBR score."""

    model: int | None = Field(description="draw index; null: the mean adapter (n_models=0)")
    sample: int = Field(description="sample index within the draw")
    text: str
    answer: str | None = Field(description="the normalised final answer, if any")
    logprob: float | None = Field(description="cumulative log-probability of the text")
    tokens: int
    finish_reason: str | None
    score: float | None = Field(
        description="the selection method's score (higher: chosen); null in progress events"
    )


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int = Field(description="every token generated, over all candidates")
    total_tokens: int


class Timing(_Response):
    queue_s: float = Field(description="waiting for an engine slot (max_in_flight)")
    generate_s: float
    select_s: float
    total_s: float


class Consensus(_Response):
    """How the choice was made: ivonserve's extra object on OpenAI responses, and the core of
    /generate's response."""

    answer: str | None = Field(description="the chosen text's normalised final answer")
    confidence: float = Field(description="agreement with the choice, in [0, 1]")
    chosen_model: int | None = Field(description="draw of the chosen candidate (null: mean)")
    chosen_sample: int
    # the fan-out the request ran with, defaults filled in
    n_models: int
    n_samples: int
    selection: str
    utility: str
    seed: int
    candidates: list[CandidateOut] | None = None
    timing: Timing


class GenerateResponse(Consensus):
    """POST /generate: the consensus text, how it was chosen, and the settings it ran with."""

    id: str
    object: Literal["ivonserve.generation"] = "ivonserve.generation"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str = Field(description="the posterior that answered")
    text: str = Field(description="the chosen (consensus) candidate's text")
    max_tokens: int
    temperature: float
    top_p: float
    usage: Usage


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(_Response):
    index: int = 0
    message: AssistantMessage
    finish_reason: str | None
    logprobs: None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    ivonserve: Consensus


class DeltaMessage(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(_Response):
    index: int = 0
    delta: DeltaMessage
    finish_reason: str | None = None
    logprobs: None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    ivonserve: Consensus | None = None


class CompletionChoice(_Response):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class CompletionResponse(_Response):
    """A /v1/completions answer; streamed chunks have the same shape (OpenAI's)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    ivonserve: Consensus | None = None


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(_Response):
    """Every error: ``{"error": {"message", "type", "param", "code"}}`` (vLLM/OpenAI shape)."""

    error: ErrorInfo


class ModelCard(_Response):
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
    sampling_temperature: float
    prune: float
    prune_by: str
    default: bool = Field(description="answers requests that name no model")
    ready: bool


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(_Response):
    status: Literal["ok"] = "ok"


class Readiness(_Response):
    status: Literal["ready", "starting", "failed", "draining", "stopped"]
    detail: str | None = None
    startup_s: float | None = None
