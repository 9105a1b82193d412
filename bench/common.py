"""What the benchmark scripts share. They run as ``python bench/NAME.py``, which puts this folder
on ``sys.path``, so each imports this module as ``common``."""

from __future__ import annotations

import shlex
import statistics
import sys

# The first GSM8k training questions: realistic prompt lengths, the same in every benchmark.
PROMPTS = [
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in "
    "May. How many clips did Natalia sell altogether in April and May?",
    "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
    "How much did she earn?",
    "Betty is saving money for a new wallet which costs $100. Betty has only half of the money "
    "she needs. Her parents give her $15, and her grandparents twice as much. How much more "
    "money does Betty need?",
    "James writes a 3-page letter to 2 different friends twice a week. How many pages does he "
    "write a year?",
]


def spread(values: list[float]) -> dict[str, float]:
    """Median and range: what the results report for every repeated measurement."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def command_line(script: str, argv: list[str] | None = None) -> str:
    """The command that reproduces a run, as its report prints it: the venv's python, the script
    and the arguments it got (argv, when main was called with its own, else the command line)."""
    return shlex.join([".venv/bin/python", script, *(sys.argv[1:] if argv is None else argv)])
