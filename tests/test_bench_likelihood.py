"""`ivonserve bench likelihood` against the live tiny server: the arms' figures from the records,
the predictive of smaller K from the draws of the largest, resume, labels adding arms, errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import bench_args, read_records

from ivonserve.bench import likelihood
from ivonserve.predictive import sequence_predictive

ROWS = [
    {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    {"question": "Half of 48?", "answer": "48 / 2 = <<48/2=24>>24\n#### 24"},
    {"question": "What is 10 - 7?", "answer": "10 - 7 = 3\n#### 3"},
    {"question": "What is 4 * 6?", "answer": "4 * 6 = 24\n#### 24"},
]


@pytest.fixture
def data(tmp_path: Path) -> Path:
    path = tmp_path / "four.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _args(url: str, data: Path, out: Path, *extra: str):
    return bench_args("likelihood", url, data, out, *extra)


def test_arms_come_from_the_records(live, data, tmp_path):
    out = tmp_path / "run"
    args = _args(live.url, data, out, "--model", "tiny", "--model", "tiny-mean",
                 "--n-models", "0,1,2,4", "--holdout", "3")  # fmt: skip
    results = asyncio.run(likelihood.run(args))
    assert results == json.loads((out / "results.json").read_text())
    assert results["questions"] == 3 and results["holdout"] == 3  # the last three rows
    names = [a["arm"] for a in results["arms"]]
    assert names == ["tiny mean", "tiny K=1", "tiny K=2", "tiny K=4", "tiny-mean mean"]
    records = read_records(out)
    # per model one request at K = 0 and one at the largest K (smaller K are its prefixes)
    assert sorted({(r["model"], r["n_models"]) for r in records}) == [
        ("tiny", 0), ("tiny", 4), ("tiny-mean", 0)
    ]  # fmt: skip
    big = {r["index"]: r for r in records if r["n_models"] == 4}
    for arm in results["arms"]:
        if arm["model"] == "tiny" and arm["k"] > 0:
            ll = [sequence_predictive(big[i]["draws"][: arm["k"]]) for i in range(3)]
            tokens = sum(big[i]["tokens"] for i in range(3))
            assert arm["nll_per_token"] == pytest.approx(-sum(ll) / tokens)
            assert arm["nll_per_question"] == pytest.approx(-np.mean(ll))
        low, high = arm["nll_per_token_ci95"]
        assert low <= arm["nll_per_token"] <= high
    assert len(results["pairs"]) == 10  # every two of five arms
    pair = next(p for p in results["pairs"] if (p["a"], p["b"]) == ("tiny mean", "tiny K=4"))
    by_name = {a["arm"]: a for a in results["arms"]}
    expected = by_name["tiny mean"]["nll_per_token"] - by_name["tiny K=4"]["nll_per_token"]
    assert pair["nll_per_token_diff"] == pytest.approx(expected)
    for name in ("report.md", "nll.png"):
        assert (out / name).stat().st_size > 0


def test_a_rerun_resumes_and_a_label_adds_arms(live, data, tmp_path):
    out = tmp_path / "resume"
    asyncio.run(likelihood.run(_args(live.url, data, out, "--n-models", "0,2")))
    first = read_records(out)
    lines = (out / "records.jsonl").read_text().splitlines()
    torn = lines[-1][: len(lines[-1]) // 2]  # a run killed mid-write: no newline
    (out / "records.jsonl").write_text("\n".join(lines[:-1]) + "\n" + torn)
    asyncio.run(likelihood.run(_args(live.url, data, out, "--n-models", "0,2")))
    again = read_records(out)
    assert len(again) == len(first) and again[:-1] == first[:-1]
    results = asyncio.run(
        likelihood.run(_args(live.url, data, out, "--n-models", "1", "--label", "other"))
    )
    names = [a["arm"] for a in results["arms"]]
    assert names == ["tiny mean", "tiny K=2", "other/tiny K=1"]
    assert set(results["servers"]) == {"-", "other"}


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ivonserve", "bench", "likelihood", "--no-progress", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_bad_url_data_or_model_is_one_line_and_exit_2(live, data, tmp_path):
    out = str(tmp_path / "o")
    cases = [
        (("--url", "http://127.0.0.1:9", "--data", str(data)), "cannot reach the server"),
        (("--data", str(tmp_path / "missing.jsonl")), "missing.jsonl: data file not found"),
        (("--url", live.url, "--data", str(data), "--model", "nope"), "--model 'nope'"),
        (("--url", live.url, "--data", str(data), "--n-models", "0,99"), "has a pool of"),
        (("--url", live.url, "--data", str(data), "--n-models", "x"), "--n-models"),
    ]
    for argv, message in cases:
        run = _cli(*argv, "--out", out)
        assert run.returncode == 2, (argv, run.stderr)
        assert run.stderr.count("\n") == 1 and message in run.stderr, run.stderr
