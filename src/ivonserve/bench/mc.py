"""Multiple-choice accuracy and calibration under a running ivonserve: the posterior predictive
of K draws against the mean adapter and against plain adapters (AdamW), through /score/choices.

Per question and (label, model), one request asks for the largest K and one for the mean
(K = 0); every smaller K is the predictive of draws 0..K-1 of the same answer, as the server's
pool serves them. An adapter served with ``--adapter`` has no posterior: its one arm is K = 0.
``--label`` names a server configuration (pruning, temperature), so runs against differently
configured servers add their arms to one results folder. Each answer goes to ``records.jsonl``
as it comes (a rerun skips finished work).

Reported per arm: accuracy, NLL, ECE (equal-width bins, ``calibration.ECE_BINS``), Brier score,
with bootstrap 95% intervals over questions; per pair of arms, paired differences on the same
questions with their intervals; a reliability diagram per arm (``reliability.png``).
``--fit-temperature DIR`` adds, for each K = 0 arm also recorded in DIR (a run on the validation
slice), the arm rescaled by the temperature fitted there (temperature scaling, Guo et al. 2017).
"""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ivonserve import calibration
from ivonserve.bench.common import (
    RECORDS,
    ServedArms,
    add_scoring_arguments,
    add_server_run,
    check_server,
    http_client,
    load_records,
    previous_results,
    score_into_records,
    scoring_key,
    served_models,
)
from ivonserve.bench.likelihood import parse_ks
from ivonserve.bench.stats import bootstrap
from ivonserve.choices import DEFAULT_FORM, FORMS, MCQuestion, load_mc
from ivonserve.errors import IvonserveError

METRICS = ("accuracy", "nll", "ece", "brier")


@dataclass(frozen=True)
class Arm:
    label: str
    model: str
    k: int  # 0: the mean adapter
    temperature: float | None = None  # temperature scaling of the letters' log-probabilities

    @property
    def name(self) -> str:
        head = f"{self.label}/" if self.label else ""
        tail = "mean" if self.k == 0 else f"K={self.k}"
        scaled = "" if self.temperature is None else f" +TS(T={self.temperature:.3g})"
        return f"{head}{self.model} {tail}{scaled}"


def _body(args: argparse.Namespace) -> Callable[[str, int, MCQuestion], dict]:
    def body(model: str, n_models: int, question: MCQuestion) -> dict:
        return {"question": question.question, "choices": list(question.choices),
                "model": model, "n_models": n_models, "form": args.form}  # fmt: skip

    return body


def _row(answer: dict, question: MCQuestion) -> dict:
    return {"id": question.id, "choice_logprobs": answer["choice_logprobs"]}


def arm_probs(arm: Arm, records: dict, questions: list[MCQuestion]) -> list[np.ndarray]:
    """Each question's predictive over its choices under one arm."""
    held = _held(arm, records)
    missing = [q.index for q in questions if q.index not in held]
    if missing:
        raise IvonserveError(
            f"arm {arm.name!r} has no record of question {missing[0]} in this folder: run it "
            "again with the same --data, --holdout and --limit"
        )
    t = 1.0 if arm.temperature is None else arm.temperature
    out = []
    for q in questions:
        draws = held[q.index]["choice_logprobs"][: max(arm.k, 1)]
        out.append(
            calibration.predictive([calibration.softmax_over(np.array(d) / t) for d in draws])
        )
    return out


def _held(arm: Arm, records: dict) -> dict[int, dict]:
    """The records an arm reads, by question index (its K draws: any request of K or more)."""
    return {
        index: row
        for (label, model, n, index), row in records.items()
        if (label, model) == (arm.label, arm.model) and (n == 0) == (arm.k == 0) and n >= arm.k
    }


def _metric(values: calibration.PerQuestion, name: str, picks: np.ndarray) -> float:
    if name == "ece":
        return calibration.ece(values.confidence[picks], values.correct[picks])
    return float(getattr(values, "correct" if name == "accuracy" else name)[picks].mean())


def summarise(arms: list[Arm], records: dict, questions: list[MCQuestion], seed: int) -> dict:
    labels = [q.label for q in questions]
    values = {
        a.name: calibration.per_question(arm_probs(a, records, questions), labels) for a in arms
    }
    n, everyone = len(questions), np.arange(len(questions))
    rows = []
    for arm in arms:
        v = values[arm.name]
        row = {"arm": arm.name, "label": arm.label, "model": arm.model, "k": arm.k,
               "temperature": arm.temperature, "questions": n}  # fmt: skip
        for m in METRICS:
            row[m] = _metric(v, m, everyone)
            row[f"{m}_ci95"] = bootstrap(lambda p, v=v, m=m: _metric(v, m, p), n, seed)
        row["reliability"] = [  # per bin: count, accuracy, mean confidence (JSON: no NaN)
            [c, a, conf] if c else [0, None, None]
            for c, a, conf in calibration.reliability(v.confidence, v.correct)
        ]
        rows.append(row)
    pairs = []
    for i, a in enumerate(arms):
        for b in arms[i + 1 :]:
            va, vb = values[a.name], values[b.name]
            pair = {"a": a.name, "b": b.name}
            for m in METRICS:

                def diff(p, m=m, va=va, vb=vb):
                    return _metric(va, m, p) - _metric(vb, m, p)

                pair[f"{m}_diff"] = diff(everyone)
                pair[f"{m}_diff_ci95"] = bootstrap(diff, n, seed)
            pairs.append(pair)
    return {"arms": rows, "pairs": pairs}


def fitted_temperatures(validation: Path, arms: list[Arm], form: str) -> list[Arm]:
    """K = 0 arms rescaled by the temperature that minimises their NLL on a validation run, and
    the same model's K > 0 arms with every draw rescaled by that temperature before averaging
    (the mean's temperature: scaling the predictive's draws needs no fit of its own)."""
    path = validation / RECORDS
    if not path.is_file():
        raise IvonserveError(f"--fit-temperature: {path} not found (run bench mc there first)")
    results = json.loads((validation / "results.json").read_text())
    if results["form"] != form:
        raise IvonserveError(f"--fit-temperature: {validation} was answered by {results['form']}")
    data = load_mc(Path(results["data"]), results["limit"], results["holdout"])
    gold = {q.index: q.label for q in data}
    records = load_records(path, scoring_key)
    out = []
    for arm in arms:
        if arm.k != 0 or arm.temperature is not None:
            continue
        rows = [
            r for (lb, m, n, _), r in records.items() if (lb, m, n) == (arm.label, arm.model, 0)
        ]
        if not rows:
            continue
        logits = [r["choice_logprobs"][0] for r in rows]
        t = round(calibration.fit_temperature(logits, [gold[r["index"]] for r in rows]), 4)
        draws = sorted({a.k for a in arms if (a.label, a.model) == (arm.label, arm.model)})
        out += [Arm(arm.label, arm.model, k, t) for k in draws]
    return out


def _ci(row: dict, m: str, digits: int) -> str:
    lo, hi = row[f"{m}_ci95"]
    return f"{row[m]:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def arms_table(arms: list[dict]) -> list[str]:
    lines = ["| arm | accuracy | NLL | ECE | Brier |", "|---|---|---|---|---|"]
    for a in arms:
        lines.append(
            f"| {a['arm']} | {_ci(a, 'accuracy', 3)} | {_ci(a, 'nll', 3)} "
            f"| {_ci(a, 'ece', 3)} | {_ci(a, 'brier', 3)} |"
        )
    return lines


def write_report(out: Path, results: dict) -> None:
    where = f" (the last {results['holdout']} rows)" if results["holdout"] else ""
    lines = [
        "# Multiple-choice accuracy and calibration with ivonserve",
        "",
        f"Data set {results['dataset']} ({results['data']}{where}), {results['questions']} "
        f"questions, answered by {results['form']}; server(s): "
        f"{', '.join(results['servers'])}. Bootstrap 95% intervals over questions (2000 "
        f"resamples); ECE over {results['ece_bins']} equal-width bins.",
        "",
        *arms_table(results["arms"]),
        "",
        "Paired differences on the same questions, a - b (accuracy: higher is better; NLL, ECE, "
        "Brier: lower is better); an interval that excludes 0 is a difference these questions "
        "resolve.",
        "",
        "| a | b | accuracy | NLL | ECE | Brier |",
        "|---|---|---|---|---|---|",
    ]
    for p in results["pairs"]:
        cells = []
        for m in METRICS:
            lo, hi = p[f"{m}_diff_ci95"]
            cells.append(f"{p[f'{m}_diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]")
        lines.append(f"| {p['a']} | {p['b']} | " + " | ".join(cells) + " |")
    lines += ["", "Reliability diagrams: `reliability.png`.", ""]
    (out / "report.md").write_text("\n".join(lines))


def write_plot(out: Path, arms: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(arms))
    rows = -(-len(arms) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3 * rows), squeeze=False)
    for axis, arm in zip(axes.flat, arms, strict=False):
        bins = len(arm["reliability"])
        centers = (np.arange(bins) + 0.5) / bins
        counts = [c for c, _, _ in arm["reliability"]]
        acc = [a if c else 0.0 for c, a, _ in arm["reliability"]]
        axis.bar(centers, acc, width=1 / bins, edgecolor="black", alpha=0.7, label="accuracy")
        axis.plot([0, 1], [0, 1], "--", color="gray")
        for x, c in zip(centers, counts, strict=True):
            if c:
                axis.text(x, 0.02, str(c), ha="center", fontsize=5, rotation=90)
        axis.set_title(f"{arm['arm']}\nECE {arm['ece']:.3f}", fontsize=7)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_xlabel("confidence", fontsize=7)
        axis.set_ylabel("accuracy", fontsize=7)
    for axis in list(axes.flat)[len(arms) :]:
        axis.axis("off")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=110)
    plt.close(fig)


async def run(args: argparse.Namespace) -> dict:
    questions = load_mc(Path(args.data), args.limit, args.holdout)
    args.form = await answer_form(args)
    ks = parse_ks(args.n_models)
    plan, seconds = await score_into_records(
        args, questions, ks, "/score/choices", _body(args), _row
    )
    out = Path(args.out)
    results = _update_results(out, args, questions, [Arm(*a) for a in plan.arms], plan, seconds)
    write_report(out, results)
    write_plot(out, results["arms"])
    return results


async def answer_form(args: argparse.Namespace) -> str:
    """``--form``, else the form the scored models were trained in (each one's own record, as
    /v1/models' ``mc_form`` says), which must agree; else the server's default, letter."""
    if args.form:
        return args.form
    async with http_client(args) as client:
        await check_server(client, args.url)
        served = await served_models(client)
    models = args.model or [name for name, card in served.items() if card["default"]]
    forms = {m: served[m].get("mc_form") or DEFAULT_FORM for m in models if m in served}
    if len(set(forms.values())) > 1:
        trained = ", ".join(f"{m} {form}" for m, form in forms.items())
        raise IvonserveError(f"--form: the models were trained in different forms ({trained}); "
                             "name one")  # fmt: skip
    return next(iter(forms.values()), DEFAULT_FORM)


def _update_results(
    out: Path,
    args: argparse.Namespace,
    questions: list[MCQuestion],
    new_arms: list[Arm],
    plan: ServedArms,
    seconds: float,
) -> dict:
    """results.json over every arm recorded in this folder (earlier runs' labels included)."""
    previous = previous_results(out)
    if previous and (previous["data"], previous["holdout"], previous["form"]) != (
        str(args.data),
        args.holdout,
        args.form,
    ):
        raise IvonserveError(
            f"{out}: holds results of other questions or another --form; use another --out"
        )
    records = load_records(out / RECORDS, scoring_key)
    indices = {q.index for q in questions}
    arms = [Arm(a["label"], a["model"], a["k"], a["temperature"]) for a in previous.get("arms", [])]
    # another --limit: an earlier label's arms rejoin once they cover these questions too
    arms = [a for a in arms if a in new_arms or indices <= _held(a, records).keys()]
    arms += [a for a in new_arms if a not in arms]
    if args.fit_temperature:
        fitted = fitted_temperatures(Path(args.fit_temperature), arms, args.form)
        arms = [a for a in arms if a.temperature is None] + fitted
    configs = add_server_run(previous, args, plan, seconds)
    results = {
        "dataset": args.dataset or Path(args.data).parent.name or Path(args.data).stem,
        "data": str(args.data),
        "holdout": args.holdout,
        "limit": args.limit,
        "form": args.form,
        "questions": len(questions),
        "ece_bins": calibration.ECE_BINS,
        "servers": configs,
        **summarise(arms, records, questions, args.seed),
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    add_scoring_arguments(parser, "multiple-choice jsonl: question, choices, label",
                          "bench/results/mc", concurrency=8)  # fmt: skip
    parser.add_argument("--dataset", help="its name in the results (default: the file's folder)")
    parser.add_argument("--form", choices=FORMS,
                        help="how the model answers: with the choice's letter, or its text "
                        "(ivonserve.choices; default: the form the posterior was trained in, "
                        "its record, else letter)")  # fmt: skip
    parser.add_argument("--fit-temperature", metavar="DIR",
                        help="a bench mc folder of the validation slice: add each K=0 arm "
                        "temperature-scaled on it")  # fmt: skip


def run_cli(args: argparse.Namespace) -> int:
    results = asyncio.run(run(args))
    for a in results["arms"]:
        print(
            f"{a['arm']:>40}: accuracy {a['accuracy']:.3f}  NLL {a['nll']:.3f}  "
            f"ECE {a['ece']:.3f}  Brier {a['brier']:.3f}"
        )
    print(f"wrote {Path(args.out) / 'results.json'}")
    return 0
