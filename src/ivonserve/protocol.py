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


def _check_name(kind: str, value: str | None, registry: Any) -> str | None:
    if value is not None and value not in registry:
        raise ValueError(f"unknown {kind} {value!r}; valid: {', '.join(sorted(registry))}")
    return value


class ChatMessage(_Request):
    """One OpenAI-style chat message."""

    role: Literal["system", "user", "assistant"]
    content: str


class GenerateRequest(_Request):
    """POST /generate: one prompt, fanned out over n_models posterior draws x n_samples samples.

    Every field but the prompt (or messages) has a server default (see ``ivonserve serve --help``).
    """

    prompt: str | None = Field(
        None, min_length=1, description="user message; the model's chat template is applied"
    )
    messages: list[ChatMessage] | None = Field(
        None, min_length=1, description="OpenAI-style chat messages (instead of prompt)"
    )
    model: str | None = Field(None, description="posterior name (see /v1/models); default: the one")
    n_models: int | None = Field(
        None, ge=0, description="posterior draws to use, 0..pool size (0: the mean adapter alone)"
    )
    n_samples: int | None = Field(None, ge=1, description="samples per draw")
    max_tokens: int | None = Field(None, ge=1, description="tokens to generate per sample, at most")
    temperature: float | None = Field(
        None, ge=0, le=10, description="decoding temperature; 0: greedy"
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

    @field_validator("selection")
    @classmethod
    def _known_selection(cls, value: str | None) -> str | None:
        return _check_name("selection", value, mbr.METHODS)

    @field_validator("utility")
    @classmethod
    def _known_utility(cls, value: str | None) -> str | None:
        return _check_name("utility", value, mbr.UTILITIES)

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        return value

    @model_validator(mode="after")
    def _one_prompt(self) -> GenerateRequest:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of prompt and messages")
        return self


class CandidateOut(_Response):
    """One sampled completion and its MBR score."""

    model: int | None = Field(description="draw index; null: the mean adapter (n_models=0)")
    sample: int = Field(description="sample index within the draw")
    text: str
    answer: str | None = Field(description="the normalised final answer, if any")
    logprob: float | None = Field(description="cumulative log-probability of the text")
    tokens: int
    finish_reason: str | None
    score: float = Field(description="the selection method's score (higher: chosen)")


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int = Field(description="every token generated, over all candidates")
    total_tokens: int


class Timing(_Response):
    generate_s: float
    select_s: float
    total_s: float


class GenerateResponse(_Response):
    id: str
    object: Literal["ivonserve.generation"] = "ivonserve.generation"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str = Field(description="the posterior that answered")
    text: str = Field(description="the chosen (consensus) candidate's text")
    answer: str | None = Field(description="its normalised final answer")
    confidence: float = Field(description="agreement with the choice, in [0, 1]")
    chosen_model: int | None = Field(description="draw of the chosen candidate (null: mean)")
    chosen_sample: int
    # the settings the request ran with, defaults filled in
    n_models: int
    n_samples: int
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    selection: str
    utility: str
    candidates: list[CandidateOut] | None = None
    usage: Usage
    timing: Timing


class ErrorInfo(_Response):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(_Response):
    """Every error: ``{"error": {"message", "type", "param", "code"}}`` (vLLM/OpenAI shape)."""

    error: ErrorInfo


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "ivonserve"
    root: str = Field(description="the posterior folder")
    base_model: str
    pool_size: int
    pool_seed: int
    sampling_temperature: float
    prune: float
    prune_by: str
    ready: bool


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Health(_Response):
    status: Literal["ok"] = "ok"


class Readiness(_Response):
    status: Literal["ready", "starting", "failed", "stopped"]
    detail: str | None = None
    startup_s: float | None = None
