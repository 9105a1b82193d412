"""The pilots' validation figures as one table (bench/mc_pilots.sh calls it): per run, its
optimizer, lr, ess, final training loss, and accuracy / NLL / ECE / Brier of the trained weights
(AdamW) or of the IVON mean and its 4-draw predictive, on the validation slice; the winner of
each optimizer by validation NLL (IVON: of the predictive, which is what the server serves).

    .venv/bin/python bench/mc_pilots_table.py bench/results/mc-pilots/arc-easy
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
            "selection_nll": arms[chosen]["nll"],
        })  # fmt: skip
    return out


def table(runs: list[dict]) -> str:
    lines = [
        "| run | steps | loss (last 10) | arm | accuracy | NLL | ECE | Brier |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        for arm, v in r["arms"].items():
            mark = " **(selection)**" if arm == r["selection_arm"] else ""
            lines.append(
                f"| {r['run']} | {r['steps']} | {r['final_loss']:.3f} | {arm}{mark} "
                f"| {v['accuracy']:.3f} | {v['nll']:.4f} | {v['ece']:.3f} | {v['brier']:.4f} |"
            )
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
