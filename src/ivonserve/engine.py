"""The vLLM engine: one ``AsyncLLM`` (V1) per process, posterior draws as LoRA slots, fan-out and
scoring.

Start-up, once (``Engine.start``): resolve the base model, prepare each posterior's pool (the mean
and K draws written to tmpfs, ``pool``), start vLLM with one LoRA slot per adapter, register each
adapter and decode two tokens from every one of them.

Slots: with ivonserve's grouped LoRA kernel (``vllm_plugin.lora_ops``, the default on the CPU) a
request without an adapter is untouched by LoRA, so ``max_loras`` is every adapter. vLLM's own
ops give such a request the last slot's adapter when every slot is taken; with them
(``lora_kernel="vllm"``, or on a GPU) one spare slot is kept free so that never happens.

``Engine.fan_out`` sends one vLLM request per draw, ``SamplingParams(n=n_samples)`` each, with a
distinct seed per draw derived from the request's seed (one seed for all would correlate the
draws' samples token by token), all at once so vLLM batches them. ``Engine.score`` sends one
request per (sequence, draw) asking only for prompt log-probabilities. If the caller is cancelled
(client gone, timeout) every engine request it made is aborted.

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
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from ivonserve.errors import EngineError, EngineNotReady, InvalidRequest
from ivonserve.pool import Pool, PreparedPool, prepare_pool, register_pool, tmpfs_dir, vllm_rank
from ivonserve.sampler import SamplerConfig
from ivonserve.vllm_plugin import LORA_KERNEL_ENV

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

    from ivonserve.config import PosteriorSpec

__all__ = [
    "STOPPED",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineNotReady",
    "FanOut",
    "Generated",
    "InvalidRequest",
    "SamplingOptions",
    "Scored",
    "Stopper",
    "TokenScores",
]

logger = logging.getLogger("ivonserve.engine")
# vLLM's CPU worker keeps this many cores of its NUMA node out of its OpenMP threads, for its
# scheduler: 1 by default, which on a 2-core machine halves the cores that compute. ivonserve
# makes it 0 unless the user set it (bench/results/fanout.md: the fan-out and /score ran
# faster with every core computing); explicit VLLM_CPU_OMP_THREADS_BIND core lists ignore it.
RESERVED_CPU_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
# oneDNN caches a GEMM primitive per shape (1,024 by default), and vLLM's CPU worker meets a new
# token count nearly every step: uncapped, the worker grew +713 and +329 MiB in two 600-request
# soaks and did not level off; capped at 64, +241 and +63 MiB, flat, at the same latency (README,
# Soak; bench/results/soak-onednn/). ivonserve sets the cap for vLLM's processes unless set.
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
CPU_ONEDNN_CACHE_CAPACITY = "64"

_SEED_MASK = (1 << 62) - 1  # vLLM adds the sample index to a request's seed: stay inside int64
CPU_DEFAULT_KV_CACHE_GIB = 1.0
CPU_DEFAULT_BLOCK_SIZE = 32
# CPU flags of native bf16 matrix instructions; without them bf16 is emulated and slower
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class EngineConfig:
    """What the engine needs of the settings (``Settings.engine_config()``): the model, the
    posteriors and their pools, and vLLM's own arguments (None: vLLM's or the CPU default)."""

    posteriors: tuple[PosteriorSpec, ...]
    model: str | None = None
    cache_dir: Path | None = None
    pool_size: int = 8
    pool_seed: int = 0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    lora_kernel: str = "grouped"
    dtype: str | None = None
    max_model_len: int | None = None
    kv_cache_gib: float | None = None
    gpu_memory_utilization: float | None = None
    block_size: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    enforce_eager: bool = False
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None


@dataclass(frozen=True)
class SamplingOptions:
    """Decoding settings of one request (the same for every draw; only the seed differs).
    ``extra``: vLLM's further sampling parameters by their ``SamplingParams`` names (top_k,
    min_p, repetition_penalty, ...), applied to every draw as given."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None  # None: a fresh random seed, reported back in FanOut.seed
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Generated:
    """One candidate: which draw made it (None: the mean adapter), which sample, what it said."""

    draw: int | None
    sample: int
    text: str
    logprob: float | None
    tokens: int
    token_ids: tuple[int, ...]
    finish_reason: str | None


# finish_reason of a candidate that early stopping aborted (its text is what it had so far)
STOPPED = "early_stop"


class Stopper(Protocol):
    """What ``Engine.fan_out`` asks whether to stop early (``mbr.stopping.Tracker``). Slot
    ``position * n_samples + sample``: the fan-out's draw-major candidate order."""

    def finished(self, slot: int, text: str, logprob: float | None, tokens: int) -> None: ...

    def progress(self, slot: int, logprob: float | None) -> None: ...

    def should_stop(self) -> bool: ...

    def still_decided(self) -> bool:
        """After ``finished`` was also told of the candidates that ended in the very step the
        rule fired: may they join the answer (else it is built from those before the rule)?"""
        ...


@dataclass
class FanOut:
    """Every candidate of one request, draw-major: draw 0's samples, then draw 1's, ...

    With early stopping, ``candidates`` are those that had finished when the rule fired (still
    draw-major) and ``stopped`` the ones it aborted, with what they had generated by then."""

    candidates: list[Generated]
    prompt_tokens: int
    completion_tokens: int  # tokens vLLM decoded (greedy repeats are not decoded twice)
    request_ids: list[str]
    seed: int
    seconds: float
    stopped: list[Generated] = field(default_factory=list)


@dataclass(frozen=True)
class TokenScores:
    """One adapter's teacher-forced scores of one sequence from position ``start`` on.

    logprobs[t]: log p(token start+t | the tokens before it); top[t]: the ``top`` likeliest
    tokens there (id -> logprob), when asked; next_token: the greedy token after the sequence
    with its logprob and top alternatives (vLLM decodes one token per request)."""

    draw: int | None
    logprobs: list[float]
    top: list[dict[int, float]] | None
    next_token: tuple[int, float, dict[int, float]]

    @property
    def total(self) -> float:
        return float(sum(self.logprobs))


@dataclass
class Scored:
    """Per sequence, one ``TokenScores`` per adapter (draw order; [mean] for n_draws = 0)."""

    sequences: list[list[TokenScores]]
    prompt_tokens: int
    seconds: float


@dataclass(frozen=True)
class NextScored:
    """Per prompt, per adapter (draw order; [mean] for n_draws = 0), the log-probabilities of
    the asked tokens as the next token."""

    logprobs: list[list[list[float]]]
    draws: list[int | None]
    prompt_tokens: int
    seconds: float


class Job(NamedTuple):
    """One vLLM request of a fan-out or a scoring."""

    draw: int | None
    request_id: str
    params: Any  # vllm.SamplingParams
    lora: LoRARequest | None
    prompt_ids: list[int]


def request_seed_for_draw(seed: int, draw: int) -> int:
    """The vLLM seed of one draw's request: distinct and well mixed per (request seed, draw)."""
    from ivonserve.sampler import draw_seed

    return draw_seed(seed, draw) & _SEED_MASK


def default_cpu_dtype(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """bfloat16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), else float32."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return "float32"
    return "bfloat16" if flags & BF16_CPU_FLAGS else "float32"


class Engine:
    """The process's vLLM engine with its pools of posterior draws.

    Build it with ``await Engine.start(config)`` (the blocking parts run in a worker thread, so
    an event loop serving /health stays responsive) and stop it with ``await engine.shutdown()``.
    """

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.llm: Any = None  # vllm.v1.engine.async_llm.AsyncLLM once started
        self.tokenizer: Any = None
        self.model_dir: Path | None = None
        self.pools: dict[str, Pool] = {}
        self.default_pool: str = config.posteriors[0].name
        self.max_model_len: int = 0
        self.engine_args: dict[str, Any] = {}
        self.startup_seconds: dict[str, float] = {}
        self._workdir: Path | None = None
        self._lora_ids = itertools.count(1)
        self._closing = False
        self._ready = False
        self._started = False
        self.aborted_requests = 0  # engine requests aborted because their caller went away
        self.plugin: list[dict[str, Any]] = []  # what vllm_plugin applied in each worker

    # --- life cycle -----------------------------------------------------------------------------
    @classmethod
    async def start(cls, config: EngineConfig) -> Engine:
        """Load the model and posterior, draw the pool, start vLLM, register every adapter."""
        engine = cls(config)
        try:
            await engine._start()
        except BaseException:
            await engine.shutdown()
            raise
        return engine

    async def _start(self) -> None:
        phases = self.startup_seconds
        prepared = await asyncio.to_thread(self._prepare)
        began = time.perf_counter()
        self.llm = await asyncio.to_thread(self._build_llm, prepared)
        phases["vllm"] = time.perf_counter() - began
        if self._closing:
            raise EngineNotReady("the engine was shut down while starting")
        began = time.perf_counter()
        for pool in prepared:
            self.pools[pool.name] = await register_pool(self.llm, pool, self._lora_ids)
        phases["register"] = time.perf_counter() - began
        began = time.perf_counter()
        await self._warm_up()
        phases["warm_up"] = time.perf_counter() - began
        phases["total"] = sum(phases.values())
        self.plugin = await self.plugin_status()
        self._ready = self._started = True
        logger.info(
            "engine ready: %s (%s)",
            ", ".join(f"pool {p.name!r} of {len(p.draw_dirs)} draws + mean" for p in prepared),
            ", ".join(f"{k} {v:.1f} s" for k, v in phases.items()),
        )
        logger.info("ivonserve's vLLM plugin in vLLM's workers: %s", self.plugin)

    def _prepare(self) -> list[PreparedPool]:
        """Blocking: the base model folder and tokenizer, then every pool written to tmpfs.
        Phases: ``tokenizer`` (importing transformers included), ``pool`` (each posterior
        loaded and checked, its K draws made and written)."""
        began = time.perf_counter()
        from transformers import AutoTokenizer

        from ivonserve.model import resolve_model

        c = self.config
        self.model_dir = resolve_model(c.model, c.cache_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.startup_seconds["tokenizer"] = time.perf_counter() - began
        began = time.perf_counter()
        self._workdir = tmpfs_dir()
        # shutdown() deletes it; this catches an interpreter exit that skipped shutdown
        atexit.register(shutil.rmtree, self._workdir, ignore_errors=True)
        pools = [
            prepare_pool(spec, self.model_dir, c.sampler, c.pool_size, c.pool_seed, self._workdir)
            for spec in c.posteriors
        ]
        self.startup_seconds["pool"] = time.perf_counter() - began
        return pools

    def lora_kernel(self, on_cpu: bool) -> str:
        """The LoRA kernel vLLM runs: ivonserve's grouped ops exist for the CPU backend only."""
        return self.config.lora_kernel if on_cpu else "vllm"

    def build_engine_args(self, pools: Sequence[PreparedPool]) -> dict[str, Any]:
        """vLLM engine arguments: LoRA slots sized for every pool, the rest from the config."""
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform

        c = self.config
        on_cpu = current_platform.is_cpu()
        adapters = sum(len(p.draw_dirs) + 1 for p in pools)
        # vLLM's own ops need a spare slot (a base request meets a full set of slots otherwise)
        slots = adapters + (1 if self.lora_kernel(on_cpu) == "vllm" else 0)
        targets = sorted({m for p in pools for m in p.target_modules})
        args: dict[str, Any] = {
            "model": str(self.model_dir),
            "tokenizer": str(self.model_dir),
            "dtype": c.dtype or (default_cpu_dtype() if on_cpu else "auto"),
            "seed": 0,
            "enable_lora": True,
            "max_loras": slots,
            "max_cpu_loras": slots,
            "max_lora_rank": vllm_rank(max(p.rank for p in pools)),
            "tensor_parallel_size": c.tensor_parallel_size,
            "pipeline_parallel_size": c.pipeline_parallel_size,
            "data_parallel_size": c.data_parallel_size,
            "enforce_eager": c.enforce_eager,
            "disable_log_stats": True,
        }
        engine_fields = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
        if targets and "lora_target_modules" in engine_fields:
            # LoRA layers only where the adapters have weights (~3x faster on the CPU)
            args["lora_target_modules"] = targets
        optional = {
            "max_model_len": c.max_model_len,
            "gpu_memory_utilization": c.gpu_memory_utilization,
            "distributed_executor_backend": c.distributed_executor_backend,
            "max_num_seqs": c.max_num_seqs,
            "max_num_batched_tokens": c.max_num_batched_tokens,
            "block_size": c.block_size or (CPU_DEFAULT_BLOCK_SIZE if on_cpu else None),
        }
        kv_gib = c.kv_cache_gib or (CPU_DEFAULT_KV_CACHE_GIB if on_cpu else None)
        if kv_gib:
            optional["kv_cache_memory_bytes"] = int(kv_gib * (1 << 30))
        args.update({k: v for k, v in optional.items() if v is not None})
        return args

    def _build_llm(self, pools: Sequence[PreparedPool]) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.platforms import current_platform
        from vllm.v1.engine.async_llm import AsyncLLM

        self.engine_args = self.build_engine_args(pools)
        # vLLM's processes (spawned below) read these when they start
        os.environ[LORA_KERNEL_ENV] = self.lora_kernel(current_platform.is_cpu())
        if current_platform.is_cpu():
            os.environ.setdefault(RESERVED_CPU_ENV, "0")
            os.environ.setdefault(ONEDNN_CACHE_ENV, CPU_ONEDNN_CACHE_CAPACITY)
        logger.info("starting vLLM: %s", self.engine_args)
        try:
            llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**self.engine_args))
        except Exception as err:
            raise EngineError(f"vLLM failed to start: {type(err).__name__}: {err}") from err
        self.max_model_len = llm.model_config.max_model_len
        if self._closing:
            llm.shutdown()
        return llm

    async def _warm_up(self) -> None:
        """Two greedy tokens from every adapter at once: loads each into its slot, so the first
        client request is not the one that pays for it (and a broken adapter fails start-up)."""
        prompt_ids = self.render("Hello")
        params = self._params(SamplingOptions(max_tokens=2, temperature=0.0), 1, 0)
        loras = [lora for pool in self.pools.values() for lora in pool.loras]
        tag = uuid.uuid4().hex[:8]
        await self._run_all(
            [
                Job(None, f"ivs-warmup-{tag}-{i}", params, lora, prompt_ids)
                for i, lora in enumerate(loras)
            ]
        )

    async def plugin_status(self) -> list[dict[str, Any]]:
        """What ivonserve's vLLM plugin applied in each of vLLM's workers (empty dicts: not
        loaded there), asked of the workers themselves."""
        if self.llm is None:
            raise EngineNotReady("the engine is not running")
        try:
            return list(await self.llm.collective_rpc("ivonserve_plugin_status"))
        except Exception:  # a worker without the plugin has no such method
            return [{}]

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
        return self.encode(text)

    def encode(self, text: str) -> list[int]:
        """Token ids of a text used as is (no chat template, no special tokens added)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def num_unfinished_requests(self) -> int:
        """Requests (sample-level, n>1 counts n) vLLM's output processor still tracks."""
        return self.llm.get_num_unfinished_requests() if self.llm is not None else 0

    def check_length(self, prompt_ids: Sequence[int], max_tokens: int) -> None:
        """The prompt is not empty and prompt + max_tokens fits the context."""
        if not prompt_ids:
            raise InvalidRequest("prompt", "the prompt is empty")
        total = len(prompt_ids) + max_tokens
        if total > self.max_model_len:
            raise InvalidRequest(
                "max_tokens",
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) = "
                f"{total} exceeds the context length {self.max_model_len}",
            )

    async def fan_out(
        self,
        prompt: str | Sequence[int],
        n_draws: int,
        n_samples: int,
        sampling: SamplingOptions = SamplingOptions(),
        pool: str | None = None,
        on_draw: Callable[[list[Generated]], None] | None = None,
        stopper: Stopper | None = None,
    ) -> FanOut:
        """n_draws draws x n_samples samples (n_draws = 0: the mean adapter, n_samples samples).

        ``prompt``: token ids, or a text used as is (no chat template; see ``render``).
        Draw k's request has ``seed = request_seed_for_draw(seed, k)``; vLLM gives its samples
        seed+0..n-1. Cancelling the caller aborts every engine request of this fan-out.
        ``on_draw`` receives each draw's candidates as soon as that draw has finished.
        ``stopper``: early stopping (``_fan_out_until``); the same requests, streamed.
        """
        target = self.pool(pool)
        if n_samples < 1:
            raise InvalidRequest("n_samples", "n_samples must be >= 1")
        adapters = target.adapters(n_draws)
        prompt_ids = self._tokens(prompt)
        self.check_length(prompt_ids, sampling.max_tokens)
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
                f"{fan_id}-{'mean' if draw is None else f'd{draw}'}",
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

    async def score(
        self,
        sequences: Sequence[Sequence[int]],
        starts: Sequence[int],
        n_draws: int,
        pool: str | None = None,
        top: int = 0,
    ) -> Scored:
        """Teacher-forced log-probabilities of ``sequences[i][starts[i]:]`` under the mean
        (n_draws = 0) or each of draws 0..n_draws-1, every (sequence, draw) in one vLLM batch.

        Only prompt log-probabilities are asked for; vLLM decodes one greedy token per request
        (its minimum), which ``TokenScores.next_token`` reports."""
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        target = self.pool(pool)
        adapters = target.adapters(n_draws)
        sequences = [list(s) for s in sequences]
        for sequence, start in zip(sequences, starts, strict=True):
            self.check_length(sequence, 1)
            if not 1 <= start <= len(sequence):
                raise InvalidRequest("continuations", "nothing to score after the prompt")
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=top,
            logprobs=top,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        score_id = f"ivs-score-{uuid.uuid4().hex[:16]}"
        jobs = [
            Job(draw, f"{score_id}-s{i}-{'mean' if draw is None else f'd{draw}'}", params, lora, s)
            for i, s in enumerate(sequences)
            for draw, lora in adapters
        ]
        began = time.perf_counter()
        outputs = iter(await self._run_all(jobs))
        per_sequence = [
            [_token_scores(draw, sequence, start, top, next(outputs)) for draw, _ in adapters]
            for sequence, start in zip(sequences, starts, strict=True)
        ]
        return Scored(
            sequences=per_sequence,
            prompt_tokens=sum(len(s) for s in sequences),
            seconds=time.perf_counter() - began,
        )

    async def score_next(
        self,
        prompts: Sequence[Sequence[int]],
        token_ids: Sequence[Sequence[int]],
        n_draws: int,
        pool: str | None = None,
    ) -> NextScored:
        """log p(t | prompt) of each of ``token_ids[i]`` for the token right after ``prompts[i]``,
        under the mean (n_draws = 0) or each of draws 0..n_draws-1: one vLLM request (one
        forward pass over the prompt) per (prompt, draw), every one in one batch. The
        log-probabilities are over the whole vocabulary (vLLM's raw logprobs), so a caller can
        renormalise them over the tokens it asked for (multiple-choice letters)."""
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        adapters = self.pool(pool).adapters(n_draws)
        for prompt in prompts:
            self.check_length(list(prompt), 1)
        jobs = []
        score_id = f"ivs-next-{uuid.uuid4().hex[:16]}"
        for i, (prompt, ids) in enumerate(zip(prompts, token_ids, strict=True)):
            params = SamplingParams(
                max_tokens=1,
                temperature=0.0,
                logprob_token_ids=[int(t) for t in ids],
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            tag = f"{score_id}-p{i}"
            for draw, lora in adapters:
                name = f"{tag}-{'mean' if draw is None else f'd{draw}'}"
                jobs.append(Job(draw, name, params, lora, list(prompt)))
        began = time.perf_counter()
        outputs = iter(await self._run_all(jobs))
        per_prompt = []
        for ids in token_ids:
            rows = []
            for _ in adapters:
                step = next(outputs).outputs[0].logprobs[0]
                rows.append([float(step[int(t)].logprob) for t in ids])
            per_prompt.append(rows)
        return NextScored(
            logprobs=per_prompt,
            draws=[draw for draw, _ in adapters],
            prompt_tokens=sum(len(p) for p in prompts),
            seconds=time.perf_counter() - began,
        )

    async def generate_base(
        self, prompt: str | Sequence[int], sampling: SamplingOptions = SamplingOptions(), n: int = 1
    ) -> list[Generated]:
        """The base model without any adapter (diagnostics and the base-in-batch test)."""
        if not self.ready:
            raise EngineNotReady("the engine is not ready")
        prompt_ids = self._tokens(prompt)
        self.check_length(prompt_ids, sampling.max_tokens)
        seed = sampling.seed if sampling.seed is not None else secrets.randbits(62)
        request_id = f"ivs-{uuid.uuid4().hex[:16]}-base"
        params = self._params(sampling, n, seed & _SEED_MASK)
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


def _top(entry: Mapping[int, Any], top: int) -> dict[int, float]:
    """The ``top`` likeliest tokens of one position (vLLM adds the actual token beyond them)."""
    return {t: lp.logprob for t, lp in entry.items() if lp.rank is not None and lp.rank <= top}


def _token_scores(
    draw: int | None, sequence: list[int], start: int, top: int, out: Any
) -> TokenScores:
    entries = out.prompt_logprobs[start:]
    completion = out.outputs[0]
    token = completion.token_ids[0]
    step = completion.logprobs[0]
    return TokenScores(
        draw=draw,
        logprobs=[entry[t].logprob for entry, t in zip(entries, sequence[start:], strict=True)],
        top=[_top(entry, top) for entry in entries] if top else None,
        next_token=(token, step[token].logprob, _top(step, top)),
    )
