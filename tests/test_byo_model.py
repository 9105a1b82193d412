"""Another architecture, end to end, the way a user runs it: a tiny random Qwen2, trained with a
real ivon-opt loop (exported live with ``save_posterior`` and imported with ``ivonserve
posterior import``: the same bytes), with a ``transformers.Trainer`` and the callback, and with
``ivonserve train`` on multiple choice in the text form; then ``ivonserve serve --model`` on it
as a real process: /generate 2 x 2, /score of the mean equal to peft's, and the text-trained
posterior's form as the default of /score/choices and ``bench mc``, a request's form winning.

Runs last (e2e) after the shared tiny engine is stopped: one vLLM engine at a time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
import torch
from conftest import HFReference, serve_process, stop_live_servers
from tiny import (
    ivon,
    ivon_loop,
    ivon_trainer,
    make_tiny_qwen2,
    peft_model,
    training_rows,
    write_mc_data,
)

from ivonserve.bench import mc
from ivonserve.cli import build_parser, main
from ivonserve.posterior import save_posterior

pytestmark = pytest.mark.e2e

PROMPT = "What is 4 * 6?"
CONTINUATION = "4 * 6 = 24. The answer is 24."
QUESTION, CHOICES = "Half of 48?", ["12", "24", "36"]
FILES = ("adapter_config.json", "adapter_model.safetensors", "hessian.safetensors",
         "posterior.json")  # fmt: skip


def _loop_route(base: Path, root: Path) -> Path:
    """The authors' loop plus one line (save_posterior); the import of what it leaves on disk
    writes the same bytes, and is what is served."""
    model = peft_model(base)
    # a step large enough that the mean is told apart from the base model in /score
    optimizer = ivon([p for p in model.parameters() if p.requires_grad], lr=0.5, clip_radius=0.1)
    ivon_loop(model, optimizer, training_rows(base), steps=3)
    live = save_posterior(model, optimizer, root / "live", base_model=str(base))
    model.save_pretrained(root / "adapter")
    torch.save(optimizer.state_dict(), root / "adapter" / "ivon.pt")
    imported = root / "imported"
    assert main(["posterior", "import", str(root / "adapter"), "--optimizer",
                 str(root / "adapter" / "ivon.pt"), "--base-model", str(base),
                 "--out", str(imported)]) == 0  # fmt: skip
    for name in FILES:
        assert (live / name).read_bytes() == (imported / name).read_bytes(), name
    return imported


def _trainer_route(base: Path, root: Path) -> Path:
    from ivonserve.trainer_callback import PosteriorCallback

    model = peft_model(base, seed=1)
    optimizer = ivon([p for p in model.parameters() if p.requires_grad], lr=0.5, clip_radius=0.1)
    callbacks = [PosteriorCallback(base_model=str(base))]
    ivon_trainer(model, optimizer, training_rows(base), root / "run", callbacks).train()
    return root / "run" / "posterior"


def _mc_text_route(base: Path, root: Path) -> Path:
    """ivonserve train on multiple choice, answered by the choice's text: its record says so."""
    from ivonserve.train import TrainConfig, train

    config = TrainConfig(
        data=str(write_mc_data(root / "mc.jsonl")), out=str(root / "mc"), mc_form="text",
        steps=2, batch_size=2, ess=1e4, max_length=64, checkpoint_every=2, precision="float32",
    )  # fmt: skip
    return train(config, base, progress=False)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """(url, base model folder, {name: posterior folder}) of `ivonserve serve` on the Qwen2."""
    root = tmp_path_factory.mktemp("qwen2")
    base = make_tiny_qwen2(root / "model")
    posteriors = {
        "qwen-loop": _loop_route(base, root),
        "qwen-trainer": _trainer_route(base, root),
        "qwen-mc": _mc_text_route(base, root),
    }
    stop_live_servers()  # one vLLM engine at a time
    args = ["--model", str(base), "--pool-size", "2", "--dtype", "float32", "--max-model-len",
            "512", "--log-level", "warning"]  # fmt: skip
    for name, folder in posteriors.items():
        args += ["--posterior", f"{name}={folder}"]
    with serve_process(args, root / "serve.log") as (url, _):
        yield url, base, posteriors


def test_both_routes_serve_on_qwen2_with_a_2x2_fan_out(qwen):
    url, base, _ = qwen
    with httpx.Client(base_url=url, timeout=300) as client:
        cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
        assert set(cards) == {"qwen-loop", "qwen-trainer", "qwen-mc"}
        assert {c["base_model"] for c in cards.values()} == {str(base)}
        for model in ("qwen-loop", "qwen-trainer"):
            body = {"prompt": PROMPT, "model": model, "n_models": 2, "n_samples": 2,
                    "max_tokens": 8, "seed": 0, "return_candidates": True}  # fmt: skip
            answer = client.post("/generate", json=body)
            assert answer.status_code == 200, answer.text
            candidates = answer.json()["candidates"]
            assert [(c["draw"], c["sample"]) for c in candidates] == [
                (0, 0), (0, 1), (1, 0), (1, 1)
            ]  # fmt: skip
            assert all(1 <= c["tokens"] <= 8 for c in candidates)


def test_score_of_the_mean_equals_peft_on_qwen2(qwen):
    url, base, posteriors = qwen
    hf = HFReference(base)
    prompt_ids = hf.prompt_ids(PROMPT)
    with httpx.Client(base_url=url, timeout=300) as client:
        for model in ("qwen-loop", "qwen-trainer"):
            body = {"prompt": PROMPT, "continuations": [CONTINUATION], "model": model,
                    "n_models": 0, "return_tokens": True}  # fmt: skip
            answer = client.post("/score", json=body)
            assert answer.status_code == 200, answer.text
            (score,) = answer.json()["scores"]
            ids = prompt_ids + score["token_ids"]
            expected = hf.logprobs(posteriors[model], ids, len(prompt_ids))
            assert answer.json()["prompt_tokens"] == len(prompt_ids)
            assert score["token_logprobs"] == pytest.approx(expected, abs=2e-4)
            assert score["logprob"] == pytest.approx(sum(expected), abs=2e-4)
            base_only = sum(hf.logprobs(None, ids, len(prompt_ids)))
            assert abs(base_only - score["logprob"]) > 0.05  # the adapter is what was scored


def test_a_text_trained_posterior_is_scored_in_text_unless_the_request_says(qwen):
    url, _, _ = qwen
    with httpx.Client(base_url=url, timeout=300) as client:
        cards = {c["id"]: c for c in client.get("/v1/models").json()["data"]}
        assert {name: c["mc_form"] for name, c in cards.items()} == {
            "qwen-mc": "text", "qwen-loop": "letter", "qwen-trainer": "letter"
        }  # fmt: skip

        def form(model: str, **extra) -> str:
            body = {"question": QUESTION, "choices": CHOICES, "model": model, **extra}
            answer = client.post("/score/choices", json=body)
            assert answer.status_code == 200, answer.text
            return answer.json()["form"]

        assert form("qwen-mc") == "text" and form("qwen-mc", form="letter") == "letter"
        assert form("qwen-loop") == "letter" and form("qwen-loop", form="text") == "text"


def test_bench_mc_takes_the_posteriors_form_and_a_flag_still_wins(qwen, tmp_path):
    url, _, _ = qwen
    data = write_mc_data(tmp_path / "mc.jsonl")

    def run(out: str, *extra: str) -> dict:
        argv = ["bench", "mc", "--url", url, "--data", str(data), "--out", str(tmp_path / out),
                "--n-models", "0,2", "--no-progress", *extra]  # fmt: skip
        return asyncio.run(mc.run(build_parser().parse_args(argv)))

    assert run("default", "--model", "qwen-mc")["form"] == "text"
    assert run("letter", "--model", "qwen-mc", "--form", "letter")["form"] == "letter"
    assert run("loop", "--model", "qwen-loop")["form"] == "letter"
    with pytest.raises(Exception) as caught:
        run("both", "--model", "qwen-mc", "--model", "qwen-loop")
    assert str(caught.value) == (
        "--form: the models were trained in different forms (qwen-mc text, qwen-loop letter); "
        "name one"
    )
