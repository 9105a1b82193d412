"""The on-disk IVON-LoRA posterior: a PEFT adapter (the mean) plus IVON's Hessian estimate.

Layout of a posterior folder (see docs in the README):
- ``adapter_config.json`` + ``adapter_model.safetensors``: the mean m, an ordinary PEFT adapter, so
  peft and vLLM load the mean model unchanged.
- ``hessian.safetensors``: h, same keys and shapes as the mean.
- ``posterior.json``: format tag, version, ess (lambda), weight decay (delta), base model, training.

The variance is IVON's own sampling rule, sigma^2 = 1 / (ess * (h + weight_decay)).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ivonserve.errors import IvonserveError, PosteriorError

FORMAT = "ivon-lora-posterior"
VERSION = 1
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HESSIAN = "hessian.safetensors"
METADATA = "posterior.json"
TRAINING_RECORD = "training.json"  # a plain adapter's (AdamW's) record of its training
IVON_LIVE = "the IVON optimizer"  # what an error names when the state is a live optimizer's
# The hyperparameters of an IVON group that posterior.json's training block records.
IVON_HYPERPARAMETERS = (
    "lr", "ess", "weight_decay", "hess_init", "beta1", "beta2", "clip_radius", "mc_samples",
    "numel",
)  # fmt: skip


@dataclass
class Posterior:
    """A diagonal Gaussian over LoRA weights, keyed like a saved PEFT adapter (no ``.default``)."""

    mean: dict[str, torch.Tensor]
    hess: dict[str, torch.Tensor]
    adapter_config: dict[str, Any]
    ess: float
    weight_decay: float
    base_model: str | None = None
    training: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_pair(self.mean, self.hess, where=HESSIAN)
        for name, value in (("ess", self.ess), ("weight_decay", self.weight_decay)):
            if not math.isfinite(value) and not (name == "ess" and value == math.inf):
                raise PosteriorError(f"{METADATA}: {name} must be finite, got {value}")
        if self.ess <= 0:
            raise PosteriorError(f"{METADATA}: ess must be > 0, got {self.ess}")
        if self.weight_decay < 0:
            raise PosteriorError(f"{METADATA}: weight_decay must be >= 0, got {self.weight_decay}")

    @property
    def keys(self) -> list[str]:
        """Parameter names in a fixed (sorted) order, so draws are reproducible across runs."""
        return sorted(self.mean)

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.mean.values())

    @property
    def rank(self) -> int:
        return int(self.adapter_config.get("r", 8))

    @property
    def target_modules(self) -> list[str]:
        """The base modules the adapter touches; vLLM's LoRA layers are restricted to these."""
        targets = self.adapter_config.get("target_modules") or []
        if isinstance(targets, str):
            targets = [targets]
        return sorted(targets)

    def variance(self, temperature: float = 1.0) -> dict[str, torch.Tensor]:
        """sigma_T^2 = T / (ess * (h + weight_decay)); an infinite ess gives zero variance."""
        if self.ess == math.inf:
            return {k: torch.zeros_like(v) for k, v in self.mean.items()}
        return {
            k: temperature / (self.ess * (self.hess[k].double() + self.weight_decay))
            for k in self.mean
        }

    def sigma(self, temperature: float = 1.0) -> dict[str, torch.Tensor]:
        return {k: v.sqrt() for k, v in self.variance(temperature).items()}

    @classmethod
    def from_adapter(cls, path: str | Path) -> Posterior:
        """A plain PEFT adapter (e.g. the AdamW baseline) as a zero-variance posterior."""
        path = Path(path)
        config = _read_json(path / ADAPTER_CONFIG)
        mean = _read_tensors(path / ADAPTER_WEIGHTS)
        _check_finite(mean, where=str(path / ADAPTER_WEIGHTS))
        hess = {k: torch.zeros_like(v) for k, v in mean.items()}
        training = adapter_training_record(path)
        return cls(mean, hess, config, ess=math.inf, weight_decay=0.0, training=training)

    @classmethod
    def load(cls, path: str | Path) -> Posterior:
        """Read and validate a posterior folder; a defect raises PosteriorError naming the file."""
        path = Path(path)
        if not path.is_dir():
            raise PosteriorError(f"{path}: not a posterior folder (does not exist)")
        meta = _read_json(path / METADATA)
        if meta.get("format") != FORMAT:
            raise PosteriorError(
                f"{path / METADATA}: format is {meta.get('format')!r}, expected {FORMAT!r}"
            )
        if meta.get("version") != VERSION:
            raise PosteriorError(
                f"{path / METADATA}: unknown format version {meta.get('version')!r} "
                f"(this ivonserve reads version {VERSION})"
            )
        for key in ("ess", "weight_decay"):
            if not isinstance(meta.get(key), int | float):
                raise PosteriorError(f"{path / METADATA}: missing or non-numeric {key!r}")
        config = _read_json(path / ADAPTER_CONFIG)
        mean = _read_tensors(path / ADAPTER_WEIGHTS)
        hess = _read_tensors(path / HESSIAN)
        _check_pair(mean, hess, where=str(path / HESSIAN))
        _check_finite(mean, where=str(path / ADAPTER_WEIGHTS))
        _check_finite(hess, where=str(path / HESSIAN))
        _check_precision(hess, float(meta["weight_decay"]), where=str(path / HESSIAN))
        try:
            return cls(
                mean,
                hess,
                config,
                ess=float(meta["ess"]),
                weight_decay=float(meta["weight_decay"]),
                base_model=meta.get("base_model"),
                training=meta.get("training", {}),
            )
        except PosteriorError as err:
            raise PosteriorError(f"{path}: {err}") from None

    def save(self, path: str | Path) -> Path:
        """Write the folder; files go to a temporary name first so a crash leaves no torn file."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        write_adapter(path, self.mean, self.adapter_config)
        _atomic_save_tensors(self.hess, path / HESSIAN)
        self.save_metadata(path)
        return path

    def save_metadata(self, path: str | Path) -> Path:
        """posterior.json alone: a new ess (the sampling spread) leaves the tensors' files as
        they were."""
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "ess": self.ess,
            "weight_decay": self.weight_decay,
            "base_model": self.base_model,
            "training": self.training,
        }
        _atomic_write_text(Path(path) / METADATA, json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return Path(path)

    @classmethod
    def from_ivon(
        cls,
        peft_model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        base_model: str | None = None,
        training: dict[str, Any] | None = None,
        adapter_name: str = "default",
    ) -> Posterior:
        """A live PEFT model and its IVON optimizer: the mean from the parameters, h from each
        group's flat ``hess``, matched to the parameters by identity.

        Call this outside ``optimizer.sampled_params()``, where ``p.data`` is the mean, not a
        sample.
        """
        names = {id(p): _saved_key(n, adapter_name) for n, p in peft_model.named_parameters()}
        mean: dict[str, torch.Tensor] = {}
        groups = []
        for number, group in enumerate(optimizer.param_groups):
            if "hess" not in group:
                raise PosteriorError(f"{IVON_LIVE}: param group {number} has no 'hess': not IVON")
            keys = []
            for param in group["params"]:
                if id(param) not in names:
                    raise PosteriorError(
                        f"{IVON_LIVE}: param group {number} holds a parameter the model does not"
                    )
                keys.append(names[id(param)])
                mean[keys[-1]] = param.detach().to(torch.float32).cpu().clone()
            groups.append(IvonGroup(keys, group["hess"], group["ess"], group["weight_decay"]))
        return cls.from_groups(
            mean,
            groups,
            lora_config_dict(peft_model.peft_config[adapter_name]),
            base_model=base_model,
            training=training,
            where=IVON_LIVE,
        )

    @classmethod
    def from_groups(
        cls,
        mean: dict[str, torch.Tensor],
        groups: list[IvonGroup],
        adapter_config: dict[str, Any],
        *,
        base_model: str | None,
        training: dict[str, Any] | None,
        where: str,
    ) -> Posterior:
        """The one path from IVON's groups to a posterior, live (``from_ivon``) or from a saved
        state (``posterior_import``), so that both write the same bytes.

        IVON keeps h flat per group, its parameters in the group's order. The posterior holds
        one ess and one weight decay, the first group's; a group with others has its h
        re-expressed at them, h' = ess_g (h_g + wd_g) / ess - wd, so that every entry's sigma is
        still ivon-opt's own 1 / sqrt(ess_g (h_g + wd_g)). ``base_model`` defaults to the
        adapter config's ``base_model_name_or_path``.
        """
        ess, weight_decay = float(groups[0].ess), float(groups[0].weight_decay)
        hess: dict[str, torch.Tensor] = {}
        for number, group in enumerate(groups):
            _check_lora_only(group.keys, where)
            sizes = [mean[key].numel() for key in group.keys]
            if group.hess.numel() != sum(sizes):
                raise PosteriorError(
                    f"{where}: param group {number} holds {group.hess.numel()} hess entries, "
                    f"its {len(sizes)} parameters {sum(sizes)}"
                )
            flat = _hess_at(group, ess, weight_decay)
            for key, piece in zip(group.keys, flat.split(sizes), strict=True):
                hess[key] = piece.reshape(mean[key].shape).float().cpu().clone()
        _check_finite(hess, where=where)
        _check_precision(hess, weight_decay, where=where)
        return cls(
            mean,
            hess,
            adapter_config,
            ess=ess,
            weight_decay=weight_decay,
            base_model=base_model or adapter_config.get("base_model_name_or_path") or None,
            training=training or {},
        )

    def stats(self) -> dict[str, Any]:
        """Sigma and signal-to-noise summaries, per module kind and overall (for `inspect`)."""
        sigma = self.sigma()
        by_module: dict[str, list[torch.Tensor]] = {}
        for key in self.keys:
            by_module.setdefault(_module_kind(key), []).append(key)
        all_keys = self.keys
        return {
            "ess": self.ess,
            "weight_decay": self.weight_decay,
            "base_model": self.base_model,
            "rank": self.rank,
            "target_modules": self.target_modules,
            "num_params": self.num_params,
            "num_tensors": len(all_keys),
            "sigma": _quantiles(torch.cat([sigma[k].flatten() for k in all_keys])),
            "snr": _quantiles(
                torch.cat([(self.mean[k].double().abs() / sigma[k]).flatten() for k in all_keys])
            ),
            "hess": _quantiles(torch.cat([self.hess[k].double().flatten() for k in all_keys])),
            "sigma_by_module": {
                kind: _quantiles(torch.cat([sigma[k].flatten() for k in keys]))
                for kind, keys in sorted(by_module.items())
            },
            "training": self.training,
        }


@dataclass(frozen=True)
class IvonGroup:
    """One IVON parameter group: its parameters' saved keys in the group's order, its flat h,
    and the ess and weight decay its sampling rule uses."""

    keys: list[str]
    hess: torch.Tensor
    ess: float
    weight_decay: float


def save_posterior(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    out_dir: str | Path,
    *,
    base_model: str | None = None,
    training: dict[str, Any] | None = None,
    adapter_name: str = "default",
) -> Path:
    """Write the posterior folder of a live PEFT model and its ivon-opt ``IVON`` optimizer: the
    one line a training loop of one's own adds (outside ``sampled_params``). ``base_model``:
    the name posterior.json records (default: the adapter config's base_model_name_or_path);
    ``training``: more to record beside the optimizer's hyperparameters.
    ``ivonserve posterior import`` of the same adapter and ``optimizer.state_dict()`` writes
    the same bytes."""
    record = ivon_record(optimizer.param_groups) | (training or {})
    posterior = Posterior.from_ivon(
        model, optimizer, base_model=base_model, training=record, adapter_name=adapter_name
    )
    return posterior.save(out_dir)


def ivon_record(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """posterior.json's training block from IVON's groups: the hyperparameters each group
    holds, live or in a saved state alike (so both routes record the same)."""
    return {
        "optimizer": "ivon",
        "ivon_param_groups": [
            {k: _json_number(group[k]) for k in IVON_HYPERPARAMETERS if k in group}
            for group in groups
        ],
    }


def lora_config_dict(config: Any) -> dict[str, Any]:
    """A peft ``LoraConfig`` as the adapter_config.json of a posterior: plain JSON, in
    inference mode (as peft's own ``save_pretrained`` writes it)."""
    return _json_safe(config.to_dict()) | {"inference_mode": True}


def adapter_training_record(path: Path) -> dict[str, Any]:
    """What a plain adapter folder records of its training: its training.json (an AdamW run of
    ``ivonserve train``), or the training block of a posterior folder served as an adapter."""
    for name, key in ((TRAINING_RECORD, None), (METADATA, "training")):
        if (path / name).is_file():
            record = _read_json(path / name)
            record = record.get(key) if key else record
            return record if isinstance(record, dict) else {}
    return {}


def load_served(path: str | Path, kind: str, model_dir: Path) -> Posterior:
    """One folder the server serves, checked against the base model: an IVON posterior, or
    (kind ``adapter``) a plain PEFT adapter such as the AdamW baseline as a zero-variance
    posterior, so that one client compares IVON draws, the IVON mean and AdamW alike."""
    path = Path(path)
    posterior = Posterior.from_adapter(path) if kind == "adapter" else Posterior.load(path)
    validate_against_base(posterior, model_dir, where=path / ADAPTER_WEIGHTS)
    return posterior


def validate_against_base(
    posterior: Posterior, model_dir: str | Path, where: str | Path = ADAPTER_WEIGHTS
) -> None:
    """Check every LoRA pair against the base model's weight shapes, reading headers only.

    A posterior trained for another model would otherwise load into vLLM and fail deep inside it.
    ``where`` names the mean's file in the error (the folder matters when several are served).
    """
    shapes = base_weight_shapes(Path(model_dir))
    for key in posterior.keys:
        module, part = _lora_module(key)
        weight = f"{module}.weight"
        if weight not in shapes:
            raise PosteriorError(
                f"{where}: key {key!r} targets {weight!r}, which the base model "
                f"at {model_dir} does not have"
            )
        out_features, in_features = shapes[weight]
        shape = tuple(posterior.mean[key].shape)
        if part == "lora_A" and shape[1] != in_features:
            raise PosteriorError(
                f"{where}: key {key!r} has shape {shape}, the base module "
                f"{weight!r} takes {in_features} inputs"
            )
        if part == "lora_B" and shape[0] != out_features:
            raise PosteriorError(
                f"{where}: key {key!r} has shape {shape}, the base module "
                f"{weight!r} has {out_features} outputs"
            )


def base_weight_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Weight shapes of a transformers folder from its safetensors headers (no tensor is read)."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise PosteriorError(f"{model_dir}: no *.safetensors weights in the base model folder")
    shapes: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    shapes[name] = tuple(handle.get_slice(name).get_shape())
        except Exception as err:  # a torn file: safetensors checks the header covers it all
            raise IvonserveError(f"{file}: unreadable safetensors ({err})") from None
    return shapes


def write_adapter(path: Path, weights: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """One PEFT adapter folder that peft's ``from_pretrained`` and vLLM's ``LoRARequest`` load."""
    path.mkdir(parents=True, exist_ok=True)
    _atomic_save_tensors(weights, path / ADAPTER_WEIGHTS)
    _atomic_write_text(path / ADAPTER_CONFIG, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path


def _saved_key(param_name: str, adapter_name: str) -> str:
    """Peft drops the adapter name in saved keys: ``lora_A.default.weight`` -> ``lora_A.weight``."""
    return param_name.replace(f".{adapter_name}.", ".")


def _hess_at(group: IvonGroup, ess: float, weight_decay: float) -> torch.Tensor:
    """A group's h at another ess and weight decay, with the same precision ess (h + wd)."""
    if (float(group.ess), float(group.weight_decay)) == (ess, weight_decay):
        return group.hess
    precision = float(group.ess) * (group.hess.double() + float(group.weight_decay))
    return precision / ess - weight_decay


def _check_lora_only(keys: list[str], where: str) -> None:
    """A posterior holds LoRA A and B weights; vLLM serves nothing else of an adapter."""
    for key in keys:
        if not any(f".{part}." in key for part in ("lora_A", "lora_B")):
            raise PosteriorError(
                f"{where}: trainable parameter {key!r} is not a LoRA A or B weight "
                "(modules_to_save, DoRA, a bias, trainable tokens): a posterior holds LoRA A and "
                "B alone; give IVON those only"
            )


def _json_number(value: Any) -> Any:
    """inf (IVON's default clip radius) as the string JSON can hold; tensors as numbers."""
    if isinstance(value, torch.Tensor):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _lora_module(key: str) -> tuple[str, str]:
    """``base_model.model.X.lora_A.weight`` -> (``X``, ``lora_A``)."""
    for part in ("lora_A", "lora_B"):
        marker = f".{part}."
        if marker in key:
            module = key.split(marker)[0].removeprefix("base_model.model.")
            return module, part
    raise PosteriorError(f"{ADAPTER_WEIGHTS}: key {key!r} is not a LoRA A/B weight")


def _module_kind(key: str) -> str:
    module, part = _lora_module(key)
    return f"{module.rsplit('.', 1)[-1]}.{part}"


def _quantiles(values: torch.Tensor) -> dict[str, float]:
    values = values.double()
    if values.numel() == 0:
        return {}
    qs = torch.tensor([0.01, 0.5, 0.99], dtype=torch.float64)
    sample = values if values.numel() <= 1_000_000 else values[:: values.numel() // 1_000_000]
    p01, p50, p99 = torch.quantile(sample, qs).tolist()
    return {
        "min": values.min().item(),
        "p01": p01,
        "median": p50,
        "p99": p99,
        "max": values.max().item(),
    }


def _check_pair(mean: dict, hess: dict, where: str) -> None:
    missing = sorted(set(mean) - set(hess))
    if missing:
        raise PosteriorError(f"{where}: missing key {missing[0]!r} (present in the mean adapter)")
    extra = sorted(set(hess) - set(mean))
    if extra:
        raise PosteriorError(f"{where}: key {extra[0]!r} is not in the mean adapter")
    for key in sorted(mean):
        if tuple(mean[key].shape) != tuple(hess[key].shape):
            raise PosteriorError(
                f"{where}: key {key!r} has shape {tuple(hess[key].shape)}, "
                f"the mean has {tuple(mean[key].shape)}"
            )


def _check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    for key in sorted(tensors):
        if not torch.isfinite(tensors[key]).all():
            raise PosteriorError(f"{where}: key {key!r} has NaN or inf entries")


def _check_precision(hess: dict[str, torch.Tensor], weight_decay: float, where: str) -> None:
    """The precision h + weight_decay must be > 0 (negative h itself is fine up to -delta).

    IVON's Hessian update keeps h + delta positive, not h: h_new + delta >= (h + delta) / 2, so a
    trained posterior can hold entries slightly below zero (seen: -5e-7 with delta = 1e-6).
    """
    for key in sorted(hess):
        if (hess[key].double() + weight_decay <= 0).any():
            raise PosteriorError(
                f"{where}: key {key!r} has entries with h + weight_decay <= 0 "
                f"(negative h below -{weight_decay}: no valid variance)"
            )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PosteriorError(f"{path}: missing file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PosteriorError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise PosteriorError(f"{path}: expected a JSON object")
    return data


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise PosteriorError(f"{path}: missing file")
    try:
        tensors = load_file(str(path))
    except Exception as err:  # safetensors raises several types for a torn or foreign file
        raise PosteriorError(f"{path}: unreadable safetensors ({err})") from None
    if not tensors:
        raise PosteriorError(f"{path}: holds no tensors")
    return {k: v.to(torch.float32) for k, v in tensors.items()}


def _atomic_save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.chmod(0o644)  # safetensors creates 0600; a posterior is shared (containers: non-root)
    tmp.replace(path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _json_safe(value: Any) -> Any:
    """PEFT configs hold sets and enums; make them plain JSON the way PEFT's save does."""
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        items = [_json_safe(v) for v in value]
        return sorted(items) if isinstance(value, set) else items
    if hasattr(value, "value") and not isinstance(value, int | float | str | bool):
        return value.value
    return value
