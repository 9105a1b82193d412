"""End to end: `ivonserve serve` as a real process on the packaged SmolLM2-135M, over real HTTP.

The posterior is $IVONSERVE_E2E_POSTERIOR if set, else the repository's default
(DEFAULT_POSTERIOR), served under its folder's name. It is copied first, so a training run still
writing there cannot tear it.
Kept cheap: a pool of 2 draws, 2 x 2 candidates of 32 tokens. Runs last (conftest orders e2e
tests last) after the shared tiny engine is stopped: one vLLM engine at a time.
"""

from __future__ import annotations

import os
import shutil
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
from conftest import serve_process, stop_live_servers

from ivonserve.config import DEFAULT_POSTERIOR, repo_root

pytestmark = pytest.mark.e2e

E2E_ENV = "IVONSERVE_E2E_POSTERIOR"
MODEL = Path(DEFAULT_POSTERIOR).name
POSTERIOR_FILES = (
    "posterior.json",
    "adapter_config.json",
    "adapter_model.safetensors",
    "hessian.safetensors",
)
QUESTION = (
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May?"
)


def e2e_posterior() -> Path:
    if env := os.environ.get(E2E_ENV):
        return Path(env)
    return repo_root() / DEFAULT_POSTERIOR


@pytest.fixture(scope="module")
def smollm2_server(tmp_path_factory: pytest.TempPathFactory):
    source = e2e_posterior()
    stop_live_servers()  # one vLLM engine at a time
    from ivonserve.model import resolve_model

    resolve_model(None)  # converts the embedded GGUF once (cached), outside the start-up clock
    root = tmp_path_factory.mktemp("e2e")
    posterior = root / "posterior"
    posterior.mkdir()
    for name in POSTERIOR_FILES:
        shutil.copy2(source / name, posterior / name)
    args = ["--posterior", f"{MODEL}={posterior}", "--pool-size", "2", "--max-model-len", "1024",
            "--log-level", "warning"]  # fmt: skip
    began = time.monotonic()
    with serve_process(args, root / "serve.log") as (url, proc):
        yield url, time.monotonic() - began, proc


def test_generate_on_smollm2_returns_four_candidates_and_a_consensus(smollm2_server):
    url, startup_s, _ = smollm2_server
    with httpx.Client(base_url=url, timeout=300) as client:
        card = client.get("/v1/models").json()["data"][0]
        assert card["id"] == MODEL and card["pool_size"] == 2
        body = {
            "prompt": QUESTION,
            "n_models": 2,
            "n_samples": 2,
            "max_tokens": 32,
            "seed": 0,
            "return_candidates": True,
        }
        answer = client.post("/generate", json=body)
    assert answer.status_code == 200, answer.text
    result = answer.json()
    candidates = result["candidates"]
    assert [(c["draw"], c["sample"]) for c in candidates] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(c["text"].strip() and 1 <= c["tokens"] <= 32 for c in candidates)
    assert result["text"] in {c["text"] for c in candidates}
    assert 0.0 <= result["confidence"] <= 1.0
    assert result["usage"]["completion_tokens"] == sum(c["tokens"] for c in candidates)
    print(
        f"\nSmolLM2 e2e: ready after {startup_s:.1f} s; /generate 2x2x32 took "
        f"{result['timing']['total_s']:.2f} s; answer {result['answer']!r}, "
        f"confidence {result['confidence']:.2f}"
    )


def test_the_product_defaults_run_compiled_bf16_with_the_plugin_in_vllms_worker(smollm2_server):
    """The server as a user starts it (torch.compile, the CPU's default dtype, the grouped LoRA
    kernel): /ready reports what the plugin applied inside vLLM's worker process."""
    url, _, proc = smollm2_server
    ready = httpx.get(f"{url}/ready", timeout=30).json()
    (plugin,) = ready["vllm_plugin"]
    assert plugin["pid"] != proc.pid and plugin["seeds"] == "rewind-by-state"
    assert plugin["lora_kernel"] == "grouped" and plugin["grouped_lora_calls"] > 0
    assert plugin["punica_wrapper"] == "GroupedPunicaWrapperCPU"
    assert plugin["compilation_mode"] == "DYNAMO_TRACE_ONCE"  # vLLM alone runs LoRA eager
    assert set(ready["startup_phases_s"]) >= {"tokenizer", "pool", "vllm", "register", "warm_up"}


def test_openai_client_on_smollm2(smollm2_server):
    import openai

    url, _, _ = smollm2_server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=24,
        seed=0,
        extra_body={"n_models": 2, "n_samples": 1},
    )
    assert reply.choices[0].message.content.strip()
    assert 0 <= reply.model_extra["ivonserve"]["confidence"] <= 1


def test_sigterm_drains_in_flight_requests_and_exits_0(smollm2_server):
    """Runs last in this module: the real signal on the real process."""
    url, _, proc = smollm2_server
    result = {}
    body = {"prompt": QUESTION, "n_models": 2, "n_samples": 2, "max_tokens": 96,
            "ignore_eos": True, "seed": 1}  # fmt: skip

    def call() -> None:
        result["response"] = httpx.post(f"{url}/generate", json=body, timeout=300)

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while "ivonserve_requests_in_flight 1.0" not in httpx.get(f"{url}/metrics").text:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    time.sleep(1.0)
    with pytest.raises(httpx.TransportError):  # no new connections while draining
        httpx.get(f"{url}/health", timeout=5)
    thread.join(300)
    answer = result["response"]
    assert answer.status_code == 200, answer.text  # accepted before the signal: completed
    assert answer.json()["usage"]["completion_tokens"] == 2 * 2 * 96
    assert proc.wait(timeout=120) == 0
