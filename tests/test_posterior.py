"""The posterior format against ivon-opt itself: from_ivon, save, load, every validation error."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import make_tiny_model, write_train_data

from ivonserve.posterior import Posterior, PosteriorError, validate_against_base
from ivonserve.train import TrainConfig, build_model, build_optimizer, collate, encode_example


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def trained(model_dir, tmp_path_factory):
    """Three real IVON steps on the tiny model: (peft model, optimizer)."""
    data = write_train_data(tmp_path_factory.mktemp("data") / "train.jsonl")
    config = TrainConfig(data=str(data), out="unused", ess=1e4, beta2=0.99, max_length=64)
    model, tokenizer = build_model(config, model_dir)
    optimizer = build_optimizer(config, [p for p in model.parameters() if p.requires_grad])
    rows = [encode_example(tokenizer, "What is 2 + 3?", "The answer is 5.", 64)] * 2
    batch = collate(rows, tokenizer.pad_token_id)
    for _ in range(3):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            model(**batch).loss.backward()
        optimizer.step()
    return model, optimizer


@pytest.fixture
def saved(trained, tmp_path, model_dir) -> Path:
    model, optimizer = trained
    return Posterior.from_ivon(model, optimizer, base_model=str(model_dir)).save(tmp_path / "post")


def test_from_ivon_save_load_is_exact(trained, saved):
    model, optimizer = trained
    loaded = Posterior.load(saved)
    params = {
        n.replace(".default.", "."): p for n, p in model.named_parameters() if p.requires_grad
    }
    assert sorted(loaded.mean) == sorted(params)
    for key, param in params.items():
        assert torch.equal(loaded.mean[key], param.detach())
    # h: the optimizer's flat per-group vector, sliced in parameter order.
    flat = torch.cat([loaded.hess[n.replace(".default.", ".")].flatten() for n in _order(model)])
    assert torch.equal(flat, optimizer.param_groups[0]["hess"])
    assert not torch.allclose(flat, torch.full_like(flat, 3e-4))  # h moved: a real estimate
    assert loaded.ess == optimizer.param_groups[0]["ess"] == 1e4
    assert loaded.weight_decay == optimizer.param_groups[0]["weight_decay"]


def _order(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def test_variance_is_ivons_sampling_rule(saved):
    post = Posterior.load(saved)
    key = post.keys[0]
    expected = 1.0 / (post.ess * (post.hess[key].double() + post.weight_decay))
    assert torch.allclose(post.variance()[key], expected, rtol=0, atol=0)
    assert torch.allclose(post.variance(0.25)[key], 0.25 * expected)


def test_set_ess_rescales_every_sigma_and_leaves_the_weights(saved, capsys):
    from ivonserve.cli import main

    before = Posterior.load(saved)
    files = ("adapter_model.safetensors", "hessian.safetensors")
    tensors = {f: (saved / f).read_bytes() for f in files}
    assert main(["posterior", "set-ess", str(saved), "1e6"]) == 0
    assert "ess 10000 -> 1e+06 (every sigma x 0.1)" in capsys.readouterr().out
    after = Posterior.load(saved)
    assert after.ess == 1e6 and after.training == before.training
    assert {f: (saved / f).read_bytes() for f in tensors} == tensors
    key = before.keys[0]
    assert torch.allclose(after.sigma()[key], 0.1 * before.sigma()[key])
    for bad in ("0", "-1", "nan"):
        assert main(["posterior", "set-ess", str(saved), bad]) == 2
        assert f"ivonserve: error: ess: must be > 0, got {float(bad)}" in capsys.readouterr().err
    assert Posterior.load(saved).ess == 1e6  # a refused value changes nothing


def test_mean_folder_is_a_plain_peft_adapter(saved, model_dir, trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, saved).eval()
    model, _ = trained
    model.eval()
    ids = torch.tensor([[1, 5, 9, 30, 44]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_validates_against_base_model(saved, model_dir, tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    post = Posterior.load(saved)
    validate_against_base(post, model_dir)  # its own base: fine
    config = LlamaConfig.from_pretrained(model_dir)
    config.hidden_size, config.num_attention_heads = 256, 8
    LlamaForCausalLM(config).save_pretrained(tmp_path / "wide")
    with pytest.raises(PosteriorError, match=r"lora_A.weight.*takes 256 inputs"):
        validate_against_base(post, tmp_path / "wide")
    with pytest.raises(PosteriorError, match=r"no \*.safetensors"):
        validate_against_base(post, tmp_path)


def test_validates_module_names_against_base(saved, model_dir):
    post = Posterior.load(saved)
    key = post.keys[0]
    renamed = key.replace("q_proj", "x_proj").replace("v_proj", "x_proj")
    post.mean[renamed] = post.mean.pop(key)
    post.hess[renamed] = post.hess.pop(key)
    with pytest.raises(PosteriorError, match=r"x_proj.weight.*does not have"):
        validate_against_base(post, model_dir)


def _edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _first(tensors: dict) -> str:
    return sorted(tensors)[0]


CORRUPTIONS = {
    "missing metadata": (lambda d: (d / "posterior.json").unlink(), r"posterior.json: missing"),
    "missing mean": (
        lambda d: (d / "adapter_model.safetensors").unlink(),
        r"adapter_model.safetensors: missing file",
    ),
    "missing hessian": (
        lambda d: (d / "hessian.safetensors").unlink(),
        r"hessian.safetensors: missing file",
    ),
    "missing config": (
        lambda d: (d / "adapter_config.json").unlink(),
        r"adapter_config.json: missing file",
    ),
    "unknown version": (
        lambda d: _edit_json(d / "posterior.json", version=7),
        r"posterior.json: unknown format version 7",
    ),
    "wrong format": (
        lambda d: _edit_json(d / "posterior.json", format="lora"),
        r"posterior.json: format is 'lora'",
    ),
    "ess not a number": (
        lambda d: _edit_json(d / "posterior.json", ess="big"),
        r"posterior.json: missing or non-numeric 'ess'",
    ),
    "hessian key missing": (
        lambda d: _edit_tensors(d / "hessian.safetensors", lambda t: t.pop(_first(t))),
        r"hessian.safetensors: missing key '.*lora_A.weight'",
    ),
    "hessian extra key": (
        lambda d: _edit_tensors(d / "hessian.safetensors", lambda t: t.update(extra=torch.ones(2))),
        r"hessian.safetensors: key 'extra' is not in the mean",
    ),
    "shape mismatch": (
        lambda d: _edit_tensors(
            d / "hessian.safetensors", lambda t: t.update({_first(t): torch.ones(3, 3)})
        ),
        r"hessian.safetensors: key '.*' has shape \(3, 3\), the mean has",
    ),
    "nan in mean": (
        lambda d: _edit_tensors(
            d / "adapter_model.safetensors", lambda t: t[_first(t)].view(-1)[0].fill_(math.nan)
        ),
        r"adapter_model.safetensors: key '.*' has NaN or inf",
    ),
    "inf in hessian": (
        lambda d: _edit_tensors(
            d / "hessian.safetensors", lambda t: t[_first(t)].view(-1)[3].fill_(math.inf)
        ),
        r"hessian.safetensors: key '.*' has NaN or inf",
    ),
    "negative h": (
        lambda d: _edit_tensors(
            d / "hessian.safetensors", lambda t: t[_first(t)].view(-1)[1].fill_(-1.0)
        ),
        r"hessian.safetensors: key '.*' has entries with h \+ weight_decay <= 0",
    ),
    "truncated safetensors": (
        lambda d: (d / "hessian.safetensors").write_bytes(
            (d / "hessian.safetensors").read_bytes()[:100]
        ),
        r"hessian.safetensors: unreadable safetensors",
    ),
    "not json": (
        lambda d: (d / "posterior.json").write_text("{nope"),
        r"posterior.json: not valid JSON",
    ),
}


@pytest.mark.parametrize("name", sorted(CORRUPTIONS))
def test_every_defect_is_named(saved, name):
    corrupt, message = CORRUPTIONS[name]
    corrupt(saved)
    with pytest.raises(PosteriorError, match=message) as info:
        Posterior.load(saved)
    assert "\n" not in str(info.value)


def test_slightly_negative_h_within_weight_decay_is_valid(saved):
    """IVON keeps h + delta > 0, not h >= 0: a trained posterior may hold h in (-delta, 0)."""
    delta = json.loads((saved / "posterior.json").read_text())["weight_decay"]
    _edit_tensors(
        saved / "hessian.safetensors", lambda t: t[_first(t)].view(-1)[0].fill_(-delta / 2)
    )
    post = Posterior.load(saved)
    variance = post.variance()[post.keys[0]].view(-1)[0].item()
    assert variance == pytest.approx(2 / (post.ess * delta), rel=1e-6)  # h stored in float32


def test_not_a_folder(tmp_path):
    with pytest.raises(PosteriorError, match="does not exist"):
        Posterior.load(tmp_path / "nowhere")


def test_plain_adapter_is_a_zero_variance_posterior(saved, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(saved / name, adapter / name)
    post = Posterior.from_adapter(adapter)
    assert all(torch.count_nonzero(v) == 0 for v in post.variance().values())
