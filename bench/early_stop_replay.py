"""Early stopping's rules replayed on one `off` run: every threshold from one measurement.

A fan-out's candidates decode in lockstep (vLLM batches them: one token each per engine step), so
with nothing else running a candidate of n tokens finishes at step n, and the order in which
candidates finish is the order of their lengths. Given every candidate of an `off` run
(`ivonserve bench gsm8k --candidates`), the rules of `ivonserve.mbr.stopping` can therefore be
replayed offline: feed the tracker the candidates in that order, step by step, and where the rule
fires, the response is selected (by `mbr.select`, as the server does) from the finished ones,
and every candidate still running has generated as many tokens as the step. Per rule: how often
the answer is off's, accuracy, generated tokens (and the share saved), and decode steps (the
longest candidate's length with off, the stopping step with the rule: latency on an idle server
is proportional to them).

`confidence` replays exactly what the server computes (it depends on the answers and the order
of finishing alone). `exact` also bounds the running candidates' log-probabilities, which the
server reads as they grow; the replay interpolates each one's final log-probability linearly
over its tokens, so its `exact` figures are an estimate (the server's `exact` always keeps off's
answer: tested). Live runs of the rules (`bench/early_stop.sh`) check the replay.

    .venv/bin/ivonserve bench gsm8k ... --early-stop off --candidates --out DIR
    .venv/bin/python bench/early_stop_replay.py DIR [--thresholds 0.8,0.9,0.95,0.99] [--out OUT]

Writes OUT/replay.json, OUT/replay.md and OUT/replay.png (tokens saved against agreement with
off); OUT defaults to DIR.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path

import numpy as np

from ivonserve.answers import normalize_answer
from ivonserve.mbr import Candidate, select
from ivonserve.mbr.stopping import DEFAULT_MIN_FINISHED, StopPolicy, Tracker

DEFAULT_THRESHOLDS = (0.8, 0.9, 0.95, 0.99)


@dataclass(frozen=True)
class Outcome:
    """One question under one rule."""

    answer: str | None
    tokens: int  # generated, over every candidate
    steps: int  # the step at which the last candidate still decoding ended or was stopped
    stopped: int  # candidates aborted


def replay(row: dict, policy: StopPolicy, method: str, max_tokens: int) -> Outcome:
    """The rule run over the candidates of one `off` record, finishing in order of length."""
    slots = sorted(row["candidates"], key=lambda c: (c[0] or 0, c[1]))  # draw-major, as served
    n_draws = len({c[0] for c in slots})
    n_samples = len(slots) // n_draws
    tracker = Tracker(policy, method, n_draws, n_samples, max_tokens)
    order = sorted(range(len(slots)), key=lambda i: slots[i][2])
    finished: list[int] = []
    for step, group in groupby(order, key=lambda i: slots[i][2]):
        for i in order:  # running candidates: their log-probability so far (interpolated)
            _, _, tokens, logprob, *_ = slots[i]
            if tokens > step and logprob is not None:  # longer than the step: still running
                tracker.progress(i, logprob * step / tokens)
        for i in group:
            _, _, tokens, logprob, _, text, *_ = slots[i]
            tracker.finished(i, text, logprob, tokens)
            finished.append(i)
        if len(finished) < len(slots) and tracker.should_stop():
            return _outcome(slots, finished, step, method)
    return _outcome(slots, finished, max(c[2] for c in slots), method)


def _outcome(slots: list, finished: list[int], step: int, method: str) -> Outcome:
    done = sorted(finished)
    chosen = select(
        [Candidate(draw=slots[i][0] or 0, text=slots[i][5], logprob=slots[i][3],
                   tokens=slots[i][2]) for i in done],
        method,
        "answer",
    )  # fmt: skip
    tokens = sum(slots[i][2] for i in done) + step * (len(slots) - len(done))
    return Outcome(chosen.answer, tokens, step, len(slots) - len(done))


def rules(thresholds: list[float], min_finished: int) -> dict[str, StopPolicy]:
    out = {"off": StopPolicy("off"), "exact (estimate)": StopPolicy("exact")}
    for t in thresholds:
        out[f"confidence-{t:g}"] = StopPolicy("confidence", t, min_finished)
    return out


def summarise(folder: Path, thresholds: list[float], min_finished: int) -> dict:
    results = json.loads((folder / "results.json").read_text())
    if results.get("utility", "answer") != "answer":
        raise SystemExit(f"{folder}: the rules replay the answer utility only")
    rows = [json.loads(ln) for ln in (folder / "records.jsonl").read_text().splitlines() if ln]
    rows = [r for r in rows if r.get("candidates")]
    if not rows:
        raise SystemExit(f"{folder}: no records with candidates (run bench gsm8k --candidates)")
    method, max_tokens = results["selection"], results["max_tokens"]
    by_grid: dict[str, list[dict]] = {}
    for r in rows:
        by_grid.setdefault(r["grid"], []).append(r)
    table = []
    for grid, grid_rows in sorted(by_grid.items()):
        outcomes = {
            name: [replay(r, policy, method, max_tokens) for r in grid_rows]
            for name, policy in rules(thresholds, min_finished).items()
        }
        off = outcomes["off"]
        for name, got in outcomes.items():
            tokens = np.array([o.tokens for o in got], dtype=float)
            steps = np.array([o.steps for o in got], dtype=float)
            table.append({
                "rule": name, "grid": grid, "questions": len(got),
                "same_answer_as_off": float(np.mean([
                    o.answer == f.answer for o, f in zip(got, off, strict=True)])),
                "accuracy": float(np.mean([
                    o.answer is not None and normalize_answer(o.answer) == r["gold"]
                    for o, r in zip(got, grid_rows, strict=True)])),
                "tokens_per_question": float(tokens.mean()),
                "tokens_saved": float(1 - tokens.sum() / sum(o.tokens for o in off)),
                "steps_p50": float(np.percentile(steps, 50)),
                "steps_p95": float(np.percentile(steps, 95)),
                "stopped_questions": float(np.mean([o.stopped > 0 for o in got])),
            })  # fmt: skip
        served = [r["answer"] for r in grid_rows]
        table.append({"rule": "check: off replayed = served", "grid": grid,
                      "questions": len(grid_rows),
                      "same_answer_as_off": float(np.mean([
                          o.answer == s for o, s in zip(off, served, strict=True)]))})  # fmt: skip
    return {"run": str(folder), "dataset": results.get("dataset"), "selection": method,
            "max_tokens": max_tokens, "temperature": results.get("temperature"),
            "min_finished": min_finished, "rows": table}  # fmt: skip


def write(out: Path, summary: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [
        f"# Early stopping replayed on {summary['run']}",
        "",
        f"{summary['dataset']}, selection `{summary['selection']}`, max_tokens "
        f"{summary['max_tokens']}, temperature {summary['temperature']}; confidence needs "
        f"{summary['min_finished']} finished candidates. Steps: decode steps until the last "
        "candidate ended or was stopped (latency on an idle server is proportional).",
        "",
        "| rule | grid | questions | same answer as off | accuracy | tokens/question "
        "| tokens saved | steps p50 | steps p95 | questions stopped early |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["rows"]:
        if "tokens_saved" not in r:
            continue
        lines.append(
            f"| {r['rule']} | {r['grid']} | {r['questions']} | {r['same_answer_as_off']:.1%} "
            f"| {r['accuracy']:.3f} | {r['tokens_per_question']:.0f} | {r['tokens_saved']:.1%} "
            f"| {r['steps_p50']:.0f} | {r['steps_p95']:.0f} | {r['stopped_questions']:.1%} |"
        )
    checks = [r for r in summary["rows"] if "tokens_saved" not in r]
    for c in checks:
        lines += ["", f"Check ({c['grid']}): the replayed `off` selects the served answer on "
                  f"{c['same_answer_as_off']:.1%} of {c['questions']} questions."]  # fmt: skip
    (out / "replay.md").write_text("\n".join(lines) + "\n")
    write_plot(out, summary["rows"])


def write_plot(out: Path, rows: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axis = plt.subplots(figsize=(5, 3.5))
    for grid in sorted({r["grid"] for r in rows}):
        conf = [r for r in rows if r["grid"] == grid and r["rule"].startswith("confidence-")]
        x = [100 * r["same_answer_as_off"] for r in conf]
        y = [100 * r["tokens_saved"] for r in conf]
        axis.plot(x, y, "o-", label=f"confidence {grid}")
        for r, xi, yi in zip(conf, x, y, strict=True):
            axis.annotate(r["rule"].removeprefix("confidence-"), (xi, yi), fontsize=7)
        for r in rows:
            if r["grid"] == grid and r["rule"].startswith("exact"):
                axis.plot(100 * r["same_answer_as_off"], 100 * r["tokens_saved"], "*",
                          markersize=12, label=f"exact {grid}")  # fmt: skip
    axis.set_xlabel("answers identical to off (%)")
    axis.set_ylabel("generated tokens saved against off (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "replay.png", dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="a bench gsm8k --candidates folder (rule off)")
    parser.add_argument("--thresholds", default=",".join(map(str, DEFAULT_THRESHOLDS)))
    parser.add_argument("--min-finished", type=int, default=DEFAULT_MIN_FINISHED)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]
    summary = summarise(args.run, thresholds, args.min_finished)
    write(args.out or args.run, summary)
    print((Path(args.out or args.run) / "replay.md").read_text())


if __name__ == "__main__":
    main()
