"""Bring your own posterior: ``save_posterior`` from a live loop, ``posterior import`` after the
fact, the Trainer callback; real ivon-opt runs on the tiny Llama and Qwen2 models, one and two
parameter groups. The imported and the live-exported folders are the same bytes, sigma is
ivon-opt's own sampling rule entry by entry, and every refusal is one line naming its file."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import (
    ivon,
    ivon_loop,
    ivon_trainer,
    make_tiny_model,
    make_tiny_qwen2,
    peft_model,
    training_rows,
)

from ivonserve.cli import main
from ivonserve.errors import IvonserveError
from ivonserve.posterior import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    HESSIAN,
    METADATA,
    Posterior,
    save_posterior,
)
from ivonserve.posterior_import import import_posterior
from ivonserve.train import collate

FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, HESSIAN, METADATA)
MAKERS = {"llama": make_tiny_model, "qwen2": make_tiny_qwen2}


@pytest.fixture(scope="module")
def bases(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bases")
    return {name: make(root / name) for name, make in MAKERS.items()}


def _split(model, how: str) -> list:
    """The optimizer's groups as a user builds them: the authors' one group of the trainable
    parameters; two groups splitting them in order, the second with another weight decay; or
    named parameters (torch's ``param_names``) grouped A then B, out of the model's order."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    if how == "one":
        return params
    if how == "two":
        half = len(params) // 2
        return [{"params": params[:half]}, {"params": params[half:], "weight_decay": 1e-3}]
    return [
        {"params": [(n, p) for n, p in named if "lora_A" in n]},
        {"params": [(n, p) for n, p in named if "lora_B" in n]},
    ]


def _trained(base: Path, how: str):
    """(peft model, IVON optimizer) after a few real steps."""
    model = peft_model(base)
    optimizer = ivon(_split(model, how))
    return model, ivon_loop(model, optimizer, training_rows(base))


def _export_both(model, optimizer, base: Path, root: Path) -> tuple[Path, Path]:
    """The live export, and the import of what the loop leaves (adapter + state file)."""
    live = save_posterior(model, optimizer, root / "live", base_model=str(base))
    adapter = root / "adapter"
    model.save_pretrained(adapter)
    torch.save(optimizer.state_dict(), root / "ivon.pt")
    argv = ["posterior", "import", str(adapter), "--optimizer", str(root / "ivon.pt"),
            "--base-model", str(base), "--out", str(root / "imported")]  # fmt: skip
    assert main(argv) == 0
    return live, root / "imported"


def _same_bytes(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(FILES)
    for name in FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _assert_ivon_sigma(posterior: Posterior, model, optimizer) -> None:
    """sigma of every entry = ivon-opt's own rule, 1 / sqrt(ess (hess + weight_decay)), from
    the optimizer's own group tensors, matched to the keys by parameter identity."""
    keys = {id(p): n.replace(".default.", ".") for n, p in model.named_parameters()}
    sigma = posterior.sigma()
    for group in optimizer.param_groups:
        rule = 1 / (group["ess"] * (group["hess"].double() + group["weight_decay"])).sqrt()
        ours = torch.cat([sigma[keys[id(p)]].flatten() for p in group["params"]])
        torch.testing.assert_close(ours, rule, rtol=1e-6, atol=0)


@pytest.mark.parametrize(("arch", "how"), [("qwen2", "one"), ("qwen2", "two"),
                                           ("qwen2", "named"), ("llama", "one")])  # fmt: skip
def test_import_equals_the_live_export_and_sigma_is_ivons_rule(bases, tmp_path, arch, how):
    model, optimizer = _trained(bases[arch], how)
    live, imported = _export_both(model, optimizer, bases[arch], tmp_path)
    _same_bytes(live, imported)
    posterior = Posterior.load(imported)
    _assert_ivon_sigma(posterior, model, optimizer)
    assert posterior.base_model == str(bases[arch])
    groups = posterior.training["ivon_param_groups"]
    assert len(groups) == (1 if how == "one" else 2)
    assert sum(g["numel"] for g in groups) == posterior.num_params
    saved = {n.replace(".default.", "."): p for n, p in model.named_parameters() if p.requires_grad}
    assert sorted(posterior.mean) == sorted(saved)
    for key, param in saved.items():
        assert torch.equal(posterior.mean[key], param.detach())
    h0 = optimizer.param_groups[0]["hess"]
    assert not torch.allclose(h0, torch.full_like(h0, 1e-3))  # h moved: learned from the data


def test_ess_overrides_and_the_record_keeps_the_trained_one(bases, tmp_path):
    model, optimizer = _trained(bases["qwen2"], "one")
    _, imported = _export_both(model, optimizer, bases["qwen2"], tmp_path)
    out = tmp_path / "wider"
    argv = ["posterior", "import", str(tmp_path / "adapter"), "--optimizer",
            str(tmp_path / "ivon.pt"), "--out", str(out), "--ess", "1e3",
            "--mc-form", "text"]  # fmt: skip
    assert main(argv) == 0
    wider, trained = Posterior.load(out), Posterior.load(imported)
    assert wider.ess == 1e3 and wider.training["ivon_param_groups"][0]["ess"] == 1e4
    # no --base-model: the adapter config's base_model_name_or_path
    assert wider.base_model == str(bases["qwen2"])
    assert wider.training["format"] == "mc" and wider.training["mc_form"] == "text"
    key = wider.keys[0]
    torch.testing.assert_close(wider.sigma()[key], trained.sigma()[key] * 10**0.5)


def test_the_trainer_callback_writes_what_importing_its_checkpoint_writes(bases, tmp_path):
    from ivonserve.trainer_callback import PosteriorCallback

    base = bases["qwen2"]
    model = peft_model(base)
    optimizer = ivon([p for p in model.parameters() if p.requires_grad])
    callback = PosteriorCallback(base_model=str(base))
    ivon_trainer(model, optimizer, training_rows(base), tmp_path / "run", [callback]).train()
    run = tmp_path / "run"
    for step in (2, 4):
        written = run / f"checkpoint-{step}" / "posterior"
        assert Posterior.load(written).training["trainer"] == {"global_step": step}
        imported = import_posterior(run / f"checkpoint-{step}", tmp_path / f"imported-{step}",
                                    base_model=str(base))  # fmt: skip
        _same_bytes(written, imported)
    _same_bytes(run / "checkpoint-4" / "posterior", run / "posterior")  # the end of training
    _assert_ivon_sigma(Posterior.load(run / "posterior"), model, optimizer)


def test_the_callback_refuses_a_trainer_without_ivon(bases, tmp_path):
    from ivonserve.trainer_callback import PosteriorCallback

    model = peft_model(bases["qwen2"])
    adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    rows = training_rows(bases["qwen2"])
    trainer = ivon_trainer(model, adamw, rows, tmp_path / "run", [PosteriorCallback()])
    with pytest.raises(IvonserveError) as caught:
        trainer.train()
    assert str(caught.value) == (
        "PosteriorCallback: the Trainer's optimizer is AdamW, not ivon-opt's IVON: pass IVON "
        "through IVONTrainer(optimizers=(IVON(...), None))"
    )
    assert not (tmp_path / "run" / "checkpoint-2").exists()  # refused before the first step
    trainable = [p for p in model.parameters() if p.requires_grad]
    trainer = ivon_trainer(model, ivon(trainable), rows, tmp_path / "acc", [PosteriorCallback()],
                           gradient_accumulation_steps=2)  # fmt: skip
    with pytest.raises(IvonserveError, match=r"^PosteriorCallback: gradient_accumulation_steps "
                       r"is 2; IVON needs 1 \(each step reads"):  # fmt: skip
        trainer.train()
    assert not (tmp_path / "acc" / "checkpoint-2").exists()


# --- refusals: one line each, naming the file -----------------------------------------------
@pytest.fixture(scope="module")
def leftovers(bases, tmp_path_factory) -> Path:
    """What a user's loop leaves: the adapter folder with its IVON state as optimizer.pt."""
    root = tmp_path_factory.mktemp("leftovers")
    model, optimizer = _trained(bases["qwen2"], "one")
    model.save_pretrained(root)
    torch.save(optimizer.state_dict(), root / "optimizer.pt")
    return root


def _copy(leftovers: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(leftovers, tmp_path / "adapter"))


def _refused(adapter: Path, out: Path, **kwargs) -> str:
    with pytest.raises(IvonserveError) as caught:
        import_posterior(adapter, out, **kwargs)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_an_adamw_state_is_named(bases, leftovers, tmp_path):
    adapter = _copy(leftovers, tmp_path)
    model = peft_model(bases["qwen2"])
    adamw = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    model(**collate(training_rows(bases["qwen2"]), 0)).loss.backward()
    adamw.step()  # a real AdamW state: exp_avg, exp_avg_sq per parameter
    torch.save(adamw.state_dict(), adapter / "optimizer.pt")
    assert _refused(adapter, tmp_path / "out") == (
        f"{adapter / 'optimizer.pt'}: an AdamW state (exp_avg, exp_avg_sq; no 'hess' in param "
        "group 0): it holds no posterior; train with ivon-opt's IVON"
    )


def test_a_numel_that_does_not_match_the_adapter_gives_both_counts(bases, leftovers, tmp_path):
    adapter = _copy(leftovers, tmp_path)
    peft_model(bases["qwen2"], r=4).save_pretrained(adapter)  # the adapter of another rank
    message = _refused(adapter, tmp_path / "out")
    assert message == (
        f"{adapter / 'optimizer.pt'}: param group 0 holds 7168 hess entries, the adapter's 8 "
        f"parameters for it have 3584 ({adapter / 'adapter_config.json'})"
    )
    adapter = _copy(leftovers, tmp_path / "q")
    peft_model(bases["qwen2"], target_modules=["q_proj"]).save_pretrained(adapter)
    assert _refused(adapter, tmp_path / "out") == (
        f"{adapter / 'optimizer.pt'}: the optimizer holds 8 parameters, the adapter "
        f"({adapter / 'adapter_config.json'}) has 4 trainable ones"
    )


@pytest.mark.parametrize("bad", ["negative", "nan"])
def test_negative_or_non_finite_hess_is_refused(leftovers, tmp_path, bad):
    adapter = _copy(leftovers, tmp_path)
    state = torch.load(adapter / "optimizer.pt", weights_only=True)
    state["param_groups"][0]["hess"][5] = -1.0 if bad == "negative" else float("nan")
    torch.save(state, adapter / "optimizer.pt")  # a fault a real run does not cause on demand
    message = _refused(adapter, tmp_path / "out")
    key = "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight'"
    assert message == (
        f"{adapter / 'optimizer.pt'}: key {key} has entries with h + weight_decay <= 0 "
        "(negative h below -1e-06: no valid variance)"
        if bad == "negative"
        else f"{adapter / 'optimizer.pt'}: key {key} has NaN or inf entries"
    )


def test_missing_files_are_named(leftovers, tmp_path):
    adapter = _copy(leftovers, tmp_path)
    (adapter / "optimizer.pt").unlink()
    assert _refused(adapter, tmp_path / "out") == (
        f"{adapter / 'optimizer.pt'}: missing file (the optimizer state: torch.save(optimizer."
        "state_dict(), ...); --optimizer names it)"
    )
    shutil.copy(leftovers / "optimizer.pt", adapter / "optimizer.pt")
    (adapter / ADAPTER_WEIGHTS).unlink()
    assert _refused(adapter, tmp_path / "out") == f"{adapter / ADAPTER_WEIGHTS}: missing file"
    (adapter / ADAPTER_CONFIG).unlink()
    assert _refused(adapter, tmp_path / "out") == (
        f"{adapter / ADAPTER_CONFIG}: missing file (a PEFT adapter folder holds it)"
    )
    assert _refused(tmp_path / "nowhere", tmp_path / "out") == (
        f"{tmp_path / 'nowhere'}: not an adapter folder (does not exist)"
    )


def test_non_lora_trainable_parameters_are_refused(bases, tmp_path):
    model = peft_model(bases["llama"], modules_to_save=["lm_head"])
    optimizer = ivon([p for p in model.parameters() if p.requires_grad])
    with pytest.raises(IvonserveError) as caught:
        save_posterior(model, optimizer, tmp_path / "out")
    assert str(caught.value) == (
        "the IVON optimizer: trainable parameter 'base_model.model.lm_head.modules_to_save.weight'"
        " is not a LoRA A or B weight (modules_to_save, DoRA, a bias, trainable tokens): a "
        "posterior holds LoRA A and B alone; give IVON those only"
    )


@pytest.mark.slow  # the CLI in a subprocess (imports torch, peft)
def test_the_cli_refuses_in_one_line_and_exit_2(leftovers, tmp_path):
    adapter = _copy(leftovers, tmp_path)
    state = torch.load(adapter / "optimizer.pt", weights_only=True)
    groups = [{k: v for k, v in g.items() if k != "hess"} for g in state["param_groups"]]
    torch.save({"param_groups": groups, "state": {}}, adapter / "optimizer.pt")
    result = subprocess.run(
        [sys.executable, "-m", "ivonserve", "posterior", "import", str(adapter), "--out",
         str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"ivonserve: error: {adapter / 'optimizer.pt'}: param group 0 has no 'hess': not an "
        "ivon-opt IVON state"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.slow  # the CLI in a subprocess (imports torch, peft)
def test_help_says_what_was_tested():
    result = subprocess.run(
        [sys.executable, "-m", "ivonserve", "posterior", "import", "--help"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    text = " ".join(result.stdout.split())
    assert "Tested here" in text and "Qwen2" in text and "Trainer checkpoint" in text
    for flag in ("--optimizer", "--base-model", "--ess", "--mc-form", "--out"):
        assert flag in text


def test_the_record_names_the_answer_form_its_readers_default_to():
    """The posterior's own record first (ivonserve train's resolved format and mc_form; an
    import's --mc-form), else None: the reader's default, letter."""
    from ivonserve.choices import recorded_form
    from ivonserve.config import repo_root

    assert (
        recorded_form({"format": "mc", "config": {"format": "auto", "mc_form": "text"}}) == "text"
    )
    assert recorded_form({"config": {"format": "mc"}}) == "letter"  # before mc_form existed
    assert recorded_form({"format": "qa", "config": {"mc_form": "text"}}) is None
    assert recorded_form({"config": {"format": "auto", "mc_form": "text"}}) is None  # unknown
    assert recorded_form({"format": "mc", "mc_form": "text"}) == "text"  # posterior import
    assert recorded_form({}) is None
    shipped = repo_root() / "posteriors"
    # the shipped ARC-Easy pair was trained in the text form: scored in it unless asked otherwise
    assert recorded_form(Posterior.load(shipped / "smollm2-135m-arc-easy").training) == "text"
    twin = Posterior.from_adapter(shipped / "smollm2-135m-arc-easy-adamw")
    assert recorded_form(twin.training) == "text"
    assert recorded_form(Posterior.load(shipped / "smollm2-135m-gsm8k-epoch").training) is None
