"""Test-time scaling replayed from candidate banks: accuracy against candidates per question.

Every bank (``bench gsm8k --candidates``, ``bench/tts.sh``) is replayed offline at every budget
B = K x S it holds: the first K draws and the first S samples of each (nested, so a curve moves
with its data, not with a new draw), the answer selected by each selector through
``ivonserve.mbr.select``, exactly as the server selects (the server's own selection replayed at a
bank's full size gives back its served answers: ``checks`` in the results). Per point: accuracy
with a bootstrap interval, tokens per question, how well the confidence ranks right answers
(AUROC, ECE, accuracy at 50% and 80% coverage) and the paired difference against the baseline
(the mean adapter's 0 x B, the same selector and questions: bootstrap interval, exact McNemar p).

Selectors: ``majority`` (self-consistency: a vote on normalised final answers), and
``METHOD:UTILITY`` for MBR (``flat:chrf`` is the paper's Eq. 9, ``model:chrf`` its Eq. 10). With
the ``answer`` utility, flat and model-wise MBR pick what the vote picks (equal samples per draw),
which is why the text utility is the default for them.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ivonserve import calibration, mbr
from ivonserve.answers import normalize_answer
from ivonserve.bench.bank import Bank, load_bank
from ivonserve.bench.common import GridPoint
from ivonserve.bench.gsm8k import text_digest
from ivonserve.bench.stats import (
    accuracy_at_coverage,
    auroc,
    bootstrap_ci,
    paired_accuracy,
)
from ivonserve.errors import IvonserveError

DEFAULT_SELECTORS = "majority,flat:chrf,model:chrf"
BUDGETS = (1, 2, 4, 8, 16, 32, 64)
COVERAGES = (0.5, 0.8)
PLOTTED_DRAWS = (0, 4, 8, 16, 32)  # the plot's lines of a posterior bank: K draws, S = 1, 2, ...
SAME_ACROSS_BANKS = ("dataset", "data", "max_tokens", "seed")


@dataclass(frozen=True)
class Selector:
    method: str
    utility: str

    @property
    def label(self) -> str:
        return "majority" if self.method == "majority" else f"{self.method}:{self.utility}"

    @classmethod
    def parse(cls, text: str) -> Selector:
        method, _, utility = text.strip().partition(":")
        if method not in mbr.METHODS:
            raise IvonserveError(f"--selectors: unknown method {method!r} in {text!r}")
        utility = "answer" if method == "majority" else utility or "answer"
        if utility not in mbr.UTILITIES:
            raise IvonserveError(f"--selectors: unknown utility {utility!r} in {text!r}")
        return cls(method, utility)


def bank_splits(bank: Bank, budgets: tuple[int, ...] = BUDGETS) -> list[GridPoint]:
    """Every K x S of the budgets that the bank holds; K = 0 for a bank of the mean adapter."""
    draw_counts = [0] if bank.n_models == 0 else _powers_of_two(bank.n_models)
    return [
        GridPoint(k, s)
        for k in draw_counts
        for s in _powers_of_two(bank.n_samples)
        if GridPoint(k, s).candidates in budgets
    ]


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(limit.bit_length()) if 2**i <= limit]


def split_candidates(record: dict, split: GridPoint) -> list[list]:
    """The record's candidates of the first K draws and the first S samples, in served order."""
    last_draw = max(1, split.n_models)  # the mean's candidates have draw None: one set
    return [c for c in record["candidates"] if (c[0] or 0) < last_draw and c[1] < split.n_samples]


def select(candidates: list[list], selector: Selector) -> mbr.Selection:
    """As the server selects (``server.generate.serving.select``): the mean is draw 0."""
    pool = [mbr.Candidate(draw=c[0] or 0, text=c[5], logprob=c[3], tokens=c[2]) for c in candidates]
    return mbr.select(pool, method=selector.method, utility=selector.utility)


def is_correct(answer: str | None, gold: str) -> bool:
    """As ``bench gsm8k`` scores a served answer."""
    return answer is not None and normalize_answer(answer) == gold


@dataclass(frozen=True)
class Outcomes:
    """One (bank, split, selector) over the questions, in question order."""

    correct: np.ndarray
    confidence: np.ndarray
    tokens: np.ndarray


def replay_point(
    bank: Bank, indices: list[int], split: GridPoint, selector: Selector
) -> tuple[Outcomes, list[mbr.Selection]]:
    correct, confidence, tokens, chosen = [], [], [], []
    for index in indices:
        record = bank.records[index]
        candidates = split_candidates(record, split)
        selection = select(candidates, selector)
        chosen.append(selection)
        correct.append(is_correct(selection.answer, record["gold"]))
        confidence.append(selection.confidence)
        tokens.append(sum(c[2] for c in candidates))
    return Outcomes(np.array(correct, float), np.array(confidence), np.array(tokens, float)), chosen


def point_row(
    bank: Bank, split: GridPoint, selector: Selector, outcomes: Outcomes, seed: int
) -> dict:
    correct, confidence = outcomes.correct, outcomes.confidence
    found = auroc(confidence, correct)
    return {
        "bank": bank.name,
        "model": bank.settings["model"],
        "split": split.label,
        "draws": split.n_models,
        "samples": split.n_samples,
        "budget": split.candidates,
        "selector": selector.label,
        "questions": int(correct.size),
        "correct": int(correct.sum()),
        "accuracy": float(correct.mean()),
        "accuracy_ci95": bootstrap_ci(correct, seed=seed),
        "tokens_per_question": float(outcomes.tokens.mean()),
        "confidence": {
            "mean": float(confidence.mean()),
            "auroc": found,
            "ece": calibration.ece(confidence, correct, calibration.ANSWER_ECE_BINS),
            **{
                f"accuracy_at_{round(c * 100)}": accuracy_at_coverage(confidence, correct, c)
                for c in COVERAGES
            },
        },
    }


def check_banks(banks: list[Bank]) -> list[int]:
    """The questions every bank holds (the replay pairs them), after checking that the banks
    asked the same questions the same way; else one line naming the folder."""
    first = banks[0]
    for bank in banks[1:]:
        for key in SAME_ACROSS_BANKS:
            if bank.settings[key] != first.settings[key]:
                raise IvonserveError(
                    f"{bank.folder}: {key} is {bank.settings[key]!r}, {first.folder}'s is "
                    f"{first.settings[key]!r}: banks compared must ask the same questions alike"
                )
    names = [b.name for b in banks]
    if len(set(names)) != len(names):
        raise IvonserveError(f"two banks are named {max(names, key=names.count)!r}")
    common = set(first.records)
    for bank in banks[1:]:
        common &= set(bank.records)
    if not common:
        raise IvonserveError("the banks hold no question in common")
    return sorted(common)


def served_check(bank: Bank, indices: list[int]) -> dict:
    """The bank's own selection at its full size, against the answer and text the server chose."""
    selector = Selector(bank.settings["selection"], bank.settings["utility"])
    full = bank.grid
    _, chosen = replay_point(bank, indices, full, selector)
    same = [
        (c.answer, text_digest(c.text)) == (bank.records[i]["answer"], bank.records[i]["text_sha"])
        for c, i in zip(chosen, indices, strict=True)
    ]
    return {"bank": bank.name, "selector": selector.label, "split": full.label,
            "same_as_served": float(np.mean(same)), "questions": len(same)}  # fmt: skip


def replay(
    banks: list[Bank],
    selectors: list[Selector],
    baseline: str,
    versus: list[tuple[str, GridPoint]],
    headline_splits: list[GridPoint],
    seed: int = 0,
) -> dict:
    """Every bank at every split and selector on the questions all of them hold, paired with
    ``baseline`` (a bank of the mean) at the same budget; the comparison against
    ``references`` (the baseline at its full size, and ``versus``)."""
    indices = check_banks(banks)
    by_name = {b.name: b for b in banks}
    for name in [baseline, *(n for n, _ in versus)]:
        if name not in by_name:
            raise IvonserveError(
                f"bank {name!r} is not among those replayed ({', '.join(by_name)})"
            )
    if by_name[baseline].n_models != 0:
        raise IvonserveError(f"--baseline {baseline!r}: a bank of the mean adapter (0 x S)")
    outcomes: dict[tuple[str, str, str], Outcomes] = {}
    points = []
    for bank in banks:
        for split in bank_splits(bank):
            for selector in selectors:
                found, _ = replay_point(bank, indices, split, selector)
                outcomes[(bank.name, split.label, selector.label)] = found
                points.append(point_row(bank, split, selector, found, seed))
    base = by_name[baseline]
    for row in points:  # against the mean's 0 x B, same selector and budget
        key = (base.name, f"0x{row['budget']}", row["selector"])
        if key in outcomes and row["bank"] != base.name:
            mine = outcomes[(row["bank"], row["split"], row["selector"])]
            row["vs_baseline"] = paired_accuracy(mine.correct, outcomes[key].correct, seed)
    references = [(base.name, GridPoint(0, base.n_samples)), *versus]
    headline = headline_rows(banks, selectors, outcomes, points, references, headline_splits, seed)
    return {
        "questions": len(indices),
        "indices": [indices[0], indices[-1]],
        "banks": {b.name: {"folder": str(b.folder), **b.settings} for b in banks},
        "selectors": [s.label for s in selectors],
        "baseline": baseline,
        "references": [f"{name} {split.label}" for name, split in references],
        "seed": seed,
        "checks": [served_check(b, indices) for b in banks],
        "points": points,
        "headline": headline,
    }


def headline_rows(
    banks: list[Bank],
    selectors: list[Selector],
    outcomes: dict,
    points: list[dict],
    references: list[tuple[str, GridPoint]],
    headline_splits: list[GridPoint],
    seed: int,
) -> list[dict]:
    """The paper's comparison: a bank of the mean at its full size, a posterior bank at the
    headline splits it holds (else at its full size), each against every reference on the same
    questions and selector."""
    by_key = {(p["bank"], p["split"], p["selector"]): p for p in points}
    rows = []
    for bank in banks:
        splits = [bank.grid]
        if bank.n_models:
            splits = [s for s in headline_splits if s in bank_splits(bank)] or splits
        for split in splits:
            for selector in selectors:
                point = by_key[(bank.name, split.label, selector.label)]
                row = {k: point[k] for k in ("bank", "split", "budget", "selector", "accuracy",
                                             "accuracy_ci95", "tokens_per_question")}  # fmt: skip
                mine = outcomes[(bank.name, split.label, selector.label)]
                row["versus"] = {}
                for name, ref in references:
                    theirs = outcomes.get((name, ref.label, selector.label))
                    if theirs is not None and (name, ref) != (bank.name, split):
                        row["versus"][f"{name} {ref.label}"] = paired_accuracy(
                            mine.correct, theirs.correct, seed
                        )
                rows.append(row)
    return rows


# --- the report ---------------------------------------------------------------------------------
def _interval(value: float, ci: list[float], scale: float = 100, digits: int = 1) -> str:
    return f"{value * scale:.{digits}f} [{ci[0] * scale:.{digits}f}, {ci[1] * scale:.{digits}f}]"


def _versus(pair: dict) -> str:
    diff = _interval(pair["diff"], pair["diff_ci95"])
    return f"{diff}, {pair['a_only']}/{pair['b_only']}, p {pair['p_mcnemar']:.2g}"


def write_report(out: Path, results: dict, command: str) -> None:
    first = next(iter(results["banks"].values()))
    lines = [
        "# Test-time scaling replayed from candidate banks",
        "",
        f"{first['dataset']} ({first['data']}), questions {results['indices'][0]}.."
        f"{results['indices'][1]} held by every bank ({results['questions']}), max_tokens "
        f"{first['max_tokens']}, seed {first['seed']} + question index. Accuracy in %, "
        f"bootstrap 95% intervals over questions (2000 resamples, paired); differences are "
        f"row minus reference on the same questions, with the questions only one side got "
        f"right (row/reference) and the exact McNemar p. Command: `{command}`.",
        "",
        "Banks:",
        "",
    ]
    for name, bank in results["banks"].items():
        served = bank["served"]
        spread = f", ess {served['ess']:g}" if served["ess"] else ""
        lines.append(
            f"- `{name}`: model `{bank['model']}` ({served['kind']}{spread}), "
            f"{bank['grid']}, temperature {bank['temperature']}"
        )
    refs = results["references"]
    lines += ["", "## The comparison", ""]
    lines += ["| bank | split | selector | accuracy % | tokens/q | " + " | ".join(
        f"vs {r}" for r in refs) + " |", "|---" * (5 + len(refs)) + "|"]  # fmt: skip
    for row in results["headline"]:
        cells = [_versus(row["versus"][r]) if r in row["versus"] else "-" for r in refs]
        lines.append(
            f"| {row['bank']} | {row['split']} | {row['selector']} "
            f"| {_interval(row['accuracy'], row['accuracy_ci95'])} "
            f"| {row['tokens_per_question']:.0f} | " + " | ".join(cells) + " |"
        )
    lines += ["", "## Is the confidence worth anything? (the comparison's points)", ""]
    lines += ["| bank | split | selector | accuracy % | AUROC | ECE | acc. at 50% | acc. at 80% |",
              "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    points = {(p["bank"], p["split"], p["selector"]): p for p in results["points"]}
    for row in (points[(r["bank"], r["split"], r["selector"])] for r in results["headline"]):
        c = row["confidence"]
        auc = "-" if c["auroc"] is None else f"{c['auroc']:.3f}"
        lines.append(
            f"| {row['bank']} | {row['split']} | {row['selector']} | {row['accuracy'] * 100:.1f} "
            f"| {auc} | {c['ece']:.3f} | {c['accuracy_at_50'] * 100:.1f} "
            f"| {c['accuracy_at_80'] * 100:.1f} |"
        )
    lines += ["", f"## Every point, against {results['baseline']} 0 x B", ""]
    lines += ["| bank | split | B | selector | accuracy % | tokens/q | vs baseline |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for p in results["points"]:
        versus = _versus(p["vs_baseline"]) if "vs_baseline" in p else "-"
        lines.append(
            f"| {p['bank']} | {p['split']} | {p['budget']} | {p['selector']} "
            f"| {_interval(p['accuracy'], p['accuracy_ci95'])} | {p['tokens_per_question']:.0f} "
            f"| {versus} |"
        )
    lines += ["", "Checks: each bank's own selection at its full size against its served answers:"]
    lines += [""] + [
        f"- `{c['bank']}` ({c['selector']}, {c['split']}): {c['same_as_served']:.1%} of "
        f"{c['questions']}"
        for c in results["checks"]
    ]
    lines += ["", "Plot: `accuracy.png`.", ""]
    (out / "report.md").write_text("\n".join(lines))


def write_plot(out: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    selectors = results["selectors"]
    fig, axes = plt.subplots(1, len(selectors), figsize=(5.5 * len(selectors), 4.5), sharey=True,
                             squeeze=False)  # fmt: skip
    banks = list(results["banks"])
    styles = ["-", "--", ":", "-."]
    for axis, selector in zip(axes[0], selectors, strict=True):
        for b, name in enumerate(banks):
            color = f"C{b % 10}"
            rows = [p for p in results["points"] if p["bank"] == name and p["selector"] == selector]
            lines = sorted({p["draws"] for p in rows if p["draws"] in PLOTTED_DRAWS})
            for i, draws in enumerate(lines):
                line = sorted((p for p in rows if p["draws"] == draws), key=lambda p: p["budget"])
                x = [p["budget"] for p in line]
                y = [p["accuracy"] * 100 for p in line]
                label = name if draws == 0 else f"{name}, {draws} draws"
                if len(line) == 1:
                    axis.errorbar(x, y, yerr=[[y[0] - line[0]["accuracy_ci95"][0] * 100],
                                  [line[0]["accuracy_ci95"][1] * 100 - y[0]]], marker="*",
                                  markersize=10, color=color, capsize=3, label=label)  # fmt: skip
                    continue
                axis.plot(x, y, styles[i % len(styles)], marker="o", color=color, label=label)
                axis.fill_between(x, [p["accuracy_ci95"][0] * 100 for p in line],
                                  [p["accuracy_ci95"][1] * 100 for p in line], color=color,
                                  alpha=0.08)  # fmt: skip
        axis.set_xscale("log", base=2)
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        axis.set_xlabel("candidates per question (K draws x S samples)")
        axis.set_title(selector)
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"accuracy % (95% CI), {results['questions']} questions")
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=110)
    plt.close(fig)


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("banks", nargs="+", type=Path, help="bank folders (bench gsm8k "
                        "--candidates); each is named by its folder")  # fmt: skip
    parser.add_argument(
        "--baseline",
        help="the mean adapter's bank (0 x S) every point is paired with at its budget "
        "(default: the first such bank with S > 1)",
    )
    parser.add_argument("--versus", action="append", default=[], metavar="BANK:SPLIT",
                        help="another reference of the comparison table, e.g. ivon-greedy:0x1 "
                        "(repeatable; the baseline at its full size always is one)")  # fmt: skip
    parser.add_argument("--headline-splits", default="4x8,8x4",
                        help="the posterior banks' splits in the comparison table")  # fmt: skip
    parser.add_argument(
        "--selectors",
        default=DEFAULT_SELECTORS,
        help=f"majority and/or METHOD:UTILITY (default {DEFAULT_SELECTORS})",
    )
    parser.add_argument("--seed", type=int, default=0, help="of the bootstrap resamples")
    parser.add_argument("--out", type=Path, required=True, help="results folder")


def run_cli(args: argparse.Namespace) -> int:
    import shlex
    import sys

    banks = [load_bank(folder) for folder in args.banks]
    baseline = args.baseline or next(
        (b.name for b in banks if b.n_models == 0 and b.n_samples > 1), None
    )
    if baseline is None:
        raise IvonserveError("--baseline: no bank of the mean adapter with S > 1 among the banks")
    versus = []
    for text in args.versus:
        name, _, split = text.partition(":")
        versus.append((name, GridPoint.parse(split, "--versus")))
    selectors = [Selector.parse(s) for s in args.selectors.split(",") if s.strip()]
    headline = [
        GridPoint.parse(s, "--headline-splits")
        for s in args.headline_splits.split(",")
        if s.strip()
    ]
    results = replay(banks, selectors, baseline, versus, headline, args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    command = shlex.join(["ivonserve", *sys.argv[1:]])
    write_report(args.out, results, command)
    write_plot(args.out, results)
    for row in results["headline"]:
        print(f"{row['bank']:>20} {row['split']:>5} {row['selector']:>12}: "
              f"{_interval(row['accuracy'], row['accuracy_ci95'])}")  # fmt: skip
    print(f"wrote {args.out / 'results.json'}")
    return 0
