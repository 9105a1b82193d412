"""Session fixtures: a tiny model and posterior, and ONE live server with the real vLLM engine.

vLLM's CPU engine takes 25-90 s to start on these machines, so the whole session shares one
uvicorn server (in a background thread, on a free port) whose lifespan starts the engine. Engine
level tests run their coroutines on that server's event loop (``live.run(coro)``): AsyncLLM is
bound to the loop it runs in. What the server answered while the engine was still starting is
recorded (``live.startup_probe``) for the 503-before-ready test.

Only one vLLM engine may run at a time (2 cores): tests marked ``e2e`` run last, and their fixture
stops the shared tiny server before starting the real-model one.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

STARTUP_TIMEOUT_S = 900
POOL_SIZE = 4
_LIVE: list[LiveServer] = []


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(  # raised inside torch when vLLM is imported; not ours
        "filterwarnings", "ignore:`torch.jit.script_method` is deprecated:DeprecationWarning"
    )


ENGINE_FIXTURES = frozenset({"live", "client", "engine", "serve_with"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that starts vLLM (through an engine fixture) is marked ``engine``, so
    ``make test-fast`` (``-m "not engine and not e2e"``) runs the rest; e2e tests run last:
    their fixture stops the shared tiny engine (one engine at a time)."""
    for item in items:
        if ENGINE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.engine)
    items.sort(key=lambda item: item.get_closest_marker("e2e") is not None)


def bench_script(name: str):
    """bench/ is scripts, not a package: load bench/NAME.py by path, registered in sys.modules (its
    dataclasses need that)."""
    path = Path(__file__).parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = sys.modules.setdefault(name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)
    return module


def bench_args(command: str, url: str, data: Path, out: Path, *extra: str) -> Any:
    """`ivonserve bench COMMAND` against ``url`` as the CLI parses it, without progress bars."""
    from ivonserve.cli import build_parser

    argv = ["bench", command, "--url", url, "--data", str(data), "--out", str(out),
            "--no-progress", *extra]  # fmt: skip
    return build_parser().parse_args(argv)


def read_records(folder: Path) -> list[dict]:
    """A bench run's records, in the order they were written."""
    return [json.loads(line) for line in (folder / "records.jsonl").read_text().splitlines()]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ivonserve_command() -> list[str]:
    """The CLI as a user runs it: the installed script where there is one."""
    script = Path(sys.executable).parent / "ivonserve"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "ivonserve.cli"]


def log_tail(log: Path) -> str:
    """A server log's last lines, without the settings table printed at start-up."""
    lines = log.read_text(errors="replace").splitlines()
    kept = [line for line in lines if not line.startswith("  ")]
    return "\n".join(kept[-40:])


@contextlib.contextmanager
def serve_process(args: list[str], log: Path) -> Iterator[tuple[str, subprocess.Popen]]:
    """`ivonserve serve ARGS` as a real process on a free port, yielded (url, process) once
    /ready answers; stopped as Ctrl-C stops it (SIGINT: the lifespan stops the engine)."""
    port = free_port()
    with log.open("w") as sink:
        command = [*ivonserve_command(), "serve", *args, "--port", str(port)]
        proc = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_ready(proc, url, log)
            yield url, proc
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _wait_until_ready(proc: subprocess.Popen, url: str, log: Path) -> None:
    began = time.monotonic()
    with httpx.Client(base_url=url, timeout=10) as client:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ivonserve serve exited ({proc.returncode}):\n{log_tail(log)}")
            if time.monotonic() - began > STARTUP_TIMEOUT_S:
                pytest.fail(f"not ready after {STARTUP_TIMEOUT_S} s:\n{log_tail(log)}")
            try:
                if client.get("/ready").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)


class LiveServer:
    """uvicorn serving ``app`` from a background thread; ``run`` executes on its event loop."""

    def __init__(self, app: Any, port: int) -> None:
        import uvicorn

        self.app = app
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.loop: asyncio.AbstractEventLoop | None = None
        self.startup_probe: dict[str, Any] = {}
        outer = self

        class _Server(uvicorn.Server):
            async def serve(self, sockets=None):
                outer.loop = asyncio.get_running_loop()
                await super().serve(sockets)

        config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
        self.server = _Server(config)
        self.thread = threading.Thread(target=self.server.run, name="live-uvicorn", daemon=True)

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        _LIVE.append(self)

    def probe_while_starting(self) -> None:
        """What the app answers before the engine is ready (it must answer at all)."""
        with httpx.Client(base_url=self.url, timeout=10) as client:
            health = client.get("/health")
            ready = client.get("/ready")
            gen = client.post("/generate", json={"prompt": "hi", "max_tokens": 2})
            models = client.get("/v1/models")
        self.startup_probe = {
            "health": (health.status_code, health.json()),
            "ready": (ready.status_code, ready.json()),
            "generate": (gen.status_code, gen.json()),
            "models": (models.status_code, models.json()),
        }

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while time.monotonic() < deadline:
                answer = client.get("/ready")
                if answer.status_code == 200:
                    return
                if answer.json().get("status") == "failed":
                    raise RuntimeError(f"engine failed to start: {answer.json()}")
                time.sleep(0.5)
        raise RuntimeError(f"engine not ready after {timeout} s")

    @property
    def engine(self) -> Any:
        return self.app.state.engine_state.engine

    def run(self, coro: Any, timeout: float = 300) -> Any:
        """Run a coroutine on the server's loop (where the engine lives) and return its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        if self in _LIVE:
            _LIVE.remove(self)
        self.server.should_exit = True
        self.thread.join(timeout=120)


class ExtraServer:
    """Another app with its own settings (limits, keys, CORS) on the shared engine: uvicorn
    serves it as a task on the live server's loop, where the engine lives."""

    def __init__(self, live: LiveServer, settings: Any) -> None:
        import uvicorn

        from ivonserve.server import create_app

        self.app = create_app(settings, engine=live.engine)
        self.url = f"http://127.0.0.1:{settings.port}"
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=settings.port,
            log_level="warning",
            timeout_graceful_shutdown=settings.drain_timeout_s,
        )
        self.server = uvicorn.Server(config)
        self.done = asyncio.run_coroutine_threadsafe(self.server.serve(), live.loop)
        deadline = time.monotonic() + 30
        while not self.server.started:
            if self.done.done() or time.monotonic() > deadline:
                raise RuntimeError(f"extra server did not start: {self.done}")
            time.sleep(0.02)

    def stop(self, timeout: float = 120) -> None:
        self.server.should_exit = True
        self.done.result(timeout)


@pytest.fixture()
def serve_with(live: LiveServer, tiny_settings: Any):
    """``serve_with(max_in_flight=1, ...)``: an extra server on the shared engine."""
    servers: list[ExtraServer] = []

    def start(**update: Any) -> ExtraServer:
        settings = tiny_settings.model_copy(update={"port": free_port(), **update})
        servers.append(ExtraServer(live, settings))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


def stop_live_servers() -> None:
    for live in list(_LIVE):
        live.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    stop_live_servers()  # never leave engine processes behind


def fake_pool(name: str = "tiny", size: int = POOL_SIZE) -> Any:
    """A ``Pool`` without vLLM: its adapters are strings naming them (``tiny/d0``, ...)."""
    from ivonserve.pool import Pool, PreparedPool

    prepared = PreparedPool(
        name=name, posterior_dir=Path(name), seed=0, rank=8, target_modules=["q_proj"],
        mean_dir=Path(name), draw_dirs=[Path(f"{name}-{d}") for d in range(size)],
    )  # fmt: skip
    return Pool(prepared=prepared, mean=f"{name}/mean", draws=[f"{name}/d{d}" for d in range(size)])


# --- tiny model and posterior -------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_model(tiny_root: Path) -> Path:
    from tiny import make_tiny_model

    return make_tiny_model(tiny_root / "model")


@pytest.fixture(scope="session")
def tiny_posterior(tiny_root: Path, tiny_model: Path) -> Path:
    from tiny import write_train_data

    from ivonserve.train import TrainConfig, train

    config = TrainConfig(
        data=str(write_train_data(tiny_root / "train.jsonl")),
        out=str(tiny_root / "posterior"),
        steps=4,
        batch_size=2,
        ess=1e4,  # sigma ~0.58: draws differ visibly
        max_length=64,
        checkpoint_every=2,
        precision="float32",  # the same weights on every CPU (auto: bf16 where native)
    )
    out = train(config, tiny_model, progress=False)
    # Four steps barely move lora_B from its zero init, so the mean adapter would decode like the
    # base model; shift the mean so that every adapter, the mean included, is told apart from it.
    import torch

    from ivonserve.posterior import Posterior

    posterior = Posterior.load(out)
    generator = torch.Generator().manual_seed(0)
    for key in posterior.keys:
        if "lora_B" in key:
            shape = posterior.mean[key].shape
            posterior.mean[key] += 0.5 * torch.randn(shape, generator=generator)
    return posterior.save(out)


@pytest.fixture(scope="session")
def tiny_settings(tiny_model: Path, tiny_posterior: Path) -> Any:
    from ivonserve.config import Settings

    return Settings(
        model=str(tiny_model),
        # the posterior, and its mean as a plain adapter: two pools on one engine
        posterior=[f"tiny={tiny_posterior}"],
        adapter=[f"tiny-mean={tiny_posterior}"],
        port=free_port(),
        pool_size=POOL_SIZE,
        pool_seed=0,
        prune=0.1,
        max_candidates=64,
        default_n_models=2,
        default_n_samples=2,
        default_max_tokens=16,
        max_tokens_limit=480,
        default_temperature=0.8,
        default_selection="model",
        default_utility="chrf",
        request_timeout_s=120,
        dtype="float32",  # parity with peft + transformers is exact in float32
        # small: prefills of concurrent requests are chunked (the seeded-sampling fix's case)
        max_num_batched_tokens=256,
        log_level="warning",
    )


@pytest.fixture(scope="session")
def live(tiny_settings: Any) -> LiveServer:
    """The shared server on the tiny model + posterior, started once per session."""
    from ivonserve.server import create_app

    server = LiveServer(create_app(tiny_settings), tiny_settings.port)
    server.start()
    try:
        server.probe_while_starting()
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    yield server
    server.stop()


@pytest.fixture(scope="session")
def engine(live: LiveServer) -> Any:
    return live.engine


@pytest.fixture()
def client(live: LiveServer) -> httpx.Client:
    with httpx.Client(base_url=live.url, timeout=120) as http:
        yield http


# --- the peft + transformers reference ----------------------------------------------------------
class HFReference:
    """Greedy decoding with peft + transformers in float32, the parity reference for vLLM."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._cache: dict[tuple, list[int]] = {}
        self._models: dict[str, Any] = {}

    def prompt_ids(self, prompt: str) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        return self.tokenizer.encode(text, add_special_tokens=False)

    def greedy(self, adapter_dir: str | Path | None, prompt_ids: list[int], n: int) -> list[int]:
        """n new tokens, greedy, never stopping at EOS (vLLM's ignore_eos); cached."""
        key = (str(adapter_dir), tuple(prompt_ids), n)
        if key not in self._cache:
            self._cache[key] = self._greedy(adapter_dir, prompt_ids, n)
        return self._cache[key]

    def model(self, adapter_dir: str | Path | None) -> Any:
        """The base model in float32 with the adapter on top (None: the base model), cached."""
        key = str(adapter_dir)
        if key not in self._models:
            import torch
            from peft import PeftModel
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32)
            if adapter_dir is not None:
                model = PeftModel.from_pretrained(model, str(adapter_dir))
            self._models[key] = model.eval()
        return self._models[key]

    def logprobs(self, adapter_dir: str | Path | None, ids: list[int], start: int) -> list[float]:
        """Teacher-forced log p(ids[t] | ids[:t]) for t = start..end (one forward pass)."""
        import torch

        with torch.no_grad():
            logits = self.model(adapter_dir)(torch.tensor([ids])).logits[0].double()
        table = torch.log_softmax(logits, dim=-1)
        return [table[t - 1, ids[t]].item() for t in range(start, len(ids))]

    def _greedy(self, adapter_dir: str | Path | None, prompt_ids: list[int], n: int) -> list[int]:
        """Argmax decoding by hand, one forward pass per token: generate() may stop at the
        model's EOS whatever the generation config says, vLLM's ignore_eos never does."""
        import torch

        model = self.model(adapter_dir)
        ids = list(prompt_ids)
        with torch.no_grad():
            for _ in range(n):
                logits = model(torch.tensor([ids])).logits[0, -1]
                ids.append(int(torch.argmax(logits)))
        return ids[len(prompt_ids) :]

    def decode(self, ids: list[int]) -> str:
        """The text vLLM returns for these ids: vLLM's incremental detokenizer withholds an
        incomplete UTF-8 sequence at the very end (the random tiny model emits raw bytes), so
        trailing U+FFFD replacement characters are dropped; the token ids are compared exactly."""
        return self.tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


@pytest.fixture(scope="session")
def hf(tiny_model: Path) -> HFReference:
    return HFReference(tiny_model)
