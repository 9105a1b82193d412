"""The vLLM engine: one ``AsyncLLM`` (V1) per process, posterior draws as LoRA slots, fan-out.

Start-up, once (``Engine.start``): resolve the base model, load each posterior and validate it
against the base model, draw its pool of K adapters (plus the mean) into a tmpfs folder, start
vLLM with ``max_loras`` = every adapter + one spare slot, and register each adapter under a
unique name AND a unique int id (vLLM keys its prefix cache on the name; reusing a name with a new
id would reuse the old adapter's KV cache).

Why one spare slot: upstream vLLM gives a request with no LoRA the last slot's adapter when it is
batched while every slot is taken. With a free slot that never happens (tests/test_engine.py shows
a base request batched with every adapter at once gets the base model's tokens).

``Engine.fan_out`` sends one vLLM request per draw, ``SamplingParams(n=n_samples)`` each, with a
distinct seed per draw derived from the request's seed (one seed for all would correlate the
draws' samples token by token), all at once so vLLM batches them. If the caller is cancelled
(client gone, timeout) every engine request of the fan-out is aborted.

Several posteriors share the engine (``--posterior NAME=DIR`` repeated): each is a ``Pool`` of
its own LoRA slots on the same base model, kept by name; a request's ``model`` picks one.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import dataclasses
import itertools
import logging
import os
import secrets
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ivonserve.errors import IvonserveError

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

    from ivonserve.config import PosteriorSpec, Settings

logger = logging.getLogger("ivonserve.engine")

# vLLM accepts only these max_lora_rank values; the posterior's rank is rounded up to one.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_SEED_MASK = (1 << 62) - 1  # vLLM adds the sample index to a request's seed: stay inside int64
CPU_DEFAULT_KV_CACHE_GIB = 1.0
CPU_DEFAULT_BLOCK_SIZE = 32
CPU_DEFAULT_DTYPE = "float32"


class EngineError(IvonserveError):
    """The engine cannot serve (not started, failed to start, or died)."""


class EngineNotReady(EngineError):
    """The engine is still starting (or has stopped)."""


class InvalidRequest(IvonserveError):
    """A request the engine cannot run as asked; ``field`` names the culprit."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingOptions:
    """Decoding settings of one request (the same for every draw; only the seed differs)."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed, reported back in FanOut.seed
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Generated:
    """One candidate: which draw made it (None: the mean adapter), which sample, what it said."""

    model: int | None
    sample: int
    text: str
    logprob: float | None
    tokens: int
    token_ids: tuple[int, ...]
    finish_reason: str | None


@dataclass
class FanOut:
    """Every candidate of one request, draw-major: draw 0's samples, then draw 1's, ..."""

    candidates: list[Generated]
    prompt_tokens: int
    completion_tokens: int  # tokens vLLM decoded (greedy repeats are not decoded twice)
    request_ids: list[str]
    seed: int
    seconds: float


@dataclass
class PreparedPool:
    """One posterior's adapters written to tmpfs (the mean and K draws), not yet registered."""

    name: str
    posterior_dir: Path
    seed: int
    rank: int
    target_modules: list[str]
    mean_dir: Path
    draw_dirs: list[Path]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pool:
    """A prepared pool registered with vLLM: the mean and the K draws as LoRA slots."""

    prepared: PreparedPool
    mean: LoRARequest
    draws: list[LoRARequest]

    @property
    def name(self) -> str:
        return self.prepared.name

    @property
    def info(self) -> dict[str, Any]:
        return self.prepared.info

    @property
    def size(self) -> int:
        return len(self.draws)

    @property
    def loras(self) -> list[LoRARequest]:
        return [self.mean, *self.draws]

    def adapters(self, n_models: int) -> list[tuple[int | None, LoRARequest]]:
        """(draw index, adapter) for draws 0..n_models-1; n_models = 0: [(None, the mean)]."""
        if not 0 <= n_models <= self.size:
            raise InvalidRequest(
                "n_models", f"n_models must be between 0 and the pool size {self.size}"
            )
        if n_models == 0:
            return [(None, self.mean)]
        return list(enumerate(self.draws[:n_models]))


def request_seed_for_draw(seed: int, draw: int) -> int:
    """The vLLM seed of one draw's request: distinct and well mixed per (request seed, draw)."""
    from ivonserve.sampler import draw_seed

    return draw_seed(seed, draw) & _SEED_MASK


def tmpfs_dir() -> Path:
    """A fresh folder for adapter files: on /dev/shm (RAM) when the machine has it."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="ivonserve-pool-", dir=base))


def _vllm_rank(rank: int) -> int:
    for allowed in _VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise EngineError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank 512")


class Engine:
    """The process's vLLM engine with its pools of posterior draws.

    Build it with ``await Engine.start(settings)`` (the blocking parts run in a worker thread, so
    an event loop serving /health stays responsive) and stop it with ``await engine.shutdown()``.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.llm: Any = None  # vllm.v1.engine.async_llm.AsyncLLM once started
        self.tokenizer: Any = None
        self.model_dir: Path | None = None
        self.pools: dict[str, Pool] = {}
        self.specs = settings.posterior_specs()
        self.default_pool: str = self.specs[0].name
        self.max_model_len: int = 0
        self.engine_args: dict[str, Any] = {}
        self.startup_seconds: dict[str, float] = {}
        self._workdir: Path | None = None
        self._lora_ids = itertools.count(1)
        self._closing = False
        self._ready = False
        self._started = False
        self.aborted_requests = 0  # engine requests aborted because their caller went away

    # --- life cycle -----------------------------------------------------------------------------
    @classmethod
    async def start(cls, settings: Settings) -> Engine:
        """Load the model and posterior, draw the pool, start vLLM, register every adapter."""
        engine = cls(settings)
        try:
            await engine._start()
        except BaseException:
            await engine.shutdown()
            raise
        return engine

    async def _start(self) -> None:
        began = time.perf_counter()
        prepared = await asyncio.to_thread(self._prepare)
        self.startup_seconds["pool"] = time.perf_counter() - began
        began = time.perf_counter()
        self.llm = await asyncio.to_thread(self._build_llm, prepared)
        self.startup_seconds["vllm"] = time.perf_counter() - began
        if self._closing:
            raise EngineNotReady("the engine was shut down while starting")
        began = time.perf_counter()
        for pool in prepared:
            await self._register(pool)
        self.startup_seconds["register"] = time.perf_counter() - began
        began = time.perf_counter()
        await self._warm_up()
        self.startup_seconds["warm_up"] = time.perf_counter() - began
        self.startup_seconds["total"] = sum(self.startup_seconds.values())
        self._ready = self._started = True
        logger.info(
            "engine ready: %s (%s)",
            ", ".join(f"pool {p.name!r} of {len(p.draw_dirs)} draws + mean" for p in prepared),
            ", ".join(f"{k} {v:.1f} s" for k, v in self.startup_seconds.items()),
        )

    def _prepare(self) -> list[PreparedPool]:
        """Blocking: the base model folder and tokenizer, then every pool written to tmpfs."""
        from transformers import AutoTokenizer

        from ivonserve.model import resolve_model

        self.model_dir = resolve_model(self.settings.model, self.settings.cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self._workdir = tmpfs_dir()
        # shutdown() deletes it; this catches an interpreter exit that skipped shutdown
        atexit.register(shutil.rmtree, self._workdir, ignore_errors=True)
        return [self._prepare_pool(spec) for spec in self.specs]

    def _prepare_pool(self, spec: PosteriorSpec) -> PreparedPool:
        """Load one posterior, check it fits the base model, write its mean and K draws."""
        from ivonserve.posterior import load_served
        from ivonserve.sampler import Sampler, SamplerConfig

        s = self.settings
        posterior = load_served(spec.path, spec.kind, self.model_dir)
        sampler = Sampler(posterior, SamplerConfig(s.sampling_temperature, s.prune, s.prune_by))
        mean_dir, draw_dirs = sampler.write_pool(
            s.pool_size, s.pool_seed, self._workdir / spec.name
        )
        return PreparedPool(
            name=spec.name,
            posterior_dir=spec.path,
            seed=s.pool_seed,
            rank=posterior.rank,
            target_modules=posterior.target_modules,
            mean_dir=mean_dir,
            draw_dirs=draw_dirs,
            info={
                "kind": spec.kind,
                "ess": posterior.ess,
                "base_model": posterior.base_model,
                "temperature": s.sampling_temperature,
                "prune": s.prune,
                "prune_by": s.prune_by,
            },
        )

    def build_engine_args(self, pools: Sequence[PreparedPool]) -> dict[str, Any]:
        """vLLM engine arguments: LoRA slots sized for every pool, the rest from the settings."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        s = self.settings
        on_cpu = current_platform.is_cpu()
        adapters = sum(len(p.draw_dirs) + 1 for p in pools)
        targets = sorted({m for p in pools for m in p.target_modules})
        args: dict[str, Any] = {
            "model": str(self.model_dir),
            "tokenizer": str(self.model_dir),
            "dtype": s.dtype or (CPU_DEFAULT_DTYPE if on_cpu else "auto"),
            "seed": 0,
            "enable_lora": True,
            # every adapter + a spare: a base request never meets a full set of slots
            "max_loras": adapters + 1,
            "max_cpu_loras": adapters + 1,
            "max_lora_rank": _vllm_rank(max(p.rank for p in pools)),
            "tensor_parallel_size": s.tensor_parallel_size,
            "pipeline_parallel_size": s.pipeline_parallel_size,
            "data_parallel_size": s.data_parallel_size,
            "enforce_eager": s.enforce_eager,
            "disable_log_stats": True,
        }
        engine_fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        if targets and "lora_target_modules" in engine_fields:
            # LoRA layers only where the adapters have weights (~3x faster on the CPU)
            args["lora_target_modules"] = targets
        optional = {
            "max_model_len": s.max_model_len,
            "gpu_memory_utilization": s.gpu_memory_utilization,
            "distributed_executor_backend": s.distributed_executor_backend,
            "max_num_seqs": s.max_num_seqs,
            "block_size": s.block_size or (CPU_DEFAULT_BLOCK_SIZE if on_cpu else None),
        }
        kv_gib = s.kv_cache_gib or (CPU_DEFAULT_KV_CACHE_GIB if on_cpu else None)
        if kv_gib:
            optional["kv_cache_memory_bytes"] = int(kv_gib * (1 << 30))
        args.update({k: v for k, v in optional.items() if v is not None})
        return args

    def _build_llm(self, pools: Sequence[PreparedPool]) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.engine_args = self.build_engine_args(pools)
        logger.info("starting vLLM: %s", self.engine_args)
        try:
            llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_args))
        except Exception as err:
            raise EngineError(f"vLLM failed to start: {type(err).__name__}: {err}") from err
        self.max_model_len = llm.model_config.max_model_len
        if self._closing:
            llm.shutdown()
        return llm

    async def _register(self, prepared: PreparedPool) -> None:
        from vllm.lora.request import LoRARequest

        def lora(kind: str, path: Path) -> LoRARequest:
            lora_id = next(self._lora_ids)
            # name unique per adapter in this engine (the prefix cache is keyed on it)
            name = f"{prepared.name}/{kind}/seed{prepared.seed}/id{lora_id}"
            return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=str(path))

        mean = lora("mean", prepared.mean_dir)
        draws = [lora(f"draw{k}", d) for k, d in enumerate(prepared.draw_dirs)]
        for request in (mean, *draws):
            if not await self.llm.add_lora(request):
                raise EngineError(f"vLLM refused adapter {request.lora_name}")
        self.pools[prepared.name] = Pool(prepared=prepared, mean=mean, draws=draws)

    async def _warm_up(self) -> None:
        """Two greedy tokens from every adapter at once: loads each into its slot, so the first
        client request is not the one that pays for it (and a broken adapter fails start-up)."""
        prompt_ids = self.render("Hello")
        params = self._params(SamplingOptions(max_tokens=2, temperature=0.0), 1, 0)
        loras = [lora for pool in self.pools.values() for lora in pool.loras]
        jobs = [
            (None, f"ivs-warmup-{uuid.uuid4().hex[:8]}-{i}", params, lora)
            for i, lora in enumerate(loras)
        ]
        await self._run_all(prompt_ids, jobs)

    @property
    def ready(self) -> bool:
        return self._ready and self.llm is not None and not self.llm.errored

    @property
    def dead(self) -> bool:
        """Started, not shut down, yet unusable: vLLM's engine core process has died."""
        return self._started and not self._closing and (self.llm is None or self.llm.errored)

    async def shutdown(self) -> None:
        """Stop vLLM (its engine processes) and delete the adapter files; safe to call twice."""
        self._closing = True
        self._ready = False
        llm, self.llm = self.llm, None
        if llm is not None:
            # stop vLLM's output handler first, or it reports the engine core's exit as a crash
            handler = getattr(llm, "output_handler", None)
            if handler is not None and not handler.done():
                handler.cancel()
                with contextlib.suppress(BaseException):
                    await handler
            await asyncio.to_thread(llm.shutdown)
            # AsyncLLM.__del__ shuts down again; at interpreter exit that fails noisily
            llm.shutdown = lambda *args, **kwargs: None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    # --- requests ---------------------------------------------------------------------------
    def pool(self, name: str | None = None) -> Pool:
        if not self.ready:
            raise EngineNotReady("the engine is not ready")
        key = name or self.default_pool
        if key not in self.pools:
            raise InvalidRequest(
                "model", f"unknown model {name!r}; this server serves {sorted(self.pools)}"
            )
        return self.pools[key]

    def render(
        self, prompt: str | None = None, messages: list[dict[str, str]] | None = None
    ) -> list[int]:
        """Token ids of a chat prompt: the model's chat template applied, generation prompt on."""
        if (prompt is None) == (messages is None):
            raise InvalidRequest("prompt", "give exactly one of prompt and messages")
        if messages is None:
            messages = [{"role": "user", "content": prompt}]
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, tokenize=False
            )
        else:  # a base model without a chat template: the contents, one per line
            text = "\n".join(m["content"] for m in messages)
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def num_unfinished_requests(self) -> int:
        """Requests (sample-level, n>1 counts n) vLLM's output processor still tracks."""
        return self.llm.get_num_unfinished_requests() if self.llm is not None else 0

    def _params(self, sampling: SamplingOptions, n: int, seed: int) -> Any:
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
                output_kind=RequestOutputKind.FINAL_ONLY,  # all n samples together, once
            )
        except VLLMClientError as err:  # a value vLLM refuses: the client's to fix
            field = getattr(err, "parameter", None) or "sampling"
            raise InvalidRequest(field, f"vLLM rejected the request: {err}") from err

    def check_length(self, prompt_ids: Sequence[int], sampling: SamplingOptions) -> None:
        """The prompt is not empty and prompt + max_tokens fits the context."""
        if not prompt_ids:
            raise InvalidRequest("prompt", "the prompt is empty")
        total = len(prompt_ids) + sampling.max_tokens
        if total > self.max_model_len:
            raise InvalidRequest(
                "max_tokens",
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({sampling.max_tokens}) = "
                f"{total} exceeds the context length {self.max_model_len}",
            )

    async def fan_out(
        self,
        prompt: str | Sequence[int],
        n_models: int,
        n_samples: int,
        sampling: SamplingOptions = SamplingOptions(),
        pool: str | None = None,
        on_draw: Callable[[list[Generated]], None] | None = None,
    ) -> FanOut:
        """n_models draws x n_samples samples (n_models = 0: the mean adapter, n_samples samples).

        ``prompt``: token ids, or a text used as is (no chat template; see ``render``).
        Draw k's request has ``seed = request_seed_for_draw(seed, k)``; vLLM gives its samples
        seed+0..n-1. Cancelling the caller aborts every engine request of this fan-out.
        ``on_draw`` receives each draw's candidates as soon as that draw has finished.
        """
        target = self.pool(pool)
        if n_samples < 1:
            raise InvalidRequest("n_samples", "n_samples must be >= 1")
        adapters = target.adapters(n_models)
        prompt_ids = self._tokens(prompt)
        self.check_length(prompt_ids, sampling)
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(62)
        fan_id = f"ivs-{uuid.uuid4().hex[:16]}"
        # Greedy decoding gives every sample the same text, and vLLM refuses n > 1 with it:
        # decode once per draw and repeat the candidate (usage counts the tokens decoded).
        greedy = sampling.temperature == 0
        n_engine = 1 if greedy else n_samples
        jobs = []
        for position, (draw, lora) in enumerate(adapters):
            request_id = f"{fan_id}-{'mean' if draw is None else f'd{draw}'}"
            params = self._params(sampling, n_engine, request_seed_for_draw(seed, position))
            jobs.append((draw, request_id, params, lora))

        def draw_candidates(position: int, out: Any) -> list[Generated]:
            completions = sorted(out.outputs, key=lambda c: c.index)
            if greedy:
                completions = completions * n_samples
            draw = jobs[position][0]
            return [_generated(draw, sample, c) for sample, c in enumerate(completions)]

        finished = None if on_draw is None else lambda i, out: on_draw(draw_candidates(i, out))
        began = time.perf_counter()
        outputs = await self._run_all(prompt_ids, jobs, finished)
        candidates = [c for i, out in enumerate(outputs) for c in draw_candidates(i, out)]
        decoded = sum(len(c.token_ids) for out in outputs for c in out.outputs)
        return FanOut(
            candidates=candidates,
            prompt_tokens=len(prompt_ids),
            completion_tokens=decoded,
            request_ids=[j[1] for j in jobs],
            seed=seed,
            seconds=time.perf_counter() - began,
        )

    async def generate_base(
        self, prompt: str | Sequence[int], sampling: SamplingOptions = SamplingOptions(), n: int = 1
    ) -> list[Generated]:
        """The base model without any adapter (diagnostics and the base-in-batch test)."""
        if not self.ready:
            raise EngineNotReady("the engine is not ready")
        prompt_ids = self._tokens(prompt)
        self.check_length(prompt_ids, sampling)
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(62)
        request_id = f"ivs-{uuid.uuid4().hex[:16]}-base"
        (out,) = await self._run_all(
            prompt_ids, [(None, request_id, self._params(sampling, n, seed & _SEED_MASK), None)]
        )
        return [_generated(None, c.index, c) for c in sorted(out.outputs, key=lambda c: c.index)]

    def encode(self, text: str) -> list[int]:
        """Token ids of a text used as is (no chat template, no special tokens added)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def _tokens(self, prompt: str | Sequence[int]) -> list[int]:
        return self.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]

    async def _run_all(
        self,
        prompt_ids: list[int],
        jobs: list[tuple],
        finished: Callable[[int, Any], None] | None = None,
    ) -> list[Any]:
        """Submit every job at once and wait for all final outputs; abort them all on failure.
        ``finished(position, output)`` is called as each job completes."""
        from vllm.inputs import TokensPrompt

        llm = self.llm

        async def one(position: int, request_id: str, params: Any, lora: Any) -> Any:
            final = None
            async for output in llm.generate(
                TokensPrompt(prompt_token_ids=prompt_ids), params, request_id, lora_request=lora
            ):
                final = output
            if finished is not None:
                finished(position, final)
            return final

        tasks = [
            asyncio.ensure_future(one(i, rid, params, lora))
            for i, (_, rid, params, lora) in enumerate(jobs)
        ]
        try:
            return await asyncio.gather(*tasks)
        except BaseException as err:
            for task in tasks:
                task.cancel()
            self.aborted_requests += len(jobs)
            # generate() aborts its own request when cancelled; abort by id as well, in case a
            # task was cancelled before its request reached the engine's bookkeeping.
            with contextlib.suppress(Exception):
                await asyncio.shield(llm.abort([j[1] for j in jobs]))
            from vllm.exceptions import VLLMClientError
            from vllm.v1.engine.exceptions import EngineDeadError

            if isinstance(err, VLLMClientError):
                field = getattr(err, "parameter", None) or "prompt"
                raise InvalidRequest(field, f"vLLM rejected the request: {err}") from err
            if isinstance(err, EngineDeadError):
                self._ready = False
                raise EngineError("the vLLM engine died; restart the server") from err
            raise


def _generated(draw: int | None, sample: int, c: Any) -> Generated:
    return Generated(
        model=draw,
        sample=sample,
        text=c.text,
        logprob=c.cumulative_logprob,
        tokens=len(c.token_ids),
        token_ids=tuple(c.token_ids),
        finish_reason=c.finish_reason,
    )
