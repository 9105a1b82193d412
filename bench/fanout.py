"""What the fan-out costs: K draws x S samples as LoRA slots, against three other ways, in one run.

Same prompts, same number of generated tokens (ignore_eos, fixed max_tokens), rounds alternated so
machine noise hits every way alike:
  (a) base   - the base model alone, n = K*S (no adapter; an engine without LoRA)
  (b) slots  - ivonserve's path: K draws registered as LoRA slots, S samples each, one batch
  (c) swap   - the same K x S with a single LoRA slot (vLLM swaps adapters)
  (d) peft   - the loop a researcher writes: peft + transformers, one draw at a time,
               generate(num_return_sequences=S)
Also: engine start-up, posterior load and pool registration times, and the engine process's
memory against pool size. Results go to OUT/fanout.json and OUT/fanout.md.

    .venv/bin/python bench/fanout.py --out bench/results
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from common import PROMPTS, spread

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def rss_of_children() -> int:
    """Resident memory of this process and its children (vLLM's engine core runs in one)."""
    import psutil

    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)])


def settings_for(args: argparse.Namespace, pool_size: int):
    from ivonserve.config import Settings

    return Settings(
        model=args.model,
        posterior=args.posterior,
        pool_size=pool_size,
        prune=0.0,
        max_model_len=args.max_model_len,
    )


async def start_ivonserve(args: argparse.Namespace, pool_size: int):
    from ivonserve.engine import Engine

    began = time.perf_counter()
    engine = await Engine.start(settings_for(args, pool_size))
    return engine, time.perf_counter() - began


def raw_engine(engine_args: dict[str, Any], **changes: Any):
    """A plain vLLM AsyncLLM with ivonserve's engine arguments, changed as asked."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    values = {**engine_args, **changes}
    if not values.get("enable_lora"):
        for key in ("max_loras", "max_cpu_loras", "max_lora_rank", "lora_target_modules"):
            values.pop(key, None)
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**values))


async def generate_all(llm, prompts_ids, jobs_per_prompt) -> int:
    """Submit every (params, lora) job for every prompt at once; returns tokens generated."""
    from vllm.inputs import TokensPrompt

    async def one(rid: str, ids: list[int], params, lora) -> int:
        final = None
        async for out in llm.generate(
            TokensPrompt(prompt_token_ids=ids), params, rid, lora_request=lora
        ):
            final = out
        return sum(len(c.token_ids) for c in final.outputs)

    tasks = []
    for p, ids in enumerate(prompts_ids):
        for j, (params, lora) in enumerate(jobs_per_prompt):
            tasks.append(one(f"bench-{time.monotonic_ns()}-{p}-{j}", ids, params, lora))
    return sum(await asyncio.gather(*tasks))


def sampling(n: int, seed: int, max_tokens: int):
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(
        n=n, temperature=1.0, seed=seed, max_tokens=max_tokens, ignore_eos=True,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )  # fmt: skip


async def timed(fn) -> tuple[float, int]:
    began = time.perf_counter()
    tokens = await fn()
    return time.perf_counter() - began, tokens


def peft_loop(model_dir: Path, draw_dirs: list[Path], prompts_ids, samples: int, max_tokens: int):
    """(d): load each draw into peft in turn and generate S samples per prompt, batched by HF."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, draw_dirs[0], adapter_name="d0").eval()
    for k, path in enumerate(draw_dirs[1:], 1):
        model.load_adapter(path, adapter_name=f"d{k}")

    def run() -> int:
        tokens = 0
        for k in range(len(draw_dirs)):
            model.set_adapter(f"d{k}")
            for ids in prompts_ids:
                with torch.no_grad():
                    out = model.generate(
                        torch.tensor([ids]), do_sample=True, temperature=1.0,
                        num_return_sequences=samples, max_new_tokens=max_tokens,
                        min_new_tokens=max_tokens, pad_token_id=0,
                    )  # fmt: skip
                tokens += (out.shape[1] - len(ids)) * out.shape[0]
        return tokens

    return run


async def throughput(args: argparse.Namespace) -> dict[str, Any]:
    k, s, t = args.draws, args.samples, args.max_tokens
    engine, start_s = await start_ivonserve(args, pool_size=k)
    pool = engine.pool()
    prompts_ids = [engine.render(prompt=p) for p in PROMPTS[: args.prompts]]
    started = {"ivonserve_engine_s": start_s, **engine.startup_seconds}
    began = time.perf_counter()
    base = raw_engine(engine.engine_args, enable_lora=False)
    started["base_engine_s"] = time.perf_counter() - began
    began = time.perf_counter()
    swap = raw_engine(engine.engine_args, max_loras=1)
    started["swap_engine_s"] = time.perf_counter() - began
    draws = pool.draws[:k]
    ways = {
        "a_base": lambda r: generate_all(base, prompts_ids, [(sampling(k * s, r, t), None)]),
        "b_slots": lambda r: generate_all(
            engine.llm, prompts_ids, [(sampling(s, r * 100 + i, t), d) for i, d in enumerate(draws)]
        ),
        "c_swap": lambda r: generate_all(
            swap, prompts_ids, [(sampling(s, r * 100 + i, t), d) for i, d in enumerate(draws)]
        ),
    }
    run_peft = None
    if not args.skip_peft:
        run_peft = peft_loop(
            engine.model_dir, [Path(d.lora_path) for d in draws], prompts_ids, s, t
        )
    rates: dict[str, list[float]] = {name: [] for name in [*ways, "d_peft"]}
    tokens: dict[str, int] = {}
    for way in ways.values():  # warm-up: first requests pay one-off costs
        await way(-1)
    for r in range(args.repeats):
        for name, way in ways.items():
            seconds, n = await timed(lambda way=way, r=r: way(r))
            rates[name].append(n / seconds)
            tokens[name] = n
        if run_peft is not None and r < args.peft_repeats:
            began = time.perf_counter()
            n = await asyncio.to_thread(run_peft)
            rates["d_peft"].append(n / (time.perf_counter() - began))
            tokens["d_peft"] = n
        print(f"round {r}: " + ", ".join(f"{n} {v[-1]:.0f} tok/s" for n, v in rates.items() if v))
    base.shutdown()
    swap.shutdown()
    ways.clear()  # drop the engines before interpreter exit, where AsyncLLM.__del__ would fail
    base = swap = None
    await engine.shutdown()
    return {
        "startup_s": started,
        "tokens_per_round": tokens,
        "tokens_per_s": {n: spread(v) for n, v in rates.items() if v},
        "ratios": _ratios(rates),
    }


async def memory(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Engine memory (RSS, this process + engine core) after registering pools of each size."""
    rows = []
    for size in args.memory_pools:
        before = rss_of_children()
        engine, seconds = await start_ivonserve(args, pool_size=size)
        rows.append({
            "pool_size": size,
            "rss_gib": rss_of_children() / (1 << 30),
            "rss_added_gib": (rss_of_children() - before) / (1 << 30),
            "startup_s": seconds,
            **{f"{k}_s": v for k, v in engine.startup_seconds.items()},
        })  # fmt: skip
        await engine.shutdown()
        print(f"pool {size}: {rows[-1]['rss_gib']:.2f} GiB, start {seconds:.1f} s")
    return rows


def _ratios(rates: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """b/x per round (paired: same round, same machine state), summarised over rounds."""
    out = {}
    for other in ("a_base", "c_swap", "d_peft"):
        pairs = list(zip(rates["b_slots"], rates[other], strict=False))
        if pairs:
            out[f"b/{other[0]}"] = spread([b / x for b, x in pairs])
    return out


def write(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fanout.json").write_text(json.dumps(result, indent=2) + "\n")
    cfg, tp = result["config"], result["throughput"]
    lines = [
        "# Fan-out throughput",
        "",
        f"Machine: {result['machine']['platform']}, {result['machine']['cpus']} CPUs. "
        f"Model {cfg['model'] or 'embedded SmolLM2-135M'} (float32), posterior "
        f"{cfg['posterior']}; {cfg['prompts']} prompts x K={cfg['draws']} draws x "
        f"S={cfg['samples']} samples x {cfg['max_tokens']} tokens (ignore_eos), "
        f"{cfg['repeats']} rounds alternated.",
        "",
        "| way | tok/s median | min | max |",
        "|---|---|---|---|",
    ]
    for name, v in tp["tokens_per_s"].items():
        lines.append(f"| {name} | {v['median']:.0f} | {v['min']:.0f} | {v['max']:.0f} |")
    lines += ["", "| ratio (paired per round) | median | min | max |", "|---|---|---|---|"]
    for name, v in tp["ratios"].items():
        lines.append(f"| {name} | {v['median']:.2f} | {v['min']:.2f} | {v['max']:.2f} |")
    lines += ["", "Start-up (s): " + ", ".join(f"{k} {v:.1f}" for k, v in tp["startup_s"].items())]
    if result.get("memory"):
        lines += ["", "| pool size | RSS GiB | start s |", "|---|---|---|"]
        for row in result["memory"]:
            lines.append(f"| {row['pool_size']} | {row['rss_gib']:.2f} | {row['startup_s']:.1f} |")
    (out / "fanout.md").write_text("\n".join(lines) + "\n")


def _sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="transformers folder (default: embedded SmolLM2-135M)")
    parser.add_argument("--posterior", default="posteriors/smollm2-135m-gsm8k")
    parser.add_argument("--draws", type=int, default=4, help="K")
    parser.add_argument("--samples", type=int, default=8, help="S")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--peft-repeats", type=int, default=1, help="(d) is slow: fewer rounds")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument(
        "--memory-pools",
        type=_sizes,
        default=[2, 8, 32],
        help="pool sizes for the memory table ('' to skip)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "throughput": asyncio.run(throughput(args)),
    }
    if args.memory_pools:
        result["memory"] = asyncio.run(memory(args))
    write(args.out, result)
    print((args.out / "fanout.md").read_text())


if __name__ == "__main__":
    main()
