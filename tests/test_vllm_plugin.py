"""ivonserve's vLLM plugin inside the real engine: loaded in vLLM's worker process (asked of the
worker itself), seeded requests whose prefill is chunked (the live server schedules at most 256
tokens a step) complete with the engine up and give the same samples alone and under load, and
vLLM's own serving benchmark client gets every request answered."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import POOL_SIZE

from ivonserve.engine import (
    CPU_ONEDNN_CACHE_CAPACITY,
    ONEDNN_CACHE_ENV,
    RESERVED_CPU_ENV,
    SamplingOptions,
)
from ivonserve.server.generate import stream

pytestmark = pytest.mark.engine

PROMPT = "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?"


def _status(live, engine) -> dict:
    (status,) = live.run(engine.plugin_status())
    return status


def test_the_plugin_runs_inside_vllms_worker(live, engine, client):
    status = _status(live, engine)
    assert status["pid"] != os.getpid()  # answered by another process: vLLM's worker
    assert status["vllm"] in ("0.32.0", "0.33.0")
    assert status["seeds"] == "rewind-by-state"
    assert status["lora_kernel"] == "grouped"
    # the LoRA model compiled, as vLLM compiles a model without LoRA (it runs LoRA eager alone)
    assert status["punica_wrapper"] == "GroupedPunicaWrapperCPU"
    assert status["compilation_mode"] == "DYNAMO_TRACE_ONCE"
    before = status["grouped_lora_calls"]
    assert client.post("/generate", json={"prompt": PROMPT, "max_tokens": 2}).status_code == 200
    assert _status(live, engine)["grouped_lora_calls"] > before  # the grouped ops ran


def _cores_of_first_numa_node() -> set[int]:
    """The cores vLLM's automatic binding picks from (one worker: the first NUMA node's), of
    those this process may use."""
    from vllm.utils.cpu_resource_utils import parse_id_list

    allowed = os.sched_getaffinity(0)
    node = Path("/sys/devices/system/node/node0/cpulist")
    if not node.exists():
        return allowed
    return set(parse_id_list(node.read_text().strip())) & allowed


def test_vllms_worker_computes_on_every_core(live, engine):
    """vLLM keeps one core out of its OpenMP threads for its scheduler unless told otherwise;
    ivonserve tells it otherwise (engine.RESERVED_CPU_ENV): on a 2-core machine, twice the
    compute."""
    assert os.environ.get(RESERVED_CPU_ENV) == "0"
    assert _status(live, engine)["omp_threads"] == len(_cores_of_first_numa_node())


def test_vllms_worker_caps_onednns_primitive_cache(live, engine):
    """Uncapped, oneDNN's cache of GEMM primitives per shape grows vLLM's worker without
    levelling off (docs/benchmarks.md, oneDNN's primitive cache); the worker itself must see the
    cap, not only this process."""
    assert os.environ.get(ONEDNN_CACHE_ENV) == CPU_ONEDNN_CACHE_CAPACITY  # the engine set it
    assert _status(live, engine)["onednn_primitive_cache_capacity"] == CPU_ONEDNN_CACHE_CAPACITY


def _sampled(seed: int) -> SamplingOptions:
    return SamplingOptions(max_tokens=24, temperature=1.0, seed=seed)


def _long_prompt(engine, words: int, salt: int) -> list[int]:
    text = " ".join(f"clips{(i * 7 + salt) % 97}" for i in range(words))
    return engine.render(f"{PROMPT} {text}")


def test_seeded_requests_with_chunked_prefill_keep_the_engine_up_and_their_samples(live, engine):
    sampling = SamplingOptions(max_tokens=24, temperature=1.0, seed=1234, ignore_eos=True)
    target = _long_prompt(engine, 60, 0)
    assert 2 * 2 * len(target) > engine.engine_args["max_num_batched_tokens"]  # chunked alone too
    rewinds = _status(live, engine)["generator_rewinds"]
    alone = live.run(engine.fan_out(target, 2, 2, sampling))

    async def under_load():
        # other seeded requests take the step's token budget first: the target's prefill is
        # cut at other places than alone
        others = [
            asyncio.ensure_future(engine.fan_out(_long_prompt(engine, 40 + 9 * i, i + 1),
                                                 POOL_SIZE, 2, _sampled(i)))
            for i in range(3)
        ]  # fmt: skip
        await asyncio.sleep(0)
        mine = await engine.fan_out(target, 2, 2, sampling)
        await asyncio.gather(*others)
        return mine

    loaded = live.run(under_load())
    assert engine.ready
    assert _status(live, engine)["generator_rewinds"] > rewinds  # discarded samples were rewound
    assert [c.token_ids for c in loaded.candidates] == [c.token_ids for c in alone.candidates]
    assert [c.text for c in loaded.candidates] == [c.text for c in alone.candidates]
    assert len({c.token_ids for c in alone.candidates}) == 4  # real sampling, not a fixed point


def _vllm_bench(live, tiny_model, tmp_path, backend: str, endpoint: str) -> dict:
    """vLLM's own serving benchmark (vllm.benchmarks.serve) against the live server."""
    script = (
        "import sys; from vllm.benchmarks.serve import add_cli_args, main; "
        "from vllm.utils.argparse_utils import FlexibleArgumentParser; "
        "p = FlexibleArgumentParser(); add_cli_args(p); main(p.parse_args(sys.argv[1:]))"
    )
    command = [
        sys.executable, "-c", script, "--backend", backend, "--base-url", live.url,
        "--endpoint", endpoint, "--model", "tiny", "--tokenizer", str(tiny_model),
        "--dataset-name", "random", "--random-input-len", "64", "--random-output-len", "16",
        "--num-prompts", "8", "--max-concurrency", "4", "--ignore-eos", "--disable-tqdm",
        "--save-result", "--result-dir", str(tmp_path), "--result-filename", f"{backend}.json",
        "--ready-check-timeout-sec", "60", "--percentile-metrics", "ttft,e2el", "--save-detailed",
    ]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads((tmp_path / f"{backend}.json").read_text())


@pytest.mark.parametrize(
    ("backend", "endpoint"),
    [("openai-chat", "/v1/chat/completions"), ("openai", "/v1/completions")],
)
def test_vllms_serving_benchmark_client_gets_every_request_answered(
    live, engine, tiny_model, tmp_path, backend, endpoint, monkeypatch
):
    # keep-alives between every step of the wait, as on a request of more than 10 s: the
    # client strips each network read, so an SSE comment glued onto the text after it and
    # the text was lost (/v1/completions: every request failed)
    monkeypatch.setattr(stream, "KEEPALIVE_S", 0.005)
    result = _vllm_bench(live, tiny_model, tmp_path, backend, endpoint)
    assert result["completed"] == 8 and result.get("failed", 0) == 0, result
    assert result["total_output_tokens"] > 0 and result["mean_ttft_ms"] > 0
    assert all(result["generated_texts"]), result["generated_texts"]  # every consensus arrived
    assert result["mean_e2el_ms"] > result["mean_ttft_ms"]  # after the opening chunk
    assert engine.ready
