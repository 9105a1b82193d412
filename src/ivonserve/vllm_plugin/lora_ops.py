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


Rows = slice | torch.Tensor  # an adapter's tokens: a slice when they are contiguous


def adapter_groups(indices: torch.Tensor) -> list[tuple[int, Rows]]:
    """(adapter slot, its token rows) for each adapter present, in slot order. Rows are a slice
    when the adapter's tokens are contiguous (vLLM batches a request's tokens together, and a
    fan-out's requests by draw), so the ops take views instead of copying rows in and out; else
    the row numbers. Tokens with index -1 (no adapter) are in no group."""
    n = indices.numel()
    if n == 0:
        return []
    starts = [0, *(torch.nonzero(indices[1:] != indices[:-1]).view(-1) + 1).tolist()]
    if len(starts) == 1:  # one adapter (or none) for every token
        slot = int(indices[0])
        return [] if slot < 0 else [(slot, slice(None))]
    runs: dict[int, list[tuple[int, int]]] = {}
    for slot, begin, end in zip(indices[starts].tolist(), starts, [*starts[1:], n], strict=True):
        if slot >= 0:
            runs.setdefault(slot, []).append((begin, end))
    return [(slot, _rows(runs[slot])) for slot in sorted(runs)]


def _rows(runs: list[tuple[int, int]]) -> Rows:
    if len(runs) == 1:
        return slice(*runs[0])
    return torch.cat([torch.arange(begin, end) for begin, end in runs])


class _GroupCache:
    """The groups of the last indices seen. Every LoRA op of a forward pass (shrink and expand
    of each adapted layer: 120 calls a step for q/v on a 30-layer model) gets the same indices,
    and grouping them cost more than the products (with the views below, an op on a decode
    step's shape got ~4x cheaper in a microbenchmark). The cache compares contents (a few
    microseconds), not identity: vLLM rewrites its index buffers in place between steps."""

    def __init__(self) -> None:
        self.indices: torch.Tensor | None = None
        self.seq_lens: torch.Tensor | None = None
        self.groups: list[tuple[int, Rows]] = []
        self.misses = 0

    def get(self, indices: torch.Tensor, seq_lens: torch.Tensor | None) -> list[tuple[int, Rows]]:
        if not (_same(indices, self.indices) and _same(seq_lens, self.seq_lens)):
            self.misses += 1
            self.indices = indices.clone()
            self.seq_lens = None if seq_lens is None else seq_lens.clone()
            self.groups = adapter_groups(_token_indices(indices, seq_lens))
        return self.groups


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and torch.equal(a, b)


GROUPS = _GroupCache()


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.to(dtype) without a dispatched no-op: at ~100 op calls a step, each call counts."""
    return x if x.dtype == dtype else x.to(dtype)


def _take(x: torch.Tensor, rows: Rows) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


def _put(target: torch.Tensor, rows: Rows, y: torch.Tensor, add: bool) -> None:
    if isinstance(rows, slice):
        view = target[rows]
        view.add_(y) if add else view.copy_(y)
    else:
        target.index_add_(0, rows, y) if add else target.index_copy_(0, rows, y)


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
    x = _as(inputs, output.dtype)
    for slot, rows in GROUPS.get(indices, seq_lens):
        y = _product(_take(x, rows), _as(matrices[slot], output.dtype))
        _put(output[:, :rank], rows, y if scaling == 1.0 else y.mul_(scaling), add=False)


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
    x = _as(inputs, output.dtype)
    for slot, rows in GROUPS.get(indices, seq_lens):
        # a one-token input over every row broadcasts, as in vLLM
        y = _product(_take(x, rows), _as(matrices[slot, :size], output.dtype))
        _put(target, rows, y, add_inputs)


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
