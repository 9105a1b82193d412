"""Benchmark MBR selection: ivonserve.mbr vs. a straightforward loop over the reference libraries.

For N in (8, 32, 64, 128) and each utility, times ``select(cands, method="model", utility=u)``
on realistic GSM8k-style reasoning completions (100-200 words, made by perturbing gold answers
of GSM8k train problems: reworded steps, filler, dropped/duplicated steps, arithmetic slips),
and the baseline: the N x N utility matrix built by calling the reference implementation once
per ordered pair (sacrebleu ``sentence_chrf`` / ``sentence_bleu``, rouge-score's ``RougeScorer``,
the SQuAD v2 ``compute_f1``, answer equality), then the same model-wise scoring. Both run in this
process on the same candidates; every candidate text is distinct (no help from deduplication).

    .venv/bin/python bench/mbr.py --out bench/results
    .venv/bin/python bench/mbr.py --quick          # fewer repeats, smaller N, for a smoke run

Writes ``mbr.json`` and ``mbr.md`` under --out. Needs sacrebleu and rouge-score (bench/test-only
dependencies; the ivonserve runtime does not import them).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import platform
import random
import re
import statistics
import string
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from common import command_line

from ivonserve.answers import extract_answer
from ivonserve.mbr import METHODS, UTILITIES, Candidate, select
from ivonserve.mbr.methods import _pick
from ivonserve.mbr.utilities import cached_extract_answer

DEFAULT_DATA = "/work/shared/data/gsm8k/train.jsonl"
UTILITY_NAMES = ("chrf", "bleu", "rouge_l", "token_f1", "answer")

# ---------------------------------------------------------------------------- candidates
_CALC = re.compile(r"<<[^<>]*>>")
_SWAPS = {
    "So": ["Therefore", "Thus", "Hence", "This means"],
    "total": ["sum", "overall total", "combined amount"],
    "has": ["now has", "ends up with", "owns"],
    "each": ["every", "per"],
    "which": ["that", "and this"],
    "buys": ["purchases", "gets"],
    "pages": ["pages in total"],
    "needs": ["still needs", "requires"],
    "earns": ["makes", "gets paid"],
    "then": ["after that", "next"],
}
_FILLERS = [
    "Let's think step by step.",
    "First, let's figure out what we know.",
    "We need to be careful with the units here.",
    "Let me double-check this calculation.",
    "Now we can put everything together.",
    "This step is straightforward.",
]


def load_problems(path: str, limit: int = 2000) -> list[dict]:
    problems = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                problems.append(json.loads(line))
            if len(problems) >= limit:
                break
    return problems


def _base_steps(problem: dict) -> tuple[list[str], str]:
    answer = _CALC.sub("", problem["answer"])
    body, _, final = answer.rpartition("####")
    steps = [s.strip() for s in body.strip().split("\n") if s.strip()]
    return steps, final.strip()


def perturb(problem: dict, rng: random.Random) -> str:
    """One plausible sampled completion (~100-200 words) for a GSM8k problem."""
    steps, final = _base_steps(problem)
    question = problem["question"].strip()
    out = ["We are told: " + question] if rng.random() < 0.8 else []
    if rng.random() < 0.5:
        out.append(rng.choice(_FILLERS))
    for step in steps:
        words = step.split()
        for k, w in enumerate(words):
            if w in _SWAPS and rng.random() < 0.5:
                words[k] = rng.choice(_SWAPS[w])
        step = " ".join(words)
        r = rng.random()
        if r < 0.08:
            continue  # dropped step
        if r < 0.16:
            out.append(step)  # repeated step
        if rng.random() < 0.15:
            out.append(rng.choice(_FILLERS))
        out.append(step)
    answer = final
    if rng.random() < 0.3:  # arithmetic slip: a different final number
        with contextlib.suppress(ValueError):
            answer = str(int(final.replace(",", "")) + rng.choice([-10, -2, -1, 1, 2, 5, 10]))
    style = rng.random()
    if style < 0.6:
        out.append(f"The answer is {answer}.")
    elif style < 0.85:
        out.append(f"#### {answer}")
    else:
        out.append(f"So the final answer is ${answer}.")
    text = " ".join(out) if rng.random() < 0.5 else "\n".join(out)
    words = text.split()
    while len(words) < 100:  # pad short ones with more working
        words += rng.choice(_FILLERS).split()
    return " ".join(words[:200]) if len(words) > 200 else " ".join(words)


def make_candidates(problems: list[dict], n: int, seed: int) -> list[Candidate]:
    """n distinct completions of one problem, spread over about sqrt(n) posterior draws."""
    n_draws = max(2, math.isqrt(n))
    rng = random.Random(seed)
    problem = problems[rng.randrange(len(problems))]
    while len(_base_steps(problem)[0]) < 3:
        problem = problems[rng.randrange(len(problems))]
    seen: set[str] = set()
    cands: list[Candidate] = []
    while len(cands) < n:
        text = perturb(problem, rng)
        if text in seen:
            continue
        seen.add(text)
        tokens = len(text.split()) * 4 // 3
        cands.append(Candidate(len(cands) % n_draws, text, -0.3 * tokens * rng.random(), tokens))
    return cands


# ---------------------------------------------------------------------------- baselines
def _squad_f1(prediction: str, ground_truth: str) -> float:
    """SQuAD v2.0 official compute_f1(a_gold, a_pred) with its normalize_answer/get_tokens."""

    def normalize(s: str) -> str:
        exclude = set(string.punctuation)
        s = "".join(ch for ch in s.lower() if ch not in exclude)
        s = re.sub(re.compile(r"\b(a|an|the)\b", re.UNICODE), " ", s)
        return " ".join(s.split())

    gold = normalize(ground_truth).split() if ground_truth else []
    pred = normalize(prediction).split() if prediction else []
    common = collections.Counter(gold) & collections.Counter(pred)
    num_same = sum(common.values())
    if len(gold) == 0 or len(pred) == 0:
        return float(gold == pred)
    if num_same == 0:
        return 0.0
    p, r = num_same / len(pred), num_same / len(gold)
    return 2 * p * r / (p + r)


def reference_pair_fns():
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"])

    def answer(a: str, b: str) -> float:
        x, y = extract_answer(a), extract_answer(b)
        return float(x is not None and x == y)

    return {
        "chrf": lambda h, r: sacrebleu.sentence_chrf(h, [r]).score / 100,
        "bleu": lambda h, r: sacrebleu.sentence_bleu(h, [r]).score / 100,
        "rouge_l": lambda h, r: scorer.score(r, h)["rougeL"].fmeasure,
        "token_f1": _squad_f1,
        "answer": answer,
    }


def baseline_scores(cands: list[Candidate], name: str, pair_fn) -> np.ndarray:
    """The model-wise MBR scores from an N x N matrix of reference-implementation calls."""
    texts = [c.text for c in cands]
    u = np.array([[pair_fn(a, b) for b in texts] for a in texts])
    scores, _ = METHODS["model"].score(u, cands, UTILITIES[name].hypothesis_keys(texts))
    return scores


# ---------------------------------------------------------------------------- timing
def fresh_select(cands: list[Candidate], utility: str):
    """select() as a new request sees it: the per-text answer cache starts empty."""
    cached_extract_answer.cache_clear()
    return select(cands, method="model", utility=utility)


def time_fn(fn, repeats: int, budget_s: float) -> tuple[list[float], object]:
    """Wall times of up to ``repeats`` calls (stopping once ``budget_s`` is spent), last result."""
    times = []
    start = time.perf_counter()
    result = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return times, result


def _loadavg() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "loadavg_at_start": _loadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data", default=DEFAULT_DATA, help="GSM8k jsonl (question/answer)")
    ap.add_argument("--out", default="bench/results", help="folder for mbr.json and mbr.md")
    ap.add_argument("--sizes", default="8,32,64,128", help="comma-separated N")
    ap.add_argument("--utilities", default=",".join(UTILITY_NAMES))
    ap.add_argument("--repeats", type=int, default=7, help="timed runs of the fast path")
    ap.add_argument("--baseline-repeats", type=int, default=3, help="timed runs of the loop")
    ap.add_argument(
        "--baseline-budget", type=float, default=60.0, help="stop repeating the loop after (s)"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="sizes 8,32,64; 3/1 repeats")
    args = ap.parse_args(argv)
    if args.quick:
        args.sizes, args.repeats, args.baseline_repeats = "8,32,64", 3, 1

    import rouge_score
    import sacrebleu

    sizes = [int(s) for s in args.sizes.split(",")]
    names = args.utilities.split(",")
    problems = load_problems(args.data)
    ref = reference_pair_fns()
    info = machine_info()
    info["sacrebleu"] = sacrebleu.__version__
    info["rouge_score"] = getattr(rouge_score, "__version__", "0.1.2")
    rows = []
    for n in sizes:
        cands = make_candidates(problems, n, seed=args.seed + n)
        words = [len(c.text.split()) for c in cands]
        for name in names:
            select(cands, method="model", utility=name)  # warm-up (imports, regex caches)
            fast, ours = time_fn(lambda c=cands, u=name: fresh_select(c, u), args.repeats, 1e9)
            slow, ref_scores = time_fn(
                lambda c=cands, u=name: baseline_scores(c, u, ref[u]),
                args.baseline_repeats,
                args.baseline_budget,
            )
            # same scores as the reference loop, and the same pick when the loop's scores go
            # through the same argmax (eligibility and tie-break rules)
            diff = float(np.max(np.abs(np.array(ours.scores) - ref_scores)))
            eligible = np.array([a is not None for a in ours.answers])
            if not eligible.any():
                eligible[:] = True
            same_pick = ours.index == _pick(ref_scores, eligible, cands)
            row = {
                "n": n,
                "utility": name,
                "words_mean": statistics.mean(words),
                "fast_ms_min": 1e3 * min(fast),
                "fast_ms_median": 1e3 * statistics.median(fast),
                "fast_repeats": len(fast),
                "loop_ms_min": 1e3 * min(slow),
                "loop_ms_median": 1e3 * statistics.median(slow),
                "loop_repeats": len(slow),
                "speedup_min": min(slow) / min(fast),
                "speedup_median": statistics.median(slow) / statistics.median(fast),
                "n_draws": len({c.draw for c in cands}),
                "scores_max_abs_diff": diff,
                "same_choice": bool(same_pick),
            }
            rows.append(row)
            print(
                f"N={n:4d} {name:9s} ours {row['fast_ms_median']:9.2f} ms  "
                f"loop {row['loop_ms_median']:10.1f} ms  x{row['speedup_median']:8.1f}  "
                f"|d score| {diff:.1e} same pick {same_pick}",
                flush=True,
            )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info["loadavg_at_end"] = _loadavg()
    report = {
        "machine": info,
        "command": command_line("bench/mbr.py", argv),
        "method": "model",
        "rows": rows,
    }
    (out / "mbr.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "mbr.md").write_text(markdown(report), encoding="utf-8")
    return 0


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        "# MBR selection benchmark",
        "",
        f"`{report['command']}` — method `{report['method']}`, distinct GSM8k-style completions "
        "(100-200 words).",
        "",
        f"Machine: {m['cpu']} ({m['cpu_count']} CPUs, {m['affinity_cpus']} usable), "
        f"{m['platform']}, Python {m['python']}, numpy {m['numpy']}, "
        f"sacrebleu {m['sacrebleu']}, rouge-score {m['rouge_score']}. "
        f"Load average (1/5/15 min) at start {m.get('loadavg_at_start')}, "
        f"at end {m.get('loadavg_at_end')}: other processes slow both columns alike.",
        "",
        "ours = `ivonserve.mbr.select`; loop = N x N calls of the reference implementation, then "
        "the same scoring. Times in ms (median of repeats; min in brackets). Candidates spread "
        "over ~sqrt(N) draws. abs diff = max \\|score difference\\| between ours and the loop.",
        "",
        "| N | utility | ours ms | loop ms | speed-up median | speed-up min | abs diff | same |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in report["rows"]:
        lines.append(
            f"| {r['n']} | {r['utility']} | {r['fast_ms_median']:.2f} ({r['fast_ms_min']:.2f}) | "
            f"{r['loop_ms_median']:.0f} ({r['loop_ms_min']:.0f}) | {r['speedup_median']:.0f}x | "
            f"{r['speedup_min']:.0f}x | {r['scores_max_abs_diff']:.0e} | {r['same_choice']} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
