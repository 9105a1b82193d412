"""Final-answer extraction and normalisation on GSM8k-style completions."""

from __future__ import annotations

import pytest

from ivonserve.answers import extract_answer, normalize_answer, parse_number

# (completion, expected normalised answer). Mostly shapes that sampled GSM8k completions take,
# including the malformed ones.
EXTRACT_CASES = [
    # --- gold / fine-tuned format "#### X", with calculator annotations
    (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
        "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72",
        "72",
    ),
    (
        "Weng earns 12/60 = $<<12/60=0.2>>0.2 per minute.\n"
        "Working 50 minutes, she earned 0.2 x 50 = $<<0.2*50=10>>10.\n#### 10",
        "10",
    ),
    ("In the beginning, Betty has only 100 / 2 = $50.\n#### 5", "5"),
    ("#### 18", "18"),
    ("#### 1,500.00", "1500"),
    ("####18", "18"),
    ("#### -3", "-3"),
    ("#### $1,234", "1234"),
    # --- few-shot CoT format "The answer is X."
    ("There are 15 trees originally. Then there were 21. So 21 - 15 = 6. The answer is 6.", "6"),
    (
        "Leah had 32 chocolates and her sister 42. 32 + 42 = 74. After eating 35, 74 - 35 = 39. "
        "The answer is 39.",
        "39",
    ),
    ("The answer is 1,234.", "1234"),
    ("The answer is $18.00.", "18"),
    ("So she makes 9 * 2 = 18 dollars. The answer is 18 dollars.", "18"),
    ("The answer is: 1,000,000", "1000000"),
    ("the answer is 18", "18"),
    ("THE ANSWER IS 18!", "18"),
    ("The final answer is 42.", "42"),
    ("The answer is -3.", "-3"),
    ("The answer is \u22127", "-7"),  # unicode minus
    ("The answer is 18.50", "18.5"),
    ("The answer is 0.5", "0.5"),
    ("The answer is 1/2", "0.5"),
    ("The answer is .5", "0.5"),
    ("The answer is 2/3.", "2/3"),
    ("The answer is 4/6", "2/3"),
    ("The answer is 50%.", "50"),
    ("The answer is 007", "7"),
    ("The answer is **18**.", "18"),
    # --- answer: X
    ("Answer: 42", "42"),
    ("**Final Answer:** 42 apples", "42"),
    ("**Answer**: $36", "36"),
    ("answer: +5", "5"),
    # --- LaTeX / boxed
    ("The final answer is $\\boxed{72}$.", "72"),
    ("Therefore the total is \\boxed{\\frac{3}{4}}", "0.75"),
    ("First guess \\boxed{1,000}, corrected: \\boxed{2,000}", "2000"),
    ("So it is \\boxed{36\\%}", "36"),
    ("The answer is \\$36", "36"),
    ("We get \\boxed{\\text{18 dollars}}", "18"),
    # --- priority among markers and occurrences
    ("The answer is 5.\n\nQuestion: Tom has 3 apples... The answer is 7.", "5"),  # first
    ("#### 12\nThe answer is 13.", "13"),  # "The answer is" outranks "####"
    ("The answer is five. She had 3 apples and 2 pears, 5 fruits.", "5"),  # no number: fallback
    ("The answer is unknown.\n#### 9", "9"),
    # --- fallback: last number in the text
    ("She has 3 apples and buys 4 more, so 3 + 4 = 7 apples.", "7"),
    ("So she makes $18.00 every day.", "18"),
    ("The temperature dropped to -3 degrees.", "-3"),
    ("10 - 5 = 5 apples left", "5"),
    ("The profit is 20 - 5", "5"),  # a minus between numbers is not a sign
    ("48/2 = 24", "24"),
    ("She spends 3/4 of her money", "0.75"),
    ("It costs US$45", "45"),
    ("x = 3.14159", "3.14159"),
    ("Step 1: 4 + 4 = 8. Step 2: 8 * 2 = 16.", "16"),
    ("Half of 1,200 is 600.", "600"),
    ("She has 12 apples.\n\n", "12"),
    # --- no number at all
    ("I don't know.", None),
    ("", None),
    ("The answer is five.", None),
    ("####", None),
    ("v1.2.3 of the tool", None),
]


@pytest.mark.parametrize(("text", "expected"), EXTRACT_CASES)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


NORMALIZE_CASES = [
    ("1,234", "1234"),
    ("$18.00", "18"),
    ("18.50", "18.5"),
    ("18.5", "18.5"),
    ("1/2", "0.5"),
    ("0.50", "0.5"),
    ("4/6", "2/3"),
    ("2/3", "2/3"),
    ("-1/8", "-0.125"),
    ("50%", "50"),
    ("-0", "0"),
    ("+5", "5"),
    ("$1,234.50", "1234.5"),
    ("\\frac{1}{2}", "0.5"),
    ("12.0000", "12"),
    ("18.", "18"),
    (" Paris. ", "paris"),
    ("New   York", "new york"),
    ("0.6667", "0.6667"),  # a rounded decimal is not 2/3
]


@pytest.mark.parametrize(("raw", "expected"), NORMALIZE_CASES)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


@pytest.mark.parametrize(
    ("a", "b"), [("0.5", "1/2"), ("18.50", "18.5"), ("1,000", "1000"), ("$7", "7.00")]
)
def test_equal_values_compare_equal(a, b):
    assert normalize_answer(a) == normalize_answer(b)


def test_distinct_values_stay_distinct():
    assert normalize_answer("0.67") != normalize_answer("2/3")
    assert normalize_answer("50%") != normalize_answer("0.5")


def test_extract_is_normalised():
    # whatever the surface form, equal values extract equal strings
    forms = ["The answer is 1/2.", "#### 0.5", "\\boxed{\\frac{1}{2}}", "Answer: 0.50"]
    assert {extract_answer(f) for f in forms} == {"0.5"}


def test_parse_number():
    assert parse_number("3/0") is None
    assert parse_number("18 apples") is None
    assert parse_number("-2.5") == -2.5
