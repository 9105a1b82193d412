"""Reliability: hostile input, a disconnect storm, bad posteriors and models at start-up, and a
vLLM engine that dies under a running server (in a real `ivonserve serve` process)."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import torch
from conftest import free_port, serve_process, stop_live_servers
from safetensors.torch import load_file, save_file

from ivonserve import cli

PROMPT = "What is 17 + 25?"
_NESTED = b"[" * 100_000 + b"]" * 100_000


# --- hostile input --------------------------------------------------------------------------
def _json(body: Any) -> bytes:
    return json.dumps(body).encode()


# (name, route, raw body, content type, status, what the error must name)
HOSTILE = [
    ("empty body", "/generate", b"", "application/json", 422, "body"),
    ("null body", "/generate", b"null", "application/json", 422, "body"),
    ("array body", "/generate", b"[1, 2]", "application/json", 422, "body"),
    ("not json", "/generate", b"{prompt: hi}", "application/json", 422, "JSON"),
    ("json as text/plain", "/generate", _json({"prompt": "hi"}), "text/plain", 422, "body"),
    ("invalid utf-8", "/generate", b'{"prompt": "\xff\xfe\xfa"}', "application/json", 400, "body"),
    ("deeply nested", "/generate", b'{"prompt": ' + _NESTED + b"}", "application/json", 400,
     "body"),
    ("huge body", "/generate", _json({"prompt": "a" * (2 << 20)}), "application/json", 413,
     "max_body_bytes"),
    ("NaN temperature", "/generate", b'{"prompt": "hi", "temperature": NaN}',
     "application/json", 422, "temperature"),
    ("inf top_p", "/generate", b'{"prompt": "hi", "top_p": Infinity}', "application/json", 422,
     "top_p"),
    ("-inf temperature", "/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi"}], "temperature": -Infinity}',
     "application/json", 422, "temperature"),
    ("huge n_samples", "/generate", _json({"prompt": "hi", "n_samples": 10**30}),
     "application/json", 422, "n_samples"),
    ("huge max_tokens", "/v1/completions", _json({"prompt": "hi", "max_tokens": 2**63}),
     "application/json", 422, "max_tokens"),
    ("negative n_models", "/generate", _json({"prompt": "hi", "n_models": -3}),
     "application/json", 422, "n_models"),
    ("seed past int64", "/generate", _json({"prompt": "hi", "seed": 2**64}), "application/json",
     422, "seed"),
    ("float count", "/generate", _json({"prompt": "hi", "n_models": 1.5}), "application/json",
     422, "n_models"),
    ("prompt as list", "/generate", _json({"prompt": ["hi"]}), "application/json", 422,
     "prompt"),
    ("messages as object", "/v1/chat/completions", _json({"messages": {"role": "user"}}),
     "application/json", 422, "messages"),
    ("content as number", "/v1/chat/completions",
     _json({"messages": [{"role": "user", "content": 5}]}), "application/json", 422,
     "messages.0.content"),
    ("prompt over the context", "/generate", _json({"prompt": "seven " * 2000}),
     "application/json", 422, "prompt"),
    ("max_tokens past the context", "/v1/completions",
     _json({"prompt": "seven " * 60, "max_tokens": 480}),
     "application/json", 422, "max_tokens"),
    ("unknown field", "/generate", _json({"prompt": "hi", "tempreature": 1}), "application/json",
     422, "tempreature"),
    ("too many stops", "/generate", _json({"prompt": "hi", "stop": ["a"] * 17}),
     "application/json", 422, "stop"),
    ("unknown model", "/v1/chat/completions",
     _json({"model": "../../etc/passwd", "messages": [{"role": "user", "content": "hi"}]}),
     "application/json", 404, "model"),
    ("batch prompt", "/v1/completions", _json({"prompt": ["a", "b"]}), "application/json", 422,
     "prompt"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("route", "body", "content_type", "status", "names"),
    [case[1:] for case in HOSTILE],
    ids=[case[0] for case in HOSTILE],
)
def test_hostile_input_gets_a_4xx_naming_the_problem(client, route, body, content_type, status,
                                                     names):  # fmt: skip
    answer = client.post(route, content=body, headers={"content-type": content_type})
    assert answer.status_code == status, answer.text[:500]
    error = answer.json()["error"]  # JSON, OpenAI's error shape, never a stack trace
    assert error["code"] == status and names in error["message"] + str(error["param"])
    assert "Traceback" not in answer.text
    assert client.get("/ready").status_code == 200  # and the server is still fine


def test_disconnect_storm_leaves_no_engine_work(live, engine, client):
    """Twelve clients (more than max_in_flight: some wait in the queue) of every kind vanish
    mid-request: nothing keeps running, no slot or queue place leaks."""
    admission = live.app.state.admission
    routes = ["/generate", "/generate", "/v1/chat/completions"]
    sockets = []
    for i in range(12):
        route = routes[i % 3]
        body = {"n_models": 2, "n_samples": 2, "max_tokens": 300, "temperature": 1.0,
                "ignore_eos": True, "stream": i % 2 == 0}  # fmt: skip
        if route == "/generate":
            body["prompt"] = PROMPT
        else:
            body["messages"] = [{"role": "user", "content": PROMPT}]
        raw = _json(body)
        sock = socket.create_connection(("127.0.0.1", live.port))
        sock.sendall(
            f"POST {route} HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(raw)}\r\n\r\n".encode()
            + raw
        )
        sockets.append(sock)
    deadline = time.monotonic() + 120
    while admission.in_flight + admission.queued < 12 or engine.num_unfinished_requests() == 0:
        assert time.monotonic() < deadline, (admission.in_flight, admission.queued)
        time.sleep(0.02)
    assert admission.queued == 12 - admission.max_in_flight
    for sock in sockets:  # abrupt: RST instead of FIN
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        sock.close()
    deadline = time.monotonic() + 30
    while engine.num_unfinished_requests() or admission.in_flight or admission.queued:
        assert time.monotonic() < deadline, (
            engine.num_unfinished_requests(), admission.in_flight, admission.queued,
        )  # fmt: skip
        time.sleep(0.05)
    answer = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 2})
    assert answer.status_code == 200


# --- bad posteriors and models at start-up ----------------------------------------------------
def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def _truncate(name: str) -> Callable[[Path], None]:
    """A damage that cuts the folder's file ``name`` in half (a torn download or copy)."""

    def damage(folder: Path) -> None:
        path = folder / name
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    return damage


def _wrong_hessian_shape(folder: Path) -> None:
    def edit(tensors: dict) -> None:
        key = sorted(tensors)[0]
        tensors[key] = torch.ones(3, 3)

    _edit_tensors(folder / "hessian.safetensors", edit)


def _nan_mean(folder: Path) -> None:
    def edit(tensors: dict) -> None:
        key = sorted(tensors)[0]
        tensors[key][0, 0] = float("nan")

    _edit_tensors(folder / "adapter_model.safetensors", edit)


def _other_base_model(folder: Path) -> None:
    """Consistent, finite, but shaped for a model with a different hidden size."""
    for name in ("adapter_model.safetensors", "hessian.safetensors"):

        def edit(tensors: dict) -> None:
            for key in tensors:
                if "lora_A" in key:
                    tensors[key] = torch.ones(tensors[key].shape[0], 7) * 1e-3

        _edit_tensors(folder / name, edit)


# (name, which folder is damaged, damage, what the one line must say)
BAD_FOLDERS = [
    ("missing folder", "posterior", lambda folder: shutil.rmtree(folder), "does not exist"),
    ("no posterior.json", "posterior", lambda folder: (folder / "posterior.json").unlink(),
     "posterior.json"),
    ("truncated safetensors", "posterior", _truncate("adapter_model.safetensors"),
     "adapter_model.safetensors: unreadable"),
    ("hessian of the wrong shape", "posterior", _wrong_hessian_shape, "hessian.safetensors"),
    ("NaN in the mean", "posterior", _nan_mean, "NaN"),
    ("shaped for another model", "posterior", _other_base_model, "lora_A"),
    ("model with torn weights", "model", _truncate("model.safetensors"),
     "model.safetensors: unreadable safetensors"),
    ("model config not JSON", "model", lambda f: (f / "config.json").write_text("{oops"),
     "config.json: unusable"),
    ("model without tokenizer", "model", lambda f: [p.unlink() for p in f.glob("tokenizer*")],
     "no usable tokenizer"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("target", "damage", "expected"), [b[1:] for b in BAD_FOLDERS], ids=[b[0] for b in BAD_FOLDERS]
)
def test_a_bad_posterior_or_model_is_one_line_and_exit_2_before_listening(
    tmp_path, capsys, tiny_model, tiny_posterior, target, damage, expected
):
    folders = {"model": tiny_model, "posterior": tiny_posterior}
    folders[target] = bad = _copy(folders[target], tmp_path / "bad")
    damage(bad)
    port = free_port()
    code = cli.main(["serve", "--model", str(folders["model"]),
                     "--posterior", f"bad={folders['posterior']}",
                     "--port", str(port), "--log-level", "error"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(f"ivonserve: error: {bad}") and expected in line, line
    assert "ivonserve: http://" not in out  # refused before the server listened
    with socket.socket() as probe:  # and nothing was left listening
        probe.bind(("127.0.0.1", port))


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--model", "/no/such/model"], "/no/such/model"),
        (["--adapter", "a=/no/such/adapter"], "/no/such/adapter"),
        (["--api-key-file", "/no/such/keys"], "/no/such/keys"),
        (["--posterior", "bad name=/x"], "[NAME=]DIR"),
        (["--config", "/no/such/config.toml"], "/no/such/config.toml"),
    ],
)
def test_bad_start_up_settings_are_one_line_and_exit_2(capsys, tiny_model, tiny_posterior, flags,
                                                        expected):  # fmt: skip
    base = ["serve", "--model", str(tiny_model), "--posterior", str(tiny_posterior),
            "--port", str(free_port()), "--log-level", "error"]  # fmt: skip
    code = cli.main(base + flags)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    (line,) = err.strip().splitlines()
    assert expected in line, line


# --- the engine dies under a running server ---------------------------------------------------
@pytest.mark.e2e
def test_engine_death_fails_requests_and_readiness_then_exits_1(tmp_path, tiny_model,
                                                                 tiny_posterior):  # fmt: skip
    stop_live_servers()  # one vLLM engine at a time
    log_path = tmp_path / "serve.log"
    args = ["--model", str(tiny_model), "--posterior", f"tiny={tiny_posterior}", "--pool-size",
            "2", "--enforce-eager", "--log-level", "info"]  # fmt: skip
    with serve_process(args, log_path) as (url, proc):
        family = psutil.Process(proc.pid).children(recursive=True)
        result: dict[str, Any] = {}
        body = {"prompt": PROMPT, "n_models": 2, "n_samples": 4, "max_tokens": 450,
                "temperature": 1.0, "ignore_eos": True}  # fmt: skip
        chat = {"messages": [{"role": "user", "content": PROMPT}], "stream": True,
                **{k: v for k, v in body.items() if k != "prompt"}}  # fmt: skip

        def call() -> None:
            result["response"] = httpx.post(f"{url}/generate", json=body, timeout=120)

        def stream(name: str, path: str, payload: dict) -> None:
            with httpx.stream("POST", f"{url}{path}", json=payload, timeout=120) as answer:
                result[name] = [line for line in answer.iter_lines() if line]

        # Freeze the engine core first: the tiny model would finish the request between two
        # polls, so only a stopped core guarantees the kill lands mid-request.
        core = _engine_core(proc.pid)
        core.suspend()
        threads = [
            threading.Thread(target=call, daemon=True),
            threading.Thread(
                target=stream, args=("generate", "/generate", {**body, "stream": True}),
                daemon=True,
            ),
            threading.Thread(
                target=stream, args=("chat", "/v1/chat/completions", chat), daemon=True
            ),
        ]  # fmt: skip
        for thread in threads:
            thread.start()
        _wait_in_flight(url, result, 3)
        core.kill()
        statuses = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                statuses.append(httpx.get(f"{url}/ready", timeout=5).status_code)
            except httpx.TransportError:
                break  # the server has stopped listening
            time.sleep(0.02)
        for thread in threads:
            thread.join(60)
        answer = result["response"]
        assert answer.status_code == 503, answer.text
        assert "engine died" in answer.json()["error"]["message"]
        # each stream ends with OpenAI's error object, then [DONE]: never a truncated body
        for name in ("generate", "chat"):
            lines = result[name]
            assert lines[-1] == "data: [DONE]", (name, lines[-3:])
            last = json.loads(lines[-2].removeprefix("data: "))
            assert "engine died" in last["error"]["message"], (name, last)
            assert last["error"]["code"] == 503 and last["error"]["type"]
        assert json.loads(result["generate"][-2].removeprefix("data: "))["type"] == "error"
        assert 503 in statuses and statuses[-1] == 503  # never back to 200
        assert proc.wait(timeout=120) == 1
        assert "the vLLM engine died" in log_path.read_text()
    _, alive = psutil.wait_procs(family, timeout=60)
    assert not alive, alive  # no orphaned engine processes


def _wait_in_flight(url: str, result: dict[str, Any], count: int = 1) -> None:
    deadline = time.monotonic() + 60
    while f"ivonserve_requests_in_flight {count:.1f}" not in httpx.get(f"{url}/metrics").text:
        assert time.monotonic() < deadline, f"the request never started: {result}"
        time.sleep(0.05)
    time.sleep(0.5)  # its engine requests are sent to the (frozen) core


def _engine_core(server_pid: int) -> psutil.Process:
    children = psutil.Process(server_pid).children(recursive=True)
    cores = [c for c in children if "EngineCore" in " ".join([c.name(), *c.cmdline()])]
    assert cores, [(c.pid, c.name(), c.cmdline()) for c in children]
    return cores[0]
