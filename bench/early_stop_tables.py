"""The early-stopping table and plot from a `bench/early_stop.sh` results folder.

Every arm (a folder of `ivonserve bench gsm8k` records: `off`, `exact`, `confidence-0.95`, ...)
is compared with `off` on the same questions, grid point and seeds: how often its answer and its
chosen text are off's, its accuracy, generated tokens (and the share saved against off), latency
p50/p95, candidates stopped, and requests per second where the whole arm ran in one go. The arm
`off-repeat` (off run again) measures how often off agrees with itself: the real model's seeded
samples are not bit-reproducible from run to run, and that floor bounds every arm's agreement.

    python bench/early_stop_tables.py bench/results/early-stop [--out DIR] [--replay DIR ...]

Writes DIR/report.md (one table per dataset and grid point), DIR/early_stop.json and
DIR/early_stop.png (tokens saved against agreement with off, the confidence arms across their
thresholds as a line, exact and off-repeat as their own markers; each --replay folder of
bench/early_stop_replay.py adds its dataset's replayed thresholds behind them as a dashed line).
DIR defaults to the results folder.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

REFERENCE = "off"


def load_arm(folder: Path) -> tuple[dict, dict[tuple[str, int], dict]]:
    """(results.json, records by (grid, question index)) of one arm's folder."""
    results = json.loads((folder / "results.json").read_text())
    records = {}
    for line in (folder / "records.jsonl").read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            records[row["grid"], row["index"]] = row
    return results, records


REPEAT = "off-repeat"


def arm_order(name: str) -> tuple[int, float, str]:
    """off, off-repeat, exact, then confidence by threshold, then anything else by name."""
    if name == REFERENCE:
        return (0, 0.0, name)
    if name == REPEAT:
        return (1, 0.0, name)
    if name == "exact":
        return (2, 0.0, name)
    if name.startswith("confidence-"):
        try:
            return (3, float(name.removeprefix("confidence-")), name)
        except ValueError:
            pass
    return (4, 0.0, name)


def compare(arm: str, grid: str, rows: list[dict], off: list[dict], point: dict | None) -> dict:
    """One arm at one grid point against off's rows of the same questions (same order)."""
    latency = np.array([r["latency_s"] for r in rows])
    tokens = np.array([r["completion_tokens"] for r in rows], dtype=float)
    off_tokens = np.array([r["completion_tokens"] for r in off], dtype=float)
    same_answer = [r["answer"] == o["answer"] for r, o in zip(rows, off, strict=True)]
    same_text = [
        r.get("text_sha") is not None and r.get("text_sha") == o.get("text_sha")
        for r, o in zip(rows, off, strict=True)
    ]
    return {
        "arm": arm,
        "grid": grid,
        "questions": len(rows),
        "same_answer": float(np.mean(same_answer)),
        "same_text": float(np.mean(same_text)),
        "accuracy": float(np.mean([r["correct"] for r in rows])),
        "tokens_per_question": float(tokens.mean()),
        "tokens_saved": float(1 - tokens.sum() / off_tokens.sum()) if off_tokens.sum() else 0.0,
        "latency_p50_s": float(np.percentile(latency, 50)),
        "latency_p95_s": float(np.percentile(latency, 95)),
        "stopped_per_question": float(np.mean([r.get("n_stopped") or 0 for r in rows])),
        "stopped_questions": float(np.mean([(r.get("n_stopped") or 0) > 0 for r in rows])),
        "questions_per_s": (point or {}).get("questions_per_s"),
    }


def summarise_dataset(folder: Path) -> list[dict]:
    """Every arm of one dataset's folder against its `off` arm, per grid point."""
    arms = sorted(
        (p for p in folder.iterdir() if (p / "results.json").is_file()),
        key=lambda p: arm_order(p.name),
    )
    if not any(p.name == REFERENCE for p in arms):
        raise SystemExit(f"{folder}: no `{REFERENCE}` arm to compare with")
    loaded = {p.name: load_arm(p) for p in arms}
    _, off_records = loaded[REFERENCE]
    rows = []
    for name, (results, records) in loaded.items():
        points = {p["grid"]: p for p in results["points"]}
        for grid in sorted({g for g, _ in records}):
            shared = sorted(i for g, i in records if g == grid and (g, i) in off_records)
            if not shared:
                continue
            mine = [records[grid, i] for i in shared]
            reference = [off_records[grid, i] for i in shared]
            rows.append(compare(name, grid, mine, reference, points.get(grid)))
    return rows


def table(dataset: str, rows: list[dict]) -> list[str]:
    lines = [
        f"### {dataset}",
        "",
        "| arm | grid | questions | same answer as off | same text as off | accuracy "
        "| tokens/question | tokens saved | p50 s | p95 s | stopped/question | q/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        qps = "-" if r["questions_per_s"] is None else f"{r['questions_per_s']:.3f}"
        lines.append(
            f"| {r['arm']} | {r['grid']} | {r['questions']} | {r['same_answer']:.1%} "
            f"| {r['same_text']:.1%} | {r['accuracy']:.3f} | {r['tokens_per_question']:.0f} "
            f"| {r['tokens_saved']:.1%} | {r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} "
            f"| {r['stopped_per_question']:.1f} | {qps} |"
        )
    return [*lines, ""]


def load_replays(folders: list[Path]) -> dict[str, list[dict]]:
    """bench/early_stop_replay.py's rows by dataset: every threshold, replayed from one off run."""
    replays: dict[str, list[dict]] = {}
    for folder in folders:
        summary = json.loads((folder / "replay.json").read_text())
        rows = [r for r in summary["rows"] if "tokens_saved" in r]  # the check row has none
        replays.setdefault(summary["dataset"], []).extend(rows)
    return replays


def plot(path: Path, by_dataset: dict[str, list[dict]], replays: dict[str, list[dict]]) -> None:
    """Tokens saved against agreement with off: the live arms as filled markers, a dataset's
    replay (every threshold, no run-to-run noise) as a dashed line of hollow ones behind them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {d: f"C{i}" for i, d in enumerate(sorted({*by_dataset, *replays}))}
    fig, axis = plt.subplots(figsize=(6.5, 4.2))
    for dataset, rows in replays.items():
        for grid in sorted({r["grid"] for r in rows}):
            conf = [r for r in rows if r["grid"] == grid and r["rule"].startswith("confidence-")]
            x = [100 * r["same_answer_as_off"] for r in conf]
            y = [100 * r["tokens_saved"] for r in conf]
            axis.plot(x, y, "o--", mfc="none", alpha=0.6, color=colours[dataset],
                      label=f"{dataset} {grid} confidence, replayed")  # fmt: skip
            for r, xi, yi in zip(conf, x, y, strict=True):
                axis.annotate(r["rule"].removeprefix("confidence-"), (xi, yi), fontsize=7,
                              color=colours[dataset], alpha=0.7)  # fmt: skip
    for dataset, rows in by_dataset.items():
        for grid in sorted({r["grid"] for r in rows}):
            at = [r for r in rows if r["grid"] == grid]
            label, colour = f"{dataset} {grid}", colours[dataset]
            conf = [r for r in at if r["arm"].startswith("confidence-")]
            if conf:
                x = [100 * r["same_answer"] for r in conf]
                y = [100 * r["tokens_saved"] for r in conf]
                axis.plot(x, y, "o-", color=colour, label=f"{label} confidence, live")
                for r, xi, yi in zip(conf, x, y, strict=True):
                    axis.annotate(r["arm"].removeprefix("confidence-"), (xi, yi), fontsize=7)
            for r in at:
                if r["arm"] == "exact":
                    axis.plot(
                        100 * r["same_answer"], 100 * r["tokens_saved"], "*", markersize=12,
                        color=colour, label=f"{label} exact, live",
                    )  # fmt: skip
                if r["arm"] == REPEAT:  # off against itself: the floor of agreement
                    axis.plot(
                        100 * r["same_answer"], 100 * r["tokens_saved"], "x", markersize=9,
                        color=colour, label=f"{label} off again, live",
                    )  # fmt: skip
    axis.set_xlabel("answers identical to off (%)")
    axis.set_ylabel("generated tokens saved against off (%)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("results", type=Path, help="bench/early_stop.sh's folder (datasets)")
    parser.add_argument("--out", type=Path, help="where to write (default: the results folder)")
    parser.add_argument("--replay", type=Path, action="append", default=[], metavar="DIR",
                        help="a bench/early_stop_replay.py folder whose thresholds the plot "
                        "draws behind the live arms (repeatable)")  # fmt: skip
    args = parser.parse_args(argv)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    datasets = sorted(p for p in args.results.iterdir() if (p / REFERENCE).is_dir())
    if not datasets:
        raise SystemExit(f"{args.results}: no dataset folder with an `{REFERENCE}` arm")
    by_dataset = {d.name: summarise_dataset(d) for d in datasets}
    lines = ["# Early stopping against off (same questions, grid, seeds)", ""]
    for dataset, rows in by_dataset.items():
        lines += table(dataset, rows)
    (out / "report.md").write_text("\n".join(lines))
    (out / "early_stop.json").write_text(json.dumps(by_dataset, indent=2) + "\n")
    plot(out / "early_stop.png", by_dataset, load_replays(args.replay))
    print("\n".join(lines))
    print(f"wrote {out / 'report.md'}, {out / 'early_stop.png'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
