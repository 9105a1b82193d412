"""The grouped LoRA ops equal vLLM's CPU ops (vllm/lora/ops/torch_ops) on random inputs, in both
of their forms (grouped and stacked: the random cases take each), except for tokens without an
adapter (index -1): vLLM gives them the last slot's weights (the upstream bug), the grouped ops
leave them untouched."""

from __future__ import annotations

import pytest
import torch
from vllm.lora.ops import torch_ops

from ivonserve.vllm_plugin import lora_ops

lora_ops.register_lora_ops()

SLOTS, RANK, HIDDEN = 5, 8, 96
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
# (tokens, what the indices look like)
CASES = [
    (1, "one"),
    (7, "mixed"),
    (64, "mixed"),
    (300, "mixed"),
    (40, "with_base"),
    (40, "all_base"),
    (33, "single_adapter"),
]


def _indices(tokens: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    if kind == "all_base":
        return torch.full((tokens,), -1)
    if kind == "single_adapter":
        return torch.full((tokens,), 2)
    low = -1 if kind == "with_base" else 0
    return torch.randint(low, SLOTS, (tokens,), generator=generator)


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "kind"), CASES)
def test_shrink_equals_vllm(dtype, tokens, kind):
    g = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, HIDDEN, generator=g).to(dtype)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=g).to(dtype)
    idx = _indices(tokens, kind, g)
    want = torch.zeros(tokens, RANK, dtype=torch.float32)  # vLLM's shrink buffer is float32
    got = torch.zeros_like(want)
    torch_ops.bgmv_shrink(x, a, want, idx, 0.5)
    lora_ops.bgmv_shrink(x, a, got, idx, 0.5)
    present = idx >= 0
    _close(got[present], want[present], dtype)
    assert torch.all(got[~present] == 0)  # untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("tokens", "kind"), CASES)
@pytest.mark.parametrize("add", [True, False])
def test_expand_and_expand_slice_equal_vllm(dtype, tokens, kind, add):
    g = torch.Generator().manual_seed(tokens + 1)
    x = torch.randn(tokens, RANK, generator=g)  # the float32 shrink buffer
    b = torch.randn(SLOTS, 1, HIDDEN, RANK, generator=g).to(dtype)
    start = torch.randn(tokens, 3 * HIDDEN, generator=g).to(dtype)
    idx = _indices(tokens, kind, g)
    present = idx >= 0
    # the whole output (bgmv_expand) and one slice of a fused output (bgmv_expand_slice)
    want, got = start.clone(), start.clone()
    torch_ops.bgmv_expand(x, b, want, idx, add)
    lora_ops.bgmv_expand(x, b, got, idx, add)
    _close(got[present], want[present], dtype)
    assert torch.equal(got[~present], start[~present])
    want, got = start.clone(), start.clone()
    torch_ops.bgmv_expand_slice(x, b, want, idx, HIDDEN, HIDDEN, add)
    lora_ops.bgmv_expand_slice(x, b, got, idx, HIDDEN, HIDDEN, add)
    _close(got[present], want[present], dtype)
    assert torch.equal(got[~present], start[~present])
    assert torch.equal(got[:, :HIDDEN], start[:, :HIDDEN])  # outside the slice: untouched


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefill_forms_repeat_each_sequences_adapter_over_its_tokens(dtype):
    g = torch.Generator().manual_seed(7)
    lengths = torch.tensor([5, 1, 17, 9])
    per_sequence = torch.tensor([3, -1, 0, 3])
    tokens = int(lengths.sum())
    starts = torch.cumsum(lengths, 0) - lengths
    meta = (starts, lengths, per_sequence, len(lengths), int(lengths.max()), tokens)
    x = torch.randn(tokens, HIDDEN, generator=g).to(dtype)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=g).to(dtype)
    b = torch.randn(SLOTS, 1, HIDDEN, RANK, generator=g).to(dtype)
    present = torch.repeat_interleave(per_sequence, lengths) >= 0
    want = torch.zeros(tokens, RANK)
    got = torch.zeros(tokens, RANK)
    torch_ops.sgmv_shrink(x, a, want, *meta, 1.0)
    lora_ops.sgmv_shrink(x, a, got, *meta, 1.0)
    _close(got[present], want[present], dtype)
    out_want = torch.zeros(tokens, 2 * HIDDEN, dtype=dtype)
    out_got = out_want.clone()
    torch_ops.sgmv_expand(got, b, out_want, *meta, True)
    lora_ops.sgmv_expand(got, b, out_got, *meta, True)
    _close(out_got[present], out_want[present], dtype)
    torch_ops.sgmv_expand_slice(got, b, out_want, *meta, HIDDEN, HIDDEN, True)
    lora_ops.sgmv_expand_slice(got, b, out_got, *meta, HIDDEN, HIDDEN, True)
    _close(out_got[present], out_want[present], dtype)
    assert torch.all(out_got[~present] == 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_tokens_result_does_not_depend_on_its_batch_or_the_form_computing_it(dtype):
    """Bit for bit, so that seeds reproduce under any batch: the token alone (one row, grouped),
    among 40 tokens of its adapter (grouped), and among interleaved adapters and base tokens
    (stacked)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, HIDDEN, generator=g).to(dtype)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=g).to(dtype)
    b = torch.randn(SLOTS, 1, HIDDEN, RANK, generator=g).to(dtype)
    mixed = torch.arange(40) % SLOTS - 1  # 1 first, then every slot and base tokens
    mixed[0] = 1
    results = []
    for indices, form in ((torch.tensor([1]), False), (torch.ones(40, dtype=torch.long), False),
                          (mixed, True)):  # fmt: skip
        rows = len(indices)
        shrunk, out = torch.zeros(rows, RANK), torch.zeros(rows, HIDDEN, dtype=dtype)
        lora_ops.bgmv_shrink(x[:rows], a, shrunk, indices, 0.5)
        lora_ops.bgmv_expand(shrunk, b, out, indices, True)
        assert lora_ops.PLANS.plan.stacked is form
        results.append((shrunk[0], out[0]))
    for shrunk, out in results[1:]:
        assert torch.equal(shrunk, results[0][0]) and torch.equal(out, results[0][1])


def test_a_fan_outs_decode_step_takes_the_stacked_form_and_a_long_prefill_the_grouped():
    decode = (torch.arange(4).repeat_interleave(8) + 1).repeat(2)  # 2 prompts x 4 draws x 8
    assert lora_ops.StepPlan(decode).stacked
    prefill = torch.arange(1200) * 4 // 1200 + 1  # 4 adapters' prompts, each contiguous
    assert not lora_ops.StepPlan(prefill).stacked
    assert not lora_ops.StepPlan(torch.full((64,), 2)).stacked  # one adapter: one product
    assert not lora_ops.StepPlan(torch.full((64,), -1)).stacked


def test_a_form_can_be_forced_and_an_unknown_one_is_refused():
    decode = (torch.arange(4).repeat_interleave(8) + 1).repeat(2)
    assert not lora_ops.StepPlan(decode, "grouped").stacked
    assert lora_ops.StepPlan(torch.full((1200,), 2), "stacked").stacked
    assert not lora_ops.StepPlan(torch.full((8,), -1), "stacked").stacked  # nothing to stack
    with pytest.raises(ValueError, match="form must be one of"):
        lora_ops.StepPlan(decode, "fast")
    with pytest.raises(ValueError, match="form must be one of"):
        lora_ops.PLANS.use_form("fast")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_forced_form_gives_the_same_bits_as_the_other(dtype):
    """bench/lora_ops.py times each form on the same step: they must compute the same thing."""
    g = torch.Generator().manual_seed(5)
    indices = torch.arange(48) % SLOTS - 1  # interleaved adapters and base tokens
    x = torch.randn(48, HIDDEN, generator=g).to(dtype)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=g).to(dtype)
    b = torch.randn(SLOTS, 1, HIDDEN, RANK, generator=g).to(dtype)
    results = []
    try:
        for form in ("grouped", "stacked"):
            lora_ops.PLANS.use_form(form)
            shrunk, out = torch.zeros(48, RANK), torch.zeros(48, HIDDEN, dtype=dtype)
            lora_ops.bgmv_shrink(x, a, shrunk, indices, 0.5)
            lora_ops.bgmv_expand(shrunk, b, out, indices, True)
            assert lora_ops.PLANS.plan.stacked is (form == "stacked")
            results.append((shrunk, out))
    finally:
        lora_ops.PLANS.use_form("auto")
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])


@pytest.mark.parametrize("tokens", [64, 1200])
def test_a_slice_no_adapter_targets_gives_zeros_until_an_adapter_is_written_in(tokens):
    """The k slice of a fused q/k/v layer when adapters target q and v: all zeros, skipped. An
    adapter later loaded into a slot (an in-place write) must be seen."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(tokens, HIDDEN, generator=g)
    a = torch.zeros(SLOTS, 1, RANK, HIDDEN)
    b = torch.zeros(SLOTS, 1, HIDDEN, RANK)
    idx = torch.randint(-1, SLOTS, (tokens,), generator=g).sort().values
    present = idx >= 0
    shrunk = torch.full((tokens, RANK), 7.0)
    lora_ops.bgmv_shrink(x, a, shrunk, idx, 1.0)
    assert torch.all(shrunk[present] == 0) and torch.all(shrunk[~present] == 7)
    start = torch.randn(tokens, HIDDEN, generator=g)
    out = start.clone()
    lora_ops.bgmv_expand(torch.randn(tokens, RANK, generator=g), b, out, idx, True)
    assert torch.equal(out, start)
    a[2, 0].copy_(torch.randn(RANK, HIDDEN, generator=g))  # vLLM loads an adapter into slot 2
    b[2, 0].copy_(torch.randn(HIDDEN, RANK, generator=g))
    want, got = torch.zeros(tokens, RANK), torch.zeros(tokens, RANK)
    torch_ops.bgmv_shrink(x, a, want, idx, 1.0)
    lora_ops.bgmv_shrink(x, a, got, idx, 1.0)
    _close(got[present], want[present], torch.float32)
    assert got[idx == 2].abs().sum() > 0
    want_out, got_out = start.clone(), start.clone()
    torch_ops.bgmv_expand(got, b, want_out, idx, True)
    lora_ops.bgmv_expand(got, b, got_out, idx, True)
    _close(got_out[present], want_out[present], torch.float32)


def test_the_stacked_form_sees_an_adapter_rewritten_between_steps():
    """The stacked form keeps its layout of the weights across steps; vLLM loading another
    adapter into a slot (an in-place write) must replace it."""
    g = torch.Generator().manual_seed(6)
    idx = (torch.arange(4).repeat_interleave(8) + 1).repeat(2)  # a decode step: stacked
    x = torch.randn(len(idx), HIDDEN, generator=g)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=g)
    b = torch.randn(SLOTS, 1, HIDDEN, RANK, generator=g)
    for _ in range(2):
        a[2, 0].copy_(torch.randn(RANK, HIDDEN, generator=g))
        b[2, 0].copy_(torch.randn(HIDDEN, RANK, generator=g))
        want, got = torch.zeros(len(idx), RANK), torch.zeros(len(idx), RANK)
        torch_ops.bgmv_shrink(x, a, want, idx, 1.0)
        lora_ops.bgmv_shrink(x, a, got, idx, 1.0)
        assert lora_ops.PLANS.plan.stacked
        _close(got, want, torch.float32)
        want_out, got_out = torch.zeros(len(idx), HIDDEN), torch.zeros(len(idx), HIDDEN)
        torch_ops.bgmv_expand(got, b, want_out, idx, True)
        lora_ops.bgmv_expand(got, b, got_out, idx, True)
        _close(got_out, want_out, torch.float32)


def _shown(groups):
    return [(slot, rows if isinstance(rows, slice) else rows.tolist()) for slot, rows in groups]


def test_groups_skip_the_base_tokens_and_are_slices_where_contiguous():
    groups = lora_ops.adapter_groups(torch.tensor([2, -1, 0, 2, -1]))
    assert _shown(groups) == [(0, slice(2, 3)), (2, [0, 3])]
    groups = lora_ops.adapter_groups(torch.tensor([1, 1, 1, 3, 3, -1, 0]))
    assert _shown(groups) == [(0, slice(6, 7)), (1, slice(0, 3)), (3, slice(3, 5))]
    assert _shown(lora_ops.adapter_groups(torch.tensor([4, 4]))) == [(4, slice(None))]
    assert lora_ops.adapter_groups(torch.tensor([-1, -1])) == []
    assert lora_ops.adapter_groups(torch.tensor([], dtype=torch.long)) == []


def test_the_groups_follow_indices_rewritten_in_place():
    """vLLM rewrites its index buffer in place each step: the cached groups must not outlive
    the contents they were computed from."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(24, HIDDEN, generator=g)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN, generator=g)
    buffer = torch.zeros(24, dtype=torch.long)
    for step in range(4):
        buffer.copy_(torch.randint(-1, SLOTS, (24,), generator=g))
        want, got = torch.zeros(24, RANK), torch.zeros(24, RANK)
        torch_ops.bgmv_shrink(x, a, want, buffer, 1.0)
        lora_ops.bgmv_shrink(x, a, got, buffer, 1.0)
        present = buffer >= 0
        _close(got[present], want[present], torch.float32)
        assert torch.all(got[~present] == 0), step


def test_the_ops_of_one_step_plan_its_tokens_once():
    x = torch.randn(32, HIDDEN)
    a = torch.randn(SLOTS, 1, RANK, HIDDEN)
    indices = torch.arange(32) // 8
    out = torch.zeros(32, RANK)
    lora_ops.bgmv_shrink(x, a, out, indices, 1.0)  # a new step: planned here
    misses = lora_ops.PLANS.misses
    for _ in range(5):  # the other layers of the same step
        lora_ops.bgmv_shrink(x, a, out, indices.clone(), 1.0)
    assert lora_ops.PLANS.misses == misses
