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
from collections.abc import Callable

import torch
from torch.library import Library

from ivonserve.vllm_plugin.shared import PluginError

LIBRARY = Library("ivonserve", "FRAGMENT")  # the ops live as long as this object
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


class StepPlan:
    """How one step's tokens meet their adapters, computed once for every LoRA op of the step.

    Two forms of the same products: ``groups``, one product per adapter present over its rows
    (views where its tokens are contiguous); and the stacked form, one product over every token
    against all the adapters present side by side, each token then keeping its own adapter's
    columns. A decode step interleaves its adapters (a fan-out's requests are ordered by prompt,
    then draw): the grouped form then pays a gather, a scatter and several small products per
    adapter, ~10 aten calls of Python dispatch each, and the stacked form wins despite its extra
    arithmetic (rank 8 x the adapters present, next to the base model's hidden size). A long
    prefill is a few contiguous runs, where the grouped form's arithmetic is what counts."""

    def __init__(self, indices: torch.Tensor, form: str = "auto") -> None:
        _check_form(form)
        self.groups = adapter_groups(indices)
        self.valid = (indices >= 0).unsqueeze(1)  # the tokens with an adapter
        self.stacked = bool(self.groups) and (
            form == "stacked" or (form == "auto" and _prefer_stacked(indices.numel(), self.groups))
        )
        if not self.stacked:
            return
        present = [slot for slot, _ in self.groups]
        slots = torch.tensor(present, dtype=torch.long)
        self.slots = slots
        # each token's position among the adapters present (0 for the base tokens: masked)
        position = torch.searchsorted(slots, indices.clamp(min=0))
        self.position = position.clamp(max=len(present) - 1)
        one_hot = torch.nn.functional.one_hot(self.position, len(present)).unsqueeze(2)
        self._one_hot = {torch.float32: (one_hot * self.valid.unsqueeze(2)).float()}

    def one_hot(self, dtype: torch.dtype) -> torch.Tensor:
        """(tokens, adapters present, 1): 1 in each token's adapter, 0 elsewhere and for the base
        tokens; kept per dtype, since every expand of the step asks for it."""
        if dtype not in self._one_hot:
            self._one_hot[dtype] = self._one_hot[torch.float32].to(dtype)
        return self._one_hot[dtype]


# "auto" picks by the step's shape (_prefer_stacked); the others force a form (bench/lora_ops.py)
FORMS = ("auto", "grouped", "stacked")


def _check_form(form: str) -> None:
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, not {form!r}")


# Stacked when the grouped form would need more products than this many tokens can amortize:
# measured on a decode step's shapes (bench/lora_ops.py).
STACKED_MAX_TOKENS = 256


def _prefer_stacked(tokens: int, groups: list[tuple[int, Rows]]) -> bool:
    interleaved = any(not isinstance(rows, slice) for _, rows in groups)
    return tokens <= STACKED_MAX_TOKENS and (interleaved or len(groups) > 2)


class _PlanCache:
    """The plan of the last indices seen. Every LoRA op of a forward pass (shrink and expand of
    each slice of each adapted layer: 180 calls a step for SmolLM2's fused q/k/v) gets the same
    indices. The cache compares contents (a few microseconds), not identity: vLLM rewrites its
    index buffers in place between steps."""

    def __init__(self) -> None:
        self.indices: torch.Tensor | None = None
        self.seq_lens: torch.Tensor | None = None
        self.form = "auto"
        self.plan = StepPlan(torch.empty(0, dtype=torch.long))
        self.misses = 0

    def use_form(self, form: str) -> None:
        """Plan every later step in this form (FORMS); the next call plans anew."""
        _check_form(form)
        self.form, self.indices = form, None

    def get(self, indices: torch.Tensor, seq_lens: torch.Tensor | None) -> StepPlan:
        if not (_same(indices, self.indices) and _same(seq_lens, self.seq_lens)):
            self.misses += 1
            self.indices = indices.clone()
            self.seq_lens = None if seq_lens is None else seq_lens.clone()
            self.plan = StepPlan(_token_indices(indices, seq_lens), self.form)
        return self.plan


def _same(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and torch.equal(a, b)


PLANS = _PlanCache()


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


# A matrix product's rounding depends on its shape on the CPU: products with fewer than 16 rows,
# or fewer than 16 columns, take other kernels (one row differs from two; a shrink to rank 8 from
# the same columns computed among 16 or more). Every product is padded to at least this many rows
# and columns, so a token's result does not depend on how many tokens share its step or its
# adapter, nor on which form (grouped or stacked) computed it: the same seed gives the same
# log-probabilities alone and in any batch.
MIN_SIDE = 16


def _product(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T, computed with at least MIN_SIDE rows and columns (see MIN_SIDE)."""
    rows, columns = x.shape[0], weight.shape[0]
    if rows < MIN_SIDE:
        x = torch.cat([x, x.new_zeros(MIN_SIDE - rows, x.shape[1])])
    if columns < MIN_SIDE:
        weight = torch.cat([weight, weight.new_zeros(MIN_SIDE - columns, weight.shape[1])])
    y = x @ weight.t()
    return y if (rows >= MIN_SIDE and columns >= MIN_SIDE) else y[:rows, :columns]


def _token_indices(indices: torch.Tensor, seq_lens: torch.Tensor | None) -> torch.Tensor:
    """Per-token adapter indices: a prefill gives one index per sequence and its length."""
    return indices if seq_lens is None else torch.repeat_interleave(indices, seq_lens)


def stacked_matrices(weights: torch.Tensor) -> torch.Tensor:
    """(slots, out, in): vLLM stacks adapters as (slots, 1, out, in)."""
    return weights.squeeze(1) if weights.dim() == 4 else weights


def _all_zero(weights: torch.Tensor) -> bool:
    """Whether every adapter's matrices here are zeros: a fused layer's slice that no adapter
    targets (k of q/k/v, when the adapters target q and v) is a third of a step's LoRA ops, and
    its products are zeros. Remembered on the tensor with its version counter, which every
    in-place write (vLLM loading or resetting an adapter in a slot) bumps."""
    known = getattr(weights, "_ivonserve_all_zero", None)
    if known is None or known[0] != weights._version:
        known = (weights._version, not bool(weights.any()))
        weights._ivonserve_all_zero = known
    return known[1]


def _present(matrices: torch.Tensor, plan: StepPlan) -> torch.Tensor:
    """The matrices of the adapters present, in slot order (a view when that is every slot)."""
    if plan.slots.numel() == matrices.shape[0]:
        return matrices
    return matrices.index_select(0, plan.slots)


def _stacked_layout(
    weights: torch.Tensor, plan: StepPlan, dtype: torch.dtype, size: int | None = None
) -> torch.Tensor:
    """The present adapters' matrices laid out for the stacked form's one product: (adapters x
    rank, in) for a shrink, (size, adapters x rank) for an expand (size: None for a shrink).
    Laying them out copies them, and every step of a decode asks for the same layout: it is kept
    on the tensor until the step's adapters change or a write (an adapter loaded into a slot)
    bumps the tensor's version counter."""
    key = (weights._version, plan, dtype, size)
    kept = getattr(weights, "_ivonserve_stacked", None)
    if kept is not None and kept[0] == key:
        return kept[1]
    present = _as(_present(stacked_matrices(weights), plan), dtype)
    if size is None:
        layout = present.reshape(-1, present.shape[-1])
    else:
        layout = present[:, :size].transpose(0, 1).reshape(size, -1)
    weights._ivonserve_stacked = (key, layout)
    return layout


def shrink(
    inputs: torch.Tensor,
    weights: torch.Tensor,
    output: torch.Tensor,
    indices: torch.Tensor,
    seq_lens: torch.Tensor | None,
    scaling: float,
) -> None:
    CALLS.count += 1
    matrices = stacked_matrices(weights)
    rank = matrices.shape[1]
    plan = PLANS.get(indices, seq_lens)
    if _all_zero(weights):
        output[:, :rank].masked_fill_(plan.valid, 0)
        return
    x = _as(inputs, output.dtype)
    if plan.stacked:
        a = _stacked_layout(weights, plan, output.dtype)
        every = _product(x, a).view(x.shape[0], -1, rank)
        own = every.gather(1, plan.position.view(-1, 1, 1).expand(-1, 1, rank)).squeeze(1)
        own = own if scaling == 1.0 else own.mul_(scaling)
        target = output[:, :rank]
        target.copy_(torch.where(plan.valid, own, target))
        return
    for slot, rows in plan.groups:
        y = _product(_take(x, rows), _as(matrices[slot], output.dtype))
        _put(output[:, :rank], rows, y if scaling == 1.0 else y.mul_(scaling), add=False)


def expand(
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
    matrices = stacked_matrices(weights)
    target = output[:, offset : offset + size]
    plan = PLANS.get(indices, seq_lens)
    if _all_zero(weights):
        if not add_inputs:
            target.masked_fill_(plan.valid, 0)
        return
    x = _as(inputs, output.dtype)
    if plan.stacked:
        b = _stacked_layout(weights, plan, output.dtype, size)  # (size, adapters x rank)
        # each token's input in its adapter's columns, zeros in the others'
        spread = (x.unsqueeze(1) * plan.one_hot(x.dtype)).flatten(1)
        y = _product(spread, b)
        target.add_(y) if add_inputs else target.copy_(torch.where(plan.valid, y, target))
        return
    for slot, rows in plan.groups:
        # a one-token input over every row broadcasts, as in vLLM
        y = _product(_take(x, rows), _as(matrices[slot, :size], output.dtype))
        _put(target, rows, y, add_inputs)


def _shrink_fake(inputs, weights, output, indices, seq_lens, scaling) -> None:
    return None


def _expand_fake(inputs, weights, output, indices, seq_lens, offset, size, add_inputs) -> None:
    return None


def register_ops(ops: dict[str, tuple[Callable, Callable]]) -> None:
    """Register each op (name: (CPU implementation, fake)) in ivonserve's torch library, once per
    process; every op writes its ``output`` argument in place."""
    from vllm.utils.torch_utils import direct_register_custom_op

    for name, (op, fake) in ops.items():
        if not hasattr(torch.ops.ivonserve, name):
            direct_register_custom_op(
                name, op, ["output"], fake, target_lib=LIBRARY, dispatch_key="CPU"
            )


def register_lora_ops() -> None:
    """The ops behind vLLM's op signatures below."""
    register_ops({"lora_shrink": (shrink, _shrink_fake), "lora_expand": (expand, _expand_fake)})


# --- vLLM's op signatures, calling the grouped ops ---------------------------------------------
def bgmv_shrink(inputs, lora_b_weights, output_tensor, lora_indices_tensor, scaling=1.0):
    torch.ops.ivonserve.lora_shrink(
        inputs, lora_b_weights, output_tensor, lora_indices_tensor, None, scaling
    )


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs=True):
    # vLLM writes the columns adapter and output share (their padding may differ)
    common = min(stacked_matrices(lora_b_weights).shape[1], output_tensor.shape[1])
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
    common = min(stacked_matrices(lora_b_weights).shape[1], output_tensor.shape[1])
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
    register_lora_ops()
    for name, op in GROUPED.items():
        setattr(punica_cpu, name, op)
    return "grouped"
