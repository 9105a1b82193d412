"""ivonserve's vLLM plugin: fixes to vLLM's CPU backend, loaded by vLLM in every one of its
processes (the front end, the engine core and its workers) through the ``vllm.general_plugins``
entry point.

* ``seeds``: a seeded request whose prefill is chunked killed vLLM's engine core on the CPU
  ("CPU Generator does not use offset"). The fix rewinds its generator by state, keeping seeds
  exact.
* ``lora_ops``: grouped LoRA kernels for the CPU punica wrapper (one matrix product per adapter
  present instead of a per-token copy of its weights; a token without an adapter is untouched).
* ``punica``: a CPU punica wrapper whose LoRA products are opaque ops reading each step's indices
  when they run, so that vLLM compiles LoRA models on the CPU (it runs them eager otherwise).

Each patch checks that the vLLM code it replaces is the code it was written against (the versions
in ``requirements/*.lock``) and refuses, loudly, when vLLM has moved: a plugin that silently
stopped applying would bring the bugs back unnoticed. ``status()`` says what is applied in the
calling process; the engine asks its workers for it (``Engine.plugin_status``).
"""

from __future__ import annotations

import os
from typing import Any

from ivonserve.vllm_plugin.shared import (
    LORA_KERNEL_ENV,
    LORA_KERNELS,
    SUPPORTED_VLLM,
    PluginError,
)

__all__ = ["LORA_KERNELS", "LORA_KERNEL_ENV", "SUPPORTED_VLLM", "PluginError", "register", "status"]

_applied: dict[str, Any] = {}


def register() -> None:
    """The entry point vLLM calls in each process; safe to call more than once."""
    if _applied:
        return
    import vllm
    from vllm.platforms import current_platform

    _applied["vllm"] = vllm.__version__
    _applied["pid"] = os.getpid()
    if not current_platform.is_cpu():
        return  # both fixes concern the CPU backend; CUDA generators rewind by offset
    if vllm.__version__ not in SUPPORTED_VLLM:
        raise PluginError(
            f"ivonserve's vLLM plugin was written against vLLM {' or '.join(SUPPORTED_VLLM)} "
            f"(requirements/*.lock), not {vllm.__version__}: install the locked version, or set "
            "VLLM_PLUGINS='' to run without it (seeded requests may then kill the CPU engine)"
        )
    from ivonserve.vllm_plugin import lora_ops, seeds

    _applied["seeds"] = seeds.apply()
    kernel = os.environ.get(LORA_KERNEL_ENV, "grouped")
    if kernel not in LORA_KERNELS:
        raise PluginError(f"{LORA_KERNEL_ENV}={kernel!r}: expected one of {LORA_KERNELS}")
    _applied["lora_kernel"] = lora_ops.apply() if kernel == "grouped" else "vllm"
    if kernel == "grouped":
        from ivonserve.vllm_plugin import punica

        _applied["punica_wrapper"] = punica.apply()
    _add_worker_status()


def status() -> dict[str, Any]:
    """What the plugin applied in this process (empty: not loaded), with live counters."""
    if not _applied:
        return {}
    import torch

    from ivonserve.vllm_plugin import lora_ops, seeds

    return {
        **_applied,
        "pid": os.getpid(),
        "omp_threads": torch.get_num_threads(),  # the cores this process computes on
        # the cap on oneDNN's per-shape GEMM cache that this process started with (engine/args.py)
        "onednn_primitive_cache_capacity": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"),
        "generator_rewinds": seeds.REWINDS.count,
        "grouped_lora_calls": lora_ops.CALLS.count,
    }


def _add_worker_status() -> None:
    """``collective_rpc("ivonserve_plugin_status")`` answers ``status()`` from each worker."""
    from vllm.v1.worker.cpu_worker import CPUWorker

    def worker_status(worker: CPUWorker) -> dict[str, Any]:
        # the mode the worker's model runs in: LoRA models compile only through this plugin
        mode = worker.vllm_config.compilation_config.mode
        return {**status(), "compilation_mode": mode.name}

    CPUWorker.ivonserve_plugin_status = worker_status
