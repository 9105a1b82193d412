"""`ivonserve train`: data formatting, answer-only loss, resuming, the AdamW baseline, the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_tiny_model, write_train_data

from ivonserve.answers import gsm8k_answer_to_target
from ivonserve.errors import IvonserveError
from ivonserve.posterior import Posterior
from ivonserve.train import (
    TrainConfig,
    batch_indices,
    encode_example,
    load_examples,
    train,
)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_train_data(tmp_path_factory.mktemp("data") / "train.jsonl")


def _config(data: Path, out: Path, **overrides) -> TrainConfig:
    values = dict(steps=4, batch_size=2, ess=1e4, beta2=0.99, max_length=64, checkpoint_every=2)
    return TrainConfig(data=str(data), out=str(out), **(values | overrides))


def test_gsm8k_answer_becomes_a_final_sentence():
    answer = "Natalia sold 48/2 = <<48/2=24>>24 clips.\nAltogether 48+24 = <<48+24=72>>72.\n#### 72"
    assert gsm8k_answer_to_target(answer) == (
        "Natalia sold 48/2 = 24 clips.\nAltogether 48+24 = 72.\nThe answer is 72."
    )
    assert gsm8k_answer_to_target("#### 1,000") == "The answer is 1,000."


def test_loss_only_on_answer_tokens(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    row = encode_example(tokenizer, "What is 2 + 3?", "The answer is 5.", 256)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True, tokenize=False
    )
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert row["labels"][:n_prompt] == [-100] * n_prompt
    answer = tokenizer.decode(row["labels"][n_prompt:])
    assert answer.startswith("The answer is 5.") and "<|im_end|>" in answer
    assert len(encode_example(tokenizer, "q" * 100, "a" * 100, 16)["input_ids"]) == 16


def test_batches_are_a_function_of_seed_and_step():
    assert batch_indices(10, 3, seed=1, step=4) == batch_indices(10, 3, seed=1, step=4)
    epoch = [i for s in range(3) for i in batch_indices(10, 3, seed=1, step=s)]
    assert len(set(epoch)) == 9  # a permutation: no example twice within an epoch


def test_resumed_run_equals_uninterrupted_run(model_dir, data, tmp_path):
    straight = train(_config(data, tmp_path / "straight"), model_dir, progress=False)
    train(_config(data, tmp_path / "killed", steps=2), model_dir, progress=False)
    resumed = train(_config(data, tmp_path / "killed", steps=4), model_dir, progress=False)
    a, b = Posterior.load(straight), Posterior.load(resumed)
    for key in a.keys:
        assert torch.equal(a.mean[key], b.mean[key]), key
        assert torch.equal(a.hess[key], b.hess[key]), key
    log = [json.loads(ln) for ln in (resumed / "training_log.jsonl").read_text().splitlines()]
    assert [row["step"] for row in log] == [1, 2, 3, 4]
    assert b.training["steps"] == 4


def test_checkpoint_of_another_run_is_refused(model_dir, data, tmp_path):
    train(_config(data, tmp_path / "run", steps=2), model_dir, progress=False)
    with pytest.raises(IvonserveError, match=r"checkpoint of a different run.*ess"):
        train(_config(data, tmp_path / "run", ess=1e5), model_dir, progress=False)


def test_adamw_writes_a_plain_adapter(model_dir, data, tmp_path):
    out = train(_config(data, tmp_path / "adamw", optimizer="adamw"), model_dir, progress=False)
    assert not (out / "hessian.safetensors").exists()
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert any("lora_B" in k and torch.count_nonzero(v) > 0 for k, v in weights.items())
    assert json.loads((out / "training.json").read_text())["lr"] == 2e-4
    assert Posterior.from_adapter(out).num_params == sum(v.numel() for v in weights.values())


def test_bad_data_file_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q"}\n')
    with pytest.raises(IvonserveError, match=r"bad.jsonl:1: expected a JSON object"):
        load_examples(bad)
    with pytest.raises(IvonserveError, match=r"missing.jsonl: training data file not found"):
        load_examples(tmp_path / "missing.jsonl")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ivonserve", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_cli_train_inspect_sample(model_dir, data, tmp_path):
    out = tmp_path / "post"
    run = _cli(
        "train", "--data", str(data), "--out", str(out), "--model", str(model_dir), "--steps", "2",
        "--batch-size", "2", "--ess", "1e4", "--max-length", "64", "--no-progress",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    stats = json.loads(_cli("posterior", "inspect", str(out), "--json").stdout)
    assert stats["ess"] == 1e4 and stats["num_params"] == 7168
    assert 0 < stats["sigma"]["min"] <= stats["sigma"]["median"] <= stats["sigma"]["max"]
    assert set(stats["sigma_by_module"]) == {
        "q_proj.lora_A", "q_proj.lora_B", "v_proj.lora_A", "v_proj.lora_B",
    }  # fmt: skip
    assert "sigma (all)" in _cli("posterior", "inspect", str(out)).stdout
    files = []
    for name, draw in (("a", "3"), ("b", "3"), ("c", "4")):
        assert (
            _cli("sample", str(out), "--draw", draw, "--out", str(tmp_path / name)).returncode == 0
        )
        files.append((tmp_path / name / "adapter_model.safetensors").read_bytes())
    assert files[0] == files[1] != files[2]


@pytest.mark.slow
def test_cli_errors_are_one_line(tmp_path, data):
    (tmp_path / "post").mkdir()
    run = _cli("posterior", "inspect", str(tmp_path / "post"))
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0
    assert "posterior.json: missing file" in run.stderr
    run = _cli("train", "--data", str(data), "--out", str(tmp_path / "x"), "--model", str(tmp_path))
    assert run.returncode == 2 and "not a transformers model folder" in run.stderr
