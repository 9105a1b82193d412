"""Compare `bench gsm8k` runs (one folder each, e.g. IVON and AdamW on one server): one table and
one plot, and exact McNemar tests between every two arms on the same questions.

An arm is one grid point of one run (its label, e.g. ``ivon 4x8``). Every figure is recomputed
from the runs' records (accuracy with its Wilson interval, ECE, generated tokens and latency per
question), not copied from their summaries. The paired test: of the questions both arms
answered, b = right in A only, c = right in B only; under the null hypothesis of equal accuracy
each discordant question is a fair coin, so p = min(1, 2 P[Binomial(b + c, 1/2) <= min(b, c)]).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ivonserve.bench.common import RECORDS, load_records
from ivonserve.bench.gsm8k import GridPoint, calibration
from ivonserve.bench.stats import mcnemar_exact, wilson_interval
from ivonserve.errors import IvonserveError


@dataclass(frozen=True)
class ArmRecords:
    label: str
    model: str
    grid: str
    rows: dict[int, dict]  # question index -> record

    @property
    def name(self) -> str:
        return f"{self.label} {self.grid}"


def load_run(folder: Path) -> tuple[dict, list[ArmRecords]]:
    results_path = folder / "results.json"
    if not results_path.is_file() or not (folder / RECORDS).is_file():
        raise IvonserveError(f"{folder}: not a `bench gsm8k` results folder (no results.json)")
    results = json.loads(results_path.read_text())
    records = load_records(folder / RECORDS, lambda r: (r["grid"], r["index"]))
    label = results.get("label") or results.get("model") or folder.name
    arms = []
    for point in results["points"]:
        rows = {i: r for (g, i), r in records.items() if g == point["grid"]}
        arms.append(ArmRecords(label, results.get("model", "?"), point["grid"], rows))
    return results, arms


def arm_row(arm: ArmRecords) -> dict:
    rows = list(arm.rows.values())
    correct = np.array([r["correct"] for r in rows], dtype=float)
    confidence = np.array([r["confidence"] or 0.0 for r in rows], dtype=float)
    low, high = wilson_interval(int(correct.sum()), len(rows))
    return {
        "arm": arm.name,
        "label": arm.label,
        "model": arm.model,
        "grid": arm.grid,
        "candidates": GridPoint.parse(arm.grid).candidates,
        "questions": len(rows),
        "correct": int(correct.sum()),
        "accuracy": float(correct.mean()),
        "accuracy_ci95": [low, high],
        "ece": calibration(confidence, correct)["ece"],
        "tokens_per_question": float(np.mean([r["completion_tokens"] for r in rows])),
        "latency_s_per_question": float(np.mean([r["latency_s"] for r in rows])),
    }


def pair_row(a: ArmRecords, b: ArmRecords) -> dict:
    shared = sorted(set(a.rows) & set(b.rows))
    right_a = [bool(a.rows[i]["correct"]) for i in shared]
    right_b = [bool(b.rows[i]["correct"]) for i in shared]
    only_a = sum(x and not y for x, y in zip(right_a, right_b, strict=True))
    only_b = sum(y and not x for x, y in zip(right_a, right_b, strict=True))
    return {
        "a": a.name,
        "b": b.name,
        "questions": len(shared),
        "only_a": only_a,
        "only_b": only_b,
        "accuracy_diff": (sum(right_a) - sum(right_b)) / max(1, len(shared)),
        "p_mcnemar": mcnemar_exact(only_a, only_b),
    }


def compare(folders: list[Path]) -> dict:
    runs = [load_run(f) for f in folders]
    datasets = {r.get("dataset", "gsm8k") for r, _ in runs}
    data = {r["data"] for r, _ in runs}
    if len(data) > 1:
        raise IvonserveError(f"the runs are on different data ({', '.join(sorted(data))})")
    arms = [arm for _, run_arms in runs for arm in run_arms]
    keys = ("label", "model", "url", "max_tokens", "temperature", "selection", "utility", "server")
    return {
        "dataset": " / ".join(sorted(datasets)),
        "data": data.pop(),
        "runs": [str(f) for f in folders],
        "settings": [{k: r.get(k) for k in keys} for r, _ in runs],
        "arms": [arm_row(a) for a in arms],
        "pairs": [pair_row(a, b) for i, a in enumerate(arms) for b in arms[i + 1 :]],
    }


def write_report(out: Path, result: dict) -> None:
    lines = [
        f"# {result['dataset']}: runs compared",
        "",
        f"Data {result['data']}. Runs: {', '.join(result['runs'])}. Accuracy with Wilson 95% "
        "intervals; ECE over 10 bins of the consensus confidence; tokens = every generated "
        "token per question; seconds = mean request latency per question (the machine's load "
        "is in each run's report).",
        "",
        "| arm | candidates | accuracy | 95% CI | correct / questions | ECE | tokens/q | s/q |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for a in result["arms"]:
        low, high = a["accuracy_ci95"]
        lines.append(
            f"| {a['arm']} | {a['candidates']} | {a['accuracy']:.3f} | [{low:.3f}, {high:.3f}] "
            f"| {a['correct']} / {a['questions']} | {a['ece']:.3f} "
            f"| {a['tokens_per_question']:.0f} | {a['latency_s_per_question']:.1f} |"
        )
    lines += [
        "",
        "Paired on the same questions: `A only` / `B only` = questions only that arm got right; "
        "exact McNemar p-value (two-sided).",
        "",
        "| A | B | questions | A only | B only | accuracy A - B | p |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in result["pairs"]:
        lines.append(
            f"| {p['a']} | {p['b']} | {p['questions']} | {p['only_a']} | {p['only_b']} "
            f"| {p['accuracy_diff']:+.3f} | {p['p_mcnemar']:.3g} |"
        )
    lines += ["", "Plot: `compare.png` (accuracy against candidates per question, per run).", ""]
    (out / "report.md").write_text("\n".join(lines))


def write_plot(out: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    labels = dict.fromkeys(a["label"] for a in result["arms"])
    for label in labels:
        arms = sorted((a for a in result["arms"] if a["label"] == label),
                      key=lambda a: a["candidates"])  # fmt: skip
        x = [a["candidates"] for a in arms]
        y = [a["accuracy"] for a in arms]
        err = [[v - a["accuracy_ci95"][0] for v, a in zip(y, arms, strict=True)],
               [a["accuracy_ci95"][1] - v for v, a in zip(y, arms, strict=True)]]  # fmt: skip
        axis.errorbar(x, y, yerr=err, marker="o", capsize=3, label=label)
        for a in arms:
            axis.annotate(a["grid"], (a["candidates"], a["accuracy"]), fontsize=7)
    axis.set_xscale("log", base=2)
    axis.set_xlabel("candidates per question")
    axis.set_ylabel("accuracy (95% CI)")
    axis.set_title(result["dataset"])
    axis.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "compare.png", dpi=120)
    plt.close(fig)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, help="`bench gsm8k` results folders")
    parser.add_argument("--out", type=Path, required=True, help="where the comparison goes")


def run_cli(args: argparse.Namespace) -> int:
    result = compare(args.runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "compare.json").write_text(json.dumps(result, indent=2) + "\n")
    write_report(args.out, result)
    write_plot(args.out, result)
    print((args.out / "report.md").read_text())
    return 0
