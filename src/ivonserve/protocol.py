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
MAX_TOP_LOGPROBS = 20  # vLLM's default max_logprobs


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")


class _Response(BaseModel):
    model_config = ConfigDict(extra="forbid")


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
    top_k: int | None = Field(None, ge=-1, description="sample among the k likeliest (0, -1: all)")
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


class CandidateOut(_Response):
    """One sampled completion and its MBR score."""

    model: int | None = Field(description="draw index; null: the mean adapter (n_models=0)")
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


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int = Field(
        description="every token generated, over all candidates (stopped ones: until stopped)"
    )
    total_tokens: int


class Timing(_Response):
    queue_s: float = Field(description="waiting for an engine slot (max_in_flight)")
    generate_s: float
    select_s: float
    total_s: float


class ScoreRequest(_Request):
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


class ContinuationScore(_Response):
    """One continuation's log-likelihood (natural log) under the posterior predictive."""

    index: int
    tokens: int
    logprob: float = Field(
        description="log((1/K) sum_k p_k(continuation | prompt)); n_models=0: the mean's"
    )
    draws: list[float] = Field(description="log p_k(continuation | prompt) of each draw k")
    disagreement: float = Field(
        description="logprob - mean(draws), >= 0 nats: 0 when every draw agrees (epistemic)"
    )
    token_ids: list[int] | None = None
    token_logprobs: list[float] | None = Field(
        None, description="per token, log of the draws' mean probability (token predictive)"
    )


class ScoreTiming(_Response):
    queue_s: float = Field(description="waiting for an engine slot (max_in_flight)")
    score_s: float
    total_s: float


class ScoreResponse(_Response):
    id: str
    object: Literal["ivonserve.score"] = "ivonserve.score"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str = Field(description="the posterior that scored")
    n_models: int
    prompt_tokens: int = Field(description="tokens of the prompt (chat template applied)")
    scores: list[ContinuationScore]
    usage: Usage
    timing: ScoreTiming


class ChoiceScoreRequest(_Request):
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
    form: Literal["letter", "text"] = Field(
        "letter", description="letter: answer with the choice's letter; text: with its text"
    )

    @field_validator("choices")
    @classmethod
    def _non_empty_choices(cls, value: list[str]) -> list[str]:
        if any(not c.strip() for c in value):
            raise ValueError("choices must not be empty strings")
        return value


class ChoiceScoreResponse(_Response):
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
    early_stop: str = Field(description="the early stopping rule the request ran with")
    n_finished: int = Field(description="candidates that finished: the ones selected from")
    n_stopped: int = Field(
        description="candidates early stopping aborted (finish_reason early_stop)"
    )
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


class CompletionLogprobs(_Response):
    """OpenAI's legacy logprobs: per token its text, log-probability (None for the first
    prompt token, which nothing predicts), likeliest alternatives, and character offset."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


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
    startup_phases_s: dict[str, float] | None = Field(
        None,
        description="seconds of each start-up phase: tokenizer, pool (posteriors loaded, "
        "draws written), vllm (engine start), register (adapters added), warm_up, total",
    )
    vllm_plugin: list[dict[str, Any]] | None = Field(
        None, description="what ivonserve's vLLM plugin applied in each vLLM worker, at start-up"
    )
