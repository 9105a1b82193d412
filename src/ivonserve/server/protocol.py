"""What the HTTP contract's features share (vLLM's ``protocol`` pattern): the strict base
models, chat messages, the fan-out and decoding options of every generation route, the consensus
and its candidates, usage, errors, and the probes' bodies. Each feature's own request and
response models are in its folder (``generate/``, ``score/``, ``openai/``).

Requests forbid unknown fields, so a misspelt option is a 422 naming it rather than silently
ignored. Bounds that depend on the server's settings (pool size, max_candidates, max_tokens
limit) are ``limits``'s, which answers with the same 422 error shape.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ivonserve import mbr

MAX_INT64 = (1 << 63) - 1  # vLLM's engine messages (msgpack) carry at most int64
MAX_SEED = MAX_INT64
VLLM_SAMPLING_EXTENSIONS = (
    "top_k",
    "min_p",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_tokens",
    "stop_token_ids",
    "include_stop_str_in_output",
    "skip_special_tokens",
    "spaces_between_special_tokens",
)


class RequestModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ResponseModel(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(RequestModel):
    """A text part of a message's content (OpenAI's list form)."""

    type: Literal["text"]
    text: str


class ChatMessage(RequestModel):
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


class FanOutOptions(RequestModel):
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
    early_stop: Literal["off", "exact", "confidence"] | None = Field(
        None,
        description="stop the fan-out once its answer is decided and abort the candidates still "
        "running: exact (never changes the answer or chosen text), confidence "
        "(Adaptive-Consistency's Beta criterion), off; 'answer' utility or majority only "
        "(default: the server's early_stop)",
    )
    early_stop_threshold: float | None = Field(
        None,
        ge=0.5,
        le=1,
        description="confidence: stop once P(the leading answer is the mode) >= this "
        "(default: the server's early_stop_threshold)",
    )

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

    # vLLM's sampling extensions (its OpenAI server takes them too), applied to every draw
    top_k: int | None = Field(
        None, ge=-1, le=MAX_INT64, description="sample among the k likeliest (0, -1: all)"
    )
    min_p: float | None = Field(
        None, ge=0, le=1, description="drop tokens below min_p x the likeliest's probability"
    )
    presence_penalty: float | None = Field(None, ge=-2, le=2, description="OpenAI's, -2..2")
    frequency_penalty: float | None = Field(None, ge=-2, le=2, description="OpenAI's, -2..2")
    repetition_penalty: float | None = Field(
        None, gt=0, le=10, description="vLLM's multiplicative penalty (1: none)"
    )
    min_tokens: int | None = Field(None, ge=0, description="tokens before EOS or a stop may end")
    stop_token_ids: list[int] | None = Field(
        None, max_length=64, description="token ids that end a sample"
    )
    include_stop_str_in_output: bool | None = Field(None, description="keep the stop string")
    skip_special_tokens: bool | None = Field(None, description="drop special tokens from text")
    spaces_between_special_tokens: bool | None = Field(None)
    logit_bias: dict[str, float] | None = Field(
        None, max_length=300, description="OpenAI's: token id (as text) -> bias in -100..100"
    )

    @field_validator("selection")
    @classmethod
    def _known_selection(cls, value: str | None) -> str | None:
        return value if value is None else mbr.METHODS.check(value)

    @field_validator("utility")
    @classmethod
    def _known_utility(cls, value: str | None) -> str | None:
        return value if value is None else mbr.UTILITIES.check(value)

    @field_validator("stop_token_ids")
    @classmethod
    def _token_ids(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and any(t < 0 for t in value):
            raise ValueError("token ids are >= 0")
        return value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        for token, bias in (value or {}).items():
            if not token.isdigit():
                raise ValueError(f"keys are token ids, got {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"biases are in -100..100, got {bias}")
        return value

    def sampling_extensions(self) -> dict[str, Any]:
        """The vLLM sampling fields this request sets, by their ``SamplingParams`` names."""
        names = (*VLLM_SAMPLING_EXTENSIONS, "logit_bias")
        extra = {n: getattr(self, n) for n in names if getattr(self, n) is not None}
        if "logit_bias" in extra:
            extra["logit_bias"] = {int(k): v for k, v in extra["logit_bias"].items()}
        return extra


class CandidateOut(ResponseModel):
    """One sampled completion and its MBR score."""

    draw: int | None = Field(description="draw index d; null: the mean adapter (n_models=0)")
    model: int | None = Field(
        description="deprecated alias of draw (the same value), kept for old clients",
        json_schema_extra={"deprecated": True},
    )
    sample: int = Field(description="sample index within the draw")
    text: str
    answer: str | None = Field(description="the normalised final answer, if any")
    logprob: float | None = Field(description="cumulative log-probability of the text")
    tokens: int
    finish_reason: str | None = Field(
        description="vLLM's (stop, length), or early_stop: aborted by early stopping, with the "
        "text it had generated (not selected from; no answer, no score)"
    )
    score: float | None = Field(
        description="the selection method's score (higher: chosen); null in progress events"
    )


class Usage(ResponseModel):
    prompt_tokens: int
    completion_tokens: int = Field(
        description="every token generated, over all candidates (stopped ones: until stopped)"
    )
    total_tokens: int


class Timing(ResponseModel):
    queue_s: float = Field(description="waiting for an engine slot (max_in_flight)")
    generate_s: float
    select_s: float
    total_s: float


class Consensus(ResponseModel):
    """How the choice was made: ivonserve's extra object on OpenAI responses, and the core of
    /generate's response."""

    answer: str | None = Field(description="the chosen text's normalised final answer")
    confidence: float = Field(description="agreement with the choice, in [0, 1]")
    chosen_draw: int | None = Field(description="draw of the chosen candidate (null: mean)")
    chosen_model: int | None = Field(
        description="alias of chosen_draw (the same value), kept for clients written against it"
    )
    chosen_sample: int
    # the fan-out the request ran with, defaults filled in
    n_models: int
    n_samples: int
    selection: str
    utility: str
    seed: int
    early_stop: str = Field(description="the early stopping rule the request ran with")
    n_finished: int = Field(description="candidates that finished: the ones selected from")
    n_stopped: int = Field(
        description="candidates early stopping aborted (finish_reason early_stop)"
    )
    candidates: list[CandidateOut] | None = None
    timing: Timing


class ErrorInfo(ResponseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(ResponseModel):
    """Every error: ``{"error": {"message", "type", "param", "code"}}`` (vLLM/OpenAI shape)."""

    error: ErrorInfo


class Health(ResponseModel):
    status: Literal["ok"] = "ok"


class Readiness(ResponseModel):
    status: Literal["ready", "starting", "failed", "draining", "stopped"]
    detail: str | None = None
    startup_s: float | None = None
    startup_phases_s: dict[str, float] | None = Field(
        None,
        description="seconds of each start-up phase: tokenizer, pool (posteriors loaded, "
        "draws written), vllm (engine start), register (adapters added), warm_up, total",
    )
    vllm_plugin: list[dict[str, Any]] | None = Field(
        None, description="what ivonserve's vLLM plugin applied in each vLLM worker, at start-up"
    )
