"""The "Does it pay off?" tables (docs/pay-off.md) from a `bench/payoff.sh` results folder.

`ivonserve bench likelihood` compares every pair of arms in its report.md; this picks the pairs
the ablations are about: each draw count against its own configuration's mean adapter, each
configuration against the reference one (no pruning, T = 1) at the same K, the IVON arms of
the reference configuration against the AdamW adapter, and a second pair's arms against the
first's.

    python bench/payoff_tables.py bench/results/likelihood/test [--reference prune-none]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ivonserve.bench.likelihood import Arm, arms_table


def arm_name(label: str, model: str, k: int) -> str:
    return Arm(label, model, k).name


def paired(pairs: dict, a: str, b: str) -> dict | None:
    """NLL(a) - NLL(b) per token with its interval, whichever order the report holds them in."""
    if (a, b) in pairs:
        p = pairs[a, b]
        return {"diff": p["nll_per_token_diff"], "ci": p["nll_per_token_diff_ci95"],
                "a_better": p["a_better_share"]}  # fmt: skip
    if (b, a) in pairs:
        p = pairs[b, a]
        lo, hi = p["nll_per_token_diff_ci95"]
        return {"diff": -p["nll_per_token_diff"], "ci": [-hi, -lo],
                "a_better": 1 - p["a_better_share"]}  # fmt: skip
    return None


def chosen_pairs(results: dict, reference: str) -> list[tuple[str, str]]:
    """A pair's models are `ivon` and `adamw`, or `NAME-ivon` and `NAME-adamw` for another pair
    (bench/payoff.sh NAME=...), whose arms are also set against the first pair's at the same K."""
    arms = {a["arm"]: a for a in results["arms"]}
    chosen = []
    for a in results["arms"]:
        label, model, k = a["label"], a["model"], a["k"]
        first_pair_model = model.rpartition("-")[2]
        first_pair = arm_name(label, first_pair_model, k)
        if model != first_pair_model and first_pair in arms:
            chosen.append((a["arm"], first_pair))
        if model.endswith("adamw"):
            continue
        own_mean = arm_name(label, model, 0)
        mean = own_mean if own_mean in arms else arm_name(reference, model, 0)
        if k > 0 and mean in arms:
            chosen.append((a["arm"], mean))
        same_k = arm_name(reference, model, k)
        if label != reference and same_k in arms:
            chosen.append((a["arm"], same_k))
        adamw = arm_name(reference, model.removesuffix("ivon") + "adamw", 0)
        if label == reference and adamw in arms:
            chosen.append((a["arm"], adamw))
    return chosen


def pairs_table(results: dict, reference: str) -> list[str]:
    pairs = {(p["a"], p["b"]): p for p in results["pairs"]}
    lines = ["| a | b | NLL(a) - NLL(b) / token | 95% CI | a better |", "|---|---|---|---|---|"]
    for a, b in chosen_pairs(results, reference):
        p = paired(pairs, a, b)
        if p is not None:
            lo, hi = p["ci"]
            lines.append(
                f"| {a} | {b} | {p['diff']:+.4f} | [{lo:+.4f}, {hi:+.4f}] | {p['a_better']:.2f} |"
            )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path, help="a payoff.sh results folder")
    parser.add_argument("--reference", default="prune-none", help="the reference configuration")
    args = parser.parse_args()
    results = json.loads((args.folder / "results.json").read_text())
    print(f"{results['questions']} questions of {results['data']}\n")
    print("\n".join(arms_table(results["arms"])) + "\n")
    print("\n".join(pairs_table(results, args.reference)))


if __name__ == "__main__":
    main()
