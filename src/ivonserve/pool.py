"""A posterior's pool: its mean and K draws written as PEFT folders, then registered with vLLM.

``PosteriorSpec`` names one posterior to serve (``--posterior NAME=DIR``); the settings parse
it, the engine makes its pool from it.

Each adapter gets a unique name AND a unique int id: vLLM keys its prefix cache on the name, and
reusing a name with a new id would reuse the old adapter's KV cache. The folders go to tmpfs
(/dev/shm where the machine has it): vLLM registers LoRA adapters from disk only.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ivonserve.errors import EngineError, IvonserveError

if TYPE_CHECKING:
    from vllm.lora.request import LoRARequest

    from ivonserve.sampler import SamplerConfig

# vLLM accepts only these max_lora_rank values; the posterior's rank is rounded up to one.
_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,63}")  # also a folder name


@dataclass(frozen=True)
class PosteriorSpec:
    """One served posterior: its name (the request's `model`), folder, and kind."""

    name: str
    path: Path
    kind: Literal["posterior", "adapter"] = "posterior"

    @classmethod
    def parse(cls, text: str, kind: Literal["posterior", "adapter"] = "posterior") -> PosteriorSpec:
        """``NAME=DIR`` or ``DIR`` (named after the folder)."""
        name, sep, folder = text.partition("=")
        if not sep:
            name, folder = "", text
        path = Path(folder.strip()).expanduser()
        name = name.strip() or path.resolve().name
        if not folder.strip() or not _NAME.fullmatch(name):
            raise IvonserveError(
                f"setting {kind}: {text!r} is not [NAME=]DIR with NAME made of letters, digits, "
                "'.', '_', '-' (at most 64, not starting with '.')"
            )
        return cls(name=name, path=path, kind=kind)


@dataclass
class PreparedPool:
    """One posterior's adapters written to tmpfs (the mean and K draws), not yet registered."""

    name: str
    posterior_dir: Path
    seed: int
    rank: int
    target_modules: list[str]
    mean_dir: Path
    draw_dirs: list[Path]
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Pool:
    """A prepared pool registered with vLLM: the mean and the K draws as LoRA slots."""

    prepared: PreparedPool
    mean: LoRARequest
    draws: list[LoRARequest]

    @property
    def name(self) -> str:
        return self.prepared.name

    @property
    def info(self) -> dict[str, Any]:
        return self.prepared.info

    @property
    def size(self) -> int:
        return len(self.draws)

    @property
    def loras(self) -> list[LoRARequest]:
        return [self.mean, *self.draws]

    def adapters(self, n_draws: int) -> list[tuple[int | None, LoRARequest]]:
        """(draw index, adapter) for draws 0..n_draws-1; n_draws = 0: [(None, the mean)].

        The request's limit (n_models <= K) is the server's, checked once (``server.limits``);
        a count past the pool here is the caller's bug, not the client's."""
        if not 0 <= n_draws <= self.size:
            raise ValueError(f"n_draws {n_draws} is outside 0..{self.size} (the pool size)")
        if n_draws == 0:
            return [(None, self.mean)]
        return list(enumerate(self.draws[:n_draws]))


def prepare_pool(
    spec: PosteriorSpec,
    model_dir: Path,
    sampler_config: SamplerConfig,
    size: int,
    seed: int,
    workdir: Path,
) -> PreparedPool:
    """Load one posterior, check it fits the base model, write its mean and K draws."""
    from ivonserve.choices import recorded_form
    from ivonserve.posterior import load_served
    from ivonserve.sampler import Sampler

    with _one_torch_thread():
        posterior = load_served(spec.path, spec.kind, model_dir)
        sampler = Sampler(posterior, sampler_config)
        mean_dir, draw_dirs = sampler.write_pool(size, seed, workdir / spec.name)
    return PreparedPool(
        name=spec.name,
        posterior_dir=spec.path,
        seed=seed,
        rank=posterior.rank,
        target_modules=posterior.target_modules,
        mean_dir=mean_dir,
        draw_dirs=draw_dirs,
        info={
            "kind": spec.kind,
            "ess": posterior.ess,
            "base_model": posterior.base_model,
            "mc_form": recorded_form(posterior.training),  # /score/choices' default: its record
            "posterior_temperature": sampler_config.posterior_temperature,
            "prune": sampler_config.prune,
            "prune_by": sampler_config.prune_by,
        },
    )


@contextlib.contextmanager
def _one_torch_thread() -> Iterator[None]:
    """The pool's tensors are small (a rank-8 adapter is ~0.5M numbers): torch's thread team
    costs more than it gains, and on a busy machine its threads wait for cores (sigma of the
    default posterior took 2.0 s with 2 threads beside other jobs, 0.01 s with one)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


async def register_pool(llm: Any, prepared: PreparedPool, lora_ids: Iterator[int]) -> Pool:
    """Add the mean and every draw to vLLM as LoRA adapters; a refusal is an EngineError."""
    from vllm.lora.request import LoRARequest

    def lora(kind: str, path: Path) -> LoRARequest:
        lora_id = next(lora_ids)
        # name unique per adapter in this engine (the prefix cache is keyed on it)
        name = f"{prepared.name}/{kind}/seed{prepared.seed}/id{lora_id}"
        return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=str(path))

    mean = lora("mean", prepared.mean_dir)
    draws = [lora(f"draw{d}", path) for d, path in enumerate(prepared.draw_dirs)]
    for request in (mean, *draws):
        if not await llm.add_lora(request):
            raise EngineError(f"vLLM refused adapter {request.lora_name}")
    return Pool(prepared=prepared, mean=mean, draws=draws)


def vllm_rank(rank: int) -> int:
    """The smallest max_lora_rank vLLM accepts that holds ``rank``."""
    for allowed in _VLLM_LORA_RANKS:
        if rank <= allowed:
            return allowed
    raise EngineError(f"LoRA rank {rank} exceeds vLLM's largest max_lora_rank 512")


def tmpfs_dir() -> Path:
    """A fresh folder for adapter files: on /dev/shm (RAM) when the machine has it."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    return Path(tempfile.mkdtemp(prefix="ivonserve-pool-", dir=base))
