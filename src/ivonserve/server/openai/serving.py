"""OpenAI's chat and completions on top of generation (``generate.serving``): their plans, their
answers whole and as OpenAI's chunk streams (``choices[0]`` is the consensus, ``ivonserve`` says
how it was chosen), and /v1/models' cards. Echo scoring is ``echo``'s.
"""

from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING, Any

from ivonserve.errors import InvalidRequest
from ivonserve.server.generate.serving import GenerationService, Outcome, Plan, consensus
from ivonserve.server.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ModelCard,
    ModelList,
)
from ivonserve.server.score.serving import served_form
from ivonserve.server.serving import render, template_messages, tokens_of

if TYPE_CHECKING:
    from ivonserve.server.lifecycle import EngineState

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


def plan_chat(service: GenerationService, req: ChatCompletionRequest) -> Plan:
    messages = template_messages(req.messages)
    return service.plan(
        req, req.model, req.max_tokens, lambda e: render(e, None, messages), "messages"
    )


def plan_completion(service: GenerationService, req: CompletionRequest) -> Plan:
    if req.echo or req.logprobs is not None:
        raise InvalidRequest(
            "echo" if req.echo else "logprobs",
            "echo and logprobs score the prompt and need max_tokens 0 or 1 (scoring); "
            "generation returns the consensus without them",
        )
    if len(req.prompts) != 1:
        raise InvalidRequest("prompt", "give one prompt (a batch of prompts is for scoring only)")
    if req.max_tokens == 0:
        raise InvalidRequest("max_tokens", "0 is for scoring (with echo) only")
    (prompt,) = req.prompts
    return service.plan(
        req,
        req.model,
        req.max_tokens,
        lambda e: tokens_of(e, prompt, service.limits),
        "prompt",
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
    def error(body: dict[str, Any]) -> dict[str, Any]:
        """OpenAI's error object as a stream event (its client raises on it)."""
        return body


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
        """A chunk with no text while the candidates are generated (see stream.sse_events)."""
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
        """A chunk with no text while the candidates are generated (see stream.sse_events)."""
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


def model_list(state: EngineState, created: int) -> ModelList:
    """Every served posterior with its pool (known from the settings while the engine starts)."""
    s = state.settings
    engine = state.engine
    ready = engine is not None and engine.ready
    base = str(engine.model_dir) if engine is not None and engine.model_dir else s.model
    cards = []
    for i, spec in enumerate(s.posterior_specs()):
        pool = engine.pools.get(spec.name) if engine is not None else None
        ess = pool.info.get("ess") if pool is not None else None
        cards.append(
            ModelCard(
                id=spec.name,
                created=created,
                root=str(spec.path),
                kind=spec.kind,
                base_model=base or EMBEDDED_MODEL,
                ess=ess if spec.kind == "posterior" else None,
                pool_size=pool.size if pool is not None else s.pool_size,
                pool_seed=s.pool_seed,
                posterior_temperature=s.posterior_temperature,
                sampling_temperature=s.posterior_temperature,
                prune=s.prune,
                prune_by=s.prune_by,
                mc_form=served_form(pool) if pool is not None else None,
                default=i == 0,
                ready=ready,
            )
        )
    return ModelList(data=cards)
