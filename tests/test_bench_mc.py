"""`ivonserve bench mc` against the live tiny server: the arms' metrics from the records (the
predictive of smaller K from the draws of the largest), 2- to 5-choice questions, resume,
temperature scaling fitted on a validation folder, the report files and errors."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import bench_args, read_records
from tiny import MC_ROWS, write_mc_data

from ivonserve import calibration
from ivonserve.bench import mc


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return write_mc_data(tmp_path / "mc.jsonl")


def _args(url: str, data: Path, out: Path, *extra: str):
    return bench_args("mc", url, data, out, *extra)


def test_arms_metrics_come_from_the_records(live, data, tmp_path):
    out = tmp_path / "run"
    args = _args(live.url, data, out, "--model", "tiny", "--model", "tiny-mean",
                 "--n-models", "0,1,2,4", "--dataset", "tiny-mc")  # fmt: skip
    results = asyncio.run(mc.run(args))
    assert results == json.loads((out / "results.json").read_text())
    assert results["dataset"] == "tiny-mc" and results["questions"] == len(MC_ROWS)
    assert results["ece_bins"] == 15
    names = [a["arm"] for a in results["arms"]]
    assert names == ["tiny mean", "tiny K=1", "tiny K=2", "tiny K=4", "tiny-mean mean"]
    records = read_records(out)
    assert sorted({(r["model"], r["n_models"]) for r in records}) == [
        ("tiny", 0), ("tiny", 4), ("tiny-mean", 0)
    ]  # fmt: skip
    assert {len(r["choice_logprobs"][0]) for r in records} == {2, 3, 4, 5}
    big = {r["index"]: r for r in records if r["n_models"] == 4}
    labels = [row["label"] for row in MC_ROWS]
    for arm in results["arms"]:
        if arm["model"] == "tiny" and arm["k"] > 0:
            probs = [
                calibration.predictive(
                    [calibration.softmax_over(d) for d in big[i]["choice_logprobs"][: arm["k"]]]
                )
                for i in range(len(MC_ROWS))
            ]
            values = calibration.per_question(probs, labels)
            assert arm["nll"] == pytest.approx(values.nll.mean())
            assert arm["accuracy"] == pytest.approx(values.correct.mean())
            assert arm["brier"] == pytest.approx(values.brier.mean())
            assert arm["ece"] == pytest.approx(calibration.ece(values.confidence, values.correct))
        for metric in mc.METRICS:
            low, high = arm[f"{metric}_ci95"]
            assert low <= arm[metric] + 1e-12 and arm[metric] <= high + 1e-12
    assert len(results["pairs"]) == 10
    pair = next(p for p in results["pairs"] if (p["a"], p["b"]) == ("tiny mean", "tiny K=4"))
    by_name = {a["arm"]: a for a in results["arms"]}
    assert pair["nll_diff"] == pytest.approx(
        by_name["tiny mean"]["nll"] - by_name["tiny K=4"]["nll"]
    )
    report = (out / "report.md").read_text()
    assert "tiny-mc" in report and "| tiny K=4 |" in report
    assert (out / "reliability.png").read_bytes()[:4] == b"\x89PNG"


def test_a_rerun_resumes_and_temperature_scaling_is_fitted_on_validation(live, data, tmp_path):
    validation, out = tmp_path / "validation", tmp_path / "test"
    asyncio.run(mc.run(_args(live.url, data, validation, "--n-models", "0", "--holdout", "3")))
    asyncio.run(mc.run(_args(live.url, data, out, "--n-models", "0,2")))
    first = read_records(out)
    lines = (out / "records.jsonl").read_text().splitlines()
    (out / "records.jsonl").write_text("\n".join(lines[:-1]) + "\n")  # a killed run
    again = _args(live.url, data, out, "--n-models", "0,2", "--fit-temperature", str(validation))
    results = asyncio.run(mc.run(again))
    assert len(read_records(out)) == len(first)
    scaled = [a for a in results["arms"] if a["temperature"] is not None]
    # the mean's fitted temperature, and the predictive with each draw scaled by it
    assert [a["k"] for a in scaled] == [0, 2] and "+TS(T=" in scaled[0]["arm"]
    assert scaled[0]["temperature"] == scaled[1]["temperature"]
    rows = read_records(validation)
    gold = {i: row["label"] for i, row in enumerate(MC_ROWS[-3:])}
    expected = calibration.fit_temperature(
        [r["choice_logprobs"][0] for r in rows], [gold[r["index"]] for r in rows]
    )
    assert scaled[0]["temperature"] == pytest.approx(expected, rel=1e-3)
    assert np.isfinite(scaled[0]["nll"])


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ivonserve", "bench", "mc", "--no-progress", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_text_form_scores_each_choice_text(live, data, tmp_path):
    out = tmp_path / "text"
    results = asyncio.run(mc.run(_args(live.url, data, out, "--n-models", "0,2", "--form", "text")))
    assert results["form"] == "text" and "answered by text" in (out / "report.md").read_text()
    assert {len(r["choice_logprobs"][0]) for r in read_records(out)} == {2, 3, 4, 5}
    again = _args(live.url, data, out, "--n-models", "0,2", "--form", "letter")
    with pytest.raises(Exception, match="another --form"):
        asyncio.run(mc.run(again))


def test_bad_url_data_or_model_is_one_line_and_exit_2(live, data, tmp_path):
    out = str(tmp_path / "o")
    gsm8k = tmp_path / "gsm8k.jsonl"
    gsm8k.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n")
    cases = [
        (("--url", "http://127.0.0.1:9", "--data", str(data)), "cannot reach the server"),
        (("--data", str(tmp_path / "missing.jsonl")), "missing.jsonl: data file not found"),
        (("--url", live.url, "--data", str(gsm8k)), "gsm8k.jsonl:1: 'choices' must be a list"),
        (("--url", live.url, "--data", str(data), "--model", "nope"), "--model 'nope'"),
        (("--url", live.url, "--data", str(data), "--n-models", "0,99"), "has a pool of"),
    ]
    for argv, message in cases:
        run = _cli(*argv, "--out", out)
        assert run.returncode == 2, (argv, run.stderr)
        assert run.stderr.count("\n") == 1 and message in run.stderr, run.stderr


def test_a_longer_limit_scores_only_the_rest(live, data, tmp_path):
    """The first N questions first, all of them later: the first run's records are reused, and
    a label not run again over all of them leaves the table until it is."""
    out = tmp_path / "run"
    asyncio.run(mc.run(_args(live.url, data, out, "--n-models", "0", "--limit", "3")))
    asyncio.run(mc.run(_args(live.url, data, out, "--n-models", "0", "--limit", "3",
                             "--label", "other")))  # fmt: skip
    results = asyncio.run(mc.run(_args(live.url, data, out, "--n-models", "0")))
    records = read_records(out)
    assert len(records) == len(MC_ROWS) + 3  # the first 3 were not asked again
    assert results["questions"] == len(MC_ROWS) and results["limit"] is None
    assert [a["label"] for a in results["arms"]] == [""]
