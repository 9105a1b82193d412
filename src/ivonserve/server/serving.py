"""The work behind the generation routes (vLLM's ``serving_*`` pattern): fill defaults and check
limits (``plan``), wait for a slot, fan out, select (``run``), and stream, for /generate,
/v1/chat/completions and /v1/completions. The shapes of the answers are ``responses``'s.

Every engine route (scoring too, ``scoring``) shares ``Service``: one place for admission, the
timeout (queue time included), the pool a request names and the prompt limit. The wire's
``n_models`` is the code's ``n_draws``: ``plan`` maps it in, ``responses`` maps it back out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any, TypeVar

from pydantic import BaseModel

from ivonserve import mbr
from ivonserve.config import Settings
from ivonserve.engine import Engine, FanOut, Generated, SamplingOptions
from ivonserve.errors import InvalidRequest
from ivonserve.mbr.stopping import StopPolicy, Tracker, unsupported
from ivonserve.pool import Pool
from ivonserve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    FanOutOptions,
    GenerateRequest,
    Timing,
    Usage,
)
from ivonserve.server.errors import ApiError, api_error
from ivonserve.server.limits import Admission, Overloaded, Ticket
from ivonserve.server.metrics import Metrics

KEEPALIVE_S = 10.0  # an SSE comment this often while candidates are generated (proxies, clients)
_KEEPALIVE = b": keep-alive\n\n"
_DONE = b"data: [DONE]\n\n"
T = TypeVar("T")


@dataclass(frozen=True)
class Plan:
    """One generation request with every default filled in and every limit checked."""

    pool: Pool
    prompt_ids: list[int]
    n_draws: int
    n_samples: int
    sampling: SamplingOptions
    selection: str
    utility: str
    return_candidates: bool
    early_stop: StopPolicy = dataclass_field(default_factory=StopPolicy)


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
        return usage(self.fan.prompt_tokens, self.fan.completion_tokens)


def usage(prompt: int, completion: int) -> Usage:
    return Usage(
        prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion
    )


@dataclass(frozen=True)
class EngineRun:
    """What ``Service.on_engine`` measured: the work's result, its queue and engine seconds."""

    result: Any
    began: float
    queue_s: float
    engine_s: float


class Service:
    """What every engine route shares: admission, the timeout, the named pool, prompt limits."""

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

    def admit(self) -> Ticket:
        """A slot or a queue place, taken before any response starts (so a refusal is a real
        429/503 status, streaming or not)."""
        try:
            return self.admission.enter()
        except Overloaded as err:
            raise ApiError(
                err.status, str(err), headers={"Retry-After": str(err.retry_after_s)}
            ) from None

    def named_pool(self, engine: Engine, model: str | None) -> Pool:
        """The pool a request names (404 if none such), or the default one."""
        if model is not None and model not in engine.pools:
            raise ApiError(
                404,
                f"model: {model!r} is not served here; served: {', '.join(engine.pools)}",
                "model",
            )
        return engine.pool(model)

    def n_draws(self, requested: int | None, pool: Pool) -> int:
        """The wire's n_models: the request's, or the server default capped at the pool."""
        if requested is None:
            return min(self.settings.default_n_models, pool.size)
        if requested > pool.size:
            raise ApiError(
                422, f"n_models: must be <= the pool size {pool.size}, got {requested}", "n_models"
            )
        return requested

    def check_prompt(self, engine: Engine, prompt_ids: list[int], field: str) -> None:
        limit = self.settings.max_prompt_tokens or engine.max_model_len - 1
        if len(prompt_ids) > limit:
            raise ApiError(
                422,
                f"{field}: the prompt is {len(prompt_ids)} tokens, over the limit of "
                f"{limit} (max_prompt_tokens / the context length)",
                field,
            )

    async def on_engine(
        self, ticket: Ticket, work: Callable[[Engine], Awaitable[T]], timeout_what: str
    ) -> EngineRun:
        """Wait for the slot, then ``work(engine)``; the timeout covers both (504)."""
        s = self.settings
        began = time.perf_counter()
        try:
            async with asyncio.timeout(s.request_timeout_s):
                async with ticket:
                    admitted = time.perf_counter()
                    result = await work(self.require_engine())
                    done = time.perf_counter()
                    self.admission.record_service(done - admitted)
        except TimeoutError:
            raise ApiError(
                504, f"the {timeout_what} took longer than request_timeout_s={s.request_timeout_s}"
            ) from None
        return EngineRun(result, began, admitted - began, done - admitted)


class GenerationService(Service):
    """Generation: plan, fan out, select, stream; the routes only translate."""

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
        pool = self.named_pool(engine, model)
        n_draws = self.n_draws(req.n_models, pool)
        n_samples = req.n_samples if req.n_samples is not None else s.default_n_samples
        count = max(1, n_draws) * n_samples
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
        self.check_prompt(engine, prompt_ids, prompt_field)
        vocab = len(engine.tokenizer)
        if any(t >= vocab for t in req.stop_token_ids or ()):
            raise ApiError(
                422, f"stop_token_ids: token ids are below the vocabulary size {vocab}",
                "stop_token_ids",
            )  # fmt: skip
        sampling = SamplingOptions(
            max_tokens=max_tokens,
            temperature=req.temperature if req.temperature is not None else s.default_temperature,
            top_p=req.top_p if req.top_p is not None else s.default_top_p,
            seed=req.seed,
            ignore_eos=req.ignore_eos,
            stop=tuple(req.stop or ()),
            extra=req.sampling_extensions(),
        )
        engine.check_length(prompt_ids, sampling.max_tokens)
        selection = req.selection or s.default_selection
        utility = req.utility or s.default_utility
        return Plan(
            pool=pool,
            prompt_ids=prompt_ids,
            n_draws=n_draws,
            n_samples=n_samples,
            sampling=sampling,
            selection=selection,
            utility=utility,
            return_candidates=req.return_candidates,
            early_stop=self.early_stop(req, selection, utility),
        )

    def early_stop(self, req: FanOutOptions, selection: str, utility: str) -> StopPolicy:
        """The request's rule, else the server's; a rule the selection and utility do not allow
        is a 422 when the request names it, and ``off`` when it is only the server default."""
        s = self.settings
        rule = req.early_stop or s.early_stop
        if req.early_stop_threshold is not None and rule != "confidence":
            raise ApiError(
                422,
                f"early_stop_threshold: applies to early_stop 'confidence', not {rule!r}",
                "early_stop_threshold",
            )
        why = unsupported(rule, selection, utility)
        if why is not None:
            if req.early_stop is not None:
                raise ApiError(422, f"early_stop: {why}", "early_stop")
            rule = "off"
        threshold = req.early_stop_threshold
        return StopPolicy(
            rule,
            threshold if threshold is not None else s.early_stop_threshold,
            s.early_stop_min_finished,
        )

    async def run(
        self,
        plan: Plan,
        ticket: Ticket,
        log: dict[str, Any],
        on_draw: Callable[[list[Generated]], None] | None = None,
    ) -> Outcome:
        """Wait for the slot, fan out, select; the timeout covers all of it."""
        log.update(model=plan.pool.name, n_models=plan.n_draws, n_samples=plan.n_samples)

        def fan_out(engine: Engine) -> Awaitable[FanOut]:
            stopper = None
            if plan.early_stop.active and max(1, plan.n_draws) * plan.n_samples > 1:
                stopper = Tracker(
                    plan.early_stop,
                    plan.selection,
                    plan.n_draws,
                    plan.n_samples,
                    plan.sampling.max_tokens,
                )
            return engine.fan_out(
                plan.prompt_ids,
                plan.n_draws,
                plan.n_samples,
                plan.sampling,
                plan.pool.name,
                on_draw,
                stopper,
            )

        run = await self.on_engine(ticket, fan_out, "request")
        fan: FanOut = run.result
        chosen = await asyncio.to_thread(_select, fan, plan.selection, plan.utility)
        selected = time.perf_counter()
        timing = Timing(
            queue_s=round(run.queue_s, 4),
            generate_s=round(run.engine_s, 4),
            select_s=round(selected - run.began - run.queue_s - run.engine_s, 4),
            total_s=round(selected - run.began, 4),
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
        if fan.stopped:
            m.early_stops.labels(name, plan.early_stop.rule).inc()
            m.stopped_candidates.labels(name).inc(len(fan.stopped))
            # the budget each stopped decode left unspent (greedy: one decode per draw)
            greedy = plan.sampling.temperature == 0
            unspent = [c for c in fan.stopped if not greedy or c.sample == 0]
            cap = plan.sampling.max_tokens
            m.saved_tokens.labels(name).inc(sum(max(0, cap - c.tokens) for c in unspent))
        log.update(
            early_stop=plan.early_stop.rule,
            n_stopped=len(fan.stopped),
            prompt_tokens=fan.prompt_tokens,
            completion_tokens=fan.completion_tokens,
            confidence=round(chosen.confidence, 4),
            **timing.model_dump(exclude={"total_s"}),
        )

    # --- the routes' requests ---------------------------------------------------------------
    def plan_generate(self, req: GenerateRequest) -> Plan:
        messages = template_messages(req.messages) if req.messages else None
        field = "messages" if messages else "prompt"
        return self.plan(
            req, req.model, req.max_tokens, lambda e: render(e, req.prompt, messages), field
        )

    def plan_chat(self, req: ChatCompletionRequest) -> Plan:
        messages = template_messages(req.messages)
        return self.plan(
            req, req.model, req.max_tokens, lambda e: render(e, None, messages), "messages"
        )

    def plan_completion(self, req: CompletionRequest) -> Plan:
        if req.echo or req.logprobs is not None:
            raise ApiError(
                422,
                "echo: echo and logprobs score the prompt and need max_tokens 0 or 1 (scoring); "
                "generation returns the consensus without them",
                "echo" if req.echo else "logprobs",
            )
        if len(req.prompts) != 1:
            raise ApiError(
                422, "prompt: give one prompt (a batch of prompts is for scoring only)", "prompt"
            )
        if req.max_tokens == 0:
            raise ApiError(422, "max_tokens: 0 is for scoring (with echo) only", "max_tokens")
        (prompt,) = req.prompts
        return self.plan(req, req.model, req.max_tokens, lambda e: tokens_of(e, prompt), "prompt")

    async def stream(
        self,
        plan: Plan,
        ticket: Ticket,
        log: dict[str, Any],
        opening: Iterable[BaseModel | dict],
        on_draw: Callable[[list[Generated]], BaseModel | dict] | None,
        closing: Callable[[Outcome], Iterable[BaseModel | dict]],
        error: Callable[[ErrorResponse], dict],
        keepalive: Callable[[], BaseModel | dict] | None = None,
    ) -> AsyncIterator[bytes]:
        """Server-sent events: ``opening`` at once, an event per finished draw (``on_draw``),
        every KEEPALIVE_S while waiting a ``keepalive()`` event (default: an SSE comment; the
        OpenAI routes send a chunk with no text, since vLLM's benchmark client strips each
        network read, so a comment glued onto the chunk after it and that chunk was lost), then
        ``closing(outcome)`` and ``[DONE]``. Any error
        after the stream began (a limit, a timeout, the engine dying) is ``error(body)`` as the
        last event before ``[DONE]``: a stream always ends, never breaks off."""
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
                        yield _sse(keepalive()) if keepalive else _KEEPALIVE
            while not draws.empty():
                yield _sse(on_draw(draws.get_nowait()))
            failure = asyncio.CancelledError() if work.cancelled() else work.exception()
            if failure is not None:
                yield _sse(error(api_error(failure).body()))
            else:
                for event in closing(work.result()):
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


# --- helpers --------------------------------------------------------------------------------
def _select(fan: FanOut, selection: str, utility: str) -> mbr.Selection:
    # the mean (draw None) is one hypothesis set of its own, like a draw
    candidates = [
        mbr.Candidate(draw=c.draw or 0, text=c.text, logprob=c.logprob, tokens=c.tokens)
        for c in fan.candidates
    ]
    try:
        return mbr.select(candidates, method=selection, utility=utility)
    except ValueError as err:
        raise ApiError(422, f"selection: {err}", "selection") from err


def template_messages(messages: list) -> list[dict[str, str]]:
    return [m.as_template_message() for m in messages]


def render(engine: Engine, prompt: str | None, messages: list[dict[str, str]] | None) -> list[int]:
    """The chat template applied; a template that rejects the messages is the client's 422."""
    try:
        return engine.render(prompt, messages)
    except InvalidRequest:
        raise
    except Exception as err:  # a chat template that rejects these messages
        raise ApiError(422, f"messages: the chat template failed: {err}", "messages") from err


def tokens_of(engine: Engine, prompt: str | list[int]) -> list[int]:
    """A completions prompt as token ids: a text used as is, or ids checked against the vocab."""
    if isinstance(prompt, str):
        return engine.encode(prompt)
    vocab = len(engine.tokenizer)
    if any(t >= vocab for t in prompt):
        raise ApiError(422, f"prompt: token ids are below the vocabulary size {vocab}", "prompt")
    return list(prompt)


def _sse(event: BaseModel | dict) -> bytes:
    data = event.model_dump_json() if isinstance(event, BaseModel) else json.dumps(event)
    return f"data: {data}\n\n".encode()
