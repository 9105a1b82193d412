"""bench/early_stop_replay.py: the stopping rules replayed on an `off` run's candidates, by hand
and on records the GSM8k client took from the live server (`bench gsm8k --candidates`)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from conftest import bench_script, read_records

from ivonserve.bench import gsm8k
from ivonserve.cli import build_parser
from ivonserve.mbr.stopping import StopPolicy

replay = bench_script("early_stop_replay")


def _record(answers_and_tokens: list[tuple[str, int]], n_samples: int) -> dict:
    return {
        "grid": f"{len(answers_and_tokens) // n_samples}x{n_samples}",
        "candidates": [
            [i // n_samples, i % n_samples, tokens, -0.1 * tokens, "stop", f"The answer is {a}."]
            for i, (a, tokens) in enumerate(answers_and_tokens)
        ],
    }


def test_confidence_stops_at_the_fourth_unanimous_finish():
    # 2 draws x 4: four short "7"s finish first (steps 10-13), then "3"s and a "7" (50-80)
    row = _record([("7", 10), ("3", 60), ("7", 11), ("3", 70), ("7", 12), ("7", 13),
                   ("3", 80), ("7", 50)], n_samples=4)  # fmt: skip
    # 4 of 4 agree: P(Beta(5, 1) > 1/2) = 1 - 2^-5 = 0.969 >= 0.95, so it fires at step 13
    got = replay.replay(row, StopPolicy("confidence", 0.95, 4), "model", 256)
    assert (got.answer, got.steps, got.stopped) == ("7", 13, 4)
    assert got.tokens == 10 + 11 + 12 + 13 + 4 * 13
    # at 0.99 it needs 6 of 6 (1 - 2^-7); the fifth finish (step 50) is a 7, the sixth a 3: never
    late = replay.replay(row, StopPolicy("confidence", 0.99, 4), "model", 256)
    assert (late.answer, late.stopped, late.tokens) == ("7", 0, 306)
    off = replay.replay(row, StopPolicy("off"), "model", 256)
    assert (off.answer, off.steps, off.tokens) == ("7", 80, 306)


def test_replayed_off_selects_what_the_server_chose(live, tmp_path: Path):
    data = tmp_path / "q.jsonl"
    data.write_text(
        "".join(
            json.dumps({"question": f"What is {i} + {i}?", "answer": f"#### {2 * i}"}) + "\n"
            for i in range(4)
        )
    )
    out = tmp_path / "off"
    argv = ["bench", "gsm8k", "--url", live.url, "--data", str(data), "--out", str(out),
            "--grid", "2x3", "--max-tokens", "12", "--early-stop", "off", "--candidates",
            "--selection", "flat", "--no-progress"]  # fmt: skip
    asyncio.run(gsm8k.run(build_parser().parse_args(argv)))
    rows = read_records(out)
    for row in rows:
        assert len(row["candidates"]) == 6
        assert sum(c[2] for c in row["candidates"]) == row["completion_tokens"]
    summary = replay.summarise(out, [0.8, 0.95], 2)
    (check,) = [r for r in summary["rows"] if r["rule"].startswith("check")]
    assert check["same_answer_as_off"] == 1.0 and check["questions"] == 4
    replay.write(out, summary)
    table = (out / "replay.md").read_text()
    assert "confidence-0.95" in table and (out / "replay.png").stat().st_size > 0
