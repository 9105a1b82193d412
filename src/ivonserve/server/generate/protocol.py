"""/generate's request and response."""

from __future__ import annotations

import time
from typing import Literal

from pydantic import Field, model_validator

from ivonserve.server.protocol import ChatMessage, Consensus, FanOutOptions, Usage


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
