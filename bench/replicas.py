"""Ray Serve replicas on this machine: start-up, and throughput of 2 replicas against 1.

For each replica count (alternated, --rounds times each): `ivonserve serve-ray --replicas N`
on a fresh local Ray cluster, the time until every replica is up, then --requests /generate
requests at --concurrency (the same seeded bodies for every count), then SIGTERM. Reports start-up
and requests/s per count and the paired ratio 2/1 per round, with the machine's load. Results go
to OUT/replicas.json and OUT/replicas.md.

    .venv/bin/python bench/replicas.py --out bench/results
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from common import PROMPTS, spread


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(replicas: int, args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    ivonserve = Path(sys.executable).parent / "ivonserve"
    command = [str(ivonserve), "serve-ray", "--replicas", str(replicas), "--num-cpus",
               str(args.num_cpus), "--port", str(port), "--pool-size", str(args.pool_size),
               "--log-level", "warning", *args.serve_args]  # fmt: skip
    sink = log.open("w")
    proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                            start_new_session=True)  # fmt: skip
    return proc, f"http://127.0.0.1:{port}"


def wait_running(proc: subprocess.Popen, url: str, log: Path, timeout: float) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if proc.poll() is not None:
            raise SystemExit(f"serve-ray exited {proc.returncode}: {log.read_text()[-2000:]}")
        if f"ivonserve on Ray Serve: {url}" in log.read_text():
            return time.monotonic() - began
        time.sleep(0.5)
    raise SystemExit(f"serve-ray not running after {timeout} s")


async def load(url: str, args: argparse.Namespace) -> tuple[float, collections.Counter]:
    bodies = [{"prompt": PROMPTS[i % len(PROMPTS)], "n_models": args.n_models,
               "n_samples": args.n_samples, "max_tokens": args.max_tokens, "ignore_eos": True,
               "seed": i} for i in range(args.requests)]  # fmt: skip
    semaphore = asyncio.Semaphore(args.concurrency)
    replicas: collections.Counter = collections.Counter()
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:

        async def one(body: dict) -> None:
            async with semaphore:
                answer = await client.post("/generate", json=body)
            answer.raise_for_status()
            replicas[answer.headers.get("x-ivonserve-replica", "?")] += 1

        await one(bodies[0])  # warm-up
        replicas.clear()
        began = time.perf_counter()
        await asyncio.gather(*(one(b) for b in bodies))
        return args.requests / (time.perf_counter() - began), replicas


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counts", default="1,2", help="replica counts to compare")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--num-cpus", type=float, default=1)
    parser.add_argument("--pool-size", type=int, default=4)
    parser.add_argument("--requests", type=int, default=24)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--n-models", type=int, default=2)
    parser.add_argument("--n-samples", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument("serve_args", nargs="*", help="more `serve-ray` flags, after --")
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    load_start = os.getloadavg()
    for r in range(args.rounds):
        for count in counts if r % 2 == 0 else counts[::-1]:
            log = args.out / f"replicas-{count}.log"
            proc, url = start(count, args, log)
            try:
                startup = wait_running(proc, url, log, args.timeout)
                rate, spread_over = asyncio.run(load(url, args))
            finally:
                stop(proc)
            rows.append({"round": r, "replicas": count, "startup_s": startup,
                         "requests_per_s": rate, "answered_by": dict(spread_over)})  # fmt: skip
            print(f"round {r}: {count} replica(s): up in {startup:.0f} s, {rate:.3f} req/s, "
                  f"{dict(spread_over)}", flush=True)  # fmt: skip
            log.unlink(missing_ok=True)
    by_count = {c: [x for x in rows if x["replicas"] == c] for c in counts}
    ratio = [b["requests_per_s"] / a["requests_per_s"]
             for a, b in zip(by_count[counts[0]], by_count[counts[-1]], strict=True)]  # fmt: skip
    result = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_start": load_start, "load_end": os.getloadavg()},
        "runs": rows,
        "startup_s": {c: spread([x["startup_s"] for x in v]) for c, v in by_count.items()},
        "requests_per_s": {
            c: spread([x["requests_per_s"] for x in v]) for c, v in by_count.items()
        },
        f"ratio_{counts[-1]}_over_{counts[0]}": spread(ratio),
    }  # fmt: skip
    (args.out / "replicas.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "# Ray Serve replicas on one machine", "",
        f"{result['machine']['platform']}, {result['machine']['cpus']} CPUs, load "
        f"{load_start[0]:.2f} -> {result['machine']['load_end'][0]:.2f}. "
        f"{args.requests} /generate requests of {args.n_models}x{args.n_samples} x "
        f"{args.max_tokens} tokens at concurrency {args.concurrency}, pool {args.pool_size}, "
        f"{args.num_cpus} CPU(s) per replica, {args.rounds} rounds alternated.", "",
        "| replicas | up in s (median, min-max) | requests/s (median, min-max) |", "|---|---|---|",
    ]  # fmt: skip
    for c in counts:
        s, q = result["startup_s"][c], result["requests_per_s"][c]
        lines.append(f"| {c} | {s['median']:.0f} ({s['min']:.0f}-{s['max']:.0f}) "
                     f"| {q['median']:.3f} ({q['min']:.3f}-{q['max']:.3f}) |")  # fmt: skip
    key = f"ratio_{counts[-1]}_over_{counts[0]}"
    lines += [
        "",
        f"{counts[-1]}/{counts[0]} replicas, paired per round: "
        f"{result[key]['median']:.2f} ({result[key]['min']:.2f}-{result[key]['max']:.2f}).",
    ]
    (args.out / "replicas.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
