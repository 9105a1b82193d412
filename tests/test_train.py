"""`ivonserve train`: data formatting, answer-only loss, resuming, the AdamW baseline, the CLI."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import make_tiny_model, write_mc_data, write_train_data

from ivonserve import choices as mc
from ivonserve.answers import gsm8k_answer_to_target
from ivonserve.errors import IvonserveError
from ivonserve.posterior import Posterior
from ivonserve.train import (
    TrainConfig,
    answer_loss,
    batch_indices,
    build_model,
    collate,
    encode,
    encode_example,
    load_examples,
    load_qa,
    lr_factor,
    train,
    validate_answers,
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


def test_length_batches_cover_the_epoch_and_pad_less():
    lengths = [
        int(n) for n in torch.randint(10, 300, (400,), generator=torch.Generator().manual_seed(0))
    ]
    steps = 400 // 4
    grouped = [batch_indices(400, 4, 3, s, lengths) for s in range(steps)]
    assert grouped == [batch_indices(400, 4, 3, s, lengths) for s in range(steps)]
    assert sorted(i for batch in grouped for i in batch) == list(range(400))  # each once
    assert grouped != [batch_indices(400, 4, 3, s, lengths) for s in range(steps, 2 * steps)]

    def padded(batches: list[list[int]]) -> int:
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    shuffled = [batch_indices(400, 4, 3, s) for s in range(steps)]
    assert padded(grouped) < 0.8 * padded(shuffled)


def test_a_checkpoint_from_before_length_batching_resumes_as_it_ran(model_dir, data, tmp_path):
    """A checkpoint without the `batching` setting ran with random batches: it resumes with
    those, and refuses length batches (they would change its run)."""
    out = tmp_path / "old"
    train(_config(data, out, steps=2, batching="random"), model_dir, progress=False)
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    del state["config"]["batching"]
    torch.save(state, out / "checkpoint.pt")
    with pytest.raises(IvonserveError, match=r"checkpoint of a different run.*batching"):
        train(_config(data, out, steps=4), model_dir, progress=False)
    train(_config(data, out, steps=4, batching="random"), model_dir, progress=False)


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
    progress = json.loads((resumed / "progress.json").read_text())
    assert (progress["step"], progress["steps"], progress["finished"]) == (4, 4, True)


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


@pytest.fixture(scope="module")
def mc_data(tmp_path_factory) -> Path:
    return write_mc_data(tmp_path_factory.mktemp("mc") / "mc.jsonl")


def test_multiple_choice_rows_are_detected_and_trained_on_the_letter_alone(model_dir, mc_data):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    examples = load_examples(mc_data, holdout=2)
    assert all(isinstance(e, mc.MCQuestion) for e in examples) and len(examples) == 4
    question = examples[2]  # five choices, the right one C
    row = encode(tokenizer, question, 320)
    prompt = mc.prompt_ids(tokenizer, question.question, question.choices)
    assert row["input_ids"] == [*prompt, mc.letter_token_ids(tokenizer, 5)[2]]
    assert [t for t in row["labels"] if t != -100] == [row["input_ids"][-1]]
    short = encode(tokenizer, question, 8)  # cut from the left: the letter stays
    assert len(short["input_ids"]) == 8 and short["labels"][-1] == row["input_ids"][-1]
    with pytest.raises(IvonserveError, match="expected a JSON object with 'question' and 'answer'"):
        load_examples(mc_data, format="qa")


@pytest.mark.parametrize("kind", ["qa", "mc"])
def test_answer_loss_equals_the_models_own_loss(model_dir, data, mc_data, kind):
    config = _config(data, Path("unused"))
    model, tokenizer = build_model(config, model_dir)
    examples = load_examples(mc_data if kind == "mc" else data)
    batch = collate([encode(tokenizer, e, 64) for e in examples[:3]], tokenizer.pad_token_id)
    with torch.no_grad():
        expected = model(**batch).loss
        assert answer_loss(model, batch).item() == pytest.approx(expected.item(), rel=1e-6)


def test_learning_rate_schedules():
    linear = TrainConfig(data="", out="", steps=10, lr_schedule="linear", warmup_steps=2)
    factors = [lr_factor(linear, s) for s in range(10)]
    assert factors[:2] == [0.5, 1.0] and factors[2] == 1.0
    assert factors[-1] == pytest.approx(1 / 8) and factors == sorted(factors[:2]) + sorted(
        factors[2:], reverse=True
    )
    constant = TrainConfig(data="", out="", steps=10)
    assert {lr_factor(constant, s) for s in range(10)} == {1.0}


def test_a_decaying_run_cannot_change_its_budget_on_resume(model_dir, data, tmp_path):
    config = _config(data, tmp_path / "run", steps=2, lr_schedule="linear")
    out = train(config, model_dir, progress=False)
    log = [json.loads(ln) for ln in (out / "training_log.jsonl").read_text().splitlines()]
    assert [row["lr"] for row in log] == pytest.approx([0.03, 0.015])
    with pytest.raises(IvonserveError, match=r"checkpoint of a different run.*steps"):
        train(_config(data, tmp_path / "run", steps=4, lr_schedule="linear"), model_dir, False)


@pytest.mark.parametrize("optimizer", ["ivon", "adamw"])
def test_multiple_choice_run_scores_its_validation_slice(model_dir, mc_data, tmp_path, optimizer):
    config = _config(mc_data, tmp_path / optimizer, optimizer=optimizer, holdout=2, eval_draws=2)
    out = train(config, model_dir, progress=False)
    report = json.loads((out / "validation.json").read_text())
    assert report["questions"] == 2 and report["ece_bins"] == 15
    arms = {"ivon": {"mean", "bma1", "bma2"}, "adamw": {"adamw"}}[optimizer]
    assert set(report["arms"]) == arms
    for values in report["arms"].values():
        assert set(values) == {"accuracy", "nll", "ece", "brier"}
        assert 0 < values["nll"] < 10 and 0 <= values["ece"] <= 1
    if optimizer == "ivon":  # the draws are not the mean, and the RNG of the run is untouched
        assert report["arms"]["bma1"] != report["arms"]["mean"]


@pytest.mark.parametrize("optimizer", ["ivon", "adamw"])
def test_question_answer_run_scores_its_validation_slice(model_dir, data, tmp_path, optimizer):
    config = _config(data, tmp_path / optimizer, optimizer=optimizer, holdout=3, eval_draws=2)
    out = train(config, model_dir, progress=False)
    report = json.loads((out / "validation.json").read_text())
    arms = {"ivon": {"mean", "bma1", "bma2"}, "adamw": {"adamw"}}[optimizer]
    assert set(report["arms"]) == arms and report["questions"] == 3
    # the reference: the model's own loss on those rows is the NLL per answer token
    model, tokenizer = build_model(config, model_dir)
    held = load_qa(data)[-3:]
    rows = [encode_example(tokenizer, q, a, config.max_length) for q, a in held]
    with torch.no_grad():
        expected = model(**collate(rows, tokenizer.pad_token_id)).loss.item()
    adamw = dataclasses.replace(config, optimizer="adamw")
    fresh = validate_answers(model, tokenizer, None, held, adamw, "float32")
    assert fresh["arms"]["adamw"]["nll_per_token"] == pytest.approx(expected, rel=1e-5)


def test_cli_takes_the_recipes_flags():
    from ivonserve.cli import build_parser

    args = build_parser().parse_args(
        ["train", "--data", "d", "--out", "o", "--format", "mc", "--lr-schedule", "linear",
         "--warmup-steps", "3", "--weight-decay", "0", "--precision", "float32"]
    )  # fmt: skip
    assert (args.format, args.lr_schedule, args.warmup_steps) == ("mc", "linear", 3)
    assert (args.weight_decay, args.precision) == (0.0, "float32")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--data", "d", "--out", "o", "--lr-schedule", "cos"])


def test_bf16_autocast_loss_agrees_with_float32(model_dir, data, mc_data):
    """bf16 autocast (used on CPUs with native bf16) keeps the loss within 2% of float32's."""
    from ivonserve.train import forward_context

    model, tokenizer = build_model(_config(data, Path("unused")), model_dir)
    for path in (data, mc_data):
        rows = [encode(tokenizer, e, 64) for e in load_examples(path)[:4]]
        batch = collate(rows, tokenizer.pad_token_id)
        with torch.no_grad():
            full = answer_loss(model, batch).item()
            with forward_context("bf16"):
                half = answer_loss(model, batch).item()
        assert half == pytest.approx(full, rel=0.02)
