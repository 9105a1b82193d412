"""A CPU punica wrapper that vLLM can compile, so that a LoRA model runs as compiled as its base.

vLLM runs every LoRA model on the CPU in eager mode: ``CpuPlatform.check_and_update_config`` sets
the compilation mode to NONE when LoRA is on. The reason is its CPU wrapper
(``PunicaWrapperCPU``): it picks its prefill or decode ops by a Python flag (``is_prefill``) and
slices its index buffer by a Python length (``indices_len``), and vLLM's CPU compilation traces
the model once and drops every guard (``DYNAMO_TRACE_ONCE``), so a traced graph would keep the
first step's choices forever. Eager costs the whole model, not only its LoRA layers: in
``bench/fanout.py`` the base model alone ran compiled and the fan-out eager, most of the gap
between them.

``GroupedPunicaWrapperCPU`` turns each of the wrapper's per-slice products into one opaque custom
op (``torch.ops.ivonserve.lora_shrink_live`` / ``lora_expand_live``) that reads the step's token
indices from its wrapper when it runs: the traced graph holds no per-step state, only the
wrapper's number. A token's index is its adapter's slot in a prefill and a decode alike, so the
grouped ops need no prefill/decode branch. The plugin then lets vLLM compile LoRA models as it
compiles any other (``--enforce-eager`` still turns it off).
"""

from __future__ import annotations

import inspect
import os
import weakref

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from ivonserve.vllm_plugin import lora_ops
from ivonserve.vllm_plugin.shared import LORA_KERNEL_ENV, PluginError

QUALNAME = f"{__name__}.GroupedPunicaWrapperCPU"
VLLM_QUALNAME = "vllm.lora.punica_wrapper.punica_cpu.PunicaWrapperCPU"
# the lines of CpuPlatform.check_and_update_config that turn compilation off for LoRA
_LORA_OFF = "if vllm_config.lora_config is not None:\n            compilation_config.mode = "

# a compiled graph names its wrapper by number; a weak map, so that an engine shut down in a
# process that starts another (the tests) does not keep its wrapper alive
_WRAPPERS: weakref.WeakValueDictionary[int, GroupedPunicaWrapperCPU] = weakref.WeakValueDictionary()


class GroupedPunicaWrapperCPU(PunicaWrapperCPU):
    """vLLM's CPU wrapper, whose products read the step's indices inside an opaque op."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.ivonserve_id = max(_WRAPPERS, default=-1) + 1
        _WRAPPERS[self.ivonserve_id] = self

    def _apply_shrink(
        self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float
    ) -> None:
        torch.ops.ivonserve.lora_shrink_live(y, x, w_t_all, scale, self.ivonserve_id)

    def _apply_expand(
        self,
        y: torch.Tensor,
        x: torch.Tensor,
        w_t_all: torch.Tensor,
        y_offset: int,
        y_slice_size: int,
        add_inputs: bool = True,
    ) -> None:
        torch.ops.ivonserve.lora_expand_live(
            y, x, w_t_all, y_offset, y_slice_size, add_inputs, self.ivonserve_id
        )

    def add_lora_embedding(
        self, y: torch.Tensor, x: torch.Tensor, lora_b_stacked: torch.Tensor, add_inputs=True, **_
    ) -> None:
        common = min(lora_ops.stacked_matrices(lora_b_stacked).shape[1], y.shape[-1])
        self._apply_expand(y, x, lora_b_stacked, 0, common, add_inputs)


def live_token_indices(wrapper: int, rows: int) -> torch.Tensor:
    """The adapter slot of each of this step's tokens, one per row of the op's input (rows that
    vLLM padded past its tokens get -1, no adapter)."""
    indices = _WRAPPERS[wrapper].token_lora_indices
    if indices.numel() >= rows:
        return indices[:rows]
    return torch.cat([indices, indices.new_full((rows - indices.numel(),), -1)])


def _shrink_live(
    output: torch.Tensor, inputs: torch.Tensor, weights: torch.Tensor, scaling: float, wrapper: int
) -> None:
    out = output.view(-1, output.shape[-1])
    indices = live_token_indices(wrapper, inputs.shape[0])
    lora_ops.shrink(inputs, weights, out, indices, None, scaling)


def _expand_live(
    output: torch.Tensor,
    inputs: torch.Tensor,
    weights: torch.Tensor,
    offset: int,
    size: int,
    add_inputs: bool,
    wrapper: int,
) -> None:
    out = output.view(-1, output.shape[-1])
    indices = live_token_indices(wrapper, inputs.shape[0])
    lora_ops.expand(inputs, weights, out, indices, None, offset, size, add_inputs)


def _shrink_live_fake(output, inputs, weights, scaling, wrapper) -> None:
    return None


def _expand_live_fake(output, inputs, weights, offset, size, add_inputs, wrapper) -> None:
    return None


def apply() -> str:
    """Make vLLM's CPU platform build this wrapper, and compile LoRA models; returns the
    wrapper's class name."""
    from vllm.platforms.cpu import CpuPlatform

    found = CpuPlatform.get_punica_wrapper()
    check = CpuPlatform.check_and_update_config.__func__
    if found not in (VLLM_QUALNAME, QUALNAME) or (
        found == VLLM_QUALNAME and _LORA_OFF not in inspect.getsource(check)
    ):
        raise PluginError(
            f"vLLM's CPU platform (punica wrapper {found}) is not the one ivonserve's compiled "
            "LoRA path was written against: vllm_plugin/punica.py needs review for this vLLM "
            "version, or run with --lora-kernel vllm"
        )
    lora_ops.register_ops(
        {
            "lora_shrink_live": (_shrink_live, _shrink_live_fake),
            "lora_expand_live": (_expand_live, _expand_live_fake),
        }
    )
    if found == VLLM_QUALNAME:
        CpuPlatform.get_punica_wrapper = classmethod(lambda cls: QUALNAME)
        CpuPlatform.check_and_update_config = classmethod(_compiling_lora(check))
    return GroupedPunicaWrapperCPU.__name__


def _compiling_lora(check):
    """vLLM's own configuration of the CPU, as for a model without LoRA: the one line that turns
    compilation off for LoRA is what this wrapper makes unnecessary. Decided per engine, by the
    kernel its workers will load (a process may start engines of both kernels, as
    bench/fanout.py does): vLLM's own ops keep vLLM's eager LoRA path."""

    def check_and_update_config(cls, vllm_config) -> None:
        if os.environ.get(LORA_KERNEL_ENV, "grouped") != "grouped":
            check(cls, vllm_config)
            return
        lora_config = vllm_config.lora_config
        vllm_config.lora_config = None
        try:
            check(cls, vllm_config)
        finally:
            vllm_config.lora_config = lora_config

    return check_and_update_config
