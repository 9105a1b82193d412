"""vLLM's arguments and environment: ``EngineConfig`` (what the engine needs of the settings),
the engine arguments derived from it and the pools, the CPU defaults, and the variables vLLM's
processes read when they start.

Slots: with ivonserve's grouped LoRA kernel (``vllm_plugin.lora_ops``, the default on the CPU) a
request without an adapter is untouched by LoRA, so ``max_loras`` is every adapter. vLLM's own
ops give such a request the last slot's adapter when every slot is taken; with them
(``lora_kernel="vllm"``, or on a GPU) one spare slot is kept free so that never happens.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ivonserve.pool import PosteriorSpec, PreparedPool, vllm_rank
from ivonserve.sampler import SamplerConfig
from ivonserve.vllm_plugin.shared import LORA_KERNEL_ENV

# vLLM's CPU worker keeps this many cores of its NUMA node out of its OpenMP threads, for its
# scheduler: 1 by default, which on a 2-core machine halves the cores that compute. ivonserve
# makes it 0 unless the user set it (bench/results/fanout.md: the fan-out and /score ran
# faster with every core computing); explicit VLLM_CPU_OMP_THREADS_BIND core lists ignore it.
RESERVED_CPU_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
# oneDNN caches a GEMM primitive per shape (1,024 by default), and vLLM's CPU worker meets a new
# token count nearly every step: uncapped, the worker grew +713 and +329 MiB in two 600-request
# soaks and did not level off; capped at 64, +241 and +63 MiB, flat, at the same latency
# (docs/benchmarks.md; bench/results/soak-onednn/). ivonserve sets the cap for vLLM's
# processes unless set.
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
CPU_ONEDNN_CACHE_CAPACITY = "64"
CPU_DEFAULT_KV_CACHE_GIB = 1.0
CPU_DEFAULT_BLOCK_SIZE = 32
# CPU flags of native bf16 matrix instructions; without them bf16 is emulated and slower
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class EngineConfig:
    """What the engine needs of the settings (``Settings.engine_config()``): the base model, the
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


def on_cpu() -> bool:
    """vLLM runs on its CPU backend here."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def default_cpu_dtype(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """bfloat16 where the CPU multiplies bf16 natively (AVX512-BF16 or AMX), else float32."""
    try:
        flags = set(cpuinfo.read_text().split())
    except OSError:
        return "float32"
    return "bfloat16" if flags & BF16_CPU_FLAGS else "float32"


def lora_kernel(config: EngineConfig, cpu: bool) -> str:
    """The LoRA kernel vLLM runs: ivonserve's grouped ops exist for the CPU backend only."""
    return config.lora_kernel if cpu else "vllm"


def build_engine_args(
    config: EngineConfig, model_dir: Path, pools: Sequence[PreparedPool], cpu: bool | None = None
) -> dict[str, Any]:
    """vLLM engine arguments: LoRA slots sized for every pool, the rest from the config."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    c = config
    cpu = on_cpu() if cpu is None else cpu
    adapters = sum(len(p.draw_dirs) + 1 for p in pools)
    # vLLM's own ops need a spare slot (a base request meets a full set of slots otherwise)
    slots = adapters + (1 if lora_kernel(c, cpu) == "vllm" else 0)
    targets = sorted({m for p in pools for m in p.target_modules})
    args: dict[str, Any] = {
        "model": str(model_dir),
        "tokenizer": str(model_dir),
        "dtype": c.dtype or (default_cpu_dtype() if cpu else "auto"),
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
        "block_size": c.block_size or (CPU_DEFAULT_BLOCK_SIZE if cpu else None),
    }
    kv_gib = c.kv_cache_gib or (CPU_DEFAULT_KV_CACHE_GIB if cpu else None)
    if kv_gib:
        optional["kv_cache_memory_bytes"] = int(kv_gib * (1 << 30))
    args.update({k: v for k, v in optional.items() if v is not None})
    return args


def set_vllm_environment(config: EngineConfig, cpu: bool) -> None:
    """The variables vLLM's processes (spawned next) read when they start: the LoRA kernel for
    ivonserve's plugin and, on the CPU, every core computing and oneDNN's cache capped (each
    unless the user set it)."""
    os.environ[LORA_KERNEL_ENV] = lora_kernel(config, cpu)
    if cpu:
        os.environ.setdefault(RESERVED_CPU_ENV, "0")
        os.environ.setdefault(ONEDNN_CACHE_ENV, CPU_ONEDNN_CACHE_CAPACITY)
