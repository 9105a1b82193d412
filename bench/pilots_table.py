"""The pilots' validation figures as one table (bench/pilots.sh calls it): per run, its
optimizer, lr, ess, final training loss, and the validation figures of the trained weights
(AdamW) or of the IVON mean and its predictive of draws: accuracy / NLL / ECE / Brier (multiple
choice) or NLL per answer token and per question (question/answer data); the winner of each
optimizer by validation NLL (IVON: of its largest predictive, which is what the server serves).

    .venv/bin/python bench/pilots_table.py bench/results/mc-pilots/arc-easy-text
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def rows(folder: Path) -> list[dict]:
    out = []
    for run in sorted(p for p in folder.iterdir() if (p / "validation.json").is_file()):
        validation = json.loads((run / "validation.json").read_text())
        summary = json.loads(
            (
                run / ("posterior.json" if (run / "posterior.json").exists() else "training.json")
            ).read_text()
        )
        summary = summary.get("training", summary)
        arms = validation["arms"]
        chosen = "adamw" if "adamw" in arms else max(a for a in arms if a.startswith("bma"))
        out.append({
            "run": run.name,
            "optimizer": summary["optimizer"],
            "lr": summary["lr"],
            "ess": summary["config"]["ess"] if summary["optimizer"] == "ivon" else None,
            "steps": summary["steps"],
            "seconds": summary["seconds"],
            "final_loss": summary["final_loss_mean10"],
            "questions": validation["questions"],
            "arms": arms,
            "selection_arm": chosen,
            "selection_nll": arms[chosen].get("nll", arms[chosen].get("nll_per_token")),
        })  # fmt: skip
    return out


def table(runs: list[dict]) -> str:
    mc = all("nll" in v for r in runs for v in r["arms"].values())
    if mc:
        lines = [
            "| run | steps | loss (last 10) | arm | accuracy | NLL | ECE | Brier |",
            "|---|---|---|---|---|---|---|---|",
        ]
    else:
        lines = [
            "| run | steps | loss (last 10) | arm | NLL / answer token | NLL / question |",
            "|---|---|---|---|---|---|",
        ]
    for r in runs:
        for arm, v in r["arms"].items():
            mark = " **(selection)**" if arm == r["selection_arm"] else ""
            head = f"| {r['run']} | {r['steps']} | {r['final_loss']:.3f} | {arm}{mark} "
            if mc:
                lines.append(
                    head + f"| {v['accuracy']:.3f} | {v['nll']:.4f} | {v['ece']:.3f} "
                    f"| {v['brier']:.4f} |"
                )
            else:
                lines.append(head + f"| {v['nll_per_token']:.4f} | {v['nll_per_question']:.2f} |")
    best = {}
    for r in runs:
        if r["optimizer"] not in best or r["selection_nll"] < best[r["optimizer"]]["selection_nll"]:
            best[r["optimizer"]] = r
    lines += [""] + [
        f"Chosen for {opt} (lowest validation NLL of its {r['selection_arm']} arm): "
        f"**{r['run']}** (NLL {r['selection_nll']:.4f})."
        for opt, r in sorted(best.items())
    ]
    return "\n".join(lines) + "\n"


def best_ivon_lr(runs: list[dict]) -> str:
    """The lr (as the run's name spells it) of the best IVON run at ess 1e6."""
    ivon = [r for r in runs if r["optimizer"] == "ivon" and r["ess"] == 1e6]
    best = min(ivon, key=lambda r: r["selection_nll"])
    return best["run"].split("-")[1].removeprefix("lr")


def main(folder: str, *flags: str) -> None:
    path = Path(folder)
    runs = rows(path)
    if "--best-ivon-lr" in flags:
        print(best_ivon_lr(runs))
        return
    (path / "pilots.json").write_text(json.dumps(runs, indent=2) + "\n")
    text = table(runs)
    (path / "pilots.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main(*sys.argv[1:])
