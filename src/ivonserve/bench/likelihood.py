"""Likelihood of reference solutions under a running ivonserve: the posterior predictive of K
draws against the mean adapter and against a plain (AdamW) adapter, through POST /score.

For each question the reference solution (the GSM8k answer in the training format: no
``<<calc>>`` notes, ``#### N`` turned into "The answer is N.") is scored given the question. One
/score request per question and model asks for the largest K; since the predictive of K draws
uses draws 0..K-1 of the pool, every smaller K is computed from the same per-draw
log-likelihoods, and the mean adapter is one more request (K = 0). An adapter served with
``--adapter`` has no posterior: its one arm is K = 0.

Arms are (label, model, K); ``--label`` names a server configuration (a pruning or temperature
setting), so several runs of differently configured servers add their arms to one results folder,
and every pair of arms is compared on the same questions. One JSON line per (label, model, K
request, question) goes to ``records.jsonl`` as soon as it is answered: a rerun skips finished
work. Reported per arm: NLL per token (total NLL / total tokens) and per question, with bootstrap
95% intervals over questions; per pair, the paired difference with its interval.
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ivonserve.bench.common import (
    RECORDS,
    Question,
    ServedArms,
    add_scoring_arguments,
    add_server_run,
    load_questions,
    load_records,
    previous_results,
    score_into_records,
    scoring_key,
)
from ivonserve.bench.stats import bootstrap_ci
from ivonserve.errors import IvonserveError
from ivonserve.predictive import sequence_predictive


@dataclass(frozen=True)
class Arm:
    label: str
    model: str
    k: int  # 0: the mean adapter

    @property
    def name(self) -> str:
        head = f"{self.label}/" if self.label else ""
        return f"{head}{self.model} " + ("mean" if self.k == 0 else f"K={self.k}")


def parse_ks(text: str) -> list[int]:
    try:
        ks = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        raise IvonserveError(f"--n-models: {text!r} is not a comma-separated list of K") from None
    if not ks or ks[0] < 0:
        raise IvonserveError(f"--n-models: {text!r} needs K >= 0 values")
    return ks


def _body(model: str, n_models: int, question: Question) -> dict:
    return {"prompt": question.question, "continuations": [question.solution], "model": model,
            "n_models": n_models}  # fmt: skip


def _row(answer: dict, question: Question) -> dict:
    (score,) = answer["scores"]
    return {"tokens": score["tokens"], "draws": score["draws"]}


def arm_values(arm: Arm, records: dict, questions: list[Question]) -> tuple[np.ndarray, np.ndarray]:
    """(log-likelihood, tokens) per question of one arm: the mean's record, or the predictive
    of the first K draws of a record that holds at least K."""
    held = {}
    for (label, model, n, index), row in records.items():
        if (label, model) == (arm.label, arm.model) and (n == 0) == (arm.k == 0) and n >= arm.k:
            held[index] = row
    missing = [q.index for q in questions if q.index not in held]
    if missing:
        raise IvonserveError(
            f"arm {arm.name!r} has no record of question {missing[0]} in this folder: run it "
            "again with the same --data, --holdout and --limit"
        )
    rows = [held[q.index] for q in questions]
    logliks = [sequence_predictive(r["draws"][: max(arm.k, 1)]) for r in rows]
    return np.array(logliks), np.array([r["tokens"] for r in rows], dtype=float)


def summarise(arms: list[Arm], records: dict, questions: list[Question], seed: int) -> dict:
    values = {arm.name: arm_values(arm, records, questions) for arm in arms}
    return {
        "arms": [_arm_row(arm, *values[arm.name], seed) for arm in arms],
        "pairs": [
            _pair_row(a, b, values[a.name], values[b.name], seed)
            for i, a in enumerate(arms)
            for b in arms[i + 1 :]
        ],
    }


def _arm_row(arm: Arm, loglik: np.ndarray, tokens: np.ndarray, seed: int) -> dict:
    return {
        "arm": arm.name,
        "label": arm.label,
        "model": arm.model,
        "k": arm.k,
        "questions": int(loglik.size),
        "tokens": int(tokens.sum()),
        "nll_per_token": float(-loglik.sum() / tokens.sum()),
        "nll_per_token_ci95": bootstrap_ci(-loglik, tokens, seed=seed),
        "nll_per_question": float(-loglik.mean()),
        "nll_per_question_ci95": bootstrap_ci(-loglik, seed=seed),
    }


def _pair_row(a: Arm, b: Arm, values_a: tuple, values_b: tuple, seed: int) -> dict:
    """NLL(a) - NLL(b) on the same questions: negative means a is better."""
    (loglik_a, tokens), (loglik_b, _) = values_a, values_b
    diff = loglik_b - loglik_a
    return {
        "a": a.name,
        "b": b.name,
        "nll_per_token_diff": float(diff.sum() / tokens.sum()),
        "nll_per_token_diff_ci95": bootstrap_ci(diff, tokens, seed=seed),
        "a_better_share": float(np.mean(diff < 0)),
    }


def arms_table(arms: list[dict]) -> list[str]:
    """The markdown table of the arms' NLL with their intervals (report.md, the README's)."""
    lines = ["| arm | NLL / token | 95% CI | NLL / question | 95% CI |", "|---|---|---|---|---|"]
    for a in arms:
        (lo, hi), (qlo, qhi) = a["nll_per_token_ci95"], a["nll_per_question_ci95"]
        lines.append(
            f"| {a['arm']} | {a['nll_per_token']:.4f} | [{lo:.4f}, {hi:.4f}] "
            f"| {a['nll_per_question']:.2f} | [{qlo:.2f}, {qhi:.2f}] |"
        )
    return lines


def write_report(out: Path, results: dict) -> None:
    lines = [
        "# Likelihood of reference solutions with ivonserve",
        "",
        f"Server {results['url']}, data {results['data']}"
        + (f" (the last {results['holdout']} rows)" if results["holdout"] else "")
        + f", {results['questions']} questions. NLL in nats, bootstrap 95% intervals over "
        "questions (2000 resamples).",
        "",
        *arms_table(results["arms"]),
    ]
    lines += [
        "",
        "Paired differences on the same questions, NLL(a) - NLL(b) per token (negative: a is "
        "better); `a better` is the share of questions where a's NLL is lower.",
        "",
        "| a | b | diff / token | 95% CI | a better |",
        "|---|---|---|---|---|",
    ]
    for p in results["pairs"]:
        lo, hi = p["nll_per_token_diff_ci95"]
        lines.append(
            f"| {p['a']} | {p['b']} | {p['nll_per_token_diff']:+.4f} | [{lo:+.4f}, {hi:+.4f}] "
            f"| {p['a_better_share']:.2f} |"
        )
    lines += ["", "Plot: `nll.png` (NLL per token against K, one line per label and model).", ""]
    (out / "report.md").write_text("\n".join(lines))


def write_plot(out: Path, arms: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(6, 4))
    series: dict[tuple[str, str], list[dict]] = {}
    for a in arms:
        series.setdefault((a["label"], a["model"]), []).append(a)
    for i, ((label, model), points) in enumerate(series.items()):
        name = f"{label}/{model}" if label else model
        color = f"C{i % 10}"
        drawn = [p for p in points if p["k"] > 0]
        mean = next((p for p in points if p["k"] == 0), None)
        if drawn:
            ks = [p["k"] for p in drawn]
            nll = [p["nll_per_token"] for p in drawn]
            err = [
                [v - p["nll_per_token_ci95"][0] for v, p in zip(nll, drawn, strict=True)],
                [p["nll_per_token_ci95"][1] - v for v, p in zip(nll, drawn, strict=True)],
            ]
            axis.errorbar(ks, nll, yerr=err, marker="o", capsize=3, color=color,
                          label=f"{name} K draws")  # fmt: skip
        if mean is not None:
            axis.axhline(mean["nll_per_token"], linestyle="--", color=color,
                         label=f"{name} mean adapter")  # fmt: skip
    axis.set_xscale("log", base=2)
    axis.set_xlabel("K (posterior draws averaged)")
    axis.set_ylabel("NLL per token (nats, 95% CI)")
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "nll.png", dpi=120)
    plt.close(fig)


async def run(args: argparse.Namespace) -> dict:
    questions = load_questions(Path(args.data), args.limit, args.holdout)
    ks = parse_ks(args.n_models)
    plan, seconds = await score_into_records(args, questions, ks, "/score", _body, _row)
    out = Path(args.out)
    results = _update_results(out, args, questions, [Arm(*a) for a in plan.arms], plan, seconds)
    write_report(out, results)
    write_plot(out, results["arms"])
    return results


def _update_results(
    out: Path,
    args: argparse.Namespace,
    questions: list[Question],
    new_arms: list[Arm],
    plan: ServedArms,
    seconds: float,
) -> dict:
    """results.json over every arm recorded in this folder (earlier runs' labels included)."""
    previous = previous_results(out)
    arms = [Arm(a["label"], a["model"], a["k"]) for a in previous.get("arms", [])]
    arms += [a for a in new_arms if a not in arms]
    configs = add_server_run(previous, args, plan, seconds)
    records = load_records(out / RECORDS, scoring_key)
    results = {
        "url": args.url,
        "data": str(args.data),
        "holdout": args.holdout,
        "questions": len(questions),
        "servers": configs,
        **summarise(arms, records, questions, args.seed),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add_scoring_arguments(parser, "GSM8k-format jsonl (e.g. test.jsonl)",
                          "bench/results/likelihood", concurrency=2)  # fmt: skip


def run_cli(args: argparse.Namespace) -> int:
    results = asyncio.run(run(args))
    for a in results["arms"]:
        lo, hi = a["nll_per_token_ci95"]
        print(f"{a['arm']:>32}: NLL/token {a['nll_per_token']:.4f} [{lo:.4f}, {hi:.4f}]")
    print(f"wrote {Path(args.out) / 'results.json'}")
    return 0
