"""Two replicas on a real local Ray cluster (`ivonserve serve-ray`, Ray Serve, the tiny model):
requests spread over both, a seed gives the same answer on either, and a replica killed mid-
request costs its in-flight requests a clear error, no hang, while Ray replaces it."""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from conftest import free_port, ivonserve_command, stop_live_servers

from ivonserve.ray_serve import BIND_ENV, pin_engine_threads

PROMPT = "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?"
REPLICA = "x-ivonserve-replica"


def _wait_running(url: str, proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    """Until serve-ray says the application runs (every replica up), and /ready answers."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"serve-ray exited ({proc.returncode}): {log.read_text()[-3000:]}")
        if f"ivonserve on Ray Serve: {url}" in log.read_text():
            assert httpx.get(f"{url}/ready", timeout=30).status_code == 200
            return
        time.sleep(1)
    pytest.fail(f"not running after {timeout} s: {log.read_text()[-3000:]}")


def _pid(replica: str) -> int:
    return int(replica.rsplit("pid ", 1)[1])


@pytest.mark.e2e
def test_two_ray_serve_replicas_spread_agree_and_survive_a_kill(tmp_path, tiny_model,
                                                                 tiny_posterior):  # fmt: skip
    stop_live_servers()  # no other vLLM engine beside the replicas'
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "serve-ray.log"
    command = [*ivonserve_command(), "serve-ray", "--replicas", "2", "--num-cpus", "1",
               "--model", str(tiny_model), "--posterior", f"tiny={tiny_posterior}",
               "--pool-size", "2", "--dtype", "float32", "--enforce-eager", "--port", str(port),
               "--log-level", "warning"]  # fmt: skip
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    with log.open("w") as sink:
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    try:
        began = time.monotonic()
        _wait_running(url, proc, log)
        startup = time.monotonic() - began
        body = {"prompt": PROMPT, "n_models": 2, "n_samples": 2, "max_tokens": 12, "seed": 5,
                "return_candidates": True}  # fmt: skip
        answers: dict[str, list[dict]] = collections.defaultdict(list)
        with httpx.Client(base_url=url, timeout=120) as client:
            for _ in range(16):
                answer = client.post("/generate", json=body)
                assert answer.status_code == 200, answer.text
                answers[answer.headers[REPLICA]].append(answer.json())
        assert len(answers) == 2, dict(answers)  # spread over both replicas
        assert all(len(a) >= 2 for a in answers.values())
        first, second = (a[0] for a in answers.values())
        for key in ("text", "answer", "confidence", "chosen_draw", "chosen_model", "chosen_sample"):
            assert first[key] == second[key], key  # the same pool on every replica
        assert [c["text"] for c in first["candidates"]] == [c["text"] for c in second["candidates"]]

        # kill one replica while requests are in flight on both: its vLLM engine is frozen
        # first, so whatever the router gives it is still running when the kill lands
        victim = next(iter(answers))
        engine_processes = psutil.Process(_pid(victim)).children(recursive=True)
        assert engine_processes, "the replica's vLLM engine processes"
        for process in engine_processes:
            process.suspend()
        results: list[httpx.Response | Exception] = []
        long = {"prompt": PROMPT, "n_models": 2, "n_samples": 4, "max_tokens": 400,
                "ignore_eos": True, "temperature": 1.0}  # fmt: skip

        def call() -> None:
            try:
                results.append(httpx.post(f"{url}/generate", json=long, timeout=180))
            except httpx.HTTPError as err:
                results.append(err)

        threads = [threading.Thread(target=call, daemon=True) for _ in range(8)]
        for thread in threads:
            thread.start()
        time.sleep(5)
        os.kill(_pid(victim), signal.SIGKILL)  # the replica and its engine: a lost machine
        for process in engine_processes:
            process.kill()
        for thread in threads:
            thread.join(200)
        assert len(results) == 8, "a request hung"
        codes = [r.status_code if isinstance(r, httpx.Response) else repr(r) for r in results]
        lost = [r for r in results if isinstance(r, httpx.Response) and r.status_code != 200]
        assert lost, codes  # some were on the killed replica
        for answer in lost:
            assert answer.status_code == 503, codes
            error = answer.json()["error"]
            assert "replica serving this request was lost" in error["message"], error
            assert answer.headers["retry-after"]
        # later requests succeed (a 503 only while the router still knows the dead replica),
        # and Ray brings a replacement up
        seen: set[str] = set()
        refused = 0
        deadline = time.monotonic() + 600
        with httpx.Client(base_url=url, timeout=120) as client:
            while time.monotonic() < deadline and len(seen - {victim}) < 2:
                answer = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 2})
                if answer.status_code == 503:
                    assert "replica serving this request was lost" in answer.text, answer.text
                    refused += 1
                    continue
                assert answer.status_code == 200, answer.text
                seen.add(answer.headers[REPLICA])
                time.sleep(0.5)
        assert victim not in seen and len(seen) == 2, seen
        assert refused <= 5, refused  # the controller notices a dead replica in seconds
        print(
            f"ray serve: 2 replicas ready after {startup:.0f} s; kill: {codes}, then "
            f"{refused} refused before the survivor and the replacement answered"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    assert code == 0, log.read_text()[-3000:]


def test_each_replica_pins_vllms_threads_to_its_own_cores(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setenv(BIND_ENV, "")
    assert pin_engine_threads(1, 2) == "2,3" == os.environ[BIND_ENV]  # replica 1: cores 2 and 3
    monkeypatch.setenv(BIND_ENV, "")
    assert pin_engine_threads(0, 1) == "0"
    monkeypatch.setenv(BIND_ENV, "")
    assert pin_engine_threads(2, 2) is None and not os.environ[BIND_ENV]  # no cores left: vLLM's
    monkeypatch.setenv(BIND_ENV, "0-1")
    assert pin_engine_threads(0, 1) is None and os.environ[BIND_ENV] == "0-1"  # the user's choice
