"""`ivonserve bench tts`: the test-time-scaling replay of candidate banks, and the banks.

The hand-made banks are small enough that every figure is worked out in the comments: the
utility is token F1 (SQuAD's: shared words over the lengths), so each pair is a fraction.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ivonserve.bench import gsm8k, tts
from ivonserve.bench.bank import BANK, PACKED, load_bank, open_bank, pack_records
from ivonserve.bench.common import GridPoint
from ivonserve.bench.gsm8k import text_digest
from ivonserve.bench.stats import accuracy_at_coverage, auroc, mcnemar_exact
from ivonserve.cli import build_parser, main
from ivonserve.errors import IvonserveError

# Question 0 of the posterior bank, 2 draws x 2 samples: [draw, sample, tokens, logprob, text].
# Words per text (the number counts as a word): c0 blue blue 3 | c1 red green 3 |
# c2 green green 1 | c3 blue green green 2. Token F1 of each pair (shared / lengths):
#   u01 = 1/3 (3)   u02 = 0   u03 = 2/7 (blue: P 1/3, R 1/4)   u12 = 1/3 (green)
#   u13 = 2/7 (green: P 1/3, R 1/4)   u23 = 4/7 (green green: P 2/3, R 1/2)
# majority: answers 3, 3, 1, 2 -> 3 (share 1/2)
# flat (Eq. 9), mean of each row with itself: c0 34/84, c1 41/84, c2 40/84, c3 45/84 -> c3: 2
# model (Eq. 10), per draw: s0(c0) = s0(c1) = (1 + 1/3)/2 = 2/3, s1(c2) = s1(c3) = (1 + 4/7)/2
#   = 11/14; c2 and c3 tie, and the higher log-probability per token wins: c2 (-0.15 against
#   -0.3) -> 1, confidence (s0(c2) + s1(c2))/2 = ((0 + 1/3)/2 + 11/14)/2 = 40/84
Q0 = [
    [0, 0, 10, -1.0, "blue blue 3"],
    [0, 1, 20, -4.0, "red green 3"],
    [1, 0, 30, -4.5, "green green 1"],
    [1, 1, 40, -12.0, "blue green green 2"],
]
# Question 1: every candidate says 5 (5 tokens each).
Q1 = [[d, s, 5, -1.0, "red 5"] for d in range(2) for s in range(2)]
SETTINGS = {
    "dataset": "hand",
    "data": "hand.jsonl",
    "temperature": 0.7,
    "max_tokens": 64,
    "seed": 0,
    "selection": "model",
    "utility": "answer",
    "early_stop": None,
    "early_stop_threshold": None,
}
SERVED = {"kind": "posterior", "base_model": "hand", "ess": 1e7, "pool_seed": 0,
          "posterior_temperature": 1.0, "prune": 0.0, "prune_by": "variance"}  # fmt: skip


def _write_bank(folder: Path, model: str, grid: str, questions: list[tuple], **settings) -> Path:
    """A bank as `bench gsm8k --candidates` writes one: bank.json and records.jsonl. questions:
    (gold, candidates, served answer) per question; the served text is the first candidate's
    with the served answer (what the check compares)."""
    folder.mkdir(parents=True)
    manifest = {"format": "ivonserve-candidate-bank", "version": 1, "runs": [],
                "settings": {**SETTINGS, "model": model, "grid": grid, **settings,
                             "served": SERVED}}  # fmt: skip
    (folder / BANK).write_text(json.dumps(manifest))
    lines = []
    for index, (gold, candidates, served) in enumerate(questions):
        rows = [[d if grid[0] != "0" else None, s, t, lp, "stop", text, None]
                for d, s, t, lp, text in candidates]  # fmt: skip
        served_text = next(c[4] for c in candidates if c[4].endswith(" " + served))
        digest = text_digest(served_text)
        lines.append({"grid": grid, "index": index, "gold": gold, "answer": served,
                      "text_sha": digest, "seed": index, "candidates": rows})  # fmt: skip
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


@pytest.fixture
def banks(tmp_path: Path) -> dict[str, Path]:
    # the posterior: 2 x 2; its served answers (model, answer): 3 (c0: the tie of c0 and c1 goes
    # to the higher log-probability per token, -0.1) and 5
    posterior = _write_bank(tmp_path / "post", "ivon", "2x2",
                            [("2", Q0, "3"), ("5", Q1, "5")])  # fmt: skip
    # the mean: 0 x 4. Question 0: two say 2, two say 7 -> every selector picks 2 (the tie goes
    # to -0.1 per token); question 1: every sample says 6, wrong.
    mean_q0 = [[0, 0, 10, -1.0, "red 2"], [0, 1, 10, -3.0, "blue 7"],
               [0, 2, 10, -2.0, "red 2"], [0, 3, 10, -3.0, "green 7"]]  # fmt: skip
    mean_q1 = [[0, s, 8, -1.0, "blue 6"] for s in range(4)]
    mean = _write_bank(tmp_path / "mean", "ivon", "0x4", [("2", mean_q0, "2"), ("5", mean_q1, "6")])
    return {"post": posterior, "mean": mean}


SELECTORS = [tts.Selector.parse(s) for s in ("majority", "flat:token_f1", "model:token_f1")]


def _replay(banks: dict[str, Path]) -> dict:
    loaded = [load_bank(banks["post"]), load_bank(banks["mean"])]
    return tts.replay(loaded, SELECTORS, "mean", [], [GridPoint(2, 2)], seed=0)


def _point(results: dict, bank: str, split: str, selector: str) -> dict:
    (point,) = [p for p in results["points"]
                if (p["bank"], p["split"], p["selector"]) == (bank, split, selector)]  # fmt: skip
    return point


def test_three_selectors_pick_three_answers_and_a_nested_split_changes_the_pick(banks):
    bank = load_bank(banks["post"])
    record = bank.records[0]
    full, one_draw = GridPoint(2, 2), GridPoint(1, 2)
    picks = {s.label: tts.select(tts.split_candidates(record, full), s) for s in SELECTORS}
    assert {k: v.answer for k, v in picks.items()} == {
        "majority": "3", "flat:token_f1": "2", "model:token_f1": "1"}  # fmt: skip
    assert picks["majority"].confidence == pytest.approx(1 / 2)
    assert picks["flat:token_f1"].confidence == pytest.approx(45 / 84)
    assert picks["model:token_f1"].confidence == pytest.approx(40 / 84)
    assert picks["flat:token_f1"].scores == pytest.approx([34 / 84, 41 / 84, 40 / 84, 45 / 84])
    # nested: the first draw alone (c0, c1) says 3 under every selector; flat's 2 was draw 1's
    first = tts.split_candidates(record, one_draw)
    assert [c[5] for c in first] == ["blue blue 3", "red green 3"]
    assert tts.select(first, SELECTORS[1]).answer == "3"
    # the split a budget holds: K x S = B, nested prefixes of the bank
    assert [s.label for s in tts.bank_splits(bank)] == ["1x1", "1x2", "2x1", "2x2"]
    assert [s.label for s in tts.bank_splits(load_bank(banks["mean"]))] == ["0x1", "0x2", "0x4"]


def test_every_figure_of_the_replay_by_hand(banks):
    results = _replay(banks)
    assert results["questions"] == 2
    # posterior 2x2: question 1 is right under every selector; question 0 (gold 2) only by flat
    assert _point(results, "post", "2x2", "majority")["accuracy"] == 0.5
    assert _point(results, "post", "2x2", "flat:token_f1")["accuracy"] == 1.0
    assert _point(results, "post", "2x2", "model:token_f1")["accuracy"] == 0.5
    # tokens per question: (10 + 20 + 30 + 40 + 4 x 5) / 2 = 60; at 1x2: (10 + 20 + 5 + 5) / 2
    assert _point(results, "post", "2x2", "majority")["tokens_per_question"] == 60
    assert _point(results, "post", "1x2", "majority")["tokens_per_question"] == 20
    # the mean 0x4: question 0 right (2), question 1 wrong (6): 0.5 under every selector
    for selector in ("majority", "flat:token_f1", "model:token_f1"):
        assert _point(results, "mean", "0x4", selector)["accuracy"] == 0.5
    # paired with the mean's 0x4 at B = 4. majority: post wrong/right, mean right/wrong on
    # questions 0/1: diff 0, one question each way, McNemar p = 1; flat: post right on both,
    # mean on question 0 only: +0.5, (1, 0), p = 2 * (1/2)^1 = 1
    versus = _point(results, "post", "2x2", "majority")["vs_baseline"]
    assert (versus["diff"], versus["a_only"], versus["b_only"]) == (0.0, 1, 1)
    assert versus["p_mcnemar"] == 1.0
    versus = _point(results, "post", "2x2", "flat:token_f1")["vs_baseline"]
    assert (versus["diff"], versus["a_only"], versus["b_only"]) == (0.5, 1, 0)
    # 1x1 (B = 1) pairs with the mean's 0x1: c0 says 3 (wrong) and red 5 (right) against red 2
    # (right) and blue 6 (wrong)
    versus = _point(results, "post", "1x1", "majority")["vs_baseline"]
    assert (versus["a_only"], versus["b_only"]) == (1, 1)
    # the confidence: majority at 2x2 is 1/2 on question 0 (wrong) and 1 on question 1 (right):
    # AUROC 1, ECE over 10 bins = (|0 - 1/2| + |1 - 1|) / 2 = 1/4; the most confident half is
    # question 1 alone: accuracy 1 at 50% coverage
    confidence = _point(results, "post", "2x2", "majority")["confidence"]
    assert confidence["auroc"] == 1.0 and confidence["ece"] == pytest.approx(0.25)
    assert confidence["accuracy_at_50"] == 1.0
    # the served check: model/answer at full size gives back what the server chose
    assert {c["bank"]: c["same_as_served"] for c in results["checks"]} == {"post": 1.0, "mean": 1.0}
    # the comparison table: the posterior at 2x2 against the mean at its full size
    (row,) = [r for r in results["headline"] if (r["bank"], r["selector"]) == ("post", "majority")]
    assert row["split"] == "2x2" and set(row["versus"]) == {"mean 0x4"}


def test_the_statistics_on_hand_made_cases():
    # AUROC: right answers at 0.9 and 0.5, wrong at 0.5 and 0.1: pairs (0.9 > 0.5, 0.9 > 0.1,
    # 0.5 = 0.5 counts half, 0.5 > 0.1) -> 3.5 / 4
    assert auroc([0.9, 0.5, 0.5, 0.1], [1, 1, 0, 0]) == 0.875
    assert auroc([0.5, 0.6], [1, 1]) is None
    # coverage 50% of 4: the two most confident (0.9 right, 0.8 wrong) -> 0.5
    assert accuracy_at_coverage([0.9, 0.8, 0.2, 0.1], [1, 0, 1, 1], 0.5) == 0.5
    # ties at the cut count in proportion: 3 of 4 tied at 0.5 (right, wrong, wrong), 50% covers
    # 0.9 (right) and one of the tied, worth 1/3 on average -> (1 + 1/3) / 2
    assert accuracy_at_coverage([0.9, 0.5, 0.5, 0.5], [1, 1, 0, 0], 0.5) == pytest.approx(2 / 3)
    assert mcnemar_exact(1, 0) == 1.0 and mcnemar_exact(0, 4) == pytest.approx(2 / 16)


def test_cli_writes_report_and_plot(banks, tmp_path):
    out = tmp_path / "replay"
    argv = ["bench", "tts", str(banks["post"]), str(banks["mean"]), "--out", str(out),
            "--selectors", "majority,flat:token_f1", "--headline-splits", "2x2,1x2"]  # fmt: skip
    assert main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["selectors"] == ["majority", "flat:token_f1"] and results["baseline"] == "mean"
    assert {r["split"] for r in results["headline"] if r["bank"] == "post"} == {"2x2", "1x2"}
    report = (out / "report.md").read_text()
    assert "| post | 2x2 | flat:token_f1 | 100.0 [100.0, 100.0] | 60 |" in report
    assert (out / "accuracy.png").stat().st_size > 0


def test_a_bank_that_mixes_runs_is_refused_naming_the_folder(banks, tmp_path):
    lines = (banks["post"] / "records.jsonl").read_text().splitlines()
    other = json.loads(lines[1])
    other["seed"] = 99  # a record of another run
    (banks["post"] / "records.jsonl").write_text(lines[0] + "\n" + json.dumps(other) + "\n")
    with pytest.raises(IvonserveError, match=r"post: record 2 \(question 1\) has seed 99, the "
                       r"bank's is 1 \(seed 0 \+ index\): records of another run"):  # fmt: skip
        load_bank(banks["post"])
    # a run with other settings into the same folder is refused before it asks anything
    settings = json.loads((banks["mean"] / BANK).read_text())["settings"]
    with pytest.raises(IvonserveError, match=r"mean: temperature is 0.7 here, 0.8 asked"):
        open_bank(banks["mean"], {**settings, "temperature": 0.8}, "cmd", 2)
    # banks of other questions are not compared
    elsewhere = _write_bank(tmp_path / "other", "ivon", "0x4", [("2", Q1, "5")], max_tokens=32)
    with pytest.raises(IvonserveError, match=r"other: max_tokens is 32, .*mean's is 64"):
        tts.check_banks([load_bank(banks["mean"]), load_bank(elsewhere)])
    argv = [sys.executable, "-m", "ivonserve", "bench", "tts", str(banks["post"]), "--out", "x"]
    run = subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path)
    assert run.returncode == 2 and run.stderr.count("\n") == 1 and "post: record 2" in run.stderr


def test_packed_records_resume_where_they_stopped(banks):
    folder = banks["mean"]
    before = load_bank(folder).records
    packed = pack_records(folder)
    assert packed.name == PACKED and pack_records(folder).read_bytes() == packed.read_bytes()
    (folder / "records.jsonl").unlink()  # a fresh checkout: only the .gz is committed
    assert load_bank(folder).records == before
    settings = json.loads((folder / BANK).read_text())["settings"]
    open_bank(folder, settings, "ivonserve bench gsm8k ...", 2)  # the resumed run unpacks it
    assert (folder / "records.jsonl").read_bytes() == gzip.decompress(packed.read_bytes())
    runs = json.loads((folder / BANK).read_text())["runs"]
    assert [r["command"] for r in runs] == ["ivonserve bench gsm8k ..."]
    # another machine keeps the same base model in another folder: it resumes; another model not
    moved = {**settings, "served": {**SERVED, "base_model": "/home/me/.cache/ivonserve/hand"}}
    open_bank(folder, moved, "elsewhere", 2)
    other = {**settings, "served": {**SERVED, "base_model": "/home/me/.cache/ivonserve/other"}}
    with pytest.raises(IvonserveError, match=r"mean: served.base_model is 'hand' here, 'other'"):
        open_bank(folder, other, "elsewhere", 2)


def test_a_real_bank_replayed_at_full_size_gives_the_served_answers(live, tmp_path):
    data = tmp_path / "q.jsonl"
    questions = [("What is 2 + 3?", 5), ("Half of 48?", 24), ("Twice 21?", 42)]
    data.write_text("".join(json.dumps({"question": q, "answer": f"#### {a}"}) + "\n"
                            for q, a in questions))  # fmt: skip
    out = tmp_path / "bank"
    argv = ["bench", "gsm8k", "--url", live.url, "--data", str(data), "--out", str(out),
            "--grid", "2x2", "--max-tokens", "8", "--candidates", "--no-progress",
            "--selection", "model", "--utility", "chrf"]  # fmt: skip
    asyncio.run(gsm8k.run(build_parser().parse_args(argv)))
    bank = load_bank(out)
    assert len(bank.records) == 3 and bank.settings["served"]["kind"] == "posterior"
    for record in bank.records.values():
        assert len(record["candidates"]) == 4 and record["seed"] == record["index"]
        draw, sample, tokens, _, finish, *_ = record["candidates"][0]
        assert (draw, sample) == (0, 0) and 0 < tokens <= 8 and finish in ("stop", "length")
    (check,) = [tts.served_check(bank, sorted(bank.records))]
    assert check == {"bank": "bank", "selector": "model:chrf", "split": "2x2",
                     "same_as_served": 1.0, "questions": 3}  # fmt: skip
    # the same command again asks nothing; other settings into it are refused
    asyncio.run(gsm8k.run(build_parser().parse_args(argv)))
    assert len((out / "records.jsonl").read_text().splitlines()) == 3
    with pytest.raises(IvonserveError, match=r"bank: max_tokens is 8 here, 9 asked"):
        asyncio.run(gsm8k.run(build_parser().parse_args([*argv, "--max-tokens", "9"])))


def test_a_bank_holds_one_grid_point(tmp_path):
    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "2 + 3?", "answer": "#### 5"}) + "\n")
    argv = ["bench", "gsm8k", "--data", str(data), "--out", str(tmp_path / "b"), "--candidates",
            "--grid", "0x1,2x2"]  # fmt: skip
    with pytest.raises(IvonserveError, match="--candidates: a bank holds one grid point"):
        asyncio.run(gsm8k.run(build_parser().parse_args(argv)))
