"""Final-answer extraction and normalisation (GSM8k-style numbers first).

Pure Python (stdlib only); imports nothing of the rest of ivonserve.

``extract_answer(text)`` finds the final answer of a completion and returns it normalised, or
``None`` when the text holds no number. Where it looks, in priority order:

1. ``The answer is X`` (also "the final answer is X", "answer is: X"), first occurrence;
2. ``answer: X`` (also "Answer: X", "**Final Answer:** X"), first occurrence;
3. ``#### X`` (the GSM8k gold format), first occurrence;
4. ``\\boxed{X}`` (also ``\\fbox{X}``), last occurrence (as the MATH benchmark reads it);
5. otherwise the last number anywhere in the text.

For markers 1-3, X is the first number after the marker in the same sentence and line, within
40 characters (so "The answer is $1,234.50." and "The answer is: **18** apples" both work, and
"The answer is five. She had 3 ..." does not read 3). A marker followed by no number there is
skipped and the next rule is tried. The first occurrence is used because the commonest failure
of few-shot sampling is a model that answers and then rambles on into a new made-up question
with its own answer. GSM8k calculator annotations ``<<48/2=24>>`` are removed first.

``normalize_answer(s)`` is the canonical form, so equal values compare equal as strings:

* numbers are read exactly (``fractions.Fraction``): ``$``, thousands commas (``1,234``),
  a trailing period, a ``%`` sign, LaTeX ``\\$``/``\\%``/``\\frac{a}{b}``/``\\text{...}`` and a
  leading ``+`` are dropped;
* integers print as integers: ``"18.00"`` -> ``"18"``, ``"-0"`` -> ``"0"``, ``"48/2"`` -> ``"24"``;
* other values with a finite decimal expansion print as the shortest exact decimal:
  ``"18.50"`` -> ``"18.5"``, ``"1/2"`` -> ``"0.5"``, ``".5"`` -> ``"0.5"``;
* values without one print as a reduced fraction: ``"4/6"`` -> ``"2/3"`` (a rounded decimal
  such as ``0.67`` stays ``0.67`` and is *not* equal to ``2/3``);
* percent: the sign is dropped and the value kept, ``"50%"`` -> ``"50"`` (GSM8k gold answers
  to "what percentage" questions are bare numbers), so ``50%`` does not equal ``0.5``;
* a string that is not a number is case-folded, whitespace-collapsed and stripped of
  surrounding punctuation: ``" Paris. "`` -> ``"paris"``.
"""

from __future__ import annotations

import re
from fractions import Fraction

__all__ = ["extract_answer", "normalize_answer", "parse_number"]

# One number as written in a completion: optional sign and currency, digits with thousands
# commas (groups of three) or plain digits, optional decimals, optional "/denominator",
# optional percent sign. A leading "-" counts as a sign only when it does not follow a word
# character (so "5-3" is 5 and 3, not 5 and -3).
_NUMBER = (
    r"(?<![\w./])"
    r"(?P<sign>[-+\u2212]?)(?:\\?\$\s?)?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)"
    r"(?:\s?/\s?(?P<den>\d+(?:\.\d+)?))?"
    r"(?![\d])"
)
_NUMBER_RE = re.compile(_NUMBER)

_CALCULATOR_RE = re.compile(r"<<[^<>]*>>")
_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_LATEX_TEXT_RE = re.compile(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}")
_MARKERS = (
    re.compile(r"the\s+(?:final\s+)?answer\s+is\b\s*:?", re.IGNORECASE),
    re.compile(r"answer\s*(?:\*\*)?\s*:", re.IGNORECASE),
    re.compile(r"####"),
)
_SENTENCE_END_RE = re.compile(r"[.!?;](?=\s|$)")
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_WINDOW = 40


def _fraction_to_str(value: Fraction) -> str:
    """Canonical text of an exact value: integer, else exact decimal, else reduced fraction."""
    if value.denominator == 1:
        return str(value.numerator)
    den = value.denominator
    twos = fives = 0
    while den % 2 == 0:
        den //= 2
        twos += 1
    while den % 5 == 0:
        den //= 5
        fives += 1
    if den != 1:
        return f"{value.numerator}/{value.denominator}"
    places = max(twos, fives)
    scaled = abs(value.numerator) * 10**places // value.denominator
    digits = str(scaled).rjust(places + 1, "0")
    text = f"{digits[:-places]}.{digits[-places:]}".rstrip("0")
    return ("-" if value < 0 else "") + text


def _to_fraction(match: re.Match[str]) -> Fraction | None:
    num = Fraction(match.group("num").replace(",", ""))
    den = match.group("den")
    if den is not None:
        den_value = Fraction(den)
        if den_value == 0:
            return None
        num = num / den_value
    if match.group("sign") in ("-", "\u2212"):
        num = -num
    return num


def _clean_latex(text: str) -> str:
    if "\\" not in text:
        return text
    text = _LATEX_FRAC_RE.sub(r"\1/\2", text)
    text = _LATEX_TEXT_RE.sub(r" \1 ", text)
    return text.replace("\\!", "").replace("\\,", "").replace("{,}", ",")


def parse_number(s: str) -> Fraction | None:
    """The exact value of ``s`` when the whole string is one number (with $, %, commas), else None.

    >>> parse_number("$1,234.50")
    Fraction(2469, 2)
    >>> parse_number("18 apples") is None
    True
    """
    text = _clean_latex(s).strip().rstrip(".").strip()
    text = text.replace("\\%", "%").rstrip("%").strip().replace("\\$", "$")
    match = _NUMBER_RE.fullmatch(text)
    if match is None:
        return None
    return _to_fraction(match)


def normalize_answer(s: str) -> str:
    """Canonical form of an answer string; equal values give equal strings (see module doc).

    >>> [normalize_answer(x) for x in ("1,234", "$18.00", "18.50", "1/2", "4/6", "50%")]
    ['1234', '18', '18.5', '0.5', '2/3', '50']
    """
    value = parse_number(s)
    if value is not None:
        return _fraction_to_str(value)
    text = " ".join(s.casefold().split())
    return text.strip(" \t.,;:!?\"'`*$()[]{}")


def _first_number(text: str) -> str | None:
    match = _NUMBER_RE.search(text)
    while match is not None:
        value = _to_fraction(match)
        if value is not None:
            return _fraction_to_str(value)
        match = _NUMBER_RE.search(text, match.start("num") + 1)
    return None


def _last_number(text: str) -> str | None:
    for match in reversed(list(_NUMBER_RE.finditer(text))):
        value = _to_fraction(match)
        if value is not None:
            return _fraction_to_str(value)
        # "5/0": not a fraction; fall back to the bare numbers it is made of
        for part in reversed(re.split(r"\s?/\s?", match.group(0))):
            inner = _NUMBER_RE.search(part)
            if inner is not None and (value := _to_fraction(inner)) is not None:
                return _fraction_to_str(value)
    return None


def _boxed_contents(text: str) -> list[str]:
    """Contents of every \\boxed{...}, braces balanced."""
    found = []
    for match in _BOXED_RE.finditer(text):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            if text[pos] == "{":
                depth += 1
            elif text[pos] == "}":
                depth -= 1
                if depth == 0:
                    found.append(text[start:pos])
                    break
    return found


def extract_answer(text: str) -> str | None:
    """The normalised final answer of a completion, or None when it holds no number.

    >>> extract_answer("She sold 48/2 = <<48/2=24>>24 clips.\\n#### 72")
    '72'
    >>> extract_answer("So the total is $1,234.00. The answer is 1,234.")
    '1234'
    >>> extract_answer("I do not know.") is None
    True
    """
    if "<<" in text:
        text = _CALCULATOR_RE.sub(" ", text)
    text = _clean_latex(text)
    for marker in _MARKERS:
        for match in marker.finditer(text):
            window = text[match.end() : match.end() + _WINDOW].split("\n", 1)[0]
            found = _first_number(_SENTENCE_END_RE.split(window, maxsplit=1)[0])
            if found is not None:
                return found
    for content in reversed(_boxed_contents(text)):
        found = _last_number(content)
        if found is not None:
            return found
    return _last_number(text)


_CALC_ANNOTATION = re.compile(r"<<[^>]*>>")
_FINAL_LINE = re.compile(r"\n?####\s*(.+?)\s*$", re.S)


def gsm8k_answer_to_target(answer: str) -> str:
    """GSM8k's worked answer as the assistant's reply: no <<calc>> notes, '#### N' as a sentence."""
    text = _CALC_ANNOTATION.sub("", answer).strip()
    match = _FINAL_LINE.search(text)
    if match:
        body = text[: match.start()].rstrip()
        text = "\n".join(filter(None, [body, f"The answer is {match.group(1).strip()}."]))
    return text
