"""The multiple-choice format: how a question is shown, its letters, and reading the data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny import MC_ROWS, make_tokenizer, write_mc_data

from ivonserve import choices as mc
from ivonserve.errors import IvonserveError


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return make_tokenizer(tmp_path_factory.mktemp("tok"))


def test_question_text_letters_every_choice_in_order():
    text = mc.question_text("  Which is warm? ", ["ice", "fire", "snow"])
    assert text == "Which is warm?\n\nA. ice\nB. fire\nC. snow\n\n" + mc.INSTRUCTION


@pytest.mark.parametrize("n", [1, 6])
def test_choice_counts_outside_two_to_five_are_refused(n):
    with pytest.raises(IvonserveError, match=rf"{n} choices; a question has 2 to 5"):
        mc.letters(n)


def test_prompt_ends_with_the_generation_prompt_and_letters_are_single_tokens(tokenizer):
    ids = mc.prompt_ids(tokenizer, "What is 2 + 3?", ["5", "6"])
    text = tokenizer.decode(ids)
    assert text.endswith("<|im_start|>assistant\n") and "A. 5\nB. 6" in text
    letters = mc.letter_token_ids(tokenizer, 5)
    assert [tokenizer.decode([t]) for t in letters] == ["A", "B", "C", "D", "E"]
    # the training example is the prompt and then the letter: what scoring reads
    assert tokenizer.encode(text + "C", add_special_tokens=False)[-1] == letters[2]


def test_load_keeps_the_validation_slice_apart(tmp_path):
    path = write_mc_data(tmp_path / "mc.jsonl")
    everything = mc.load_mc(path)
    assert [q.id for q in everything] == [r["id"] for r in MC_ROWS]
    validation, training = mc.load_mc(path, holdout=2), mc.load_mc(path, holdout=-2)
    assert [q.id for q in validation] == ["mc/4", "mc/5"]
    assert [q.id for q in training] == ["mc/0", "mc/1", "mc/2", "mc/3"]
    assert [q.index for q in validation] == [0, 1]  # the benchmark's keys, per slice
    assert [q.id for q in mc.load_mc(path, limit=2, holdout=-2)] == ["mc/0", "mc/1"]
    assert everything[2].choices == ("10", "20", "24", "30", "42") and everything[2].label == 2


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "q", "choices": ["a"], "label": 0}, "'choices': 1 choices"),
        ({"question": "q", "choices": ["a", "b"], "label": 2}, "'label' must be the index"),
        ({"question": "q", "choices": ["a", "b"], "label": True}, "'label' must be the index"),
        ({"question": "", "choices": ["a", "b"], "label": 0}, "'question' must be a non-empty"),
        ({"question": "q", "choices": "ab", "label": 0}, "'choices' must be a list of strings"),
    ],
)
def test_bad_rows_name_the_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "bad.jsonl"
    good = {"question": "q", "choices": ["a", "b"], "label": 0}
    path.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(IvonserveError, match=rf"bad.jsonl:2: .*{message}"):
        mc.load_mc(path)


def test_missing_file_and_too_large_holdout_are_named(tmp_path):
    with pytest.raises(IvonserveError, match=r"nope\.jsonl: data file not found"):
        mc.load_mc(Path(tmp_path / "nope.jsonl"))
    path = write_mc_data(tmp_path / "mc.jsonl")
    with pytest.raises(IvonserveError, match="a holdout of 6 leaves no question"):
        mc.load_mc(path, holdout=6)
