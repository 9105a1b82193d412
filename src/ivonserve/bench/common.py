"""What the HTTP benchmark clients share: the data, resumable records and the server check
(their statistics: ``stats``)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from ivonserve.answers import extract_answer, gsm8k_answer_to_target
from ivonserve.errors import IvonserveError

RECORDS = "records.jsonl"


@dataclass(frozen=True)
class GridPoint:
    n_models: int
    n_samples: int

    @property
    def label(self) -> str:
        return f"{self.n_models}x{self.n_samples}"

    @property
    def candidates(self) -> int:
        return max(1, self.n_models) * self.n_samples

    @classmethod
    def parse(cls, text: str, flag: str = "--grid") -> GridPoint:
        try:
            models, samples = (int(part) for part in text.lower().split("x"))
        except ValueError:
            raise IvonserveError(f"{flag}: {text!r} is not MODELSxSAMPLES (e.g. 4x8)") from None
        if models < 0 or samples < 1:
            raise IvonserveError(f"{flag}: {text!r} needs n_models >= 0 and n_samples >= 1")
        return cls(models, samples)


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


def drop_torn_tail(path: Path) -> None:
    """Cut a torn last line (a run killed mid-write), so that the next append starts a line."""
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with path.open("r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


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


def http_client(args: Any) -> httpx.AsyncClient:
    """The benchmark's client of ``args.url``: its timeout per request and its API key."""
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else None
    return httpx.AsyncClient(base_url=args.url, timeout=timeout, headers=headers)


@dataclass(frozen=True)
class ServedArms:
    """What a scoring benchmark asks of a server: per model one request at K = 0 (the mean) and
    one at its largest K (every smaller K is a prefix of those draws), and the arms they give."""

    served: dict[str, dict[str, Any]]
    models: list[str]
    requests: list[tuple[str, str, int]]  # (label, model, n_models)
    arms: list[tuple[str, str, int]]  # (label, model, K); an adapter's only K is 0


async def plan_arms(client: httpx.AsyncClient, args: Any, ks: list[int]) -> ServedArms:
    """``args.model`` (default: the server's default) checked against what the server serves
    and against each pool's size; one line naming the flag otherwise."""
    await check_server(client, args.url)
    served = await served_models(client)
    models = args.model or [next(name for name, card in served.items() if card["default"])]
    unknown = [m for m in models if m not in served]
    if unknown:
        raise IvonserveError(
            f"--model {unknown[0]!r}: not served by {args.url} (it serves {', '.join(served)})"
        )
    requests, arms = [], []
    for model in models:
        card = served[model]
        model_ks = [0] if card["kind"] == "adapter" else ks
        if max(model_ks) > card["pool_size"]:
            raise IvonserveError(
                f"--n-models {max(model_ks)}: {model!r} has a pool of {card['pool_size']}"
            )
        requests += [(args.label, model, k) for k in sorted({0, max(model_ks)} & {*model_ks})]
        arms += [(args.label, model, k) for k in model_ks]
    return ServedArms(served, models, requests, arms)


def scoring_key(row: dict) -> tuple[str, str, int, int]:
    """A scoring record's identity: (label, model, n_models, question index)."""
    return (row["label"], row["model"], row["n_models"], row["index"])


async def score_into_records(
    args: Any,
    questions: list,
    ks: list[int],
    endpoint: str,
    body_of: Callable[[str, int, Any], dict],
    row_of: Callable[[dict, Any], dict],
) -> tuple[ServedArms, float]:
    """Plan the arms against the server, then POST ``body_of(model, n_models, question)`` to
    ``endpoint`` for every (request, question) not yet in ``args.out``'s records, ``concurrency``
    at a time, appending each answer as the request's (label, model, n_models, index) and
    ``row_of(answer, question)``. Returns the plan and the seconds spent scoring."""
    from tqdm import tqdm

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    async with http_client(args) as client:
        plan = await plan_arms(client, args, ks)
        drop_torn_tail(out / RECORDS)
        done = load_records(out / RECORDS, scoring_key)
        todo = [(r, q) for r in plan.requests for q in questions if (*r, q.index) not in done]
        semaphore = asyncio.Semaphore(args.concurrency)
        bar = tqdm(total=len(todo), desc="scoring", unit="q", disable=args.no_progress)
        began = time.perf_counter()

        async def one(request: tuple[str, str, int], question: Any, sink: Any) -> None:
            label, model, n_models = request
            async with semaphore:
                response = await client.post(endpoint, json=body_of(model, n_models, question))
            if response.status_code != 200:
                raise IvonserveError(
                    f"{args.url}{endpoint} answered {response.status_code}: {response.text[:300]}"
                )
            row = {"label": label, "model": model, "n_models": n_models, "index": question.index}
            sink.write(json.dumps(row | row_of(response.json(), question)) + "\n")
            sink.flush()
            bar.update(1)

        with (out / RECORDS).open("a") as sink:
            try:
                await asyncio.gather(*(one(r, q, sink) for r, q in todo))
            finally:
                bar.close()
    return plan, time.perf_counter() - began


def previous_results(out: Path) -> dict:
    """What an earlier run left in ``out/results.json`` (nothing: {})."""
    path = out / "results.json"
    return json.loads(path.read_text()) if path.exists() else {}


def add_server_run(previous: dict, args: Any, plan: ServedArms, seconds: float) -> dict:
    """results.json's ``servers``: per ``--label`` its URL, the cards of the models it scored
    and the seconds spent, added to what earlier runs in the folder recorded."""
    configs = previous.get("servers", {})
    config = configs.setdefault(args.label or "-", {"url": args.url, "models": {}, "seconds": 0})
    config["models"].update({m: plan.served[m] for m in plan.models})
    config["seconds"] = round(config["seconds"] + seconds, 1)
    return configs


DEFAULT_K = "0,1,2,4,8"


def add_scoring_arguments(parser: Any, data_help: str, out: str, concurrency: int) -> None:
    """The flags every scoring benchmark (likelihood, mc) shares."""
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server to measure")
    parser.add_argument("--data", required=True, help=data_help)
    parser.add_argument("--holdout", type=int, default=0,
                        help="only the last N rows: the validation slice `train --holdout N` "
                        "kept out of training")  # fmt: skip
    parser.add_argument("--limit", type=int, help="the first N questions only")
    parser.add_argument("--model", action="append",
                        help="a served posterior or adapter; repeat to compare several "
                        "(default: the server's default)")  # fmt: skip
    parser.add_argument(
        "--n-models",
        default=DEFAULT_K,
        help=f"the K to compare, 0: the mean adapter (default {DEFAULT_K})",
    )
    parser.add_argument("--label", default="",
                        help="names this server's configuration; arms of other labels already "
                        "in --out are kept and compared")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=concurrency, help="requests in flight")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per request")
    parser.add_argument("--seed", type=int, default=0, help="of the bootstrap resamples")
    parser.add_argument("--api-key", help="sent as Authorization: Bearer KEY")
    parser.add_argument("--out", default=out, help="results folder")
    parser.add_argument("--no-progress", action="store_true")
