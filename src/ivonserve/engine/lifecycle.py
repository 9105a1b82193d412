"""The engine's life: ``Engine.start`` (resolve the base model, prepare each posterior's pool:
the mean and K draws written to tmpfs, ``pool``; start vLLM with one LoRA slot per adapter;
register each adapter; decode two tokens from every one of them), readiness, the pools by name,
the tokenizer, and ``shutdown``. The requests are the mixins' (``fan_out``, ``scoring``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from ivonserve.engine.args import EngineConfig, build_engine_args, on_cpu, set_vllm_environment
from ivonserve.engine.fan_out import FanOutMixin
from ivonserve.engine.scoring import ScoringMixin
from ivonserve.engine.types import Job, SamplingOptions
from ivonserve.errors import EngineError, EngineNotReady, InvalidRequest, UnknownPosterior
from ivonserve.pool import Pool, PreparedPool, prepare_pool, register_pool, tmpfs_dir

logger = logging.getLogger("ivonserve.engine")


class Engine(FanOutMixin, ScoringMixin):
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

    def _build_llm(self, pools: list[PreparedPool]) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        assert self.model_dir is not None
        cpu = on_cpu()
        self.engine_args = build_engine_args(self.config, self.model_dir, pools, cpu)
        set_vllm_environment(self.config, cpu)  # vLLM's processes (spawned below) read it
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

    # --- what requests resolve against ----------------------------------------------------------
    def pool(self, name: str | None = None) -> Pool:
        """The pool of the posterior ``name`` (None: the default one); ``UnknownPosterior``
        (404) if this engine serves none of that name."""
        self.require_ready()
        key = name or self.default_pool
        if key not in self.pools:
            raise UnknownPosterior(key, self.pools)
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

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    def num_unfinished_requests(self) -> int:
        """Requests (sample-level, n>1 counts n) vLLM's output processor still tracks."""
        return self.llm.get_num_unfinished_requests() if self.llm is not None else 0
