"""Candidate banks: every candidate of every question of one `bench gsm8k --candidates` run.

A bank is one folder: ``bank.json`` (the settings that made every candidate, the served model's
card from ``/v1/models`` and the commands that ran) and the records, one JSON line per question
with its request ``seed`` and every candidate as ``CANDIDATE_FIELDS``. The candidates of one
question are reproduced by sending the same request (the same ``seed``) to a server with the same
settings: draw d's samples are vLLM's seeds ``request_seed_for_draw(seed, d) + s``.

Records grow as ``records.jsonl`` (a rerun asks only the questions not in it) and are committed
as ``records.jsonl.gz``; a fresh checkout resumes from the ``.gz``. A bank holds one grid point
and one set of settings: a run with other settings into the same folder is refused, and so is a
record whose seed is not the bank's, so a replay never mixes runs.
"""

from __future__ import annotations

import datetime
import gzip
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ivonserve.bench.common import RECORDS, GridPoint
from ivonserve.errors import IvonserveError

BANK = "bank.json"
PACKED = RECORDS + ".gz"
FORMAT = "ivonserve-candidate-bank"
CANDIDATE_FIELDS = ("draw", "sample", "tokens", "logprob", "finish_reason", "text", "answer")
# what makes two runs' candidates comparable: the requests' settings...
REQUEST_SETTINGS = (
    "dataset",
    "data",
    "model",
    "grid",
    "temperature",
    "max_tokens",
    "seed",
    "selection",
    "utility",
    "early_stop",
    "early_stop_threshold",
)
# ...and the served model's (its /v1/models card less what changes from start to start)
SERVED_SETTINGS = (
    "kind",
    "base_model",
    "ess",
    "pool_seed",
    "posterior_temperature",
    "prune",
    "prune_by",
)


@dataclass(frozen=True)
class Bank:
    folder: Path
    settings: dict[str, Any]  # REQUEST_SETTINGS and "served" (SERVED_SETTINGS)
    records: dict[int, dict]  # question index -> record, in index order

    @property
    def grid(self) -> GridPoint:
        return GridPoint.parse(self.settings["grid"])

    @property
    def n_models(self) -> int:
        return self.grid.n_models

    @property
    def n_samples(self) -> int:
        return self.grid.n_samples

    @property
    def name(self) -> str:
        return self.folder.name


def bank_settings(args: Any, card: dict, body: dict) -> dict[str, Any]:
    """The settings a bank records and checks: the run's arguments as the requests carry them
    (``body``: a request of the run; greedy 0x1 sends temperature 0) and the served card."""
    settings = {key: getattr(args, key) for key in REQUEST_SETTINGS}
    settings["temperature"] = body["temperature"]
    settings["served"] = {key: card.get(key) for key in SERVED_SETTINGS}
    return settings


def open_bank(folder: Path, settings: dict[str, Any], command: str, questions: int) -> None:
    """Start a bank in ``folder``, or check that the one there has the same settings, and add
    this run's command to it. Unpacks a committed ``records.jsonl.gz`` so the run resumes."""
    path = folder / BANK
    if path.exists():
        manifest = read_manifest(folder)
        differing = _differences(_comparable(manifest["settings"]), _comparable(settings))
        if differing:
            raise IvonserveError(f"{folder}: {differing}; a bank holds one run's settings")
    else:
        manifest = {"format": FORMAT, "version": 1, "settings": settings}
        manifest["candidate_fields"] = list(CANDIDATE_FIELDS)
        manifest["runs"] = []
    unpack_records(folder)
    when = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    manifest["runs"].append({"command": command, "questions": questions, "started": when})
    path.write_text(json.dumps(manifest, indent=2) + "\n")


def read_manifest(folder: Path) -> dict:
    path = folder / BANK
    if not path.is_file():
        raise IvonserveError(f"{folder}: not a candidate bank (no {BANK})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise IvonserveError(f"{path}: not JSON ({err.msg}, line {err.lineno})") from None
    if manifest.get("format") != FORMAT:
        raise IvonserveError(f"{path}: format is {manifest.get('format')!r}, not {FORMAT!r}")
    return manifest


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings less where this machine keeps the base model: the served card names its
    local folder (a converted copy under the user's cache), which differs from machine to
    machine while the model does not, and a fresh checkout must resume the committed banks."""
    served = dict(settings.get("served") or {})
    if served.get("base_model"):
        served["base_model"] = Path(served["base_model"]).name
    return settings | {"served": served}


def _differences(have: dict, want: dict, prefix: str = "") -> str:
    """The first setting that differs, as 'grid is 8x8 here, 4x8 asked', else ''."""
    for key in sorted(set(have) | set(want)):
        a, b = have.get(key), want.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = _differences(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key} is {a!r} here, {b!r} asked"
    return ""


def unpack_records(folder: Path) -> None:
    """A fresh checkout has only the committed ``.gz``: make it the growing records again."""
    if not (folder / RECORDS).exists() and (folder / PACKED).exists():
        with gzip.open(folder / PACKED, "rb") as packed, (folder / RECORDS).open("wb") as out:
            shutil.copyfileobj(packed, out)


def pack_records(folder: Path) -> Path:
    """Write ``records.jsonl.gz`` from the records (what is committed); returns its path.
    Deterministic bytes (no name, no time in the header), so an unchanged bank commits nothing."""
    folder = Path(folder)
    unpack_records(folder)
    tmp = folder / (PACKED + ".tmp")
    with (
        (folder / RECORDS).open("rb") as raw,
        tmp.open("wb") as out,
        gzip.GzipFile(filename="", mode="wb", fileobj=out, compresslevel=9, mtime=0) as gz,
    ):
        shutil.copyfileobj(raw, gz)
    tmp.replace(folder / PACKED)
    return folder / PACKED


def _record_lines(folder: Path) -> list[str]:
    if (folder / RECORDS).exists():
        return (folder / RECORDS).read_text().splitlines()
    if (folder / PACKED).exists():
        with gzip.open(folder / PACKED, "rt") as packed:
            return packed.read().splitlines()
    raise IvonserveError(f"{folder}: no {RECORDS} or {PACKED}")


def load_bank(folder: Path) -> Bank:
    """A bank's settings and records, checked: one grid point, the bank's seeds, every candidate
    there; else one line naming the folder. A torn last line (a killed run) is ignored."""
    folder = Path(folder)
    settings = read_manifest(folder)["settings"]
    grid, base = settings["grid"], settings["seed"]
    expected = GridPoint.parse(grid).candidates
    records: dict[int, dict] = {}
    for number, line in enumerate(_record_lines(folder), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        index = row.get("index")
        where = f"{folder}: record {number} (question {index})"
        if row.get("grid") != grid:
            raise IvonserveError(f"{where} is grid {row.get('grid')}, the bank's is {grid}")
        if row.get("seed") != base + index:
            raise IvonserveError(
                f"{where} has seed {row.get('seed')}, the bank's is {base + index} "
                f"(seed {base} + index): records of another run"
            )
        if len(row.get("candidates") or ()) != expected:
            raise IvonserveError(
                f"{where} has {len(row.get('candidates') or ())} candidates, the bank's "
                f"{grid} has {expected}"
            )
        if index in records:
            raise IvonserveError(f"{where} answers a question the bank already holds")
        records[index] = row
    if not records:
        raise IvonserveError(f"{folder}: the bank holds no records")
    return Bank(folder, settings, dict(sorted(records.items())))
