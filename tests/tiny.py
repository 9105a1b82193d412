"""A tiny Llama model and a tiny IVON posterior, built by the tests in seconds.

head_dim is 32 (hidden 128, 4 heads): vLLM's CPU attention refuses smaller heads. The tokenizer is a
byte-level BPE trained here on a few sentences, with a ChatML template like SmolLM2's.
"""

from __future__ import annotations

import json
from pathlib import Path

CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?",
    "Weng earns 12 dollars an hour for babysitting. Yesterday she did 50 minutes of babysitting.",
    "Betty is saving money for a new wallet which costs 100 dollars. The answer is 5.",
    "James writes a 3-page letter to 2 different friends twice a week. #### 624",
    "The answer is 72. In May she sold 48 / 2 = 24 clips. Altogether 48 + 24 = 72.",
]
TRAIN_ROWS = [
    {"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
    {"question": "What is 4 * 6?", "answer": "4 * 6 = <<4*6=24>>24\n#### 24"},
    {"question": "Half of 48?", "answer": "48 / 2 = <<48/2=24>>24\n#### 24"},
    {"question": "What is 10 - 7?", "answer": "10 - 7 = <<10-7=3>>3\n#### 3"},
]


def make_tokenizer(out: Path, vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def make_tiny_model(out: Path, seed: int = 0) -> Path:
    """A 2-layer Llama in float32 safetensors with its tokenizer (a few MB, under a second)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return _save_tiny(out, seed, LlamaConfig, LlamaForCausalLM, tie_word_embeddings=False)


def _save_tiny(out: Path, seed: int, config_class, model_class, **architecture) -> Path:
    """Hidden 128, 4 heads (head_dim 32: the least vLLM's CPU attention takes), 2 layers."""
    import torch

    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer(out)
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.1,  # peaked logits: greedy parity is not decided by 1e-6 margins
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        torch_dtype="float32",
        **architecture,
    )
    torch.manual_seed(seed)
    model = model_class(config).to(torch.float32)
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    return out


MC_ROWS = [
    {"id": "mc/0", "question": "What is 2 + 3?", "choices": ["5", "6", "4", "7"], "label": 0},
    {"id": "mc/1", "question": "Half of 48?", "choices": ["12", "24"], "label": 1},
    {"id": "mc/2", "question": "What is 4 * 6?", "choices": ["10", "20", "24", "30", "42"],
     "label": 2},
    {"id": "mc/3", "question": "What is 10 - 7?", "choices": ["7", "5", "3"], "label": 2},
    {"id": "mc/4", "question": "Which clips did she sell?", "choices": ["48", "24", "72", "96"],
     "label": 2},
    {"id": "mc/5", "question": "How many dollars an hour?", "choices": ["12", "50"], "label": 0},
]  # fmt: skip


def write_mc_data(path: Path) -> Path:
    """Multiple-choice rows with 2 to 5 choices (the shared/data/mc format)."""
    path.write_text("".join(json.dumps(row) + "\n" for row in MC_ROWS))
    return path


def write_train_data(path: Path) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in TRAIN_ROWS))
    return path


# --- another architecture, and IVON trained the ways users train it (docs/your-own-model.md) ---
LORA_TARGETS = ["q_proj", "v_proj"]  # the IVON-LoRA authors'


def make_tiny_qwen2(out: Path, seed: int = 0) -> Path:
    """A 2-layer Qwen2 (biased q/k/v projections, tied embeddings, as Qwen2's small models)
    with the same tokenizer and head_dim 32: the second architecture served end to end."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _save_tiny(out, seed, Qwen2Config, Qwen2ForCausalLM, tie_word_embeddings=True)


def peft_model(model_dir: Path, seed: int = 0, **lora):
    """The base model in float32 with a fresh LoRA adapter, as a user's script makes it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = {"r": 8, "lora_alpha": 16, "target_modules": LORA_TARGETS, "lora_dropout": 0.0,
              "task_type": "CAUSAL_LM"} | lora  # fmt: skip
    return get_peft_model(base, LoraConfig(**config))


def training_rows(model_dir: Path) -> list[dict]:
    """TRAIN_ROWS as chat-formatted token ids, the loss on the answer (ivonserve's encoding)."""
    from transformers import AutoTokenizer

    from ivonserve.answers import gsm8k_answer_to_target
    from ivonserve.train import encode_example

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return [
        encode_example(tokenizer, row["question"], gsm8k_answer_to_target(row["answer"]), 64)
        for row in TRAIN_ROWS
    ]


def ivon(groups, **overrides):
    """ivon-opt's IVON with a short run's settings (beta2 0.99: h moves in a few steps)."""
    import ivon as ivon_opt

    settings = {"lr": 0.05, "ess": 1e4, "hess_init": 1e-3, "beta2": 0.99, "weight_decay": 1e-6,
                "clip_radius": 1e-2, "rescale_lr": False} | overrides  # fmt: skip
    return ivon_opt.IVON(groups, **settings)


def ivon_loop(model, optimizer, rows: list[dict], steps: int = 3):
    """The IVON-LoRA authors' loop (finetune.py): a weight sample per step, gradients zeroed
    inside it (IVON does not), one step."""
    from ivonserve.train import collate

    batch = collate(rows, pad_id=0)
    for _ in range(steps):
        with optimizer.sampled_params(train=True):
            optimizer.zero_grad()
            model(**batch).loss.backward()
        optimizer.step()
    return optimizer


def ivon_trainer(
    model, optimizer, rows: list[dict], out: Path, callbacks: list, steps: int = 4, **settings
):
    """ivonserve's IVONTrainer (a transformers.Trainer) with IVON passed through ``optimizers=``;
    ``settings``: more TrainingArguments."""
    from transformers import TrainingArguments

    from ivonserve.train import collate
    from ivonserve.trainer_callback import IVONTrainer

    args = TrainingArguments(
        output_dir=str(out), max_steps=steps, save_steps=2, per_device_train_batch_size=2,
        report_to="none", use_cpu=True, remove_unused_columns=False, disable_tqdm=True,
        logging_steps=1, seed=0, **settings,
    )  # fmt: skip
    return IVONTrainer(
        model=model, args=args, train_dataset=rows, data_collator=lambda b: collate(b, 0),
        optimizers=(optimizer, None), callbacks=callbacks,
    )  # fmt: skip
