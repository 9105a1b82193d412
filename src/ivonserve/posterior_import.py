"""A posterior from what ivon-opt training elsewhere leaves: a PEFT adapter folder (the mean) and
the optimizer's saved state (``torch.save(optimizer.state_dict(), ...)``, or a
``transformers.Trainer`` checkpoint folder holding both, its ``optimizer.pt`` included).

IVON keeps h as one flat ``hess`` per parameter group, in the order of the parameters the
optimizer was built with, and a saved state holds no parameter names (unless the optimizer was
given named parameters, torch's ``param_names``). The order is recovered by building the PEFT
model from the adapter config on the meta device (no weight is read or allocated, so a 70B base
imports on a laptop: only the base model's config.json is read), its trainable parameters in
``named_parameters`` order, as ``IVON([p for p in model.parameters() if p.requires_grad])``
received them; each group's numel is checked against it. The slicing itself is
``Posterior.from_groups``, the same as a live export's (``posterior.save_posterior``).
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ivonserve.errors import IvonserveError
from ivonserve.posterior import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    IvonGroup,
    Posterior,
    _read_tensors,
    _saved_key,
    ivon_record,
    lora_config_dict,
)

OPTIMIZER_STATE = "optimizer.pt"  # the name transformers.Trainer saves a checkpoint's state under
TRAINER_STATE = "trainer_state.json"  # a Trainer checkpoint's step counter
ADAPTER_NAME = "default"  # peft's, on the meta model


def import_posterior(
    adapter_dir: str | Path,
    out: str | Path,
    *,
    optimizer_state: str | Path | None = None,
    base_model: str | None = None,
    ess: float | None = None,
    mc_form: str | None = None,
) -> Path:
    """Write the posterior folder of ``adapter_dir`` (a PEFT adapter folder, or a Trainer
    checkpoint) and its IVON state (default: ``adapter_dir/optimizer.pt``). ``base_model``:
    where the base model's config.json is read (a folder or a Hugging Face name) and the name
    posterior.json records (default: the adapter config's); ``ess``: sample at another spread
    than the state's; ``mc_form``: record that it was trained on multiple choice in that
    answer form (what ``/score/choices`` and ``bench mc`` then default to)."""
    adapter_dir = Path(adapter_dir)
    state_path = Path(optimizer_state) if optimizer_state else adapter_dir / OPTIMIZER_STATE
    if Path(out).resolve() == adapter_dir.resolve():
        raise IvonserveError(f"--out {out}: the adapter folder itself; name a folder of its own")
    config = read_lora_config(adapter_dir)
    mean = read_adapter_weights(adapter_dir)
    groups = ivon_groups(read_state(state_path), state_path)
    base = base_model or config.base_model_name_or_path
    if not base:
        raise IvonserveError(
            f"{adapter_dir / ADAPTER_CONFIG}: names no base model; give --base-model"
        )
    order = trainable_parameters(config, base, adapter_dir)
    _check_adapter_weights(mean, order, adapter_dir, base)
    training = ivon_record(groups) | trainer_record(_trainer_step(adapter_dir))
    if mc_form is not None:
        training |= {"format": "mc", "mc_form": mc_form}
    posterior = Posterior.from_groups(
        mean,
        assign_groups(groups, order, state_path, adapter_dir),
        lora_config_dict(config),
        base_model=base,
        training=training,
        where=str(state_path),
    )
    if ess is not None:
        posterior = replace(posterior, ess=ess)
    return posterior.save(out)


def trainer_record(global_step: int | None) -> dict[str, Any]:
    """What posterior.json records of a Trainer run (the callback and an import of its
    checkpoint alike): the step."""
    return {} if global_step is None else {"trainer": {"global_step": int(global_step)}}


def read_lora_config(adapter_dir: Path) -> Any:
    """The adapter's peft config; a missing file or another kind of adapter is refused."""
    from peft import PeftConfig

    path = adapter_dir / ADAPTER_CONFIG
    if not adapter_dir.is_dir():
        raise IvonserveError(f"{adapter_dir}: not an adapter folder (does not exist)")
    if not path.is_file():
        raise IvonserveError(f"{path}: missing file (a PEFT adapter folder holds it)")
    try:
        config = PeftConfig.from_pretrained(str(adapter_dir))
    except Exception as err:  # peft raises several types for a foreign or torn file
        raise IvonserveError(f"{path}: not a PEFT adapter config ({_first_line(err)})") from None
    kind = getattr(config.peft_type, "value", config.peft_type)
    if kind != "LORA":
        raise IvonserveError(f"{path}: a {kind} adapter; a posterior is over LoRA weights")
    if getattr(config, "use_dora", False):
        raise IvonserveError(f"{path}: a DoRA adapter (use_dora), which vLLM does not serve")
    return config


def read_adapter_weights(adapter_dir: Path) -> dict[str, torch.Tensor]:
    """The mean: adapter_model.safetensors (peft's default; an older ``.bin`` is named)."""
    path = adapter_dir / ADAPTER_WEIGHTS
    if not path.exists() and (adapter_dir / "adapter_model.bin").exists():
        raise IvonserveError(
            f"{path}: missing file (adapter_model.bin is there: save the adapter with "
            "safe_serialization=True)"
        )
    return _read_tensors(path)


def read_state(path: Path) -> dict[str, Any]:
    """An optimizer's ``state_dict()`` saved with torch.save (tensors and numbers only: loaded
    with ``weights_only``); one level of nesting under ``optimizer`` is read too."""
    if not path.is_file():
        raise IvonserveError(
            f"{path}: missing file (the optimizer state: torch.save(optimizer.state_dict(), "
            "...); --optimizer names it)"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for a foreign or torn file
        raise IvonserveError(f"{path}: not a torch-saved state ({_first_line(err)})") from None
    if isinstance(state, dict) and "param_groups" not in state:
        state = state.get("optimizer", state)
    if not isinstance(state, dict) or not isinstance(state.get("param_groups"), list):
        raise IvonserveError(f"{path}: not an optimizer state_dict (no 'param_groups')")
    return state


def ivon_groups(state: dict[str, Any], path: Path) -> list[dict[str, Any]]:
    """The state's param groups, each holding IVON's ``hess``; an AdamW state is named."""
    groups = state["param_groups"]
    if not groups:
        raise IvonserveError(f"{path}: an optimizer state with no param group")
    for number, group in enumerate(groups):
        if "hess" in group:
            continue
        if _looks_like_adam(state, group):
            raise IvonserveError(
                f"{path}: an AdamW state (exp_avg, exp_avg_sq; no 'hess' in param group "
                f"{number}): it holds no posterior; train with ivon-opt's IVON"
            )
        raise IvonserveError(
            f"{path}: param group {number} has no 'hess': not an ivon-opt IVON state"
        )
    return groups


def trainable_parameters(config: Any, base_model: str, adapter_dir: Path) -> list[tuple[str, Any]]:
    """(saved key, shape) of every trainable parameter of the PEFT model the adapter config
    makes on the base model, in ``named_parameters`` order: built on the meta device."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    lora = copy.deepcopy(config)
    lora.inference_mode = False  # a saved config says True, which freezes every parameter
    base_config = _base_config(base_model)
    try:
        with torch.device("meta"):
            model = get_peft_model(AutoModelForCausalLM.from_config(base_config), lora)
    except Exception as err:  # a config that does not fit the base model's modules
        raise IvonserveError(
            f"{adapter_dir / ADAPTER_CONFIG}: does not apply to the base model {base_model} "
            f"({_first_line(err)})"
        ) from None
    return [
        (_saved_key(name, ADAPTER_NAME), param.shape)
        for name, param in model.named_parameters()
        if param.requires_grad
    ]


def assign_groups(
    groups: list[dict[str, Any]],
    order: list[tuple[str, Any]],
    path: Path,
    adapter_dir: Path,
) -> list[IvonGroup]:
    """Each group's parameters: by name where the state has torch's ``param_names``, else the
    next ones of the adapter's order (groups split that order in turn); a numel that does not
    match is refused, with both counts."""
    shapes = dict(order)
    keys = [key for key, _ in order]
    held = sum(len(group["params"]) for group in groups)
    if held != len(keys):
        raise IvonserveError(
            f"{path}: the optimizer holds {held} parameters, the adapter "
            f"({adapter_dir / ADAPTER_CONFIG}) has {len(keys)} trainable ones"
        )
    out, offset = [], 0
    for number, group in enumerate(groups):
        count = len(group["params"])
        if "param_names" in group:
            names = [_saved_key(name, ADAPTER_NAME) for name in group["param_names"]]
            unknown = [name for name in names if name not in shapes]
            if unknown:
                raise IvonserveError(
                    f"{path}: param group {number} names {unknown[0]!r}, which the adapter "
                    f"({adapter_dir / ADAPTER_CONFIG}) does not train"
                )
        else:
            names = keys[offset : offset + count]
        offset += count
        expected = sum(shapes[name].numel() for name in names)
        if group["hess"].numel() != expected:
            raise IvonserveError(
                f"{path}: param group {number} holds {group['hess'].numel()} hess entries, the "
                f"adapter's {count} parameters for it have {expected} "
                f"({adapter_dir / ADAPTER_CONFIG})"
            )
        out.append(IvonGroup(names, group["hess"], group["ess"], group["weight_decay"]))
    return out


def _check_adapter_weights(
    mean: dict[str, torch.Tensor], order: list[tuple[str, Any]], adapter_dir: Path, base: str
) -> None:
    """The adapter file holds exactly the trainable parameters, each of its shape."""
    path = adapter_dir / ADAPTER_WEIGHTS
    for key, shape in order:
        if key not in mean:
            raise IvonserveError(
                f"{path}: missing key {key!r}, which the adapter config makes on {base}"
            )
        if tuple(mean[key].shape) != tuple(shape):
            raise IvonserveError(
                f"{path}: key {key!r} has shape {tuple(mean[key].shape)}, the adapter config "
                f"makes {tuple(shape)} on {base}"
            )
    extra = sorted(set(mean) - {key for key, _ in order})
    if extra:
        raise IvonserveError(
            f"{path}: key {extra[0]!r} is not a trainable parameter the adapter config makes "
            f"on {base}"
        )


def _base_config(base_model: str) -> Any:
    """The base model's transformers config: from its folder, the embedded model's name, or a
    Hugging Face name (config.json alone is fetched)."""
    from transformers import AutoConfig

    from ivonserve.model import EMBEDDED_NAME

    source = base_model
    if base_model == EMBEDDED_NAME:
        from ivonserve.model import resolve_model

        source = str(resolve_model(None))
    try:
        return AutoConfig.from_pretrained(source)
    except Exception as err:  # OSError, ValueError: no folder, no such name, offline
        raise IvonserveError(
            f"{base_model}: cannot read the base model's config.json ({_first_line(err)}); "
            "--base-model names a transformers folder or a Hugging Face model"
        ) from None


def _trainer_step(adapter_dir: Path) -> int | None:
    """A Trainer checkpoint's global step (its trainer_state.json), else None."""
    path = adapter_dir / TRAINER_STATE
    if not path.is_file():
        return None
    try:
        return int(json.loads(path.read_text())["global_step"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise IvonserveError(f"{path}: not a Trainer state (no global_step)") from None


def _looks_like_adam(state: dict[str, Any], group: dict[str, Any]) -> bool:
    per_param = [v for v in state.get("state", {}).values() if isinstance(v, dict)]
    return "betas" in group or any("exp_avg_sq" in v for v in per_param)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
