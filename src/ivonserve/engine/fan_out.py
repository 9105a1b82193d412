"""The fan-out: one vLLM request per draw, ``SamplingParams(n=n_samples)`` each, all at once so
vLLM batches them, with a distinct seed per draw derived from the request's seed (one seed for
all would correlate the draws' samples token by token); early stopping (a ``Stopper`` asked as
the candidates finish); the base model alone (``generate_base``); and the submission every
engine request shares (``_run_all``): if the caller is cancelled (client gone, timeout), every
engine request it made is aborted.

The engine trusts its caller with the request's limits (n_models <= K, the prompt's length:
``server.limits`` checks them once); what vLLM itself refuses becomes an ``InvalidRequest``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
import uuid
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ivonserve.engine.types import (
    STOPPED,
    FanOut,
    Generated,
    Job,
    SamplingOptions,
    Stopper,
    job_name,
)
from ivonserve.errors import EngineError, EngineNotReady, InvalidRequest
from ivonserve.sampler import draw_seed

if TYPE_CHECKING:
    from ivonserve.pool import Pool

logger = logging.getLogger("ivonserve.engine")
SEED_MASK = (1 << 62) - 1  # vLLM adds the sample index to a request's seed: stay inside int64
DEFAULT_SAMPLING = SamplingOptions()


def request_seed_for_draw(seed: int, draw: int) -> int:
    """The vLLM seed of one draw's request: distinct and well mixed per (request seed, draw)."""
    return draw_seed(seed, draw) & SEED_MASK


class FanOutMixin:
    """``Engine``'s fan-out and request submission; ``engine.lifecycle.Engine`` holds the state
    and the methods annotated here."""

    llm: Any  # vllm.v1.engine.async_llm.AsyncLLM once started
    aborted_requests: int
    ready: bool
    _ready: bool
    pool: Callable[..., Pool]
    encode: Callable[[str], list[int]]

    def require_ready(self) -> None:
        if not self.ready:
            raise EngineNotReady("the engine is not ready")

    async def fan_out(
        self,
        prompt: str | Sequence[int],
        n_draws: int,
        n_samples: int,
        sampling: SamplingOptions = DEFAULT_SAMPLING,
        pool: Pool | None = None,
        on_draw: Callable[[list[Generated]], None] | None = None,
        stopper: Stopper | None = None,
    ) -> FanOut:
        """n_draws draws x n_samples samples (n_draws = 0: the mean adapter, n_samples samples)
        of ``pool`` (None: the default pool).

        ``prompt``: token ids, or a text used as is (no chat template; see ``render``).
        Draw d's request has ``seed = request_seed_for_draw(seed, d)``; vLLM gives its samples
        seed+0..n-1. Cancelling the caller aborts every engine request of this fan-out.
        ``on_draw`` receives each draw's candidates as soon as that draw has finished.
        ``stopper``: early stopping (``_fan_out_until``); the same requests, streamed.
        """
        self.require_ready()
        if n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {n_samples}")
        adapters = (pool or self.pool()).adapters(n_draws)
        prompt_ids = self._tokens(prompt)
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(62)
        fan_id = f"ivs-{uuid.uuid4().hex[:16]}"
        # Greedy decoding gives every sample the same text, and vLLM refuses n > 1 with it:
        # decode once per draw and repeat the candidate (usage counts the tokens decoded).
        greedy = sampling.temperature == 0
        n_engine = 1 if greedy else n_samples
        streamed = stopper is not None
        jobs = [
            Job(
                draw,
                job_name(fan_id, draw),
                self._params(sampling, n_engine, request_seed_for_draw(seed, position), streamed),
                lora,
                prompt_ids,
            )
            for position, (draw, lora) in enumerate(adapters)
        ]
        if stopper is not None:
            return await self._fan_out_until(
                jobs, n_samples, greedy, stopper, on_draw, len(prompt_ids), seed
            )

        def draw_candidates(position: int, out: Any) -> list[Generated]:
            completions = sorted(out.outputs, key=lambda c: c.index)
            if greedy:
                completions = completions * n_samples
            draw = jobs[position].draw
            return [_generated(draw, sample, c) for sample, c in enumerate(completions)]

        finished = None if on_draw is None else lambda i, out: on_draw(draw_candidates(i, out))
        began = time.perf_counter()
        outputs = await self._run_all(jobs, finished)
        candidates = [c for i, out in enumerate(outputs) for c in draw_candidates(i, out)]
        decoded = sum(len(c.token_ids) for out in outputs for c in out.outputs)
        return FanOut(
            candidates=candidates,
            prompt_tokens=len(prompt_ids),
            completion_tokens=decoded,
            request_ids=[j.request_id for j in jobs],
            seed=seed,
            seconds=time.perf_counter() - began,
        )

    async def generate_base(
        self, prompt: str | Sequence[int], sampling: SamplingOptions = DEFAULT_SAMPLING, n: int = 1
    ) -> list[Generated]:
        """The base model without any adapter (diagnostics and the base-in-batch test)."""
        self.require_ready()
        prompt_ids = self._tokens(prompt)
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(62)
        request_id = f"ivs-{uuid.uuid4().hex[:16]}-base"
        params = self._params(sampling, n, seed & SEED_MASK)
        (out,) = await self._run_all([Job(None, request_id, params, None, prompt_ids)])
        return [_generated(None, c.index, c) for c in sorted(out.outputs, key=lambda c: c.index)]

    def _tokens(self, prompt: str | Sequence[int]) -> list[int]:
        return self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    def _params(self, sampling: SamplingOptions, n: int, seed: int, streamed: bool = False) -> Any:
        """``streamed``: every sample's output at every step (CUMULATIVE), for early stopping;
        else all n samples together once (FINAL_ONLY). The samples are the same either way."""
        from vllm.exceptions import VLLMClientError
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        try:
            return SamplingParams(
                n=n,
                max_tokens=sampling.max_tokens,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                seed=seed,
                ignore_eos=sampling.ignore_eos,
                stop=list(sampling.stop) or None,
                logprobs=0,  # only the sampled token: gives the cumulative logprob
                output_kind=(
                    RequestOutputKind.CUMULATIVE if streamed else RequestOutputKind.FINAL_ONLY
                ),
                **sampling.extra,
            )
        except VLLMClientError as err:  # a value vLLM refuses: the client's to fix
            field_name = getattr(err, "parameter", None) or "sampling"
            raise InvalidRequest(field_name, f"vLLM rejected the request: {err}") from err

    async def _run_all(
        self, jobs: list[Job], finished: Callable[[int, Any], None] | None = None
    ) -> list[Any]:
        """Submit every job at once and wait for all final outputs; abort them all on failure.
        ``finished(position, output)`` is called as each job completes."""
        from vllm.inputs import TokensPrompt

        llm = self.llm

        async def one(position: int, job: Job) -> Any:
            final = None
            async for output in llm.generate(
                TokensPrompt(prompt_token_ids=job.prompt_ids),
                job.params,
                job.request_id,
                lora_request=job.lora,
            ):
                final = output
            if finished is not None:
                finished(position, final)
            return final

        tasks = [asyncio.ensure_future(one(i, job)) for i, job in enumerate(jobs)]
        try:
            return await asyncio.gather(*tasks)
        except BaseException as err:
            await self._abort_failed(llm, jobs, tasks, err)
            raise

    async def _abort_failed(
        self, llm: Any, jobs: list[Job], tasks: list[asyncio.Future], err: BaseException
    ) -> None:
        """After a failure or cancellation: cancel every task, abort every request, and raise
        vLLM's client and engine errors as ivonserve's (the caller re-raises anything else)."""
        for task in tasks:
            task.cancel()
        self.aborted_requests += len(jobs)
        # generate() aborts its own request when cancelled; abort by id as well, in case a
        # task was cancelled before its request reached the engine's bookkeeping.
        with contextlib.suppress(Exception):
            await asyncio.shield(llm.abort([j.request_id for j in jobs]))
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(err, VLLMClientError):
            field_name = getattr(err, "parameter", None) or "prompt"
            raise InvalidRequest(field_name, f"vLLM rejected the request: {err}") from err
        if isinstance(err, EngineDeadError):
            self._ready = False
            raise EngineError("the vLLM engine died; restart the server") from err

    async def _fan_out_until(
        self,
        jobs: list[Job],
        n_samples: int,
        greedy: bool,
        stopper: Stopper,
        on_draw: Callable[[list[Generated]], None] | None,
        prompt_tokens: int,
        seed: int,
    ) -> FanOut:
        """``fan_out`` with early stopping. Each draw's request streams every sample's output
        (CUMULATIVE: same seeds, same samples as FINAL_ONLY); each finished sample goes to the
        stopper, each running one's cumulative logprob too. When ``stopper.should_stop()``, the
        requests still running are aborted in vLLM (``AsyncLLM.abort``: their sequences leave
        the batch and their KV blocks are freed); their generators end with vLLM's abort
        outputs, which say how many tokens each had decoded. Samples that ended in the same
        engine step as the deciding one (their outputs were already on their way) join the
        finished ones if ``stopper.still_decided()``; else the answer is built from exactly the
        candidates the rule saw, and those count as stopped. Greedy requests decode once per
        draw: that one sample fills all n_samples slots."""
        from vllm.inputs import TokensPrompt

        llm = self.llm
        n_slots = len(jobs) * n_samples
        latest: list[dict[int, Any]] = [{} for _ in jobs]  # completion index -> newest output
        done: dict[int, Generated] = {}  # slot -> candidate, finished before the decision
        late: dict[int, Generated] = {}  # slot -> candidate, finished (not aborted) after it
        reported: set[int] = set()  # positions whose draw went to on_draw
        reaborted: set[int] = set()
        decision = asyncio.Event()
        broken = False  # the rule failed once: the fan-out runs on as with off

        def asks_to_stop() -> bool:
            nonlocal broken
            try:
                return stopper.should_stop()
            except Exception:
                broken = True
                logger.exception("early stopping failed; this fan-out runs to its end")
                return False

        def observe(position: int, out: Any) -> None:
            draw = jobs[position].draw
            for c in out.outputs:
                latest[position][c.index] = c
                for sample in range(n_samples) if greedy else (c.index,):
                    slot = position * n_samples + sample
                    if c.finish_reason in (None, "abort") or slot in done:
                        if c.finish_reason is None and not decision.is_set():
                            stopper.progress(slot, c.cumulative_logprob)
                    elif decision.is_set():
                        late[slot] = _generated(draw, sample, c)
                    else:
                        done[slot] = _generated(draw, sample, c)
                        stopper.finished(slot, c.text, c.cumulative_logprob, len(c.token_ids))
            if decision.is_set():
                return
            first = position * n_samples
            complete = all(first + s in done for s in range(n_samples))
            if on_draw is not None and position not in reported and complete:
                reported.add(position)
                on_draw([done[first + s] for s in range(n_samples)])
            if len(done) < n_slots and not broken and asks_to_stop():
                decision.set()

        async def one(position: int, job: Job) -> None:
            if decision.is_set():
                return  # decided before this request was sent: never send it
            async for output in llm.generate(
                TokensPrompt(prompt_token_ids=job.prompt_ids),
                job.params,
                job.request_id,
                lora_request=job.lora,
            ):
                observe(position, output)
                if decision.is_set() and not output.finished and position not in reaborted:
                    # a request that reached vLLM's bookkeeping only after the abort below
                    reaborted.add(position)
                    await llm.abort(job.request_id)

        began = time.perf_counter()
        tasks = [asyncio.ensure_future(one(i, job)) for i, job in enumerate(jobs)]
        everything = asyncio.gather(*tasks)
        decided = asyncio.ensure_future(decision.wait())
        try:
            await asyncio.wait({everything, decided}, return_when=asyncio.FIRST_COMPLETED)
            if not everything.done():
                running = [j.request_id for j, t in zip(jobs, tasks, strict=True) if not t.done()]
                await asyncio.shield(llm.abort(running))
            await everything
        except BaseException as err:
            everything.cancel()  # cancels the tasks; its own outcome is then never unread
            await self._abort_failed(llm, jobs, tasks, err)
            raise
        finally:
            decided.cancel()
        seconds = time.perf_counter() - began
        if late:
            for slot, c in sorted(late.items()):
                stopper.finished(slot, c.text, c.logprob, c.tokens)
            if stopper.still_decided():
                done.update(late)

        stopped: list[Generated] = []
        for position, job in enumerate(jobs):
            partial = []
            for sample in range(n_samples):
                slot = position * n_samples + sample
                if slot not in done:
                    output = latest[position].get(0 if greedy else sample)
                    partial.append(_stopped(job.draw, sample, output))
            stopped += partial
            if on_draw is not None and position not in reported:
                first = position * n_samples
                cands = [done.get(first + s) for s in range(n_samples)]
                rest = iter(partial)
                on_draw([c if c is not None else next(rest) for c in cands])
        return FanOut(
            candidates=[done[slot] for slot in sorted(done)],
            prompt_tokens=prompt_tokens,
            completion_tokens=sum(len(c.token_ids) for out in latest for c in out.values()),
            request_ids=[j.request_id for j in jobs],
            seed=seed,
            seconds=seconds,
            stopped=stopped,
        )


def _stopped(draw: int | None, sample: int, c: Any | None) -> Generated:
    """A candidate early stopping aborted: what it had generated, finish reason ``STOPPED``."""
    if c is None:  # never produced a token
        return Generated(draw, sample, "", None, 0, (), STOPPED)
    return dataclasses.replace(_generated(draw, sample, c), finish_reason=STOPPED)


def _generated(draw: int | None, sample: int, c: Any) -> Generated:
    return Generated(
        draw=draw,
        sample=sample,
        text=c.text,
        logprob=c.cumulative_logprob,
        tokens=len(c.token_ids),
        token_ids=tuple(c.token_ids),
        finish_reason=c.finish_reason,
    )
