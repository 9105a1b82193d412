"""Multiple-choice questions: the one place that says how a question is shown to the model and
what it is trained and scored to answer, in one of two answer forms.

``letter`` (the IVON-LoRA authors' form): a question with n choices (2 to 5) becomes one user
message (the question, then its choices lettered A, B, ...) and the answer is a single token, the
letter, right after the chat template's generation prompt. Training puts its loss on that token
only; scoring reads the next-token distribution after the same prompt and keeps the letters'
probabilities, so one forward pass per (question, draw) scores every choice.

``text`` (cloze, for models too small to bind a letter to a choice): the user message is the
question alone and the answer is the choice's own text. Training puts its loss on the right
choice's tokens; scoring takes each choice's log-likelihood log p(choice | question) and
renormalises over the choices, p_i = p(y_i | x) / sum_j p(y_j | x): one sequence per choice,
sharing the prompt (vLLM's prefix cache computes it once per draw).

Training, the server and the benchmark all build their prompts here, so they cannot drift apart.

Data format (jsonl): ``{"id": ..., "question": str, "choices": [str, ...], "label": int}`` with
``label`` the 0-based index of the right choice (ARC, OpenBookQA as in ``shared/data/mc``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ivonserve.errors import IvonserveError

LETTERS = "ABCDE"
FORMS = ("letter", "text")
DEFAULT_FORM = "letter"  # where neither the request nor the posterior's record names one
MIN_CHOICES, MAX_CHOICES = 2, len(LETTERS)
INSTRUCTION = "Answer with the letter of the correct choice."


@dataclass(frozen=True)
class MCQuestion:
    index: int  # position in the file after holdout/limit: the benchmark's record key
    id: str
    question: str
    choices: tuple[str, ...]
    label: int | None  # None: unlabelled (scoring only)


def letters(n_choices: int) -> list[str]:
    check_choice_count(n_choices, "choices")
    return list(LETTERS[:n_choices])


def check_choice_count(n_choices: int, field: str) -> None:
    if not MIN_CHOICES <= n_choices <= MAX_CHOICES:
        raise IvonserveError(
            f"{field}: {n_choices} choices; a question has {MIN_CHOICES} to {MAX_CHOICES}"
        )


def question_text(question: str, choices: Sequence[str]) -> str:
    """The user message: the question, its lettered choices, the instruction."""
    lines = [question.strip(), ""]
    lines += [
        f"{letter}. {choice}" for letter, choice in zip(letters(len(choices)), choices, strict=True)
    ]
    return "\n".join([*lines, "", INSTRUCTION])


def question_messages(question: str, choices: Sequence[str]) -> list[dict[str, str]]:
    return [{"role": "user", "content": question_text(question, choices)}]


def prompt_ids(tokenizer: Any, question: str, choices: Sequence[str]) -> list[int]:
    """Token ids of the chat-templated question, ending with the generation prompt: the next
    token is the answer letter."""
    encoded = tokenizer.apply_chat_template(
        question_messages(question, choices), add_generation_prompt=True, tokenize=True
    )
    if hasattr(encoded, "keys") and "input_ids" in encoded:  # BatchEncoding in newer transformers
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


def text_prompt_ids(tokenizer: Any, question: str) -> list[int]:
    """The cloze prompt: the question alone as the user message, then the generation prompt."""
    encoded = tokenizer.apply_chat_template(
        [{"role": "user", "content": question.strip()}], add_generation_prompt=True, tokenize=True
    )
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


def choice_token_ids(tokenizer: Any, choice: str) -> list[int]:
    """A choice's text as the assistant's reply (no special tokens)."""
    ids = [int(t) for t in tokenizer.encode(choice.strip(), add_special_tokens=False)]
    if not ids:
        raise IvonserveError(f"choice {choice!r} encodes to no token")
    return ids


def letter_token_ids(tokenizer: Any, n_choices: int) -> list[int]:
    """One token id per letter; a tokenizer that splits a letter cannot score it in one pass."""
    ids = []
    for letter in letters(n_choices):
        encoded = tokenizer.encode(letter, add_special_tokens=False)
        if len(encoded) != 1:
            raise IvonserveError(f"the tokenizer splits the answer letter {letter!r}: {encoded}")
        ids.append(int(encoded[0]))
    return ids


def recorded_form(training: dict[str, Any]) -> str | None:
    """The answer form a posterior was trained to answer multiple choice in, from its own
    record (posterior.json's ``training``, an adapter's training.json): ``letter`` or
    ``text``; None where the record does not say it was trained on multiple choice (then
    whoever reads it uses their own default, ``letter``). ``ivonserve train`` records the
    resolved ``format`` beside its ``config`` (whose ``format`` may say ``auto``);
    ``posterior import --mc-form`` records ``format`` and ``mc_form``."""
    config = training.get("config")
    config = config if isinstance(config, dict) else {}
    if training.get("format", config.get("format")) != "mc":
        return None
    form = training.get("mc_form", config.get("mc_form", "letter"))
    return form if form in FORMS else None


def is_mc_row(row: Any) -> bool:
    return isinstance(row, dict) and "choices" in row and "question" in row


def parse_row(row: Any, where: str, index: int, labelled: bool = True) -> MCQuestion:
    """One jsonl row, or an error naming the file, line and field."""
    if not isinstance(row, dict):
        raise IvonserveError(f"{where}: expected a JSON object")
    question, choices, label = row.get("question"), row.get("choices"), row.get("label")
    if not isinstance(question, str) or not question.strip():
        raise IvonserveError(f"{where}: 'question' must be a non-empty string")
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise IvonserveError(f"{where}: 'choices' must be a list of strings")
    check_choice_count(len(choices), f"{where}: 'choices'")
    if label is None and not labelled:
        return MCQuestion(index, str(row.get("id", index)), question, tuple(choices), None)
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise IvonserveError(
            f"{where}: 'label' must be the index of the right choice (0 to {len(choices) - 1})"
        )
    return MCQuestion(index, str(row.get("id", index)), question, tuple(choices), label)


def load_mc(path: Path, limit: int | None = None, holdout: int = 0) -> list[MCQuestion]:
    """Labelled questions of a jsonl file. ``holdout`` > 0: only the last N rows (the validation
    slice that ``train --holdout N`` keeps out); < 0: every row but the last -N (what training
    sees); ``limit``: the first N of what is left."""
    if not path.is_file():
        raise IvonserveError(f"{path}: data file not found")
    raw = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw.append((number, json.loads(line)))
        except json.JSONDecodeError:
            raise IvonserveError(f"{path}:{number}: not a JSON line") from None
    if holdout:
        if abs(holdout) >= len(raw):
            raise IvonserveError(f"{path}: a holdout of {abs(holdout)} leaves no question")
        raw = raw[-holdout:] if holdout > 0 else raw[:holdout]
    raw = raw[:limit]
    if not raw:
        raise IvonserveError(f"{path}: no questions")
    return [parse_row(row, f"{path}:{number}", i) for i, (number, row) in enumerate(raw)]
