"""`bench/payoff_tables.py`: the pairs it picks from a likelihood results folder, and their signs
whichever order the report compared them in."""

from __future__ import annotations

import pytest
from conftest import bench_script

from ivonserve.bench.common import Question
from ivonserve.bench.likelihood import Arm, summarise


def _summarised(rows: dict, arms: list) -> dict:
    """Two questions of 10 tokens each, with the per-draw log-likelihoods in `rows`."""
    questions = [Question(i, f"q{i}", "1", "s") for i in range(2)]
    records = {
        (label, model, k, i): {"draws": draws[i], "tokens": 10}
        for (label, model, k), draws in rows.items()
        for i in range(2)
    }
    return summarise(arms, records, questions, seed=0)


def _results() -> dict:
    """Per-draw log-likelihoods made up so every difference is known: the draws of `prune-none`
    beat its mean, `temperature-10`'s draws are worse, AdamW is best."""
    rows = {
        ("prune-none", "ivon", 0): [[-20.0], [-30.0]],
        ("prune-none", "ivon", 2): [[-19.0, -19.0], [-29.0, -29.0]],
        ("prune-none", "adamw", 0): [[-10.0], [-20.0]],
        ("temperature-10", "ivon", 2): [[-25.0, -25.0], [-35.0, -35.0]],
    }
    arms = [Arm("prune-none", "adamw", 0)] + [
        Arm(label, "ivon", k)
        for label, ks in (("prune-none", (0, 1, 2)), ("temperature-10", (1, 2)))
        for k in ks
    ]
    return _summarised(rows, arms)


def test_the_tables_pick_the_ablations_pairs_with_signs_either_way():
    tables = bench_script("payoff_tables")
    results = _results()
    chosen = tables.chosen_pairs(results, "prune-none")
    assert chosen == [
        ("prune-none/ivon mean", "prune-none/adamw mean"),
        ("prune-none/ivon K=1", "prune-none/ivon mean"),
        ("prune-none/ivon K=1", "prune-none/adamw mean"),
        ("prune-none/ivon K=2", "prune-none/ivon mean"),
        ("prune-none/ivon K=2", "prune-none/adamw mean"),
        # temperature leaves the mean alone: its draws are compared with the reference's mean
        ("temperature-10/ivon K=1", "prune-none/ivon mean"),
        ("temperature-10/ivon K=1", "prune-none/ivon K=1"),
        ("temperature-10/ivon K=2", "prune-none/ivon mean"),
        ("temperature-10/ivon K=2", "prune-none/ivon K=2"),
    ]
    pairs = {(p["a"], p["b"]): p for p in results["pairs"]}
    # AdamW was listed first, so (ivon mean, adamw) is stored the other way round.
    assert ("prune-none/ivon mean", "prune-none/adamw mean") not in pairs
    ivon_vs_adamw = tables.paired(pairs, "prune-none/ivon mean", "prune-none/adamw mean")
    assert ivon_vs_adamw["diff"] == pytest.approx(10 / 10)  # 10 nats a question, 10 tokens
    assert ivon_vs_adamw["ci"] == pytest.approx([1.0, 1.0])
    assert ivon_vs_adamw["a_better"] == 0
    draws_vs_mean = tables.paired(pairs, "prune-none/ivon K=2", "prune-none/ivon mean")
    assert draws_vs_mean["diff"] == pytest.approx(-0.1)
    assert draws_vs_mean["a_better"] == 1
    hot = tables.paired(pairs, "temperature-10/ivon K=2", "prune-none/ivon K=2")
    assert hot["diff"] == pytest.approx(0.6)
    lines = tables.pairs_table(results, "prune-none")
    assert len(lines) == 2 + len(chosen)
    assert "| prune-none/ivon mean | prune-none/adamw mean | +1.0000 |" in "\n".join(lines)


def test_a_second_pair_is_set_against_its_own_twin_and_against_the_first_pair():
    tables = bench_script("payoff_tables")
    rows = {
        ("prune-none", "ivon", 0): [[-20.0], [-30.0]],
        ("prune-none", "adamw", 0): [[-10.0], [-20.0]],
        ("prune-none", "epoch-ivon", 0): [[-12.0], [-22.0]],
        ("prune-none", "epoch-ivon", 2): [[-11.0, -11.0], [-21.0, -21.0]],
        ("prune-none", "epoch-adamw", 0): [[-9.0], [-19.0]],
    }
    results = _summarised(rows, [Arm(label, model, k) for label, model, k in rows])
    chosen = tables.chosen_pairs(results, "prune-none")
    assert chosen == [
        ("prune-none/ivon mean", "prune-none/adamw mean"),
        ("prune-none/epoch-ivon mean", "prune-none/ivon mean"),
        ("prune-none/epoch-ivon mean", "prune-none/epoch-adamw mean"),
        ("prune-none/epoch-ivon K=2", "prune-none/epoch-ivon mean"),
        ("prune-none/epoch-ivon K=2", "prune-none/epoch-adamw mean"),
        ("prune-none/epoch-adamw mean", "prune-none/adamw mean"),
    ]
    pairs = {(p["a"], p["b"]): p for p in results["pairs"]}
    new_vs_old = tables.paired(pairs, "prune-none/epoch-ivon mean", "prune-none/ivon mean")
    assert new_vs_old["diff"] == pytest.approx(-0.8)
    twins = tables.paired(pairs, "prune-none/epoch-ivon K=2", "prune-none/epoch-adamw mean")
    assert twins["diff"] == pytest.approx(0.2)
