"""`bench/soak.py`: its accounting against a live server's own metrics, its memory verdict, and its
one-line refusal of a server it cannot reach."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import bench_script, free_port
from test_api import metric, scrape

SCRIPT = Path(__file__).parents[1] / "bench" / "soak.py"


def _run(url: str, out: Path, *extra: str) -> subprocess.CompletedProcess:
    command = [sys.executable, str(SCRIPT), "--url", url, "--out", str(out), "--no-progress"]
    return subprocess.run([*command, *extra], capture_output=True, text=True, timeout=600)


def test_soak_counts_what_the_server_counted(serve_with, tmp_path):
    srv = serve_with(max_in_flight=1, max_queued=1)
    out = tmp_path / "soak"
    args = ["--requests", "4", "--concurrency", "1", "--burst", "6", "--mix", "1x1,2x2",
            "--max-tokens", "48", "--idle-wait-s", "60", "--long", "3",
            "--long-words", "120"]  # fmt: skip
    run = _run(srv.url, out, *args)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((out / "soak.json").read_text())
    steady, burst = result["phases"]["steady"], result["phases"]["burst"]
    long = result["phases"]["long"]
    assert (steady["sent"], steady["completed"], steady["refused"]) == (4, 4, 0)
    # long prompts at every token (ignore_eos): prefills past the server's 256-token budget
    assert (long["sent"], long["completed"], long["failed"]) == (3, 3, 0)
    # requests 4..6 of the cycled mix 1x1,2x2 at 48 tokens each, every token generated
    assert long["tokens"] == sum(max(1, k) * s * 48 for k, s in [(1, 1), (2, 2), (1, 1)])
    assert burst["sent"] == 6 and burst["completed"] + burst["refused"] == 6
    assert burst["completed"] >= 2  # one in flight + one queued are always accepted
    assert result["totals"]["failed"] == result["totals"]["lost"] == 0
    assert result["liveness"]["status"] == "completed"
    assert all(result["checks"].values()) and result["ok"]
    # the client's view equals the server's: every 200 and every 429 it counted was answered
    samples = scrape(srv.url)
    completed = steady["completed"] + long["completed"] + burst["completed"] + 1  # + liveness
    assert metric(samples, "ivonserve_requests_total", route="/generate", status="200") == completed
    refused = metric(samples, "ivonserve_requests_total", route="/generate", status="429")
    assert refused == burst["refused"]
    assert "| burst | 6 |" in (out / "soak.md").read_text()


def test_memory_verdict_forgives_warm_up_but_not_a_climb():
    soak = bench_script("soak")
    sampler = soak.MemorySampler(None, None)
    warm_then_level = [1000 + min(t, 50) * 4 for t in range(200)]  # +200 MiB, then flat
    climbing = [1000 + t * 0.5 for t in range(200)]  # +50 MiB over each 100 s, to the end
    sampler.samples = [
        {"t": float(t), "phase": "steady", "api": a * soak.MIB, "tree": c * soak.MIB}
        for t, (a, c) in enumerate(zip(warm_then_level, climbing, strict=True))
    ]
    memory = sampler.summary()
    assert memory["api"]["flat"] is True
    assert memory["api"]["steady"]["growth_mib"] == 200
    assert memory["tree"]["flat"] is False
    assert abs(memory["tree"]["settled"]["trend_mib"] - 49.5) < 1e-6
    assert "GROWING" in soak._memory_line(memory["tree"])
    sampler.samples = sampler.samples[:8]  # too short a run to judge
    assert sampler.summary()["api"]["flat"] is None


def test_an_unreachable_server_is_one_line_and_exit_2(tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    run = _run(url, tmp_path / "soak", "--requests", "1", "--burst", "0")
    assert run.returncode == 2
    assert run.stderr.strip() == f"soak: {url}: cannot reach the server (ConnectError)"
    assert not (tmp_path / "soak").exists()
