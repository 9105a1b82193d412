"""The LoRA ops of one layer slice on the shapes of real steps: vLLM's CPU ops against ivonserve's
two forms of the same products (grouped: one product per adapter over its rows; stacked: one
product against every adapter present, each token keeping its own columns). Microseconds per
shrink + expand pair, medians of rounds alternated in one process; picks
``lora_ops.STACKED_MAX_TOKENS``.

    .venv/bin/python bench/lora_ops.py --out bench/results
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch
from common import command_line
from vllm.lora.ops import torch_ops

from ivonserve.vllm_plugin import lora_ops

HIDDEN, RANK = 576, 8  # SmolLM2-135M's q projection, ivonserve's posterior rank


def decode(sequences: int, adapters: int, samples: int) -> torch.Tensor:
    """A fan-out's decode step: requests ordered by prompt, then draw, each with `samples`
    sequences, so an adapter's tokens come back once per prompt."""
    per_prompt = torch.arange(adapters).repeat_interleave(samples) + 1
    return per_prompt.repeat(sequences // len(per_prompt))


def prefill(tokens: int, adapters: int) -> torch.Tensor:
    """A prefill: each adapter's requests contiguous."""
    return (torch.arange(tokens) * adapters // tokens) + 1


SHAPES = {
    "decode 4x8 x2 prompts (64 tokens)": decode(64, 4, 8),
    "decode 8x8 x2 prompts (128 tokens)": decode(128, 8, 8),
    "decode 8x4 x8 prompts (256 tokens)": decode(256, 8, 4),
    "prefill 4 adapters (256 tokens)": prefill(256, 4),
    "prefill 4 adapters (1200 tokens)": prefill(1200, 4),
    "decode, one adapter (64 tokens)": torch.full((64,), 1),
}
FORMS = ("vllm", "grouped", "stacked")


def pair(form: str, x, a, b, indices) -> None:
    shrunk = torch.zeros(x.shape[0], RANK)
    out = torch.zeros(x.shape[0], HIDDEN, dtype=x.dtype)
    ops = torch_ops if form == "vllm" else lora_ops
    ops.bgmv_shrink(x, a, shrunk, indices, 1.0)
    ops.bgmv_expand(shrunk, b, out, indices, True)


def timed(form: str, x, a, b, indices, calls: int) -> float:
    if form != "vllm":
        lora_ops.PLANS.use_form(form)
    pair(form, x, a, b, indices)
    began = time.perf_counter()
    for _ in range(calls):
        pair(form, x, a, b, indices)
    return (time.perf_counter() - began) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    lora_ops.register_lora_ops()
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    load_start = os.getloadavg()
    results = {}
    for name, indices in SHAPES.items():
        slots = int(indices.max()) + 1
        x = torch.randn(len(indices), HIDDEN, generator=g).to(dtype)
        a = torch.randn(slots, 1, RANK, HIDDEN, generator=g).to(dtype)
        b = torch.randn(slots, 1, HIDDEN, RANK, generator=g).to(dtype)
        times = {form: [] for form in FORMS}
        for _ in range(args.rounds):
            for form in FORMS:
                times[form].append(timed(form, x, a, b, indices, args.calls))
        results[name] = {form: statistics.median(v) for form, v in times.items()}
        print(name, {k: round(v) for k, v in results[name].items()}, flush=True)
    write(args, results, load_start, os.getloadavg())


def write(args, results, load_start, load_end) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {
        "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch threads "
        f"{torch.get_num_threads()}, load {load_start} at the start, {load_end} at the end",
        "dtype": args.dtype,
        "rounds": args.rounds,
        "calls": args.calls,
        "hidden": HIDDEN,
        "rank": RANK,
    }
    (args.out / "lora_ops.json").write_text(json.dumps({**meta, "us": results}, indent=2) + "\n")
    lines = [
        "# LoRA ops of one layer slice: microseconds per shrink + expand",
        "",
        f"{meta['machine']}; {args.dtype}, hidden {HIDDEN}, rank {RANK}; median of "
        f"{args.rounds} rounds of {args.calls} calls, forms alternated. "
        f"`{command_line('bench/lora_ops.py')}`",
        "",
        "| step | vLLM's ops | grouped | stacked | vLLM / best |",
        "|---|---|---|---|---|",
    ]
    for name, r in results.items():
        best = min(r["grouped"], r["stacked"])
        lines.append(
            f"| {name} | {r['vllm']:.0f} | {r['grouped']:.0f} | {r['stacked']:.0f} "
            f"| {r['vllm'] / best:.1f}x |"
        )
    (args.out / "lora_ops.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
