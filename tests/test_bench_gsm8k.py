"""`ivonserve bench gsm8k` against the live tiny server: results, accuracy, resume, errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import bench_args, read_records

from ivonserve.bench import gsm8k

QUESTIONS = [
    {"question": "What is 2 + 3?", "answer": "2 + 3 = 5\n#### 5"},
    {"question": "Half of 48?", "answer": "48 / 2 = 24\n#### 24"},
    {"question": "A dozen eggs cost $1,200 in Wonderland?", "answer": "#### 1,200"},
]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "three.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def _args(url: str, data: Path, out: Path, *extra: str):
    return bench_args("gsm8k", url, data, out, "--grid", "0x1,2x2", "--max-tokens", "8", *extra)


def test_results_fields_and_accuracy_from_the_records(live, data, tmp_path):
    out = tmp_path / "run"
    results = asyncio.run(gsm8k.run(_args(live.url, data, out)))
    assert results == json.loads((out / "results.json").read_text())
    assert {p["grid"] for p in results["points"]} == {"0x1", "2x2"}
    records = read_records(out)
    assert len(records) == 6
    assert {r["gold"] for r in records} == {"5", "24", "1200"}
    for point in results["points"]:
        rows = [r for r in records if r["grid"] == point["grid"]]
        assert point["accuracy"] == sum(r["correct"] for r in rows) / 3
        assert point["completion_tokens"] == sum(r["completion_tokens"] for r in rows)
        assert point["candidates"] == (1 if point["grid"] == "0x1" else 4)
        low, high = point["accuracy_ci95"]
        assert 0 <= low <= point["accuracy"] <= high <= 1
        assert set(point["latency_s"]) == {"p50", "p95", "p99"}
        assert point["tokens_per_s"] > 0 and point["questions_per_s"] > 0
        assert 0 <= point["calibration"]["ece"] <= 1
    # at most 8 tokens per candidate: 3 questions x 1 (greedy 0x1) or x 4 candidates (2x2)
    tokens = {p["grid"]: p["completion_tokens"] for p in results["points"]}
    assert 0 < tokens["0x1"] <= 24 and 24 < tokens["2x2"] <= 96
    for name in ("report.md", "accuracy.png", "reliability.png"):
        assert (out / name).stat().st_size > 0


def test_rerun_skips_finished_questions(live, data, tmp_path):
    out = tmp_path / "resume"
    asyncio.run(gsm8k.run(_args(live.url, data, out)))
    first = read_records(out)
    # A killed run: the last answer never made it to disk.
    lines = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text("\n".join(lines[:-1]) + "\n")
    results = asyncio.run(gsm8k.run(_args(live.url, data, out)))
    again = read_records(out)
    assert len(again) == 6
    assert again[:5] == first[:5]  # untouched: those were not asked again
    assert (again[5]["grid"], again[5]["index"]) == (first[5]["grid"], first[5]["index"])
    # Throughput needs a full run of a point; the resumed point reports none.
    resumed = {p["grid"]: p for p in results["points"]}
    assert "tokens_per_s" not in resumed[first[5]["grid"]]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ivonserve", "bench", "gsm8k", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.slow
def test_bad_url_and_bad_data_are_one_line_errors(data, tmp_path):
    run = _cli("--url", "http://127.0.0.1:9", "--data", str(data), "--out", str(tmp_path / "o"))
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0 and "cannot reach the server" in run.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "no answer"}\n')
    run = _cli("--data", str(bad), "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and "bad.jsonl:1: expected a JSON object" in run.stderr
    run = _cli("--data", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and "missing.jsonl: data file not found" in run.stderr
    run = _cli("--data", str(data), "--grid", "4by8", "--out", str(tmp_path / "o"))
    assert run.returncode == 2 and "--grid: '4by8' is not MODELSxSAMPLES" in run.stderr


def test_model_reaches_the_named_posterior_and_an_unknown_one_is_one_line(live, data, tmp_path):
    out = tmp_path / "adapter"
    results = asyncio.run(gsm8k.run(_args(live.url, data, out, "--model", "tiny-mean",
                                          "--label", "adamw-like")))  # fmt: skip
    assert results["model"] == "tiny-mean" and results["label"] == "adamw-like"
    assert results["server"]["kind"] == "adapter"
    assert {r["model"] for r in read_records(out)} == {"tiny-mean"}  # who answered, says the server
    assert results["dataset"] == data.parent.name
    assert "# " + data.parent.name in (out / "report.md").read_text()
    run = subprocess.run(
        [sys.executable, "-m", "ivonserve", "bench", "gsm8k", "--url", live.url, "--data",
         str(data), "--model", "nope", "--out", str(tmp_path / "x"), "--no-progress"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert "--model 'nope': not served" in run.stderr


def _fake_run(folder: Path, label: str, grid: str, correct: list[bool]) -> Path:
    folder.mkdir(parents=True)
    records = [{"grid": grid, "model": label, "index": i, "gold": "1", "answer": "1",
                "correct": c, "confidence": 0.9 if c else 0.6, "completion_tokens": 10 + i,
                "latency_s": 1.0} for i, c in enumerate(correct)]  # fmt: skip
    (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    results = {"label": label, "model": label, "dataset": "svamp", "data": "svamp/test.jsonl",
               "points": [{"grid": grid}]}  # fmt: skip
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_mcnemar_on_hand_made_cases():
    from ivonserve.bench.stats import mcnemar_exact

    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(5, 5) == 1.0
    assert mcnemar_exact(0, 6) == pytest.approx(2 / 64)  # 2 * (1/2)^6
    assert mcnemar_exact(1, 9) == pytest.approx(2 * 11 / 1024)  # 2 * (C(10,0)+C(10,1)) / 2^10
    assert mcnemar_exact(9, 1) == mcnemar_exact(1, 9)


def test_compare_recomputes_the_table_from_the_records(tmp_path):
    from ivonserve.cli import main

    a = _fake_run(tmp_path / "ivon", "ivon", "4x8", [True] * 8 + [False] * 2)
    b = _fake_run(tmp_path / "adamw", "adamw", "0x32", [True, False] * 5)
    assert main(["bench", "compare", str(a), str(b), "--out", str(tmp_path / "cmp")]) == 0
    result = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    arms = {x["arm"]: x for x in result["arms"]}
    assert arms["ivon 4x8"]["accuracy"] == 0.8 and arms["adamw 0x32"]["accuracy"] == 0.5
    assert (
        arms["ivon 4x8"]["candidates"] == 32 and arms["adamw 0x32"]["tokens_per_question"] == 14.5
    )
    (pair,) = result["pairs"]
    # ivon right and adamw wrong on questions 1, 3, 5, 7; the reverse on 8 (9: both wrong)
    assert (pair["only_a"], pair["only_b"]) == (4, 1)
    assert pair["p_mcnemar"] == pytest.approx(2 * (1 + 5) / 32)
    report = (tmp_path / "cmp" / "report.md").read_text()
    assert report.startswith("# svamp") and "| ivon 4x8 | adamw 0x32 | 10 | 4 | 1 |" in report
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 0
