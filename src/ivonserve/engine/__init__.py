"""The vLLM engine: one ``AsyncLLM`` (V1) per process, posterior draws as LoRA slots, fan-out and
scoring. Split by job:

* ``args``: vLLM's arguments and environment (``EngineConfig``, ``build_engine_args``, the CPU
  defaults, the LoRA kernel and CPU variables vLLM's processes read);
* ``lifecycle``: ``Engine`` itself: start (pools prepared and registered, warm-up), readiness,
  the pools by name, the tokenizer, shutdown;
* ``fan_out``: ``Engine.fan_out`` (one vLLM request per draw, ``n_samples`` samples each, a
  distinct seed per draw, early stopping), ``generate_base``, submission and abort;
* ``scoring``: ``Engine.score`` and ``Engine.score_next`` (prompt log-probabilities);
* ``types``: what goes in and out (``SamplingOptions``, ``Generated``, ``FanOut``, ...).

Several posteriors share the engine (``--posterior NAME=DIR`` repeated): each is a ``Pool`` of
its own LoRA slots on the same base model, kept by name; a request resolves its pool once
(``Engine.pool``) and hands the ``Pool`` to ``fan_out`` or ``score``.
"""

from ivonserve.engine.args import (
    CPU_ONEDNN_CACHE_CAPACITY,
    ONEDNN_CACHE_ENV,
    RESERVED_CPU_ENV,
    EngineConfig,
    build_engine_args,
    default_cpu_dtype,
)
from ivonserve.engine.fan_out import request_seed_for_draw
from ivonserve.engine.lifecycle import Engine
from ivonserve.engine.types import (
    STOPPED,
    FanOut,
    Generated,
    NextScored,
    SamplingOptions,
    Scored,
    Stopper,
    TokenScores,
)
from ivonserve.errors import EngineError, EngineNotReady, InvalidRequest

__all__ = [
    "CPU_ONEDNN_CACHE_CAPACITY",
    "ONEDNN_CACHE_ENV",
    "RESERVED_CPU_ENV",
    "STOPPED",
    "Engine",
    "EngineConfig",
    "EngineError",
    "EngineNotReady",
    "FanOut",
    "Generated",
    "InvalidRequest",
    "NextScored",
    "SamplingOptions",
    "Scored",
    "Stopper",
    "TokenScores",
    "build_engine_args",
    "default_cpu_dtype",
    "request_seed_for_draw",
]
