"""The docs hold together: every relative link in README.md and docs/*.md reaches a file that
exists (and, with ``#anchor``, a heading of it, by GitHub's slug rules); every ``ivonserve ...``
command they show names a real subcommand and real flags of it (``cli.build_parser()``); every
``make TARGET`` is a target of the Makefile; the README stays short and indexes every page, and a
page's contents list names each of its sections. Parsing only: no engine, no server."""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from urllib.parse import unquote

import pytest

from ivonserve import cli

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)(?:\s+#+)?\s*$")
CODE_SPAN = re.compile(r"(`+)((?:[^`\n]|\n(?!\s*\n))+?)\1")  # may wrap, not past a paragraph
INLINE_LINK = re.compile(
    r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*<?([^()\s>]*)>?(?:\s+\"[^\"]*\")?\s*\)"
)
REFERENCE_LINK = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$")
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")
# `ivonserve`, `.venv/bin/ivonserve`, `$(BIN)/ivonserve`: the CLI, not the package or the service
INVOCATION = re.compile(r"(?:^|(?<=[\s;&|(]))(?:\S*/)?ivonserve(?=\s|$)")
COMMAND_END = re.compile(r"\s(?:&&|\|\||;|\||&)(?:\s|$)")
FLAG = re.compile(r"(?<![\w-])--[a-zA-Z][\w-]*")
MAKE = re.compile(r"(?:^|(?<=[\s;&|(]))make\s+(?:-\S+\s+)*(?:[A-Z_]+=\S*\s+)*([a-z][\w-]*)")


@dataclass
class Page:
    path: Path
    headings: list[tuple[int, str]] = field(default_factory=list)  # (level, text)
    prose: list[str] = field(default_factory=list)  # lines outside code blocks
    blocks: list[list[str]] = field(default_factory=list)  # fenced code blocks' lines

    @property
    def name(self) -> str:
        return str(self.path.relative_to(ROOT))


@cache
def parse(path: Path) -> Page:
    page = Page(path)
    fence: str | None = None
    for line in path.read_text().splitlines():
        opening = FENCE.match(line)
        if fence is None and opening:
            fence = opening.group(1)
            page.blocks.append([])
        elif fence is not None:
            if opening and opening.group(1).startswith(fence) and not line.strip(fence[0] + " "):
                fence = None
            else:
                page.blocks[-1].append(line)
        else:
            page.prose.append(line)
            if heading := HEADING.match(line):
                page.headings.append((len(heading.group(1)), heading.group(2)))
    return page


def slug(heading: str) -> str:
    """GitHub's anchor of a heading (github-slugger): the rendered text lower-cased, every
    character but letters, digits, spaces, '-' and '_' dropped, spaces turned into '-'."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link shows its text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "")
    return "".join(ch for ch in text.lower() if ch.isalnum() or ch in " -_").replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, text in parse(path).headings:
        base = slug(text)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(page: Page) -> list[str]:
    """Inline and reference link targets outside code (a link's text may wrap over lines)."""
    text = CODE_SPAN.sub("", "\n".join(page.prose))
    found = INLINE_LINK.findall(text)
    for line in text.splitlines():
        if ref := REFERENCE_LINK.match(line):
            found.append(ref.group(1))
    return found


def code_lines(page: Page) -> list[str]:
    """Shell-like lines the page shows: code block lines (continuations joined, comments cut)
    and inline code spans."""
    lines = []
    for block in page.blocks:
        joined = "\n".join(block).replace("\\\n", " ")
        lines += [re.sub(r"(?:^|\s)#.*$", "", line) for line in joined.splitlines()]
    lines += [span.replace("\n", " ") for _, span in CODE_SPAN.findall("\n".join(page.prose))]
    return lines


def test_the_pages_parse():
    assert README in PAGES and len(PAGES) > 5
    for path in PAGES:
        assert parse(path).headings, path
    assert slug("Scoring: `POST /score` and echo on `/v1/completions`") == (
        "scoring-post-score-and-echo-on-v1completions"
    )
    assert slug("vLLM's benchmark client") == "vllms-benchmark-client"
    assert slug("Does it pay off?") == "does-it-pay-off"
    assert slug("[The plugin](x.md): `seeds` & co") == "the-plugin-seeds--co"


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in links(parse(path)):
        if not target or SCHEME.match(target):
            continue  # http(s), mailto: not ours to check
        file_part, _, anchor = unquote(target).partition("#")
        if not file_part:
            dest = path
        elif file_part.startswith("/"):
            dest = ROOT / file_part.lstrip("/")
        else:
            dest = path.parent / file_part
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest.resolve()):
            broken.append(f"{target}: no heading #{anchor} in {dest.name}")
    return broken


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_every_relative_link_reaches_a_file_and_a_heading(path):
    broken = broken_links(path)
    assert not broken, f"{parse(path).name}: " + "; ".join(broken)


def test_the_link_check_catches_what_it_should(tmp_path):
    (tmp_path / "other.md").write_text(
        "# Other\n\n## A section: `code`, (and more)\n\n## Twice\n\n## Twice\n"
    )
    page = tmp_path / "page.md"
    page.write_text(
        "# Page\n\n## Here\n\n[ok](other.md#a-section-code-and-more) [ok](other.md#twice-1) "
        "[ok](#here) [ok](https://example.com/x.md#y) `[not a link](nowhere.md)`\n\n"
        "```\n[in a code block](nowhere.md)\n## not a heading\n```\n\n"
        "[bad](missing.md) [bad](other.md#nope) ![bad](img/none.png) [bad](#not-a-heading)\n"
    )
    assert broken_links(page) == [
        "missing.md: no such file",
        "other.md#nope: no heading #nope in other.md",
        "img/none.png: no such file",
        "#not-a-heading: no heading #not-a-heading in page.md",
    ]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    subs: dict[str, argparse.ArgumentParser] = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            subs.update(action.choices)
    return subs


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


@cache
def root_parser() -> argparse.ArgumentParser:
    return cli.build_parser()


def check_command(tail: str) -> list[str]:
    """Problems with one command line after the word `ivonserve`: its subcommand path must
    exist, and each --flag must be an option of the subcommand it reaches."""
    tail = COMMAND_END.split(tail, maxsplit=1)[0]
    words = tail.split()
    parser, path = root_parser(), ["ivonserve"]
    for word in words:
        subs = subcommands(parser)
        if word in subs:
            parser, path = subs[word], [*path, word]
        elif subs and re.fullmatch(r"[a-z][a-z-]*", word):
            return [f"`{' '.join(path)} {word}`: no such subcommand (known: {sorted(subs)})"]
        else:
            break
    known = options(parser)
    return [
        f"`{' '.join(path)} {flag}`: no such flag"
        for flag in FLAG.findall(tail)
        if flag not in known
    ]


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_every_ivonserve_command_shown_exists(path):
    page = parse(path)
    problems = []
    for line in code_lines(page):
        for match in INVOCATION.finditer(line):
            problems += check_command(line[match.end() :])
    assert not problems, f"{page.name}: " + "; ".join(problems)


def test_the_command_check_catches_what_it_should():
    assert check_command(" serve --pool-size 4 --posterior a=b") == []
    assert check_command(" bench gsm8k --url U --grid 0x1") == []
    assert check_command(" posterior inspect DIR --json") == []
    assert check_command(" serve --pool-sise 4")  # a typo of a flag
    assert check_command(" bench gsm9k --url U")  # a subcommand that does not exist
    assert check_command(" train --lr 1e-3") == []
    assert check_command(" sample DIR --json")  # inspect's flag, not sample's
    assert check_command(" serve & curl --fail x") == []  # the next command's flags are its own


@cache
def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text()
    return set(re.findall(r"^([A-Za-z][\w-]*)\s*:(?!=)", text, flags=re.M))


def test_the_make_check_reads_targets_not_variables():
    assert MAKE.findall("cd x && make bench-soak URL=u ARGS='--server-pid 1'") == ["bench-soak"]
    assert MAKE.findall("make LOCK=requirements/gpu.lock setup") == ["setup"]
    assert "serv" not in make_targets() and "bench-mbr" in make_targets()


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_every_make_target_shown_exists(path):
    page = parse(path)
    targets = make_targets()
    assert {"serve", "test", "setup"} <= targets
    shown = {m for line in code_lines(page) for m in MAKE.findall(line)}
    assert shown <= targets, f"{page.name}: no such make target: {sorted(shown - targets)}"


def test_the_readme_is_short_and_indexes_every_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
    linked = {
        (README.parent / unquote(t).partition("#")[0]).resolve() for t in links(parse(README))
    }
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"
    # the two commands that do all the set-up, as the Makefile has them
    assert "make serve" in lines[3] and "make test" in lines[4], lines[:6]


@pytest.mark.parametrize("path", PAGES[1:], ids=lambda p: p.name)
def test_a_contents_list_names_every_section(path):
    """A page's contents list (the #links above its first section) names each of its sections."""
    page = parse(path)
    top = []
    for line in page.prose:
        if (heading := HEADING.match(line)) and len(heading.group(1)) == 2:
            break
        top.append(line)
    listed = set(re.findall(r"\]\(#([^)]+)\)", "\n".join(top)))
    assert listed, f"{page.name}: no contents list (#links) above its first section"
    sections = [text for level, text in page.headings if level == 2]
    missing = [text for text in sections if slug(text) not in listed]
    assert not missing, f"{page.name}: the contents list lacks {missing}"
