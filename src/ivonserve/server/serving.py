"""The work behind the generation routes (vLLM's ``serving_*`` pattern): fill defaults and check
limits (``plan``), wait for a slot, fan out, select (``run``), and shape the answer for
/generate, /v1/chat/completions and /v1/completions, streamed or not.

Every route goes through the same ``plan`` -> ``run``: one place for the limits, the timeout
(queue time included), the metrics and the request's log fields.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from ivonserve import mbr
from ivonserve.answers import extract_answer
from ivonserve.config import Settings
from ivonserve.engine import Engine, FanOut, Generated, InvalidRequest, Pool, SamplingOptions
from ivonserve.protocol import (
    AssistantMessage,
    CandidateOut,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    Consensus,
    DeltaMessage,
    ErrorInfo,
    FanOutOptions,
    GenerateRequest,
    GenerateResponse,
    Timing,
    Usage,
)
from ivonserve.server.limits import Admission, Overloaded, Ticket
from ivonserve.server.metrics import Metrics

KEEPALIVE_S = 10.0  # an SSE comment this often while candidates are generated (proxies, clients)
_KEEPALIVE = b": keep-alive\n\n"
_DONE = b"data: [DONE]\n\n"


class ApiError(Exception):
    """An error answered as ``ErrorResponse`` with its HTTP status (and headers, if any)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}

    def info(self) -> ErrorInfo:
        return ErrorInfo(
            message=self.message, type=error_type(self.status), param=self.param, code=self.status
        )


def error_type(status: int) -> str:
    return {
        400: "BadRequestError",
        401: "AuthenticationError",
        404: "NotFoundError",
        413: "RequestTooLargeError",
        422: "BadRequestError",
        429: "RateLimitError",
        503: "ServiceUnavailableError",
        504: "TimeoutError",
    }.get(status, "InternalServerError" if status >= 500 else "Error")


@dataclass(frozen=True)
class Plan:
    """One generation request with every default filled in and every limit checked."""

    pool: Pool
    prompt_ids: list[int]
    n_models: int
    n_samples: int
    sampling: SamplingOptions
    selection: str
    utility: str
    return_candidates: bool


@dataclass(frozen=True)
class Outcome:
    plan: Plan
    fan: FanOut
    chosen: mbr.Selection
    timing: Timing

    @property
    def winner(self) -> Generated:
        return self.fan.candidates[self.chosen.index]

    @property
    def usage(self) -> Usage:
        prompt, completion = self.fan.prompt_tokens, self.fan.completion_tokens
        return Usage(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
        )


class GenerationService:
    """Owns the admission control and the metrics of generation; the routes only translate."""

    def __init__(
        self,
        settings: Settings,
        require_engine: Callable[[], Engine],
        admission: Admission,
        metrics: Metrics,
    ) -> None:
        self.settings = settings
        self.require_engine = require_engine
        self.admission = admission
        self.metrics = metrics

    # --- the shared path --------------------------------------------------------------------
    def plan(
        self,
        req: FanOutOptions,
        model: str | None,
        max_tokens: int | None,
        prompt: Callable[[Engine], list[int]],
        prompt_field: str,
    ) -> Plan:
        """Defaults from the settings, then every limit; a violation is a 4xx naming it."""
        engine = self.require_engine()
        s = self.settings
        if model is not None and model not in engine.pools:
            raise ApiError(
                404,
                f"model: {model!r} is not served here; served: {', '.join(engine.pools)}",
                "model",
            )
        pool = engine.pool(model)
        n_models = req.n_models if req.n_models is not None else min(s.default_n_models, pool.size)
        if n_models > pool.size:
            raise ApiError(
                422, f"n_models: must be <= the pool size {pool.size}, got {n_models}", "n_models"
            )
        n_samples = req.n_samples if req.n_samples is not None else s.default_n_samples
        count = max(1, n_models) * n_samples
        if count > s.max_candidates:
            raise ApiError(
                422,
                f"n_samples: max(1, n_models) * n_samples = {count} candidates exceeds "
                f"max_candidates {s.max_candidates}",
                "n_samples",
            )
        max_tokens = max_tokens if max_tokens is not None else s.default_max_tokens
        if max_tokens > s.max_tokens_limit:
            raise ApiError(
                422, f"max_tokens: must be <= {s.max_tokens_limit}, got {max_tokens}", "max_tokens"
            )
        prompt_ids = prompt(engine)
        limit = s.max_prompt_tokens or engine.max_model_len - 1
        if len(prompt_ids) > limit:
            raise ApiError(
                422,
                f"{prompt_field}: the prompt is {len(prompt_ids)} tokens, over the limit of "
                f"{limit} (max_prompt_tokens / the context length)",
                prompt_field,
            )
        sampling = SamplingOptions(
            max_tokens=max_tokens,
            temperature=req.temperature if req.temperature is not None else s.default_temperature,
            top_p=req.top_p if req.top_p is not None else s.default_top_p,
            seed=req.seed,
            ignore_eos=req.ignore_eos,
            stop=tuple(req.stop or ()),
        )
        engine.check_length(prompt_ids, sampling)
        return Plan(
            pool=pool,
            prompt_ids=prompt_ids,
            n_models=n_models,
            n_samples=n_samples,
            sampling=sampling,
            selection=req.selection or s.default_selection,
            utility=req.utility or s.default_utility,
            return_candidates=req.return_candidates,
        )

    def admit(self) -> Ticket:
        """A slot or a queue place, taken before any response starts (so a refusal is a real
        429/503 status, streaming or not)."""
        try:
            return self.admission.enter()
        except Overloaded as err:
            raise ApiError(
                err.status, str(err), headers={"Retry-After": str(err.retry_after_s)}
            ) from None

    async def run(
        self,
        plan: Plan,
        ticket: Ticket,
        log: dict[str, Any],
        on_draw: Callable[[list[Generated]], None] | None = None,
    ) -> Outcome:
        """Wait for the slot, fan out, select; the timeout covers all of it."""
        s = self.settings
        log.update(model=plan.pool.name, n_models=plan.n_models, n_samples=plan.n_samples)
        began = time.perf_counter()
        try:
            async with asyncio.timeout(s.request_timeout_s):
                async with ticket:
                    admitted = time.perf_counter()
                    fan = await self.require_engine().fan_out(
                        plan.prompt_ids,
                        plan.n_models,
                        plan.n_samples,
                        plan.sampling,
                        plan.pool.name,
                        on_draw,
                    )
                    generated = time.perf_counter()
                    self.admission.record_service(generated - admitted)
        except TimeoutError:
            raise ApiError(
                504, f"the request took longer than request_timeout_s={s.request_timeout_s}"
            ) from None
        chosen = await asyncio.to_thread(_select, fan, plan.selection, plan.utility)
        selected = time.perf_counter()
        timing = Timing(
            queue_s=round(admitted - began, 4),
            generate_s=round(generated - admitted, 4),
            select_s=round(selected - generated, 4),
            total_s=round(selected - began, 4),
        )
        self._observe(plan, fan, chosen, timing, log)
        return Outcome(plan=plan, fan=fan, chosen=chosen, timing=timing)

    def _observe(
        self, plan: Plan, fan: FanOut, chosen: mbr.Selection, timing: Timing, log: dict[str, Any]
    ) -> None:
        m, name = self.metrics, plan.pool.name
        for phase in ("queue", "generate", "select"):
            m.phase.labels(phase).observe(getattr(timing, f"{phase}_s"))
        m.candidates.labels(name).inc(len(fan.candidates))
        m.prompt_tokens.labels(name).inc(fan.prompt_tokens)
        m.generated_tokens.labels(name).inc(fan.completion_tokens)
        m.confidence.labels(name).observe(chosen.confidence)
        log.update(
            prompt_tokens=fan.prompt_tokens,
            completion_tokens=fan.completion_tokens,
            confidence=round(chosen.confidence, 4),
            **timing.model_dump(exclude={"total_s"}),
        )

    # --- the routes' shapes -----------------------------------------------------------------
    def plan_generate(self, req: GenerateRequest) -> Plan:
        messages = _template_messages(req.messages) if req.messages else None
        field = "messages" if messages else "prompt"
        return self.plan(
            req, req.model, req.max_tokens, lambda e: _render(e, req.prompt, messages), field
        )

    def plan_chat(self, req: ChatCompletionRequest) -> Plan:
        messages = _template_messages(req.messages)
        return self.plan(
            req, req.model, req.max_tokens, lambda e: _render(e, None, messages), "messages"
        )

    def plan_completion(self, req: CompletionRequest) -> Plan:
        return self.plan(req, req.model, req.max_tokens, lambda e: e.encode(req.prompt), "prompt")

    async def stream(
        self,
        plan: Plan,
        ticket: Ticket,
        log: dict[str, Any],
        opening: Iterable[BaseModel | dict],
        on_draw: Callable[[list[Generated]], BaseModel | dict] | None,
        closing: Callable[[Outcome], Iterable[BaseModel | dict]],
    ) -> AsyncIterator[bytes]:
        """Server-sent events: ``opening`` at once, an event per finished draw (``on_draw``),
        keep-alive comments while waiting, then ``closing(outcome)`` and ``[DONE]``. An error
        after the stream began is an ``{"error": ...}`` event (what OpenAI's client expects)."""
        draws: asyncio.Queue[list[Generated]] = asyncio.Queue()
        work = asyncio.create_task(
            self.run(plan, ticket, log, draws.put_nowait if on_draw else None)
        )
        try:
            for event in opening:
                yield _sse(event)
            while not work.done():
                waiting = asyncio.ensure_future(draws.get())
                await asyncio.wait(
                    {work, waiting}, timeout=KEEPALIVE_S, return_when=asyncio.FIRST_COMPLETED
                )
                if waiting.done():
                    yield _sse(on_draw(waiting.result()))
                else:
                    waiting.cancel()
                    if not work.done():
                        yield _KEEPALIVE
            while not draws.empty():
                yield _sse(on_draw(draws.get_nowait()))
            try:
                outcome = work.result()
            except ApiError as err:
                yield _sse({"type": "error", "error": err.info().model_dump()})
            except InvalidRequest as err:
                info = ApiError(422, f"{err.field}: {err}", err.field).info()
                yield _sse({"type": "error", "error": info.model_dump()})
            else:
                for event in closing(outcome):
                    yield _sse(event)
            yield _DONE
        except asyncio.CancelledError:
            if not self.admission.draining:  # else: the drain deadline passed
                self.metrics.disconnects.inc()  # the client left: the fan-out is aborted below
            raise
        finally:
            if not work.done():
                work.cancel()
                with contextlib.suppress(BaseException):
                    await work
            ticket.release()


# --- response shapes ------------------------------------------------------------------------
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
        "chosen_model": winner.model,
        "chosen_sample": winner.sample,
        "n_models": plan.n_models,
        "n_samples": plan.n_samples,
        "selection": plan.selection,
        "utility": plan.utility,
        "seed": outcome.fan.seed,
        "candidates": candidates_out(outcome) if plan.return_candidates else None,
        "timing": outcome.timing,
    }


def candidates_out(outcome: Outcome) -> list[CandidateOut]:
    chosen, fan = outcome.chosen, outcome.fan
    answers = chosen.answers or tuple(extract_answer(c.text) for c in fan.candidates)
    return [
        candidate_out(c, answers[i], float(chosen.scores[i])) for i, c in enumerate(fan.candidates)
    ]


def candidate_out(c: Generated, answer: str | None, score: float | None) -> CandidateOut:
    return CandidateOut(
        model=c.model,
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

    def closing(self, outcome: Outcome) -> list[ChatCompletionChunk]:
        text = ChatChunkChoice(delta=DeltaMessage(content=outcome.chosen.text))
        end = ChatChunkChoice(delta=DeltaMessage(), finish_reason=outcome.winner.finish_reason)
        chunks = [self.chunk([text]), self.chunk([end], ivonserve=consensus(outcome))]
        if self.include_usage:
            chunks.append(self.chunk([], usage=outcome.usage))
        return chunks


class CompletionStream(_OpenAIStream):
    """OpenAI's completion chunks: the consensus text with its finish reason, then usage."""

    prefix = "cmpl"

    def closing(self, outcome: Outcome) -> list[CompletionResponse]:
        choice = CompletionChoice(
            text=outcome.chosen.text, finish_reason=outcome.winner.finish_reason
        )
        chunks = [
            CompletionResponse(
                id=self.id,
                created=self.created,
                model=self.model,
                choices=[choice],
                ivonserve=consensus(outcome),
            )
        ]
        if self.include_usage:
            chunks.append(
                CompletionResponse(
                    id=self.id,
                    created=self.created,
                    model=self.model,
                    choices=[],
                    usage=outcome.usage,
                )
            )
        return chunks


def progress_event(candidates: list[Generated]) -> dict[str, Any]:
    """One /generate progress event: a draw's candidates, as soon as that draw finished."""
    return {
        "type": "candidates",
        "candidates": [
            candidate_out(c, extract_answer(c.text), None).model_dump() for c in candidates
        ],
    }


def result_event(outcome: Outcome) -> list[dict[str, Any]]:
    return [{"type": "result", "result": generate_response(outcome).model_dump()}]


# --- helpers --------------------------------------------------------------------------------
def _select(fan: FanOut, selection: str, utility: str) -> mbr.Selection:
    candidates = [
        mbr.Candidate(model=c.model or 0, text=c.text, logprob=c.logprob, tokens=c.tokens)
        for c in fan.candidates
    ]
    try:
        return mbr.select(candidates, method=selection, utility=utility)
    except ValueError as err:
        raise ApiError(422, f"selection: {err}", "selection") from err


def _template_messages(messages: list) -> list[dict[str, str]]:
    return [m.as_template_message() for m in messages]


def _render(engine: Engine, prompt: str | None, messages: list[dict[str, str]] | None) -> list[int]:
    try:
        return engine.render(prompt, messages)
    except InvalidRequest:
        raise
    except Exception as err:  # a chat template that rejects these messages
        raise ApiError(422, f"messages: the chat template failed: {err}", "messages") from err


def _sse(event: BaseModel | dict) -> bytes:
    data = event.model_dump_json() if isinstance(event, BaseModel) else json.dumps(event)
    return f"data: {data}\n\n".encode()
