"""GSM8k accuracy, calibration and cost of a running ivonserve, over a grid of n_models x n_samples.

HTTP only, so it measures any deployment (a container, a GPU box). One JSON line per (grid point,
question) goes to ``records.jsonl`` as soon as it is answered, so a rerun skips finished work.
Grid point ``0x1`` is the mean model with greedy decoding: the paper's baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ivonserve.answers import normalize_answer
from ivonserve.bench.bank import bank_settings, open_bank
from ivonserve.bench.common import (
    RECORDS,
    GridPoint,
    Question,
    check_server,
    drop_torn_tail,
    load_questions,
    load_records,
    served_models,
)
from ivonserve.bench.stats import wilson_interval
from ivonserve.calibration import ANSWER_ECE_BINS, ece, reliability
from ivonserve.errors import IvonserveError

DEFAULT_GRID = "0x1,1x8,4x8,8x8"


def request_body(point: GridPoint, question: Question, args: argparse.Namespace) -> dict:
    greedy = point.n_models == 0 and point.n_samples == 1
    return {
        "prompt": question.question,
        "model": args.model,
        "n_models": point.n_models,
        "n_samples": point.n_samples,
        "max_tokens": args.max_tokens,
        "temperature": 0.0 if greedy else args.temperature,
        "seed": args.seed + question.index,
        "selection": args.selection,
        "utility": args.utility,
        **early_stop_fields(args),
        **({"return_candidates": True} if args.candidates else {}),
    }


def early_stop_fields(args: argparse.Namespace) -> dict:
    """--early-stop and --early-stop-threshold as request fields (left out: the server's)."""
    fields = {}
    if getattr(args, "early_stop", None) is not None:
        fields["early_stop"] = args.early_stop
    if getattr(args, "early_stop_threshold", None) is not None:
        fields["early_stop_threshold"] = args.early_stop_threshold
    return fields


def text_digest(text: str | None) -> str | None:
    """A short fingerprint of the chosen text: two runs chose the same text iff these match."""
    return None if text is None else hashlib.sha256(text.encode()).hexdigest()[:16]


def load_done(path: Path) -> dict[tuple[str, int], dict]:
    """Finished records by (grid label, question index)."""
    return load_records(path, lambda row: (row["grid"], row["index"]))


async def run_point(
    client: httpx.AsyncClient,
    point: GridPoint,
    todo: list[Question],
    args: argparse.Namespace,
    sink: Any,
) -> float:
    """Ask every question of one grid point, `concurrency` at a time; returns the wall time."""
    from tqdm import tqdm

    semaphore = asyncio.Semaphore(args.concurrency)
    bar = tqdm(total=len(todo), desc=point.label, unit="q", disable=args.no_progress)

    async def ask(question: Question) -> None:
        async with semaphore:
            began = time.perf_counter()
            response = await client.post("/generate", json=request_body(point, question, args))
            latency = time.perf_counter() - began
        if response.status_code != 200:
            raise IvonserveError(
                f"{args.url}/generate answered {response.status_code}: {response.text[:300]}"
            )
        body = response.json()
        predicted = body.get("answer")
        row = {
            "grid": point.label,
            "model": body.get("model"),
            "index": question.index,
            "gold": question.gold,
            "answer": predicted,
            "correct": predicted is not None and normalize_answer(predicted) == question.gold,
            "confidence": body.get("confidence"),
            "completion_tokens": body.get("usage", {}).get("completion_tokens", 0),
            "latency_s": round(latency, 4),
            "early_stop": body.get("early_stop"),
            "n_finished": body.get("n_finished"),
            "n_stopped": body.get("n_stopped"),
            "chosen": [body.get("chosen_model"), body.get("chosen_sample")],
            "text_sha": text_digest(body.get("text")),
            "seed": body.get("seed"),
        }
        if args.candidates:  # a bank's candidates, as bank.CANDIDATE_FIELDS
            row["candidates"] = [
                [c.get("draw", c.get("model")), c["sample"], c["tokens"], c["logprob"],
                 c["finish_reason"], c["text"], c.get("answer")]
                for c in body.get("candidates", [])
            ]  # fmt: skip
        sink.write(json.dumps(row) + "\n")
        sink.flush()
        bar.update(1)

    began = time.perf_counter()
    try:
        await asyncio.gather(*(ask(q) for q in todo))
    finally:
        bar.close()
    return time.perf_counter() - began


def calibration(confidence: np.ndarray, correct: np.ndarray) -> dict:
    """The ECE of the served confidence and its non-empty bins (the reliability diagram)."""
    table = reliability(confidence, correct, ANSWER_ECE_BINS)
    rows = [{"bin": b, "count": count, "confidence": conf, "accuracy": acc}
            for b, (count, acc, conf) in enumerate(table) if count]  # fmt: skip
    return {"ece": ece(confidence, correct, ANSWER_ECE_BINS), "bins": rows}


def summarise(point: GridPoint, rows: list[dict], wall_s: float | None) -> dict:
    correct = np.array([r["correct"] for r in rows], dtype=float)
    confidence = np.array([r["confidence"] or 0.0 for r in rows], dtype=float)
    latency = np.array([r["latency_s"] for r in rows])
    tokens = int(sum(r["completion_tokens"] for r in rows))
    low, high = wilson_interval(int(correct.sum()), len(rows))
    summary = {
        "grid": point.label,
        "n_models": point.n_models,
        "n_samples": point.n_samples,
        "candidates": point.candidates,
        "questions": len(rows),
        "accuracy": float(correct.mean()),
        "accuracy_ci95": [low, high],
        "answered": float(np.mean([r["answer"] is not None for r in rows])),
        "calibration": calibration(confidence, correct),
        "latency_s": {f"p{q}": float(np.percentile(latency, q)) for q in (50, 95, 99)},
        "completion_tokens": tokens,
        "tokens_per_question": tokens / len(rows),
        "stopped_per_question": float(np.mean([r.get("n_stopped") or 0 for r in rows])),
        "stopped_questions": float(np.mean([(r.get("n_stopped") or 0) > 0 for r in rows])),
    }
    if wall_s:  # only when every question of the point ran in this invocation
        summary["questions_per_s"] = len(rows) / wall_s
        summary["tokens_per_s"] = tokens / wall_s
    return summary


def dataset_name(path: Path) -> str:
    """What the report calls the data: its folder's name (gsm8k, svamp), else the file's."""
    folder = path.resolve().parent.name
    return folder if folder and folder not in (".", "data") else path.stem


def write_report(out: Path, results: dict) -> None:
    lines = [
        f"# {results['dataset']} with ivonserve: {results['label']}",
        "",
        f"Server {results['url']}, model `{results['model']}`, data {results['data']}, "
        f"{results['questions']} questions, "
        f"selection `{results['selection']}`, utility `{results['utility']}`, "
        f"max_tokens {results['max_tokens']}, temperature {results['temperature']}, "
        f"early stop {_early_stop_label(results)}.",
        "",
        "| grid | candidates | accuracy | 95% CI | answered | ECE | p50 s | p95 s | tok/question"
        " | tok/s | q/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in results["points"]:
        low, high = s["accuracy_ci95"]
        lines.append(
            f"| {s['grid']} | {s['candidates']} | {s['accuracy']:.3f} | [{low:.3f}, {high:.3f}] "
            f"| {s['answered']:.2f} | {s['calibration']['ece']:.3f} "
            f"| {s['latency_s']['p50']:.2f} | {s['latency_s']['p95']:.2f} "
            f"| {s['tokens_per_question']:.0f} | {_fmt(s.get('tokens_per_s'))} "
            f"| {_fmt(s.get('questions_per_s'), 3)} |"
        )
    lines += ["", "Plots: `accuracy.png` (accuracy and tokens against candidates per question),"]
    lines += ["`reliability.png` (confidence against accuracy per grid point).", ""]
    (out / "report.md").write_text("\n".join(lines))


def _early_stop_label(results: dict) -> str:
    rule = results.get("early_stop")
    if rule is None:
        return "the server's default"
    threshold = results.get("early_stop_threshold")
    return f"`{rule}`" + (f" at {threshold}" if threshold is not None else "")


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_plots(out: Path, points: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, left = plt.subplots(figsize=(6, 4))
    x = [p["candidates"] for p in points]
    acc = [p["accuracy"] for p in points]
    err = [[a - p["accuracy_ci95"][0] for a, p in zip(acc, points, strict=True)],
           [p["accuracy_ci95"][1] - a for a, p in zip(acc, points, strict=True)]]  # fmt: skip
    left.errorbar(x, acc, yerr=err, marker="o", capsize=3, label="accuracy")
    for p in points:
        left.annotate(p["grid"], (p["candidates"], p["accuracy"]), fontsize=8)
    left.set_xscale("log", base=2)
    left.set_xlabel("candidates per question")
    left.set_ylabel("accuracy (95% CI)")
    right = left.twinx()
    right.plot(x, [p["tokens_per_question"] for p in points], "s--", color="grey")
    right.set_ylabel("generated tokens per question", color="grey")
    fig.tight_layout()
    fig.savefig(out / "accuracy.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(points), figsize=(3 * len(points), 3), squeeze=False)
    for axis, p in zip(axes[0], points, strict=True):
        bins = p["calibration"]["bins"]
        axis.plot([0, 1], [0, 1], ":", color="grey")
        axis.bar(
            [b["confidence"] for b in bins], [b["accuracy"] for b in bins], width=0.08, alpha=0.7
        )
        axis.set_title(f"{p['grid']}  ECE {p['calibration']['ece']:.3f}", fontsize=9)
        axis.set_xlim(0, 1)
        axis.set_ylim(0, 1)
        axis.set_xlabel("confidence")
    axes[0][0].set_ylabel("accuracy")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=120)
    plt.close(fig)


async def run(args: argparse.Namespace) -> dict:
    questions = load_questions(Path(args.data), args.limit)
    grid = [GridPoint.parse(part) for part in args.grid.split(",") if part.strip()]
    if args.candidates and len(grid) != 1:
        raise IvonserveError("--candidates: a bank holds one grid point; give --grid one point")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    summaries = []
    async with httpx.AsyncClient(base_url=args.url, timeout=timeout) as client:
        await check_server(client, args.url)
        served = await served_models(client)
        if args.model is None:
            args.model = next(name for name, card in served.items() if card["default"])
        elif args.model not in served:
            raise IvonserveError(
                f"--model {args.model!r}: not served by {args.url} (it serves {', '.join(served)})"
            )
        if args.candidates:
            settings = bank_settings(
                args, served[args.model], request_body(grid[0], questions[0], args)
            )
            command = getattr(args, "command_line", "(bench.gsm8k.run from Python)")
            open_bank(out, settings, command, len(questions))
        drop_torn_tail(out / RECORDS)
        done = load_done(out / RECORDS)
        with (out / RECORDS).open("a") as sink:
            for point in grid:
                todo = [q for q in questions if (point.label, q.index) not in done]
                wall = await run_point(client, point, todo, args, sink) if todo else None
                done = load_done(out / RECORDS)
                rows = [done[(point.label, q.index)] for q in questions]
                full_run = len(todo) == len(questions)
                summaries.append(summarise(point, rows, wall if full_run else None))
    results = {
        "url": args.url,
        "model": args.model,
        "label": args.label or args.model,
        "server": served[args.model],
        "dataset": args.dataset or dataset_name(Path(args.data)),
        "data": str(args.data),
        "questions": len(questions),
        "selection": args.selection,
        "utility": args.utility,
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "early_stop": args.early_stop,
        "early_stop_threshold": args.early_stop_threshold,
        "points": summaries,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_report(out, results)
    write_plots(out, summaries)
    return results


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server to measure")
    parser.add_argument("--data", required=True, help="GSM8k-format jsonl (e.g. test.jsonl)")
    parser.add_argument("--model", help="a served posterior or adapter (default: the server's)")
    parser.add_argument("--label", help="names this run in `bench compare` (default: --model)")
    parser.add_argument("--dataset", help="its name in reports (default: the data's folder)")
    parser.add_argument("--limit", type=int, help="first N questions only")
    parser.add_argument("--grid", default=DEFAULT_GRID, help="n_models x n_samples points")
    parser.add_argument("--concurrency", type=int, default=4, help="requests in flight")
    parser.add_argument("--selection", default="model", help="MBR method")
    parser.add_argument("--utility", default="answer", help="MBR utility")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.7, help="sampled points (not 0x1)")
    parser.add_argument("--seed", type=int, default=0, help="question i uses seed + i")
    parser.add_argument(
        "--early-stop",
        choices=["off", "exact", "confidence"],
        help="the requests' early_stop rule (default: the server's); records then hold each "
        "question's stopped candidates and chosen text (bench/early_stop.sh compares rules)",
    )
    parser.add_argument(
        "--early-stop-threshold",
        type=float,
        help="the requests' early_stop_threshold (confidence; default: the server's)",
    )
    parser.add_argument(
        "--candidates",
        action="store_true",
        help="make --out a candidate bank (one grid point): keep every candidate as [draw, sample, "
        "tokens, logprob, finish_reason, text, answer], the settings and the served model's card "
        "in bank.json; `bench tts` and bench/early_stop_replay.py replay it",
    )
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--out", default="bench/results/gsm8k", help="results folder")
    parser.add_argument("--no-progress", action="store_true")


def run_cli(args: argparse.Namespace) -> int:
    args.command_line = shlex.join(["ivonserve", *sys.argv[1:]])  # what a bank records
    results = asyncio.run(run(args))
    for s in results["points"]:
        low, high = s["accuracy_ci95"]
        print(
            f"{s['grid']:>6}: accuracy {s['accuracy']:.3f} [{low:.3f}, {high:.3f}] "
            f"ECE {s['calibration']['ece']:.3f} p50 {s['latency_s']['p50']:.2f}s"
        )
    print(f"wrote {Path(args.out) / 'results.json'}")
    return 0
