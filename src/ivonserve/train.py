"""IVON-LoRA finetuning (ivon-opt + peft) that leaves a posterior folder; AdamW as the baseline.

Chat-formatted SFT on question/answer jsonl (GSM8k format), loss on the answer tokens only. The
batch of step s is a pure function of (seed, s), so a killed run resumes from its last checkpoint by
reloading the weights and optimizer state and carrying on at the next step.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ivonserve.answers import gsm8k_answer_to_target
from ivonserve.errors import IvonserveError
from ivonserve.posterior import Posterior, write_adapter

CHECKPOINT = "checkpoint.pt"
LOG = "training_log.jsonl"
DEFAULT_LR = {"ivon": 0.03, "adamw": 2e-4}


@dataclass
class TrainConfig:
    """Defaults are the IVON-LoRA paper's (Cong et al., 2025) where it has one."""

    data: str
    out: str
    model: str | None = None
    optimizer: Literal["ivon", "adamw"] = "ivon"
    rank: int = 8
    alpha: int = 16
    targets: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    ess: float = 1e7
    hess_init: float = 3e-4
    lr: float | None = None  # None: 0.03 for IVON, 2e-4 for AdamW
    beta1: float = 0.9
    beta2: float = 0.99999
    weight_decay: float = 1e-6
    clip_radius: float = 1e-3
    mc_samples: int = 1
    rescale_lr: bool = False
    steps: int = 100
    batch_size: int = 8
    max_length: int = 320
    seed: int = 0
    limit: int | None = None
    holdout: int = 0  # the last N rows of the data: a validation slice kept out of training
    checkpoint_every: int = 25
    threads: int | None = None

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]


def load_examples(path: Path, limit: int | None = None, holdout: int = 0) -> list[tuple[str, str]]:
    """(question, target) pairs from a jsonl with `question` and `answer` fields. The last
    ``holdout`` rows are left out: they are the validation slice that hyperparameters are chosen
    on (``ivonserve bench likelihood --holdout N`` reads exactly those)."""
    if not path.is_file():
        raise IvonserveError(f"{path}: training data file not found")
    examples = []
    with path.open() as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question, answer = row["question"], row["answer"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise IvonserveError(
                    f"{path}:{number}: expected a JSON object with 'question' and 'answer'"
                ) from None
            examples.append((str(question), gsm8k_answer_to_target(str(answer))))
    if holdout:
        if holdout >= len(examples):
            raise IvonserveError(f"{path}: --holdout {holdout} leaves no training example")
        examples = examples[:-holdout]
    examples = examples[:limit]
    if not examples:
        raise IvonserveError(f"{path}: no examples")
    return examples


def encode_example(tokenizer: Any, question: str, target: str, max_length: int) -> dict:
    """Token ids with labels on the assistant's tokens only (the prompt is masked with -100)."""
    messages = [{"role": "user", "content": question}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    full_ids = tokenizer.apply_chat_template(
        [*messages, {"role": "assistant", "content": target}], tokenize=True
    )
    prompt_ids, full_ids = _as_ids(prompt_ids), _as_ids(full_ids)
    if full_ids[: len(prompt_ids)] != prompt_ids:
        raise IvonserveError("the chat template does not extend the prompt; cannot mask it")
    full_ids = full_ids[:max_length]
    labels = [-100] * min(len(prompt_ids), len(full_ids)) + full_ids[len(prompt_ids) :]
    return {"input_ids": full_ids, "labels": labels}


def _as_ids(encoded: Any) -> list[int]:
    """apply_chat_template returns a list, or a BatchEncoding in newer transformers."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return list(encoded)


def collate(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(r["input_ids"]) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), -100, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        mask[i, :n] = 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batch_indices(n_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """Examples of step `step`: epochs are seeded permutations, so any step is reproducible."""
    per_epoch = max(1, n_examples // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    return order[position * batch_size : (position + 1) * batch_size].tolist()


def build_model(config: TrainConfig, model_dir: Path) -> tuple[Any, Any]:
    """The base model in float32 (IVON needs one dtype) with a fresh LoRA adapter on top."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(config.seed)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        target_modules=list(config.targets),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, lora), tokenizer


def build_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    import ivon

    return ivon.IVON(
        params,
        lr=config.learning_rate,
        ess=config.ess,
        hess_init=config.hess_init,
        beta1=config.beta1,
        beta2=config.beta2,
        weight_decay=config.weight_decay,
        mc_samples=config.mc_samples,
        clip_radius=config.clip_radius,
        rescale_lr=config.rescale_lr,
    )


def train_step(model: Any, optimizer: Any, batch: dict, config: TrainConfig) -> float:
    """One optimizer step. IVON: mc_samples forward/backward passes, each at a sampled weight."""
    model.train()
    if config.optimizer == "adamw":
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        return loss.item()
    losses = []
    for _ in range(config.mc_samples):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()  # IVON does not zero gradients itself
            loss = model(**batch).loss
            loss.backward()
        losses.append(loss.item())
    optimizer.step()
    return float(np.mean(losses))


def train(config: TrainConfig, model_dir: Path, progress: bool = True) -> Path:
    """Run (or resume) training and write the posterior (IVON) or adapter (AdamW) to config.out."""
    from tqdm import tqdm

    if config.threads:
        torch.set_num_threads(config.threads)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    examples = load_examples(Path(config.data), config.limit, config.holdout)
    model, tokenizer = build_model(config, model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config, params)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start, elapsed = _resume(out, config, model, optimizer)
    log = (out / LOG).open("a")
    bar = tqdm(total=config.steps, initial=start, disable=not progress, unit="step")
    began = time.perf_counter() - elapsed
    losses: list[float] = []
    for step in range(start, config.steps):
        indices = batch_indices(len(examples), config.batch_size, config.seed, step)
        rows = [encode_example(tokenizer, *examples[i], config.max_length) for i in indices]
        loss = train_step(model, optimizer, collate(rows, pad_id), config)
        if not math.isfinite(loss):
            raise IvonserveError(f"loss became {loss} at step {step}; lower lr or raise ess")
        losses.append(loss)
        seconds = time.perf_counter() - began
        log.write(json.dumps({"step": step + 1, "loss": loss, "seconds": round(seconds, 2)}) + "\n")
        log.flush()
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)
        done = step + 1
        if done % config.checkpoint_every == 0 or done == config.steps:
            _save(out, config, model, optimizer, done, seconds, model_dir)
    bar.close()
    log.close()
    if start >= config.steps:
        _save(out, config, model, optimizer, start, elapsed, model_dir)
    return out


def _save(
    out: Path,
    config: TrainConfig,
    model: Any,
    optimizer: Any,
    step: int,
    seconds: float,
    base: Path,
) -> None:
    """The result so far (posterior or adapter), then the checkpoint that resuming reads."""
    summary = _summary(out, config, step, seconds)
    if config.optimizer == "ivon":
        Posterior.from_ivon(model, optimizer, base_model=_base_name(base), training=summary).save(
            out
        )
    else:
        from peft.utils import get_peft_model_state_dict

        from ivonserve.posterior import _json_safe

        weights = {k: v.detach().float() for k, v in get_peft_model_state_dict(model).items()}
        write_adapter(out, weights, _json_safe(model.peft_config["default"].to_dict()))
        (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
    state = {
        "step": step,
        "seconds": seconds,
        "config": asdict(config),
        "trainable": {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        },
        "optimizer": optimizer.state_dict(),
        "torch_rng": torch.get_rng_state(),  # IVON's weight noise: resumed runs draw the same
        # IVON's debiasing counter lives outside its state_dict.
        "optimizer_step": getattr(optimizer, "current_step", None),
    }
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    tmp.replace(out / CHECKPOINT)


def _resume(out: Path, config: TrainConfig, model: Any, optimizer: Any) -> tuple[int, float]:
    """Step and elapsed time of the last checkpoint in `out` (0 if none), loading its state."""
    path = out / CHECKPOINT
    if not path.exists():
        (out / LOG).unlink(missing_ok=True)
        return 0, 0.0
    state = torch.load(path, weights_only=False)
    saved = {k: v for k, v in state["config"].items() if k not in _RESUMABLE}
    current = {k: v for k, v in asdict(config).items() if k not in _RESUMABLE}
    if saved != current:
        diff = sorted(k for k in current if saved.get(k) != current[k])
        raise IvonserveError(
            f"{path}: a checkpoint of a different run (differs in {', '.join(diff)}); "
            f"use another --out or delete it"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    if state["optimizer_step"] is not None:
        optimizer.current_step = state["optimizer_step"]
    _truncate_log(out / LOG, state["step"])
    print(f"resuming from {path} at step {state['step']}")
    return state["step"], state["seconds"]


# Flags that may change between a killed run and its resumption without changing the result.
_RESUMABLE = {"steps", "checkpoint_every", "threads", "out"}


def _truncate_log(path: Path, step: int) -> None:
    """Drop log lines past the checkpoint: those steps are about to be run again."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if json.loads(ln)["step"] <= step]
        path.write_text("".join(ln + "\n" for ln in lines))


def _summary(out: Path, config: TrainConfig, step: int, seconds: float) -> dict[str, Any]:
    losses = [json.loads(ln)["loss"] for ln in (out / LOG).read_text().splitlines()]
    tail = losses[-10:]
    return {
        "optimizer": config.optimizer,
        "config": {k: v for k, v in asdict(config).items() if k not in ("out", "threads")},
        "lr": config.learning_rate,
        "steps": step,
        "seconds": round(seconds, 1),
        "first_loss": losses[0] if losses else None,
        "final_loss_mean10": float(np.mean(tail)) if tail else None,
    }


def _base_name(model_dir: Path) -> str:
    from ivonserve.model import DONE_MARKER, EMBEDDED_NAME

    return EMBEDDED_NAME if (model_dir / DONE_MARKER).exists() else str(model_dir)
