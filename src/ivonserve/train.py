"""IVON-LoRA finetuning (ivon-opt + peft) that leaves a posterior folder; AdamW as the baseline.

Two data formats, told apart by their rows (or ``--format``): question/answer jsonl (GSM8k), a
chat-formatted SFT with the loss on the answer tokens only; and multiple-choice jsonl
(``choices``/``label``, see ``ivonserve.choices``), with the loss on the answer letter only. The
batch and the learning rate of step s are pure functions of (seed, s), so a killed run resumes
from its last checkpoint by reloading the weights and optimizer state and carrying on at the next
step. A multiple-choice run with ``--holdout N`` ends by scoring its validation slice
(``validation.json``): what the learning rate and ess are chosen on.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ivonserve import choices as mc
from ivonserve.answers import gsm8k_answer_to_target
from ivonserve.errors import IvonserveError
from ivonserve.posterior import Posterior, write_adapter

CHECKPOINT = "checkpoint.pt"
LOG = "training_log.jsonl"
VALIDATION = "validation.json"
PROGRESS = "progress.json"
DEFAULT_LR = {"ivon": 0.03, "adamw": 2e-4}


@dataclass
class TrainConfig:
    """Defaults are the IVON-LoRA paper's (Cong et al., 2025) where it has one."""

    data: str
    out: str
    model: str | None = None
    format: Literal["auto", "qa", "mc"] = "auto"  # auto: mc when rows have `choices`
    mc_form: Literal["letter", "text"] = "letter"  # multiple choice: the answer's form (choices)
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
    lr_schedule: Literal["constant", "linear"] = "constant"  # linear: decays to 0 at `steps`
    warmup_steps: int = 0  # linear rise from lr/warmup to lr first
    batch_size: int = 8
    max_length: int = 320
    seed: int = 0
    limit: int | None = None
    holdout: int = 0  # the last N rows of the data: a validation slice kept out of training
    checkpoint_every: int = 25
    threads: int | None = None
    eval_draws: int = 8  # IVON, multiple choice with a holdout: draws in the validation BMA
    precision: Literal["auto", "float32", "bf16"] = "auto"  # auto: bf16 autocast on native bf16
    batching: Literal["random", "length"] = "length"  # length: batches of similar lengths

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.optimizer]


Example = tuple[str, str] | mc.MCQuestion  # (question, target) or a multiple-choice question


def detect_format(path: Path, requested: str) -> str:
    """``qa`` or ``mc``: as requested, else from the first row's fields."""
    if requested != "auto":
        return requested
    if not path.is_file():
        raise IvonserveError(f"{path}: training data file not found")
    with path.open() as handle:
        first = next((line for line in handle if line.strip()), "")
    try:
        return "mc" if mc.is_mc_row(json.loads(first)) else "qa"
    except json.JSONDecodeError:
        raise IvonserveError(f"{path}:1: not a JSON line") from None


def load_examples(
    path: Path, limit: int | None = None, holdout: int = 0, format: str = "auto"
) -> list[Example]:
    """The training rows. The last ``holdout`` rows are left out: they are the validation slice
    that hyperparameters are chosen on (``bench likelihood``/``bench mc --holdout N`` read
    exactly those)."""
    if detect_format(path, format) == "mc":
        return list(mc.load_mc(path, limit, -holdout))
    return load_qa(path, limit, holdout)


def load_qa(path: Path, limit: int | None = None, holdout: int = 0) -> list[tuple[str, str]]:
    """(question, target) pairs from a jsonl with `question` and `answer` fields."""
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


def encode(tokenizer: Any, example: Example, max_length: int, mc_form: str = "letter") -> dict:
    if isinstance(example, mc.MCQuestion):
        return encode_choice(tokenizer, example, max_length, mc_form)
    return encode_example(tokenizer, *example, max_length)


def encode_choice(
    tokenizer: Any, question: mc.MCQuestion, max_length: int, answer: str = "letter"
) -> dict:
    """The prompt and the right answer after it (its letter, or its text), the loss on the
    answer alone. The prompt is cut from the left if too long, so the answer never goes."""
    assert question.label is not None
    prompt, target = mc_sequence(tokenizer, question, question.label, answer)
    prompt = prompt[-max(1, max_length - len(target)) :]
    return {"input_ids": [*prompt, *target], "labels": [-100] * len(prompt) + target}


def mc_sequence(
    tokenizer: Any, question: mc.MCQuestion, choice: int, answer: str
) -> tuple[list[int], list[int]]:
    """(prompt, answer tokens) of one choice of a question in the given answer form."""
    if answer == "letter":
        prompt = mc.prompt_ids(tokenizer, question.question, question.choices)
        return prompt, [mc.letter_token_ids(tokenizer, len(question.choices))[choice]]
    prompt = mc.text_prompt_ids(tokenizer, question.question)
    return prompt, mc.choice_token_ids(tokenizer, question.choices[choice])


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


def batch_indices(
    n_examples: int, batch_size: int, seed: int, step: int, lengths: list[int] | None = None
) -> list[int]:
    """Examples of step `step`: epochs are seeded permutations, so any step is reproducible.

    With ``lengths`` (``--batching length``), each run of ``GROUP`` batches of the permutation is
    sorted by length and cut into batches, whose order is then shuffled (seeded): a batch pads to
    rows of about its own length instead of a random row's, and is still a pure function of
    (seed, step), so resuming stays exact."""
    per_epoch = max(1, n_examples // batch_size)
    epoch, position = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n_examples)
    if lengths is None:
        return order[position * batch_size : (position + 1) * batch_size].tolist()
    order = order[: per_epoch * batch_size]
    span = GROUP * batch_size
    grouped = [
        sorted(order[i : i + span].tolist(), key=lambda j: -lengths[j])
        for i in range(0, len(order), span)
    ]
    batches = [g[i : i + batch_size] for g in grouped for i in range(0, len(g), batch_size)]
    shuffled = np.random.default_rng([seed, epoch, 1]).permutation(len(batches))
    return batches[shuffled[position]]


GROUP = 16  # --batching length: batches sorted together (more: less padding, less mixing)


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


def resolved_precision(config: TrainConfig) -> str:
    """float32, or bf16 autocast where the CPU multiplies bf16 natively (the server's rule)."""
    if config.precision != "auto":
        return config.precision
    from ivonserve.engine import default_cpu_dtype

    return "bf16" if default_cpu_dtype() == "bfloat16" else "float32"


def forward_context(precision: str) -> Any:
    """bf16 autocast for the products; the weights, gradients and optimizer stay float32."""
    import contextlib

    if precision == "bf16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_factor(config: TrainConfig, step: int) -> float:
    """The base learning rate's multiplier at 0-based ``step``: a linear warm-up over
    ``warmup_steps``, then constant or a linear decay that reaches 0 after the last step."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    if config.lr_schedule == "linear":
        return (config.steps - step) / max(1, config.steps - config.warmup_steps)
    return 1.0


def answer_loss(model: Any, batch: dict) -> torch.Tensor:
    """The causal LM's loss, with the output layer applied only where a label is: the same value
    as ``model(**batch).loss`` (tested), without the vocabulary-wide product at every prompt
    position (a fifth of SmolLM2's forward pass on multiple-choice prompts)."""
    causal = model.get_base_model()  # the transformers model, LoRA layers injected in place
    hidden = causal.get_decoder()(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
    ).last_hidden_state
    labels = batch["labels"][:, 1:]
    keep = labels != -100
    logits = causal.get_output_embeddings()(hidden[:, :-1][keep]).float()
    return torch.nn.functional.cross_entropy(logits, labels[keep])


def train_step(
    model: Any, optimizer: Any, batch: dict, config: TrainConfig, precision: str = "float32"
) -> float:
    """One optimizer step. IVON: mc_samples forward/backward passes, each at a sampled weight."""
    model.train()
    if config.optimizer == "adamw":
        optimizer.zero_grad()
        with forward_context(precision):
            loss = answer_loss(model, batch)
        loss.backward()
        optimizer.step()
        return loss.item()
    losses = []
    for _ in range(config.mc_samples):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()  # IVON does not zero gradients itself
            with forward_context(precision):
                loss = answer_loss(model, batch)
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
    examples = load_examples(Path(config.data), config.limit, config.holdout, config.format)
    precision = resolved_precision(config)
    model, tokenizer = build_model(config, model_dir)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(config, params)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    start, elapsed = _resume(out, config, model, optimizer)
    log = (out / LOG).open("a")
    bar = tqdm(total=config.steps, initial=start, disable=not progress, unit="step")
    began = time.perf_counter() - elapsed
    losses: list[float] = []
    encoded = [encode(tokenizer, e, config.max_length, config.mc_form) for e in examples]
    lengths = [len(row["input_ids"]) for row in encoded] if config.batching == "length" else None
    for step in range(start, config.steps):
        indices = batch_indices(len(examples), config.batch_size, config.seed, step, lengths)
        rows = [encoded[i] for i in indices]
        for group in optimizer.param_groups:
            group["lr"] = config.learning_rate * lr_factor(config, step)
        loss = train_step(model, optimizer, collate(rows, pad_id), config, precision)
        if not math.isfinite(loss):
            raise IvonserveError(f"loss became {loss} at step {step}; lower lr or raise ess")
        losses.append(loss)
        seconds = time.perf_counter() - began
        record = {"step": step + 1, "loss": loss, "lr": optimizer.param_groups[0]["lr"]}
        log.write(json.dumps(record | {"seconds": round(seconds, 2)}) + "\n")
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
    if config.holdout and isinstance(examples[0], mc.MCQuestion):
        validation = mc.load_mc(Path(config.data), None, config.holdout)
        report = validate_choices(model, tokenizer, optimizer, validation, config, precision)
        (out / VALIDATION).write_text(json.dumps(report, indent=2) + "\n")
    elif config.holdout:
        held = load_qa(Path(config.data))[-config.holdout :]
        report = validate_answers(model, tokenizer, optimizer, held, config, precision)
        (out / VALIDATION).write_text(json.dumps(report, indent=2) + "\n")
    return out


def choice_logprobs(
    model: Any, tokenizer: Any, questions: list[mc.MCQuestion], precision: str, batch: int = 16
) -> list[list[float]]:
    """Log-probabilities of each question's answer letters after its prompt (peft, no server):
    the in-process reference that the validation of a training run uses. Batches are formed in
    order of length (less padding); the answers come back in the questions' order."""
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    causal = model.get_base_model()
    prompts = [mc.prompt_ids(tokenizer, q.question, q.choices) for q in questions]
    order = sorted(range(len(questions)), key=lambda i: len(prompts[i]))
    out: dict[int, list[float]] = {}
    with torch.no_grad(), forward_context(precision):
        for first in range(0, len(order), batch):
            chunk = order[first : first + batch]
            inputs = collate(
                [{"input_ids": prompts[i], "labels": prompts[i]} for i in chunk], pad_id
            )
            hidden = causal.get_decoder()(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            ).last_hidden_state
            last = hidden[torch.arange(len(chunk)), [len(prompts[i]) - 1 for i in chunk]]
            logprobs = torch.log_softmax(causal.get_output_embeddings()(last).float(), dim=-1)
            for row, i in zip(logprobs, chunk, strict=True):
                letters = mc.letter_token_ids(tokenizer, len(questions[i].choices))
                out[i] = row[letters].tolist()
    return [out[i] for i in range(len(questions))]


def text_choice_logprobs(
    model: Any, tokenizer: Any, questions: list[mc.MCQuestion], precision: str, batch: int = 32
) -> list[list[float]]:
    """log p(choice text | question) of every choice of every question (the ``text`` form)."""
    pairs = [(qi, ci) for qi, q in enumerate(questions) for ci in range(len(q.choices))]
    rows = []
    for qi, ci in pairs:
        prompt, target = mc_sequence(tokenizer, questions[qi], ci, "text")
        rows.append({"input_ids": prompt + target, "labels": [-100] * len(prompt) + target})
    totals = sequence_logprobs(model, tokenizer, rows, precision, batch)
    out: list[list[float]] = [[] for _ in questions]
    for (qi, _), total in zip(pairs, totals, strict=True):
        out[qi].append(total)
    return out


def sequence_logprobs(
    model: Any, tokenizer: Any, rows: list[dict], precision: str, batch: int = 32
) -> list[float]:
    """Each row's log-likelihood of its labelled tokens (summed), the output layer applied only
    at those tokens; batches in order of length (less padding), results in the rows' order."""
    model.eval()
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    causal = model.get_base_model()
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    totals: dict[int, float] = {}
    with torch.no_grad(), forward_context(precision):
        for first in range(0, len(order), batch):
            chunk = order[first : first + batch]
            inputs = collate([rows[i] for i in chunk], pad_id)
            hidden = causal.get_decoder()(
                input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
            ).last_hidden_state
            labels = inputs["labels"][:, 1:]
            keep = labels != -100
            logits = causal.get_output_embeddings()(hidden[:, :-1][keep]).float()
            picked = torch.log_softmax(logits, dim=-1).gather(1, labels[keep][:, None])[:, 0]
            per_row = torch.zeros(len(chunk), dtype=torch.float64)
            per_row.index_add_(0, keep.nonzero()[:, 0], picked.double())
            totals.update(zip(chunk, per_row.tolist(), strict=True))
    return [totals[i] for i in range(len(rows))]


def validate_answers(
    model: Any,
    tokenizer: Any,
    optimizer: Any,
    examples: list[tuple[str, str]],
    config: TrainConfig,
    precision: str,
) -> dict[str, Any]:
    """NLL of the validation slice's reference answers (question/answer data), per token and per
    question: of the trained weights (AdamW) or the mean (IVON), and for IVON the posterior
    predictive of 1, 2, 4 and ``eval_draws`` draws (log of the mean of the draws' likelihoods
    of each whole answer, as ``bench likelihood`` computes it through the server)."""
    from ivonserve.predictive import sequence_predictive

    rows = [encode_example(tokenizer, q, a, config.max_length) for q, a in examples]
    tokens = sum(sum(label != -100 for label in row["labels"][1:]) for row in rows)

    def loglik() -> list[float]:
        return sequence_logprobs(model, tokenizer, rows, precision)

    arms = {"mean" if config.optimizer == "ivon" else "adamw": np.array(loglik())}
    for k, draws in _draws(optimizer, config, loglik).items():
        arms[f"bma{k}"] = np.array([sequence_predictive(d) for d in zip(*draws, strict=True)])
    return {
        "data": config.data,
        "holdout": config.holdout,
        "questions": len(rows),
        "answer_tokens": int(tokens),
        "arms": {
            name: {
                "nll_per_token": float(-ll.sum() / tokens),
                "nll_per_question": float(-ll.mean()),
            }
            for name, ll in arms.items()
        },
    }


def _draws(optimizer: Any, config: TrainConfig, score: Any) -> dict[int, list]:
    """IVON: ``score()`` under each of ``eval_draws`` seeded draws of the weights, as nested
    prefixes by K in 1, 2, 4, eval_draws; the global RNG is left as it was (resuming stays exact).
    AdamW: none."""
    if config.optimizer != "ivon" or config.eval_draws <= 0:
        return {}
    draws = []
    state = torch.get_rng_state()
    torch.manual_seed(config.seed + 1)
    try:
        for _ in range(config.eval_draws):
            with optimizer.sampled_params():
                draws.append(score())
    finally:
        torch.set_rng_state(state)
    return {k: draws[:k] for k in sorted({1, 2, 4, config.eval_draws}) if k <= config.eval_draws}


def validate_choices(
    model: Any,
    tokenizer: Any,
    optimizer: Any,
    questions: list[mc.MCQuestion],
    config: TrainConfig,
    precision: str,
) -> dict[str, Any]:
    """Accuracy, NLL, ECE and Brier on the validation slice: of the trained weights (AdamW) or
    the mean (IVON), and for IVON also the predictive of ``eval_draws`` draws. The draws use a
    seeded generator and leave the global RNG as it was (resuming stays exact)."""
    from ivonserve import calibration

    labels = [q.label for q in questions]

    def scored(per_question_logprobs: list[list[float]]) -> list[np.ndarray]:
        return [calibration.softmax_over(lp) for lp in per_question_logprobs]

    def logprobs() -> list[list[float]]:
        if config.mc_form == "text":
            return text_choice_logprobs(model, tokenizer, questions, precision)
        return choice_logprobs(model, tokenizer, questions, precision)

    arms = {"mean" if config.optimizer == "ivon" else "adamw": scored(logprobs())}
    for k, draws in _draws(optimizer, config, lambda: scored(logprobs())).items():
        arms[f"bma{k}"] = [
            calibration.predictive([d[i] for d in draws]) for i in range(len(questions))
        ]
    return {
        "data": config.data,
        "holdout": config.holdout,
        "form": config.mc_form,
        "questions": len(questions),
        "ece_bins": calibration.ECE_BINS,
        "arms": {
            name: calibration.summary(calibration.per_question(probs, labels))
            for name, probs in arms.items()
        },
    }


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
    _write_progress(out, config, step, seconds)


def _write_progress(out: Path, config: TrainConfig, step: int, seconds: float) -> None:
    """How far the run is, for a reader of the folder (a run may span several sessions): the
    posterior beside it is the one of this step, and the same command resumes from here."""
    progress = {
        "step": step,
        "steps": config.steps,
        "finished": step >= config.steps,
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / step, 3) if step else None,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    (out / PROGRESS).write_text(json.dumps(progress, indent=2) + "\n")


def _resume(out: Path, config: TrainConfig, model: Any, optimizer: Any) -> tuple[int, float]:
    """Step and elapsed time of the last checkpoint in `out` (0 if none), loading its state."""
    path = out / CHECKPOINT
    if not path.exists():
        (out / LOG).unlink(missing_ok=True)
        return 0, 0.0
    state = torch.load(path, weights_only=False)
    # A decaying learning rate is a function of the budget: that budget may not change.
    resumable = _RESUMABLE - {"steps"} if config.lr_schedule == "linear" else _RESUMABLE
    # a checkpoint older than a setting ran with that setting's default
    saved = {f.name: f.default for f in fields(TrainConfig) if f.default is not MISSING}
    saved |= _BEFORE_THE_SETTING
    saved |= {k: v for k, v in state["config"].items() if k not in resumable}
    current = {k: v for k, v in asdict(config).items() if k not in resumable}
    saved = {k: v for k, v in saved.items() if k in current}
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


# What a checkpoint older than a setting ran with, where that is not the setting's default.
_BEFORE_THE_SETTING = {"batching": "random"}

# Flags that may change between a killed run and its resumption without changing the result.
_RESUMABLE = {"steps", "checkpoint_every", "threads", "out", "eval_draws"}


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
        "format": detect_format(Path(config.data), config.format),  # auto resolved: its readers'
        "config": {k: v for k, v in asdict(config).items() if k not in ("out", "threads")},
        "lr": config.learning_rate,
        "precision": resolved_precision(config),
        "steps": step,
        "seconds": round(seconds, 1),
        "first_loss": losses[0] if losses else None,
        "final_loss_mean10": float(np.mean(tail)) if tail else None,
    }


def _base_name(model_dir: Path) -> str:
    from ivonserve.model import DONE_MARKER, EMBEDDED_NAME

    return EMBEDDED_NAME if (model_dir / DONE_MARKER).exists() else str(model_dir)
