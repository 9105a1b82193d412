"""What the fan-out costs: K draws x S samples as LoRA slots, against the other ways, in one run.

Arms (the same prompts and token counts: ignore_eos, fixed max_tokens):
  a     base       - the base model alone, n = K*S (an engine without LoRA)
  b     grouped    - ivonserve's engine: K draws as LoRA slots, S samples each, one batch, with
                     ivonserve's grouped LoRA kernel (the default)
  b'    vllm-ops   - the same engine with vLLM's own CPU LoRA ops (--lora-kernel vllm)
  c     swap       - a plain vLLM engine with one LoRA slot, swapping the K adapters
  v     plain-vllm - vllm.LLM as a user would set it up: the K draws as LoRA adapters
                     (q/v targets, block 32, vLLM's own ops), the same requests
  d     peft       - the loop a researcher writes: peft + transformers, one draw at a time
  a* b* a and b with no core kept for vLLM's scheduler (VLLM_CPU_NUM_OF_RESERVED_CPU=0: the
        OpenMP threads on every core of the NUMA node, ivonserve's default since 2026-12-02).
        The other arms keep vLLM's default (=1: one core left to the scheduler, which on a
        2-core machine halves the cores that compute), as every figure before that date.
--arms picks a subset (b always runs: the others take its model, draws and prompts).
Every engine is started once and kept, but only the arm being measured runs: the others' vLLM
processes are frozen (SIGSTOP) meanwhile, so no idle engine's OpenMP threads or polling loops
share the cores (each vLLM worker binds its threads to every core). Rounds alternate the arms,
so machine noise hits every arm alike; ratios are paired per round. Two workloads: decode-heavy
(the GSM8k prompts, --decode-tokens out) and prefill-heavy (prompts of --prefill-words words,
--prefill-tokens out); in each dtype asked (float32, bfloat16). Also: ivonserve's start-up phases
and memory against pool size. Results go to OUT/fanout.json and OUT/fanout.md.

    .venv/bin/python bench/fanout.py --out bench/results
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psutil
from common import PROMPTS, command_line, spread

from ivonserve.vllm_plugin import LORA_KERNEL_ENV

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# An arm is frozen as soon as its last output arrives, which can be while its engine core still
# waits on a step it sent to its worker. vLLM times that wait in wall-clock time, frozen or not:
# with the default 300 s, an engine died on thawing once the other arms had run longer than that
# (emulated bf16, 2026-12-04: the step's deadline had begun while its arm was frozen).
os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "7200")


# --- engines, each with the processes it started (to freeze them while another arm runs) -------
@dataclass
class Arm:
    name: str
    run: Any  # async (round) -> generated tokens
    processes: list[psutil.Process] = field(default_factory=list)
    close: Any = None
    startup_s: float = 0.0

    def freeze(self) -> None:
        for p in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.suspend()

    def thaw(self) -> None:
        for p in self.processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.resume()

    async def stop(self) -> None:
        """Close the engine, then end whatever of its processes outlived that (vllm.LLM has no
        shutdown of its own), so the next dtype's engines start on a machine without it."""
        self.thaw()
        result = self.close() if self.close else None
        if asyncio.iscoroutine(result):
            await result
        alive = [p for p in self.processes if p.is_running()]
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.terminate()
        _, alive = psutil.wait_procs(alive, timeout=30)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True)}


RESERVED_ENV = "VLLM_CPU_NUM_OF_RESERVED_CPU"
ARMS = ("a", "b", "b'", "c", "v", "a*", "b*")


async def _started(make, kernel: str, reserved: str) -> tuple[Any, list[psutil.Process], float]:
    """Start an engine with the LoRA kernel and reserved cores its vLLM processes read at start;
    returns its new processes."""
    before = _children()
    os.environ[LORA_KERNEL_ENV] = kernel
    os.environ[RESERVED_ENV] = reserved
    began = time.perf_counter()
    engine = await make()
    seconds = time.perf_counter() - began
    new = [psutil.Process(pid) for pid in _children() - before]
    return engine, new, seconds


def settings_for(args: argparse.Namespace, dtype: str, pool_size: int, kernel: str):
    from ivonserve.config import Settings

    return Settings(
        model=args.model,
        posterior=[args.posterior],
        pool_size=pool_size,
        prune=0.0,
        dtype=dtype,
        max_model_len=args.max_model_len,
        lora_kernel=kernel,
    )


async def ivonserve_engine(args: argparse.Namespace, dtype: str, pool_size: int, kernel: str):
    from ivonserve.engine import Engine

    return await Engine.start(settings_for(args, dtype, pool_size, kernel).engine_config())


def async_llm(engine_args: dict[str, Any], **changes: Any):
    """A plain vLLM AsyncLLM with ivonserve's engine arguments, changed as asked."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    values = {**engine_args, **changes}
    if not values.get("enable_lora"):
        for key in ("max_loras", "max_cpu_loras", "max_lora_rank", "lora_target_modules"):
            values.pop(key, None)
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**values))


def sampling(n: int, seed: int, max_tokens: int):
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    return SamplingParams(
        n=n, temperature=1.0, seed=seed, max_tokens=max_tokens, ignore_eos=True,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )  # fmt: skip


async def generate_all(llm, prompts_ids, jobs) -> int:
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
        for j, (params, lora) in enumerate(jobs):
            tasks.append(one(f"bench-{time.monotonic_ns()}-{p}-{j}", ids, params, lora))
    return sum(await asyncio.gather(*tasks))


def plain_vllm(model_dir: Path, draw_dirs: list[Path], dtype: str, args: argparse.Namespace):
    """(v): vllm.LLM the way its docs set up multi-LoRA, with the informed choices a user makes
    for this adapter (its target modules, a CPU block size), but none of ivonserve's."""
    from vllm import LLM
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=str(model_dir), dtype=dtype, enable_lora=True, max_loras=len(draw_dirs),
        max_lora_rank=8, lora_target_modules=["q_proj", "v_proj"], block_size=32,
        max_model_len=args.max_model_len, kv_cache_memory_bytes=1 << 30,
    )  # fmt: skip
    loras = [LoRARequest(f"draw{k}", k + 1, str(d)) for k, d in enumerate(draw_dirs)]
    return llm, loras


def plain_run(llm, loras, prompts_ids, samples: int, max_tokens: int):
    from vllm.inputs import TokensPrompt

    prompts = [TokensPrompt(prompt_token_ids=ids) for ids in prompts_ids for _ in loras]
    requests = [lora for _ in prompts_ids for lora in loras]

    def run(r: int) -> int:
        params = [sampling(samples, r * 100 + i, max_tokens) for i in range(len(prompts))]
        outs = llm.generate(prompts, params, lora_request=requests, use_tqdm=False)
        return sum(len(c.token_ids) for out in outs for c in out.outputs)

    return run


def peft_loop(model_dir: Path, draw_dirs: list[Path], dtype: str, samples: int):
    """(d): load each draw into peft in turn and generate S samples per prompt, batched by HF."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype))
    model = PeftModel.from_pretrained(base, draw_dirs[0], adapter_name="d0").eval()
    for k, path in enumerate(draw_dirs[1:], 1):
        model.load_adapter(path, adapter_name=f"d{k}")

    def run(prompts_ids, max_tokens: int) -> int:
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


# --- one dtype: start every arm, then rounds of every workload ---------------------------------
async def one_dtype(args: argparse.Namespace, dtype: str, workloads: dict) -> dict[str, Any]:
    k, s = args.draws, args.samples
    arms: dict[str, Arm] = {}

    async def add(name: str, make, kernel: str, run_for, close, reserved="1") -> None:
        if name != "b_grouped" and name.split("_")[0] not in args.arms:
            return
        for arm in arms.values():
            arm.freeze()  # a starting engine measures its own start-up alone too
        engine, processes, seconds = await _started(make, kernel, reserved)
        arms[name] = Arm(name, run_for(engine), processes, lambda: close(engine), seconds)
        arms[name].freeze()

    grouped = None

    async def make_grouped():
        nonlocal grouped
        grouped = await ivonserve_engine(args, dtype, k, "grouped")
        return grouped

    def slots_run(engine):
        draws = engine.pool().draws[:k]
        return lambda w, r: generate_all(
            engine.llm, w["ids"], [(sampling(s, r * 100 + i, w["tokens"]), d)
                                   for i, d in enumerate(draws)],
        )  # fmt: skip

    await add("b_grouped", make_grouped, "grouped", slots_run, lambda e: e.shutdown())
    model_dir = grouped.model_dir
    draw_dirs = [Path(d.lora_path) for d in grouped.pool().draws[:k]]
    for w in workloads.values():
        w["ids"] = [grouped.render(prompt=p) for p in w["prompts"]]
    engine_args = grouped.engine_args

    await add("b'_vllm-ops", partial(ivonserve_engine, args, dtype, k, "vllm"), "vllm", slots_run,
              lambda e: e.shutdown())  # fmt: skip

    async def make_base():
        return async_llm(engine_args, enable_lora=False)

    def base_run(llm):
        return lambda w, r: generate_all(llm, w["ids"], [(sampling(k * s, r, w["tokens"]), None)])

    await add("a_base", make_base, "vllm", base_run, _shutdown_llm)
    await add("a*_base-all-cores", make_base, "vllm", base_run, _shutdown_llm, reserved="0")

    await add("b*_grouped-all-cores", partial(ivonserve_engine, args, dtype, k, "grouped"),
              "grouped", slots_run, lambda e: e.shutdown(), reserved="0")  # fmt: skip

    async def make_swap():
        return async_llm(engine_args, max_loras=1, max_cpu_loras=k)

    draw_loras = grouped.pool().draws[:k]

    def swap_run(llm):
        return lambda w, r: generate_all(
            llm, w["ids"], [(sampling(s, r * 100 + i, w["tokens"]), d)
                            for i, d in enumerate(draw_loras)],
        )  # fmt: skip

    await add("c_swap", make_swap, "vllm", swap_run, _shutdown_llm)

    async def make_plain():
        return await asyncio.to_thread(plain_vllm, model_dir, draw_dirs, dtype, args)

    def plain_arm(made):
        llm, loras = made

        async def run(w, r):
            return await asyncio.to_thread(plain_run(llm, loras, w["ids"], s, w["tokens"]), r)

        return run

    await add("v_plain-vllm", make_plain, "vllm", plain_arm, lambda made: None)  # Arm.stop ends it

    peft = None if args.skip_peft else peft_loop(model_dir, draw_dirs, dtype, s)
    results: dict[str, Any] = {"startup_s": {n: a.startup_s for n, a in arms.items()}}
    results["ivonserve_startup_phases_s"] = dict(grouped.startup_seconds)
    for wname, w in workloads.items():
        rates: dict[str, list[float]] = {name: [] for name in arms}
        tokens: dict[str, int] = {}
        for arm in arms.values():  # warm-up: the first requests pay one-off costs
            arm.thaw()
            await arm.run(w, -1)
            arm.freeze()
        for r in range(args.repeats):
            for name, arm in arms.items():
                arm.thaw()
                began = time.perf_counter()
                n = await arm.run(w, r)
                rates[name].append(n / (time.perf_counter() - began))
                tokens[name] = n
                arm.freeze()
            shown = ", ".join(f"{n} {v[-1]:.0f}" for n, v in rates.items())
            print(f"{dtype} {wname} round {r}: {shown}", flush=True)
        if peft is not None and wname in args.peft_workloads:
            short = w["tokens"] if wname == "prefill" else args.peft_tokens
            began = time.perf_counter()
            n = await asyncio.to_thread(peft, w["ids"], short)
            rates["d_peft"] = [n / (time.perf_counter() - began)]
            print(f"{dtype} {wname} d_peft {rates['d_peft'][0]:.1f}", flush=True)
        results[wname] = {
            "prompt_tokens": [len(ids) for ids in w["ids"]],
            "tokens_per_round": tokens,
            "tokens_per_s": {n: spread(v) for n, v in rates.items()},
            "ratios": _ratios(rates),
        }
    for arm in arms.values():
        await arm.stop()
    return results


def _shutdown_llm(llm) -> None:
    llm.shutdown()
    llm.shutdown = lambda *a, **kw: None  # AsyncLLM.__del__ shuts down again at exit


def _ratios(rates: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    """x/y per round (paired: same round, same machine state), summarised over rounds."""
    pairs = {"b/a": ("b_grouped", "a_base"), "b/b'": ("b_grouped", "b'_vllm-ops"),
             "b/c": ("b_grouped", "c_swap"), "b/v": ("b_grouped", "v_plain-vllm"),
             "b'/v": ("b'_vllm-ops", "v_plain-vllm"), "b'/a": ("b'_vllm-ops", "a_base"),
             "b/d": ("b_grouped", "d_peft"), "b*/b": ("b*_grouped-all-cores", "b_grouped"),
             "a*/a": ("a*_base-all-cores", "a_base"),
             "b*/a*": ("b*_grouped-all-cores", "a*_base-all-cores")}  # fmt: skip
    out = {}
    for label, (x, y) in pairs.items():
        both = list(zip(rates.get(x, []), rates.get(y, []), strict=False))
        if both:
            out[label] = spread([a / b for a, b in both])
    return out


async def startup(args: argparse.Namespace) -> list[dict[str, Any]]:
    """ivonserve's start-up phases and memory (this process and its children) per pool size."""
    rows = []
    os.environ.pop(RESERVED_ENV, None)  # ivonserve's default
    for size in args.memory_pools:
        before = rss_of_children()
        began = time.perf_counter()
        engine = await ivonserve_engine(args, args.dtypes[-1], size, "grouped")
        seconds = time.perf_counter() - began
        rss = rss_of_children()
        rows.append({"pool_size": size, "dtype": args.dtypes[-1], "rss_gib": rss / (1 << 30),
                     "rss_added_gib": (rss - before) / (1 << 30), "startup_s": seconds,
                     **{f"{k}_s": v for k, v in engine.startup_seconds.items()}})  # fmt: skip
        await engine.shutdown()
        print(f"pool {size}: {rows[-1]['rss_gib']:.2f} GiB, phases {engine.startup_seconds}")
    return rows


def rss_of_children() -> int:
    me = psutil.Process()
    return sum(p.memory_info().rss for p in [me, *me.children(recursive=True)])


def workloads_for(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    long = " ".join(" ".join(PROMPTS) for _ in range(args.prefill_words // 60 + 1)).split()
    prefill = [" ".join(long[i * 7 : i * 7 + args.prefill_words]) for i in range(args.prompts)]
    every = {
        "decode": {"prompts": PROMPTS[: args.prompts], "tokens": args.decode_tokens},
        "prefill": {"prompts": prefill, "tokens": args.prefill_tokens},
    }
    return {name: every[name] for name in args.workloads}


def _workload_line(cfg: dict[str, Any], workload: str) -> str:
    if workload == "decode":
        return f"decode-heavy: GSM8k prompts, {cfg['decode_tokens']} tokens out"
    return f"prefill-heavy: {cfg['prefill_words']}-word prompts, {cfg['prefill_tokens']} tokens out"


def write(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "fanout.json").write_text(json.dumps(result, indent=2) + "\n")
    cfg, machine = result["config"], result["machine"]
    lines = [
        "# Fan-out throughput",
        "",
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs, load {machine['load_start']} "
        f"at the start, {machine['load_end']} at the end. Model "
        f"{cfg['model'] or 'embedded SmolLM2-135M'}, posterior {cfg['posterior']}; "
        f"{cfg['prompts']} prompts x K={cfg['draws']} draws x S={cfg['samples']} samples; "
        + "; ".join(_workload_line(cfg, w) for w in cfg["workloads"])
        + f" (ignore_eos); {cfg['repeats']} rounds alternated, only the measured arm's engine "
        "running (the others frozen with SIGSTOP). Generated tokens per second.",
    ]
    if "command" in cfg:
        lines += ["", f"`{cfg['command']}`"]
    for dtype, per in result["dtypes"].items():
        for wname in [w for w in ("decode", "prefill") if w in per]:
            w = per[wname]
            lines += ["", f"## {dtype}, {wname}-heavy", "",
                      f"Prompt tokens {w['prompt_tokens']}, generated tokens a round "
                      f"{w['tokens_per_round']}.", "", "| arm | tok/s median | min | max |",
                      "|---|---|---|---|"]  # fmt: skip
            for name, v in w["tokens_per_s"].items():
                lines.append(f"| {name} | {v['median']:.0f} | {v['min']:.0f} | {v['max']:.0f} |")
            lines += ["", "| ratio (paired per round) | median | min | max |", "|---|---|---|---|"]
            for name, v in w["ratios"].items():
                lines.append(f"| {name} | {v['median']:.2f} | {v['min']:.2f} | {v['max']:.2f} |")
        phases = ", ".join(f"{k} {v:.2f}" for k, v in per["ivonserve_startup_phases_s"].items())
        lines += [
            "",
            f"{dtype} start-up (s): engines "
            + ", ".join(f"{k} {v:.1f}" for k, v in per["startup_s"].items())
            + f"; ivonserve phases {phases}",
        ]
    if result.get("startup"):
        lines += ["", "## ivonserve start-up by pool size", "",
                  "| pool size | dtype | RSS GiB | tokenizer s | pool s | vllm s | register s "
                  "| warm_up s | total s |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for row in result["startup"]:
            lines.append(
                f"| {row['pool_size']} | {row['dtype']} | {row['rss_gib']:.2f} "
                f"| {row['tokenizer_s']:.2f} | {row['pool_s']:.2f} "
                f"| {row['vllm_s']:.1f} | {row['register_s']:.2f} | {row['warm_up_s']:.1f} "
                f"| {row['total_s']:.1f} |"
            )
    (out / "fanout.md").write_text("\n".join(lines) + "\n")


def _sizes(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="transformers folder (default: embedded SmolLM2-135M)")
    parser.add_argument("--posterior", default="posteriors/smollm2-135m-gsm8k")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--draws", type=int, default=4, help="K")
    parser.add_argument("--samples", type=int, default=8, help="S")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--prefill-words", type=int, default=420, help="about 1.3 tokens a word")
    parser.add_argument("--prefill-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--arms", default="a,b,b',c,v", help=f"a subset of {','.join(ARMS)}")
    parser.add_argument("--workloads", default="decode,prefill")
    parser.add_argument("--skip-peft", action="store_true")
    parser.add_argument("--peft-tokens", type=int, default=32, help="(d) is slow: fewer tokens")
    parser.add_argument("--peft-workloads", default="decode", help="workloads (d) runs")
    parser.add_argument("--max-model-len", type=int, default=1024)
    parser.add_argument("--memory-pools", type=_sizes, default=[1, 8, 32],
                        help="pool sizes for the start-up table ('' to skip)")  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.peft_workloads = args.peft_workloads.split(",")
    args.arms = args.arms.split(",")
    if unknown := set(args.arms) - set(ARMS):
        parser.error(f"--arms: unknown {sorted(unknown)}; the arms are {','.join(ARMS)}")
    args.workloads = args.workloads.split(",")
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(),
               "python": platform.python_version(),
               "load_start": [round(x, 2) for x in os.getloadavg()]}  # fmt: skip
    config = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    config["command"] = command_line("bench/fanout.py")
    result = {"config": config, "machine": machine, "dtypes": {}}
    for dtype in args.dtypes:  # written after each part: a long run stopped keeps what it had
        result["dtypes"][dtype] = asyncio.run(one_dtype(args, dtype, workloads_for(args)))
        machine["load_end"] = [round(x, 2) for x in os.getloadavg()]
        write(args.out, result)
    if args.memory_pools:
        result["startup"] = asyncio.run(startup(args))
        machine["load_end"] = [round(x, 2) for x in os.getloadavg()]
        write(args.out, result)
    print((args.out / "fanout.md").read_text())


if __name__ == "__main__":
    main()
