"""Seeded sampling with chunked prefill on vLLM's CPU backend.

When the scheduler splits a prompt over several steps, vLLM still samples a token for the
unfinished request at each partial step and then discards it; to make that discarded draw leave
no trace it rewinds the request's generator (``GPUModelRunner._bookkeeping_sync``)::

    gen.set_offset(gen.get_offset() - 4)

That works for CUDA's Philox generators only: a CPU generator raises "CPU Generator does not use
offset", which kills the engine core. Only seeded requests own a generator, and ivonserve seeds
every engine request (one seed per draw), so the first chunked prefill took the server down.

The fix rewinds by state instead of by offset: before sampling, the generator of every request
whose token will be discarded is saved (``get_state``); after sampling it is restored, and the
offset rewind is skipped for it. The random stream of a request is then the same whether its
prefill was chunked or not, so a seed gives the same samples alone and under load.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np

from ivonserve.vllm_plugin.shared import PluginError

# the line of GPUModelRunner._bookkeeping_sync this patch stands in for
OFFSET_REWIND = "gen.set_offset(gen.get_offset() - 4)"


class _Counter:
    count = 0


REWINDS = _Counter()  # generators rewound in this process (observable through status())


def apply() -> str:
    """Patch vLLM's CPU model runner; returns what was applied."""
    from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    source = inspect.getsource(GPUModelRunner._bookkeeping_sync)
    if OFFSET_REWIND not in source or "discard_request_mask" not in source:
        raise PluginError(
            "vLLM's GPUModelRunner._bookkeeping_sync no longer rewinds discarded samples with "
            f"`{OFFSET_REWIND}`: ivonserve's seed fix (vllm_plugin/seeds.py) needs review for "
            "this vLLM version"
        )
    sample, bookkeeping = CPUModelRunner._sample, CPUModelRunner._bookkeeping_sync

    def _sample(self: Any, *args: Any, **kwargs: Any) -> Any:
        saved = {i: gen.get_state() for i, gen in _discarded_generators(self)}
        try:
            return sample(self, *args, **kwargs)
        finally:
            generators = self.input_batch.generators
            for i, state in saved.items():
                generators[i].set_state(state)
            REWINDS.count += len(saved)

    def _bookkeeping_sync(self: Any, *args: Any, **kwargs: Any) -> Any:
        # already rewound by state in _sample: hide them from the offset rewind
        generators = self.input_batch.generators
        hidden = {i: generators.pop(i) for i, _ in _discarded_generators(self)}
        try:
            return bookkeeping(self, *args, **kwargs)
        finally:
            generators.update(hidden)

    CPUModelRunner._sample = _sample
    CPUModelRunner._bookkeeping_sync = _bookkeeping_sync
    return "rewind-by-state"


def _discarded_generators(runner: Any) -> list[tuple[int, Any]]:
    """(batch index, generator) of each seeded request whose sampled token this step discards."""
    num_reqs = runner.input_batch.num_reqs
    generators = runner.input_batch.generators
    indices = np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]
    return [(int(i), generators[int(i)]) for i in indices if int(i) in generators]
