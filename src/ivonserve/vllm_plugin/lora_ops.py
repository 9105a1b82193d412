"""Grouped LoRA kernels for vLLM's CPU backend (its punica wrapper, ``PunicaWrapperCPU``).

vLLM's CPU ops (``vllm/lora/ops/torch_ops/lora_ops.py``) gather every token's adapter matrices,
``weights[indices]``: a (tokens, rank, dim) copy per op per layer (in a prefill, tokens = prompt
length x draws), then multiply token by token (``einsum("bi,boi->bo")``). A token with index -1
(no adapter) reads ``weights[-1]``, the last slot: the reason a request without LoRA, batched
while every slot is taken, got the last adapter.

These ops group the tokens by adapter instead: one matrix product per adapter present, over the
rows of its tokens; no per-token weight copy; a token with index -1 is left untouched. Each op is a
registered torch custom op (``torch.ops.ivonserve.*``), so vLLM's ``torch.compile`` of the model
treats it as one opaque call instead of tracing its data-dependent grouping.

Semantics are vLLM's, op for op (``tests/test_lora_ops.py`` compares them on random inputs):
shrink: ``out[t, :r] = scale * x[t] @ A[i_t].T``; expand: ``out[t, off:off+n] (+)= x[t] @
B[i_t, :n].T``; the prefill (``sgmv_*``) forms repeat each sequence's adapter index over its
tokens.
"""

import inspect

import torch
from torch.library import Library

from ivonserve.vllm_plugin import PluginError

_LIB = Library("ivonserve", "FRAGMENT")  # the ops live as long as this object
# vLLM's op signatures these replace: a moved argument would silently mean another thing
_EXPECTED = {
    "bgmv_shrink": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", "scaling"],
    "bgmv_expand": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor",
                    "add_inputs"],
    "bgmv_expand_slice": ["inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor",
                          "slice_offset", "slice_size", "add_inputs"],
    "sgmv_shrink": ["inputs", "lora_a_weights", "output_tensor", "b_seq_start_loc",
                    "seq_len_tensor", "lora_indices_tensor", "batches", "max_seq_length",
                    "token_nums", "scaling"],
    "sgmv_expand": ["inputs", "lora_b_weights", "output_tensor", "b_seq_start_loc",
                    "seq_len_tensor", "lora_indices_tensor", "batches", "max_seq_length",
                    "token_nums", "add_inputs"],
    "sgmv_expand_slice": ["inputs", "lora_b_weights", "output_tensor", "b_seq_start_loc",
                          "seq_len_tensor", "lora_indices_tensor", "batches", "max_seq_length",
                          "token_nums", "slice_offset", "slice_size", "add_inputs"],
}  # fmt: skip


class _Counter:
    count = 0


CALLS = _Counter()  # grouped op calls in this process (observable through status())


def adapter_groups(indices: torch.Tensor) -> list[tuple[int, torch.Tensor | None]]:
    """(adapter slot, its token rows) for each adapter present; rows None means every token.
    Tokens with index -1 (no adapter) are in no group."""
    if indices.numel() == 0:
        return []
    low, high = (int(v) for v in torch.aminmax(indices))
    if low == high:
        return [] if low < 0 else [(low, None)]
    return [
        (slot, torch.nonzero(indices == slot).view(-1))
        for slot in torch.unique(indices).tolist()
        if slot >= 0
    ]


# A matrix product's rounding depends on its row count on the CPU (small products take other
# kernels: one row differs from two, an expand of fewer than 16 rows from more). Every group is
# padded to at least this many rows, so a token's result does not depend on how many tokens
# share its adapter: the same seed gives the same log-probabilities alone and in a batch.
MIN_ROWS = 16


def _product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T, computed with at least MIN_ROWS rows (see MIN_ROWS)."""
    rows = x.shape[0]
    if rows >= MIN_ROWS:
        return x @ weight.t()
    padded = torch.cat([x, x.new_zeros(MIN_ROWS - rows, x.shape[1])])
    return (padded @ weight.t())[:rows]


def _token_indices(indices: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
    """Per-token adapter indices: a prefill gives one index per sequence and its length."""
    return indices if seq_lens is None else torch.repeat_interleave(indices, seq_lens)


def _matrices(weights: torch.Tensor) -> torch.Tensor:
    """(slots, out, in): vLLM stacks adapters as (slots, 1, out, in)."""
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _shrink(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    output: torch.Tensor,
    indices: torch.Tensor,
    seq_lens: torch.Tensor | None,
    scaling: float,
) -> None:
    CALLS.count += 1
    matrices = _matrices(weights)
    rank = matrices.shape[1]
    x = inputs.to(output.dtype)
    for slot, rows in adapter_groups(_token_indices(indices, seq_lens)):
        a = matrices[slot].to(output.dtype)
        if rows is None:
            output[:, :rank] = scaling * _product(x, a)
        else:
            output[rows, :rank] = scaling * _product(x.index_select(0, rows), a)


def _expand(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    output: torch.Tensor,
    indices: torch.Tensor,
    seq_lens: torch.Tensor | None,
    offset: int,
    size: int,
    add_inputs: bool,
) -> None:
    CALLS.count += 1
    matrices = _matrices(weights)
    target = output[:, offset : offset + size]
    x = inputs.to(output.dtype)
    for slot, rows in adapter_groups(_token_indices(indices, seq_lens)):
        b = matrices[slot, :size].to(output.dtype)
        if rows is None:  # one token's result broadcasts over every row, as in vLLM
            y = _product(x, b)
            target.add_(y) if add_inputs else target.copy_(y)
        else:
            y = _product(x.index_select(0, rows), b)
            target.index_add_(0, rows, y) if add_inputs else target.index_copy_(0, rows, y)


def _shrink_fake(inputs, weights, output, indices, seq_lens, scaling) -> None:
    return None


def _expand_fake(inputs, weights, output, indices, seq_lens, offset, size, add_inputs) -> None:
    return None


def _register_ops() -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    if hasattr(torch.ops.ivonserve, "lora_shrink"):
        return
    direct_register_custom_op(
        "lora_shrink", _shrink, ["output"], _shrink_fake, target_lib=_LIB, dispatch_key="CPU"
    )
    direct_register_custom_op(
        "lora_expand", _expand, ["output"], _expand_fake, target_lib=_LIB, dispatch_key="CPU"
    )


# --- vLLM's op signatures, calling the grouped ops ---------------------------------------------
def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    torch.ops.ivonserve.lora_shrink(
        inputs, lora_b_weights, output_tensor, lora_indices_tensor, None, scaling
    )


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    # vLLM writes the columns adapter and output share (their padding may differ)
    common = min(_matrices(lora_b_weights).shape[1], output_tensor.shape[1])
    bgmv_expand_slice(inputs, lora_b_weights, output_tensor, lora_indices_tensor, 0, common,
                      add_inputs)  # fmt: skip


def bgmv_expand_slice(
    inputs,
    lora_b_weights,
    output_tensor,
    lora_indices_tensor,
    slice_offset,
    slice_size,
    add_inputs=True,
):
    torch.ops.ivonserve.lora_expand(
        inputs,
        lora_b_weights,
        output_tensor,
        lora_indices_tensor,
        None,
        slice_offset,
        slice_size,
        add_inputs,
    )


def sgmv_shrink(
    inputs,
    lora_a_weights,
    output_tensor,
    b_seq_start_loc,
    seq_len_tensor,
    lora_indices_tensor,
    batches,
    max_seq_length,
    token_nums,
    scaling,
):
    torch.ops.ivonserve.lora_shrink(
        inputs, lora_a_weights, output_tensor, lora_indices_tensor, seq_len_tensor, scaling
    )


def sgmv_expand(
    inputs,
    lora_b_weights,
    output_tensor,
    b_seq_start_loc,
    seq_len_tensor,
    lora_indices_tensor,
    batches,
    max_seq_length,
    token_nums,
    add_inputs=False,
):
    common = min(_matrices(lora_b_weights).shape[1], output_tensor.shape[1])
    sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor,
                      lora_indices_tensor, batches, max_seq_length, token_nums, 0, common,
                      add_inputs)  # fmt: skip


def sgmv_expand_slice(
    inputs,
    lora_b_weights,
    output_tensor,
    b_seq_start_loc,
    seq_len_tensor,
    lora_indices_tensor,
    batches,
    max_seq_length,
    token_nums,
    slice_offset,
    slice_size,
    add_inputs=False,
):
    torch.ops.ivonserve.lora_expand(
        inputs,
        lora_b_weights,
        output_tensor,
        lora_indices_tensor,
        seq_len_tensor,
        slice_offset,
        slice_size,
        add_inputs,
    )


GROUPED = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
}


def apply() -> str:
    """Point vLLM's CPU punica wrapper at the grouped ops; returns what was applied."""
    from vllm.lora.ops import torch_ops
    from vllm.lora.punica_wrapper import punica_cpu

    for name, expected in _EXPECTED.items():
        original = getattr(punica_cpu, name, None)
        found = list(inspect.signature(original).parameters) if original else None
        if original is not getattr(torch_ops, name, None) or found != expected:
            raise PluginError(
                f"vLLM's CPU LoRA op {name} is not the one ivonserve's grouped kernels replace "
                f"(expected parameters {expected}, found {found}): vllm_plugin/lora_ops.py "
                "needs review for this vLLM version, or run with --lora-kernel vllm"
            )
    _register_ops()
    for name, op in GROUPED.items():
        setattr(punica_cpu, name, op)
    return "grouped"
