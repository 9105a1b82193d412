"""The cost of one training step, before and after: the model's own loss in float32 on random
batches (what `ivonserve train` did before 2026-12-05) against bf16 autocast, the output layer
applied only where a label is (``train.answer_loss``) and batches of similar lengths
(``--batching length``), for IVON and AdamW, in one process, rounds alternated; seconds per step
as medians, ratios against the baseline of the same round. The arms on random batches share their
batches; the length-batched arm runs the same steps of a length-batched epoch (the same number of
examples, less padding: its tokens per step are printed beside it). Run it with nothing else on
the machine and say its load beside the figures.

    .venv/bin/python bench/train_step.py --data ../shared/data/mc/arc-easy/train.jsonl \
        --out bench/results/train-step/arc-easy
    .venv/bin/python bench/train_step.py --data ../shared/data/gsm8k/train.jsonl \
        --out bench/results/train-step/gsm8k
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
from common import command_line

from ivonserve.model import resolve_model
from ivonserve.train import (
    TrainConfig,
    answer_loss,
    batch_indices,
    build_model,
    build_optimizer,
    collate,
    encode,
    forward_context,
    load_examples,
)

ARMS = {  # name: (precision, loss, batching)
    "float32, model loss (before)": ("float32", "model", "random"),
    "bf16 autocast, model loss": ("bf16", "model", "random"),
    "float32, answer loss": ("float32", "answer", "random"),
    "bf16 autocast, answer loss": ("bf16", "answer", "random"),
    "bf16 autocast, answer loss, length batches (after)": ("bf16", "answer", "length"),
}


def step(model, optimizer, batch, optimizer_name: str, precision: str, loss_kind: str) -> None:
    def loss():
        with forward_context(precision):
            return model(**batch).loss if loss_kind == "model" else answer_loss(model, batch)

    model.train()
    if optimizer_name == "adamw":
        optimizer.zero_grad()
        loss().backward()
    else:
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            loss().backward()
    optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--optimizers", default="ivon,adamw")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="timed steps per arm and round")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--mc-form", default="text", help="multiple choice: the answer's form")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = resolve_model(None, None)
    examples = load_examples(Path(args.data), holdout=300)
    seconds: dict[tuple[str, str], list[float]] = {}
    ratios: dict[tuple[str, str], list[float]] = {}
    tokens: dict[str, float] = {}  # padded tokens per timed step, by batching
    for optimizer_name in args.optimizers.split(","):
        config = TrainConfig(data=args.data, out="", optimizer=optimizer_name, ess=1e6,
                             hess_init=1e-3, weight_decay=0)  # fmt: skip
        model, tokenizer = build_model(config, model_dir)
        optimizer = build_optimizer(config, [p for p in model.parameters() if p.requires_grad])
        rows = [encode(tokenizer, e, 320, args.mc_form) for e in examples]
        lengths = [len(row["input_ids"]) for row in rows]
        batches = {
            batching: [
                collate([rows[i] for i in batch_indices(len(rows), args.batch_size, 0, s, by)],
                        tokenizer.pad_token_id)
                for s in range(args.steps + 1)
            ]
            for batching, by in (("random", None), ("length", lengths))
        }  # fmt: skip
        for batching, timed in batches.items():
            tokens[batching] = sum(b["input_ids"].numel() for b in timed[1:]) / args.steps
        for r in range(args.rounds):
            per_round = {}
            for name, (precision, loss_kind, batching) in ARMS.items():
                warm, *timed = batches[batching]
                step(model, optimizer, warm, optimizer_name, precision, loss_kind)
                began = time.perf_counter()
                for batch in timed:
                    step(model, optimizer, batch, optimizer_name, precision, loss_kind)
                per_round[name] = (time.perf_counter() - began) / args.steps
                seconds.setdefault((optimizer_name, name), []).append(per_round[name])
            base = per_round["float32, model loss (before)"]
            for name, value in per_round.items():
                ratios.setdefault((optimizer_name, name), []).append(base / value)
            print(f"{optimizer_name} round {r + 1}: "
                  + ", ".join(f"{k} {v:.2f} s" for k, v in per_round.items()))  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [
        {"optimizer": o, "arm": a, "s_per_step": statistics.median(v),
         "examples_per_s": args.batch_size / statistics.median(v),
         "speedup_vs_before": statistics.median(ratios[(o, a)]),
         "speedup_min_max": [min(ratios[(o, a)]), max(ratios[(o, a)])]}
        for (o, a), v in seconds.items()
    ]  # fmt: skip
    load = os.getloadavg()
    summary = {"rows": rows, "threads": args.threads, "padded_tokens_per_step": tokens,
               "load_at_end": load, "command": command_line("bench/train_step.py")}  # fmt: skip
    (out / "train_step.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"# Training step cost ({args.data})",
        "",
        f"`{command_line('bench/train_step.py')}`; {args.threads} threads, batch "
        f"{args.batch_size} ({tokens['random']:.0f} padded tokens a step on random batches, "
        f"{tokens['length']:.0f} on length batches), medians of "
        f"{args.rounds} alternated rounds of {args.steps} steps; load average at the end "
        f"{load[0]:.2f}.",
        "",
        "| optimizer | arm | s / step | examples / s | speed-up (min-max) |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        lo, hi = row["speedup_min_max"]
        lines.append(
            f"| {row['optimizer']} | {row['arm']} | {row['s_per_step']:.2f} "
            f"| {row['examples_per_s']:.2f} | {row['speedup_vs_before']:.2f} ({lo:.2f}-{hi:.2f}) |"
        )
    (out / "train_step.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
