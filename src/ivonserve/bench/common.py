"""What the HTTP benchmark clients share: the data, resumable records, the server check, and
bootstrap intervals."""

from __future__ import annotations

import json
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from ivonserve.answers import extract_answer, gsm8k_answer_to_target
from ivonserve.errors import IvonserveError

RECORDS = "records.jsonl"


@dataclass(frozen=True)
class Question:
    index: int
    question: str
    gold: str
    solution: str  # the reference answer as the model was trained to write it


def load_questions(path: Path, limit: int | None = None, holdout: int = 0) -> list[Question]:
    """GSM8k-format rows (`question`, `answer` ending in `#### N`). ``holdout``: only the last
    N rows (the validation slice ``ivonserve train --holdout N`` kept out of training);
    ``limit``: the first N of what is left."""
    if not path.is_file():
        raise IvonserveError(f"{path}: data file not found")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            answer = str(row["answer"])
            gold = extract_answer(answer.rsplit("####", 1)[-1])
            question = str(row["question"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise IvonserveError(
                f"{path}:{number}: expected a JSON object with 'question' and 'answer'"
            ) from None
        if gold is None:
            raise IvonserveError(f"{path}:{number}: the answer has no '#### N' number")
        rows.append((question, gold, gsm8k_answer_to_target(answer)))
    if holdout:
        rows = rows[-holdout:]
    rows = rows[:limit]
    if not rows:
        raise IvonserveError(f"{path}: no questions")
    return [Question(i, q, gold, solution) for i, (q, gold, solution) in enumerate(rows)]


def load_records(path: Path, key: Callable[[dict], Hashable]) -> dict[Hashable, dict]:
    """Finished records by ``key(record)``; a torn last line (a killed run) is ignored."""
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            done[key(row)] = row
    return done


async def check_server(client: httpx.AsyncClient, url: str) -> None:
    """The server answers and is ready; else one line naming the URL."""
    try:
        response = await client.get("/ready")
    except httpx.HTTPError as err:
        raise IvonserveError(f"{url}: cannot reach the server ({type(err).__name__})") from None
    if response.status_code != 200:
        raise IvonserveError(f"{url}/ready answered {response.status_code}: not ready")


async def served_models(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    """The server's posteriors and adapters by name (/v1/models), with their pool settings."""
    response = await client.get("/v1/models")
    response.raise_for_status()
    return {card["id"]: card for card in response.json()["data"]}


def bootstrap_ci(
    numerator: np.ndarray,
    denominator: np.ndarray | None = None,
    resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> list[float]:
    """Percentile interval of sum(numerator) / sum(denominator) (the mean when no denominator)
    over questions resampled with replacement. One seed draws the same resamples for every
    statistic, so statistics of the same questions stay paired."""
    numerator = np.asarray(numerator, dtype=np.float64)
    denominator = np.ones_like(numerator) if denominator is None else np.asarray(denominator)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, numerator.size, (resamples, numerator.size))
    values = numerator[picks].sum(axis=1) / denominator[picks].sum(axis=1)
    tail = (1 - level) / 2 * 100
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
