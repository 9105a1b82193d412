"""Does a running ivonserve stay up, keep every request it accepts, and hold its memory under load?

A bounded soak on loopback, HTTP only: `steady` sends --requests at --concurrency; `long` sends
--long requests of long prompts (--long-words words, ignore_eos) at the same concurrency, so that
their prefills exceed vLLM's per-step token budget and are chunked (seeded requests with chunked
prefills once killed vLLM's CPU engine: ivonserve's vLLM plugin); then `burst` sends --burst at
once (past the server's limits, so some must be refused with 429/503 and a Retry-After), waiting
for the server to drain (`/metrics` gauges back to 0) after each; a last
request must then still succeed. Memory (the API process from /metrics; with --server-pid, that
process and its children, where vLLM's engine runs) is sampled every second. Stops by itself:
after the counts, or at --deadline-s. Results go to OUT/soak.json and OUT/soak.md; the exit code
is 0 when nothing accepted was lost (failed == 0, lost == 0; lost is failed by definition here),
the server went idle, the last request succeeded, `steady` saw no refusals and memory stayed flat
once warm (see WARMUP, FLAT); 2 when the server cannot be reached.

    .venv/bin/python bench/soak.py --url http://127.0.0.1:8000 --requests 200 --concurrency 8 \
        --long 16 --burst 64 --out bench/results/soak
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families
from tqdm import tqdm

PROMPTS = [
    "What is 17 + 25?",
    "A box holds 6 eggs. How many eggs are in 7 boxes?",
    "Tom has 30 apples and gives away 12. How many apples does he have left?",
    "What is 144 divided by 12?",
]
KEEP = 5  # example bodies / error strings kept per phase
# Memory is judged on the second half of the steady phase: in the first, a fresh server's caches
# fill (vLLM's CPU worker grows fastest at first: docs/benchmarks.md, Soak), which a leak test
# must not mistake for a leak. "Flat": the fitted trend over that half is under 2% of its level.
WARMUP = 0.5
FLAT = 0.02
MIB = 1 << 20
QUANTILES = ("p50", "p95", "p99", "max")
STATUSES = ("completed", "refused", "rejected", "failed", "skipped")


class SoakError(Exception):
    """A one-line reason to stop before the soak starts (exit 2)."""


@dataclass
class Outcome:
    """One request: completed | refused | rejected | failed | skipped (not sent: deadline)."""

    status: str
    code: int | None = None
    latency_s: float = 0.0
    tokens: int = 0
    detail: str | None = None


@dataclass
class PhaseSummary:
    name: str
    sent: int
    completed: int
    refused: int
    rejected: int
    failed: int
    skipped: int
    accepted: int
    lost: int
    wall_s: float
    requests_per_s: float
    tokens: int
    latency_s: dict[str, float]
    examples: dict[str, list[str]] = field(default_factory=dict)
    idle_after: dict[str, Any] = field(default_factory=dict)


def classify(response: httpx.Response, latency: float) -> Outcome:
    code, text = response.status_code, response.text[:300]
    if code == 200:
        try:
            body = response.json()
        except ValueError:
            return Outcome("failed", code, latency, detail="200 with a body that is not JSON")
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            return Outcome("failed", code, latency, detail=f"200 without a 'text': {text}")
        tokens = (body.get("usage") or {}).get("completion_tokens") or 0
        return Outcome("completed", code, latency, tokens=int(tokens))
    if code in (429, 503):
        if response.headers.get("retry-after", "").strip().isdigit():
            return Outcome("refused", code, latency)
        return Outcome(
            "failed", code, latency, detail=f"{code} without integer Retry-After: {text}"
        )
    if 400 <= code < 500:
        return Outcome("rejected", code, latency, detail=f"{code}: {text}")
    return Outcome("failed", code, latency, detail=f"{code}: {text}")


async def send(client: httpx.AsyncClient, body: dict[str, Any]) -> Outcome:
    began = time.perf_counter()
    try:
        response = await client.post("/generate", json=body)
    except httpx.HTTPError as err:
        detail = f"{type(err).__name__}: {err}".rstrip(": ")
        return Outcome("failed", None, time.perf_counter() - began, detail=detail)
    return classify(response, time.perf_counter() - began)


async def run_phase(
    client: httpx.AsyncClient, name: str, bodies: list[dict], concurrency: int, deadline: float,
    progress: bool,
) -> tuple[list[Outcome], float]:  # fmt: skip
    """Send every body, `concurrency` at a time; none is started after the deadline."""
    gate = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(bodies), desc=name, unit="req", disable=not progress)

    async def one(body: dict[str, Any]) -> Outcome:
        async with gate:
            late = time.monotonic() > deadline
            outcome = Outcome("skipped") if late else await send(client, body)
        bar.update(1)
        return outcome

    began = time.perf_counter()
    try:
        outcomes = await asyncio.gather(*(one(body) for body in bodies))
    finally:
        bar.close()
    return outcomes, time.perf_counter() - began


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    rank = max(1, -(-len(values) * q // 100))
    return values[int(rank) - 1]


def summarise(name: str, outcomes: list[Outcome], wall_s: float) -> PhaseSummary:
    count = {s: sum(o.status == s for o in outcomes) for s in STATUSES}
    latency = sorted(o.latency_s for o in outcomes if o.status == "completed")
    quantiles = {f"p{q}": percentile(latency, q) for q in (50, 95, 99)} if latency else {}
    examples = {
        kind: [o.detail for o in outcomes if o.status == kind][:KEEP]
        for kind in ("rejected", "failed")
        if count[kind]
    }
    return PhaseSummary(
        name=name, sent=len(outcomes) - count["skipped"], **count,
        accepted=count["completed"] + count["failed"], lost=count["failed"], wall_s=wall_s,
        requests_per_s=count["completed"] / wall_s if wall_s else 0.0,
        tokens=sum(o.tokens for o in outcomes),
        latency_s={**quantiles, "max": latency[-1]} if latency else {}, examples=examples,
    )  # fmt: skip


async def read_metrics(probe: httpx.AsyncClient) -> dict[str, float] | None:
    """Every sample in /metrics as `name{labels}` -> value; None when it cannot be read."""
    try:
        response = await probe.get("/metrics")
        response.raise_for_status()
        families = list(text_string_to_metric_families(response.text))
    except (httpx.HTTPError, ValueError):
        return None
    samples = {}
    for family in families:
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def total(samples: dict[str, float], name: str) -> float | None:
    """The sum of a metric over its label sets; None when absent."""
    values = [v for k, v in samples.items() if k == name or k.startswith(name + "{")]
    return sum(values) if values else None


async def wait_idle(probe: httpx.AsyncClient, limit_s: float) -> dict[str, Any]:
    """Poll /metrics until nothing is in flight or queued, at most `limit_s`."""
    began = time.monotonic()
    while True:
        samples = await read_metrics(probe)
        waited = round(time.monotonic() - began, 2)
        busy = {"note": "/metrics unreachable"}
        if samples is not None:
            busy = {g: total(samples, f"ivonserve_requests_{g}") for g in ("in_flight", "queued")}
            if all(v is None for v in busy.values()):
                return {"idle": None, "waited_s": waited, "note": "no ivonserve_requests_* gauges"}
            if not any(busy.values()):
                return {"idle": True, "waited_s": waited}
        if waited > limit_s:
            return {"idle": False, "waited_s": waited, **busy}
        await asyncio.sleep(0.5)


def tree_rss(pid: int) -> dict[str, int] | None:
    """Resident memory of a process and of each descendant (vLLM's engine core and its worker
    are children), by ``name[pid]``, so that a growth can be pinned on one of them."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return None
    rss = {}
    for proc in procs:
        with contextlib.suppress(psutil.Error):  # a child may exit between listing and reading
            rss[f"{proc.name()}[{proc.pid}]"] = proc.memory_info().rss
    return rss or None  # empty: every process went (a zombie has no memory to read)


class MemorySampler:
    """Once a second: API RSS from /metrics and, with a pid, the server's process tree RSS."""

    def __init__(self, probe: httpx.AsyncClient, pid: int | None) -> None:
        self.probe, self.pid, self.phase = probe, pid, "start"
        self.samples: list[dict[str, Any]] = []
        self.began = time.monotonic()

    async def run(self) -> None:
        while True:
            api = total(await read_metrics(self.probe) or {}, "process_resident_memory_bytes")
            procs = tree_rss(self.pid) if self.pid else None
            tree = sum(procs.values()) if procs else None
            t = round(time.monotonic() - self.began, 2)
            self.samples.append(
                {"t": t, "phase": self.phase, "api": api, "tree": tree, "procs": procs}
            )
            await asyncio.sleep(1.0)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "criterion": f"flat: the trend over the last {1 - WARMUP:.0%} of the steady phase "
            f"grows by < {FLAT:.0%} of its level (the first {WARMUP:.0%} is warm-up)"
        }
        for key in ("api", "tree"):
            rows = [(s["t"], s[key] / MIB, s["phase"]) for s in self.samples if s[key] is not None]
            if not rows:
                continue
            steady = [(t, v) for t, v, phase in rows if phase == "steady"]
            out[key] = {"samples": len(rows), "first_mib": rows[0][1], "last_mib": rows[-1][1],
                        "max_mib": max(v for _, v, _ in rows), "steady": _growth(steady),
                        "settled": _growth(steady[int(len(steady) * WARMUP):])}  # fmt: skip
            out[key]["flat"] = out[key]["settled"].get("flat")
        steady = [s for s in self.samples if s["phase"] == "steady" and s.get("procs")]
        if steady:  # each process of the tree over the steady phase
            first, last = steady[0]["procs"], steady[-1]["procs"]
            out["processes"] = {
                name: {"first_mib": rss / MIB, "last_mib": last.get(name, 0) / MIB}
                for name, rss in first.items()
            }
        return out


def _growth(points: list[tuple[float, float]]) -> dict[str, Any]:
    """First and last value, and the least-squares trend over the span (robust to one spike)."""
    if len(points) < 10:
        return {"samples": len(points)}
    (t0, first), (t1, last) = points[0], points[-1]
    slope = statistics.linear_regression([t for t, _ in points], [v for _, v in points]).slope
    trend = slope * (t1 - t0)
    return {
        "samples": len(points), "seconds": t1 - t0, "first_mib": first, "last_mib": last,
        "growth_mib": last - first, "trend_mib": trend, "slope_mib_per_min": slope * 60,
        "flat": trend < FLAT * first,
    }  # fmt: skip


def parse_mix(text: str) -> list[tuple[int, int]]:
    """'1x1,2x2,4x2' -> [(1, 1), (2, 2), (4, 2)]: n_models x n_samples, cycled over requests."""
    try:
        mix = [tuple(int(x) for x in part.split("x")) for part in text.lower().split(",") if part]
    except ValueError:
        mix = []
    if not mix or any(len(m) != 2 or m[0] < 0 or m[1] < 1 for m in mix):
        raise argparse.ArgumentTypeError(f"{text!r}: expected MODELSxSAMPLES,... e.g. 1x1,2x2")
    return mix  # type: ignore[return-value]


def load_prompts(path: Path | None) -> list[str]:
    """The built-in questions, or the 'question' of each GSM8k jsonl line."""
    if path is None:
        return PROMPTS
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise SoakError(f"{path}: {err.strerror}") from None
    questions = []
    for number, line in enumerate(lines, 1):
        try:
            questions += [str(json.loads(line)["question"])] if line.strip() else []
        except (json.JSONDecodeError, KeyError, TypeError):
            raise SoakError(f"{path}:{number}: expected a JSON object with 'question'") from None
    if not questions:
        raise SoakError(f"{path}: no questions")
    return questions


def bodies(first: int, count: int, prompts: list[str], args: argparse.Namespace) -> list[dict]:
    out = []
    for i in range(first, first + count):
        k, s = args.mix[i % len(args.mix)]
        out.append({"prompt": prompts[i % len(prompts)], "n_models": k, "n_samples": s,
                    "max_tokens": args.max_tokens, "seed": i})  # fmt: skip
    return out


def long_prompts(prompts: list[str], words: int) -> list[str]:
    """Prompts of at least ``words`` words: the questions joined, each start shifted by one."""
    out = []
    for start in range(len(prompts)):
        text: list[str] = []
        while len(text) < words:
            text += prompts[(start + len(text)) % len(prompts)].split()
        out.append(" ".join(text[:words]))
    return out


def long_bodies(first: int, count: int, prompts: list[str], args: argparse.Namespace) -> list[dict]:
    """The `long` phase: long prompts, every token generated (ignore_eos), seeded."""
    texts = long_prompts(prompts, args.long_words)
    return [{**body, "ignore_eos": True} for body in bodies(first, count, texts, args)]


async def preflight(probe: httpx.AsyncClient, url: str) -> Any:
    """The server answers and is ready; returns its /v1/models."""
    try:
        ready, models = await probe.get("/ready"), await probe.get("/v1/models")
    except httpx.HTTPError as err:
        raise SoakError(f"{url}: cannot reach the server ({type(err).__name__})") from None
    for path, response in (("/ready", ready), ("/v1/models", models)):
        if response.status_code != 200:
            raise SoakError(f"{url}{path} answered {response.status_code}: {response.text[:200]}")
    try:
        return models.json()
    except ValueError:
        return models.text


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    prompts = load_prompts(args.prompts)
    if args.server_pid and tree_rss(args.server_pid) is None:
        raise SoakError(f"--server-pid {args.server_pid}: no such process")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    most = max(args.concurrency, args.burst)  # connections: every request of a phase at once
    limits = httpx.Limits(max_connections=most, max_keepalive_connections=most)
    timeout = httpx.Timeout(args.request_timeout_s, connect=10.0)
    client = {"base_url": args.url, "headers": headers}
    async with (
        httpx.AsyncClient(**client, timeout=10.0) as probe,  # /metrics: never behind the load
        httpx.AsyncClient(**client, timeout=timeout, limits=limits) as load,
    ):
        models = await preflight(probe, args.url)
        machine = {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        }
        machine |= {"loadavg_start": os.getloadavg(), "started": time.strftime("%FT%T%z")}
        deadline = time.monotonic() + args.deadline_s
        sampler = MemorySampler(probe, args.server_pid)
        sampling = asyncio.create_task(sampler.run())
        phases: dict[str, PhaseSummary] = {}
        try:
            first, progress = 0, not args.no_progress
            plan = [
                ("steady", args.requests, args.concurrency, bodies),
                ("long", args.long, args.concurrency, long_bodies),
                ("burst", args.burst, args.burst, bodies),
            ]
            for name, count, width, make in plan:
                if name == "long" and count == 0:
                    continue
                sampler.phase = name
                todo = make(first, count, prompts, args)
                outcomes, wall = await run_phase(load, name, todo, width, deadline, progress)
                first += count
                sampler.phase = f"{name}-drain"
                phases[name] = summarise(name, outcomes, wall)
                phases[name].idle_after = await wait_idle(probe, args.idle_wait_s)
            sampler.phase = "liveness"
            live = await send(load, bodies(first, 1, prompts, args)[0])
            final = await read_metrics(probe) or {}
        finally:
            sampling.cancel()
            await asyncio.gather(sampling, return_exceptions=True)
    machine |= {"loadavg_end": os.getloadavg(), "finished": time.strftime("%FT%T%z")}
    return report(args, machine, models, phases, live, final, sampler)


def report(
    args: argparse.Namespace, machine: dict, models: Any, phases: dict[str, PhaseSummary],
    live: Outcome, final: dict[str, float], sampler: MemorySampler,
) -> dict[str, Any]:  # fmt: skip
    totals = {
        k: sum(getattr(p, k) for p in phases.values()) for k in (*STATUSES, "accepted", "lost")
    }
    checks = {
        "failed == 0": totals["failed"] == 0,
        "lost == 0": totals["lost"] == 0,
        "idle after each phase": all(p.idle_after["idle"] is not False for p in phases.values()),
        "last request completed": live.status == "completed",
        "no refusals in steady": phases["steady"].refused == 0 or args.allow_steady_refusals,
    }
    memory = sampler.summary()
    for key, label in (("api", "API"), ("tree", "process tree")):
        if memory.get(key, {}).get("flat") is not None:  # None: too few samples to judge
            checks[f"{label} memory flat"] = memory[key]["flat"]
    ivonserve = {
        k: v for k, v in final.items()
        if k.startswith("ivonserve_") and not k.split("{")[0].endswith("_created")
    }  # fmt: skip
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    settings["api_key"] = "***" if args.api_key else None
    settings["mix"] = ",".join(f"{k}x{s}" for k, s in args.mix)
    return {
        "settings": settings, "machine": machine,
        "server": {"models": models, "metrics_final": ivonserve},
        "phases": {name: asdict(p) for name, p in phases.items()}, "totals": totals,
        "deadline_hit": totals["skipped"] > 0, "liveness": asdict(live),
        "memory": memory, "memory_samples": sampler.samples,
        "checks": checks, "ok": all(checks.values()),
    }  # fmt: skip


def markdown(result: dict[str, Any]) -> str:
    cfg, machine = result["settings"], result["machine"]
    lines = [
        f"# Soak: {cfg['url']}",
        "",
        f"{machine['started']}, {machine['platform']}, {machine['cpus']} CPUs, load "
        f"{machine['loadavg_start'][0]:.2f} -> {machine['loadavg_end'][0]:.2f}. "
        f"{cfg['requests']} requests at concurrency {cfg['concurrency']}, "
        f"{cfg['long']} of {cfg['long_words']}-word prompts (ignore_eos), then a burst of "
        f"{cfg['burst']}; mix {cfg['mix']}, max_tokens {cfg['max_tokens']}"
        + (" (deadline hit: some not sent)." if result["deadline_hit"] else "."),
        "",
        "| phase | sent | completed | refused | rejected | failed | req/s | tokens "
        "| p50 s | p95 s | p99 s | max s | idle after |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in result["phases"].values():
        lat = [f"{p['latency_s'][q]:.2f}" if p["latency_s"] else "-" for q in QUANTILES]
        idle = p["idle_after"]
        lines.append(
            f"| {p['name']} | {p['sent']} | {p['completed']} | {p['refused']} | {p['rejected']} "
            f"| {p['failed']} | {p['requests_per_s']:.1f} | {p['tokens']} | {' | '.join(lat)} "
            f"| {idle['idle']} ({idle['waited_s']:.1f} s) |"
        )
    memory = result["memory"]
    lines += ["", f"Memory (MiB; {memory['criterion']}):"]
    for key, label in (("api", "API process (/metrics)"), ("tree", "server process tree")):
        if key in memory:
            lines.append(f"- {label}: {_memory_line(memory[key])}")
    for name, m in memory.get("processes", {}).items():
        lines.append(f"  - {name}: {m['first_mib']:.1f} -> {m['last_mib']:.1f} (steady phase)")
    checks = result["checks"].items()
    lines += ["", "Checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in checks)]
    live = result["liveness"]
    if live["status"] != "completed":
        lines.append(f"Last request: {live['status']} ({live['detail']})")
    for p in result["phases"].values():
        for kind, texts in p["examples"].items():
            lines += [f"- {p['name']} {kind}: {t}" for t in texts]
    return "\n".join(lines) + "\n"


def _memory_line(m: dict[str, Any]) -> str:
    steady, settled = m["steady"], m["settled"]
    text = f"first {m['first_mib']:.1f}, last {m['last_mib']:.1f}, max {m['max_mib']:.1f}; "
    if m["flat"] is None:
        return text + f"steady phase too short for a trend ({steady['samples']} samples)"
    return text + (
        f"steady phase {steady['first_mib']:.1f} -> {steady['last_mib']:.1f}; its last "
        f"{settled['seconds']:.0f} s: trend {settled['trend_mib']:+.1f} "
        f"({settled['slope_mib_per_min']:+.2f}/min): " + ("flat" if m["flat"] else "GROWING")
    )


def write(out: Path, result: dict[str, Any]) -> str:
    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    (out / "soak.md").write_text(text)
    return text


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the running server")
    parser.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY' on every call")
    parser.add_argument("--requests", type=int, default=200, help="steady phase: how many")
    parser.add_argument("--concurrency", type=int, default=8, help="steady phase: in flight")
    parser.add_argument(
        "--long",
        type=int,
        default=16,
        help="long phase: requests of long prompts (chunked prefills); 0: none",
    )
    parser.add_argument("--long-words", type=int, default=300, help="long phase: prompt words")
    parser.add_argument("--burst", type=int, default=64, help="burst phase: sent at once")
    parser.add_argument("--mix", type=parse_mix, default=parse_mix("1x1,2x2,4x2"))
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prompts", type=Path, help="GSM8k jsonl ('question' per line)")
    parser.add_argument("--server-pid", type=int, help="also sample RSS of this process tree")
    parser.add_argument("--deadline-s", type=float, default=1800.0, help="send nothing after")
    parser.add_argument("--request-timeout-s", type=float, default=300.0)
    parser.add_argument("--idle-wait-s", type=float, default=60.0, help="wait for a drain")
    parser.add_argument("--allow-steady-refusals", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak"))
    args = parser.parse_args()
    if not args.url.startswith(("http://", "https://")):
        parser.error(f"--url {args.url!r}: expected http://HOST:PORT")
    if args.requests < 0 or args.burst < 0 or args.concurrency < 1:
        parser.error("--requests and --burst must be >= 0, --concurrency >= 1")
    args.url = args.url.rstrip("/")
    return args


def main() -> int:
    args = parse_args()
    try:
        result = asyncio.run(soak(args))
    except SoakError as err:
        print(f"soak: {err}", file=sys.stderr)
        return 2
    print(write(args.out, result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
