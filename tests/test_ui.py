"""The consensus page (issue 32) in a real headless Chromium against the live tiny server: a
prompt submitted through the form streams /generate and fills the grid, the vote shares and the
consensus; an error shows the server's own message; a shared link fills the form and runs; a
stopped candidate (early stopping) is shown greyed. Plus the HTTP side: the page's files load
without a key, the API keeps its key rule, and the files are package data.

The browser is Debian's ``chromium`` driven through Debian's ``chromedriver`` (``apt-get install
chromium chromium-driver``; ``.ci/run`` installs them): nothing is downloaded at run time. Without
them the browser tests are skipped, saying so. Screenshots go to pytest's tmp_path and to
``runs/ui/`` (git-ignored).
"""

from __future__ import annotations

import base64
import fnmatch
import json
import re
import shutil
import tomllib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from conftest import POOL_SIZE

from ivonserve import mbr
from ivonserve.config import repo_root
from ivonserve.server.page import UI_DIR

PROMPT = "Tom has 3 apples and buys 4 more. How many apples does he have now?"
KEY = "ui-test-key"
WAIT_S = 600  # a generation on 2 busy cores; never asserted on, only an upper bound
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
ARTEFACTS = repo_root() / "runs" / "ui"


# --- the browser --------------------------------------------------------------------------------
def find_browser() -> tuple[str | None, str | None, str]:
    """Chromium's binary, its chromedriver, and why not when either is missing."""
    binary = next((found for name in BROWSERS if (found := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    missing = [what for what, path in (("Chromium", binary), ("chromedriver", driver)) if not path]
    reason = (
        f"no {' and no '.join(missing)} on PATH: apt-get install chromium chromium-driver "
        "(.ci/run does)"
    )
    return binary, driver, reason


BINARY, DRIVER, NO_BROWSER = find_browser()
# checked before any fixture: without a browser, the tiny engine is not started for nothing
needs_browser = pytest.mark.skipif(BINARY is None or DRIVER is None, reason=NO_BROWSER)


@pytest.fixture(scope="module")
def browser():
    if BINARY is None or DRIVER is None:
        pytest.skip(NO_BROWSER)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BINARY
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in CI
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1360,1500",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)
    driver.set_page_load_timeout(120)
    driver.set_script_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def open_page(driver: Any, url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 120).until(
        lambda d: d.execute_script("return document.body && document.body.dataset.ready")
    )


def wait_finished(driver: Any) -> str:
    """The page's state once the request ended: done, error or stopped."""
    from selenium.webdriver.support.ui import WebDriverWait

    def ended(d: Any) -> str | bool:
        state = d.find_element("id", "result").get_attribute("data-state")
        if d.find_element("id", "error").is_displayed():
            return "error"
        return state if state in ("done", "error", "stopped") else False

    return WebDriverWait(driver, WAIT_S, poll_frequency=0.2).until(ended)


def text_of(driver: Any, css: str) -> str:
    return driver.find_element("css selector", css).get_attribute("textContent")


def fill(driver: Any, **fields: Any) -> None:
    for name, value in fields.items():
        field = driver.find_element("id", name)
        field.clear()
        field.send_keys(str(value))


def choose(driver: Any, name: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", name)).select_by_value(value)


def cells(driver: Any) -> list[Any]:
    return driver.find_elements("css selector", "#grid .cell")


def raw_result(driver: Any) -> dict[str, Any]:
    return json.loads(text_of(driver, "#raw"))


def cluster_key(candidate: dict[str, Any]) -> str:
    """The page's clustering: the normalised answer, else the whitespace-normalised text."""
    if candidate["answer"]:
        return f"a:{candidate['answer']}"
    return "t:" + " ".join(candidate["text"].split())


def screenshot(driver: Any, path: Path) -> Path:
    """The whole page (beyond the window), through Chromium's DevTools protocol."""
    width, height = driver.execute_script(
        "return [document.documentElement.scrollWidth, document.documentElement.scrollHeight]"
    )
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": 1},
        },
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def keep(path: Path) -> Path:
    """A copy of an artefact under runs/ui/ (git-ignored), where it outlives tmp_path."""
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(path, ARTEFACTS / path.name))


# --- the page in the browser --------------------------------------------------------------------
@needs_browser
def test_consensus_streams_into_the_grid(browser, serve_with, tmp_path):
    """On a server with an API key: the key typed into the page lists the posteriors and runs
    the request; the grid has n_models x n_samples cells, the chosen one is the response's."""
    from selenium.webdriver.support.ui import WebDriverWait

    srv = serve_with(api_keys=[KEY])
    open_page(browser, f"{srv.url}/")  # redirected to /ui/
    assert browser.current_url == f"{srv.url}/ui/"
    fill(browser, **{"api-key": KEY})
    browser.find_element("id", "key-form").submit()  # saves the key, lists the posteriors
    WebDriverWait(browser, 60).until(
        lambda d: d.find_elements("css selector", "#model option[value='tiny']")
    )
    choose(browser, "model", "tiny")
    browser.find_element("id", "prompt").send_keys(PROMPT)
    fill(browser, n_models=2, n_samples=3, max_tokens=16, temperature=1.0, seed=11)
    choose(browser, "selection", "model")
    choose(browser, "utility", "chrf")
    browser.find_element("id", "run").click()
    assert wait_finished(browser) == "done", text_of(browser, "#error")

    result = raw_result(browser)
    assert (result["n_models"], result["n_samples"], result["seed"]) == (2, 3, 11)
    grid = cells(browser)
    assert len(grid) == 2 * 3
    assert {(c.get_attribute("data-draw"), c.get_attribute("data-sample")) for c in grid} == {
        (str(m), str(s)) for m in range(2) for s in range(3)
    }
    assert all(c.get_attribute("data-state") == "done" for c in grid)
    chosen = browser.find_elements("css selector", "#grid .cell.chosen")
    assert len(chosen) == 1
    assert chosen[0].get_attribute("data-draw") == str(result["chosen_draw"])
    assert chosen[0].get_attribute("data-sample") == str(result["chosen_sample"])

    # the page's result is the API's: the same request without the page, same seed
    body = {
        "prompt": PROMPT,
        "model": "tiny",
        "n_models": 2,
        "n_samples": 3,
        "max_tokens": 16,
        "temperature": 1.0,
        "seed": 11,
        "selection": "model",
        "utility": "chrf",
        "return_candidates": True,
    }
    direct = httpx.post(
        f"{srv.url}/generate", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=300
    ).json()
    assert (direct["chosen_draw"], direct["chosen_sample"], direct["text"]) == (
        result["chosen_draw"],
        result["chosen_sample"],
        result["text"],
    )

    # one cluster per distinct answer (else text), each cell coloured as its cluster
    keys = {cluster_key(c) for c in result["candidates"]}
    shares = browser.find_elements("css selector", "#shares .share-row:not(.share-head)")
    assert len(shares) == len(keys)
    votes = [r.find_element("css selector", ".num").get_attribute("textContent") for r in shares]
    assert sum(int(v.split("/")[0]) for v in votes) == 6
    assert len(browser.find_elements("css selector", "#draw-shares .draw-row")) == 2
    by_cell = {(c.get_attribute("data-draw"), c.get_attribute("data-sample")): c for c in grid}
    letters = {}
    for candidate in result["candidates"]:
        cell = by_cell[(str(candidate["draw"]), str(candidate["sample"]))]
        letters.setdefault(cluster_key(candidate), set()).add(cell.get_attribute("data-cluster"))
    assert all(len(found) == 1 for found in letters.values())  # one letter per cluster
    assert len({next(iter(found)) for found in letters.values()}) == len(keys)

    # the consensus, its confidence, timing and usage
    assert text_of(browser, "#chosen-text") == result["text"]
    confidence = int(text_of(browser, "#confidence").rstrip("%"))
    assert abs(confidence - 100 * result["confidence"]) <= 0.5 + 1e-9
    assert str(result["usage"]["total_tokens"]) in text_of(browser, "#timing")
    # a cell opens its full text
    target = result["candidates"][-1]
    by_cell[(str(target["draw"]), str(target["sample"]))].click()
    assert browser.find_element("id", "cell-detail").is_displayed()
    assert text_of(browser, "#detail-text") == target["text"]

    # the curl command: the request with its seed, the key only as a variable
    curl = text_of(browser, "#curl")
    assert curl.startswith(f"curl -s '{srv.url}/generate'")
    assert '"n_models":2' in curl and '"n_samples":3' in curl and '"seed":11' in curl
    assert "Authorization: Bearer $IVONSERVE_API_KEY" in curl and KEY not in curl
    link = browser.find_element("id", "share-link").get_attribute("href")
    assert "run=1" in link and "seed=11" in link and KEY not in link
    # the key lives in this browser's session storage only (not remembered, not in a URL)
    stored = browser.execute_script(
        "const k = 'ivonserve.apiKey'; return [sessionStorage.getItem(k), localStorage.getItem(k)]"
    )
    assert stored == [KEY, None]
    assert KEY not in browser.current_url

    shot = screenshot(browser, tmp_path / "consensus.png")
    keep(shot)
    assert shot.stat().st_size > 10_000


@needs_browser
def test_error_shows_the_servers_message(browser, live, client, tmp_path):
    """n_models above the pool: the page shows the server's own message (a 422), no grid."""
    open_page(browser, f"{live.url}/ui/")
    browser.find_element("id", "prompt").send_keys(PROMPT)
    fill(browser, n_models=POOL_SIZE + 1, n_samples=1, max_tokens=4)
    browser.find_element("id", "run").click()
    assert wait_finished(browser) == "error"
    expected = client.post(
        "/generate", json={"prompt": PROMPT, "n_models": POOL_SIZE + 1, "n_samples": 1}
    )
    assert expected.status_code == 422
    message = expected.json()["error"]["message"]
    assert text_of(browser, "#error-message") == message
    assert "HTTP 422" in text_of(browser, "#error-detail")
    assert not browser.find_element("id", "result").is_displayed()
    keep(screenshot(browser, tmp_path / "error.png"))


@needs_browser
def test_a_link_fills_the_form_and_runs(browser, live):
    """?prompt=...&n_models=2&n_samples=2&seed=7&run=1 (through /ui's redirect, query kept)."""
    query = {"prompt": PROMPT, "n_models": 2, "n_samples": 2, "seed": 7, "max_tokens": 8}
    open_page(browser, f"{live.url}/ui?{urlencode({**query, 'run': 1})}")
    assert browser.current_url.startswith(f"{live.url}/ui/?")
    for name, value in query.items():
        assert browser.find_element("id", name).get_attribute("value") == str(value)
    assert wait_finished(browser) == "done", text_of(browser, "#error")
    result = raw_result(browser)
    assert (result["n_models"], result["n_samples"], result["seed"]) == (2, 2, 7)
    assert len(cells(browser)) == 4
    chosen = browser.find_element("css selector", "#grid .cell.chosen")
    assert chosen.get_attribute("data-draw") == str(result["chosen_draw"])
    assert chosen.get_attribute("data-sample") == str(result["chosen_sample"])


@needs_browser
def test_stopped_candidates_are_shown_as_such(browser, live):
    """A candidate the stream flags as stopped (``stopped: true``, ``finished: false`` or
    ``finish_reason: "early_stop"``) is greyed, labelled and left out of the vote shares."""
    open_page(browser, f"{live.url}/ui/")

    def candidate(draw: int, sample: int, answer: str | None, **extra: Any) -> dict[str, Any]:
        return {
            "draw": draw,
            "model": draw,
            "sample": sample,
            "text": f"The answer is {answer}",
            "answer": answer,
            "logprob": -1.5,
            "tokens": 5,
            "finish_reason": "stop",
            "score": None,
            **extra,
        }

    first = [candidate(0, 0, "7"), candidate(0, 1, None, stopped=True)]
    second = [
        candidate(1, 0, None, finish_reason="early_stop"),
        candidate(1, 1, "8", finished=False),
    ]
    result = {
        "answer": "7",
        "confidence": 1.0,
        "chosen_draw": 0,
        "chosen_model": 0,
        "chosen_sample": 0,
        "n_models": 2,
        "n_samples": 2,
        "selection": "model",
        "utility": "answer",
        "seed": 1,
        "text": "The answer is 7",
        "model": "tiny",
        "temperature": 1.0,
        "top_p": 1.0,
        "max_tokens": 8,
        "timing": {"queue_s": 0, "generate_s": 0.1, "select_s": 0, "total_s": 0.1},
        "usage": {"prompt_tokens": 3, "completion_tokens": 20, "total_tokens": 23},
        "candidates": [{**c, "score": 0.5} for c in first + second],
    }
    browser.execute_script(
        "ivonserve.begin({n_models: 2, n_samples: 2}, {prompt: 'x'});"
        "ivonserve.applyEvent({type: 'candidates', candidates: arguments[0]});"
        "ivonserve.applyEvent({type: 'candidates', candidates: arguments[1]});"
        "ivonserve.applyEvent({type: 'result', result: arguments[2]});",
        first,
        second,
        result,
    )
    states = {
        (c.get_attribute("data-draw"), c.get_attribute("data-sample")): c.get_attribute(
            "data-state"
        )
        for c in cells(browser)
    }
    assert states == {
        ("0", "0"): "done",
        ("0", "1"): "stopped",
        ("1", "0"): "stopped",
        ("1", "1"): "stopped",
    }
    for c in browser.find_elements("css selector", "#grid .cell.stopped"):
        assert "stopped" in c.get_attribute("textContent")
    assert "3 candidates stopped early" in text_of(browser, "#stopped-note")
    shares = browser.find_elements("css selector", "#shares .share-row:not(.share-head)")
    assert len(shares) == 1 and "1/1" in shares[0].get_attribute("textContent")


# --- the HTTP side, no browser ------------------------------------------------------------------
def test_page_loads_without_a_key_and_the_api_keeps_its_rule(serve_with):
    srv = serve_with(api_keys=[KEY])
    with httpx.Client(base_url=srv.url, timeout=60) as http:
        for path in ("/", "/ui"):
            moved = http.get(f"{path}?prompt=hi&run=1")
            assert moved.status_code == 307
            assert moved.headers["location"] == "ui/?prompt=hi&run=1"
        page = http.get("/ui/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        for name, kind in (("app.js", "javascript"), ("style.css", "text/css")):
            asset = http.get(f"/ui/{name}")
            assert asset.status_code == 200 and kind in asset.headers["content-type"]
        assert http.get("/ui/missing.js").status_code == 404
        # every API call still needs the key
        assert http.get("/v1/models").status_code == 401
        refused = http.post("/generate", json={"prompt": "hi", "max_tokens": 2})
        assert refused.status_code == 401
        listed = http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"})
        assert listed.status_code == 200
    # the page is not part of the API's schema
    assert not {"/", "/ui"} & set(srv.app.openapi()["paths"])


class _Options(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.select: str | None = None
        self.options: dict[str, list[str]] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "select":
            self.select = dict(attrs).get("id")
            self.options[self.select] = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self.select = None

    def handle_data(self, data: str) -> None:
        if self.select and self.lasttag == "option" and data.strip():
            self.options[self.select].append(data.strip())


def test_page_lists_every_method_and_utility_and_fetches_nothing_outside():
    parser = _Options()
    parser.feed((UI_DIR / "index.html").read_text())
    assert sorted(parser.options["selection"][1:]) == sorted(mbr.METHODS)
    assert sorted(parser.options["utility"][1:]) == sorted(mbr.UTILITIES)
    for path in UI_DIR.iterdir():  # no CDN, no web font: the page works offline
        assert not re.search(r"https?://|//cdn|@import", path.read_text()), path.name


def test_page_files_are_package_data():
    """Every file of the page is matched by pyproject's package-data (so the wheel, `pip install
    .` and the Docker image carry it)."""
    pyproject = tomllib.loads((repo_root() / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["ivonserve.server"]
    files = sorted(p.name for p in UI_DIR.iterdir() if p.is_file())
    assert files == ["app.js", "index.html", "style.css"]
    for name in files:
        assert any(fnmatch.fnmatch(f"ui/{name}", pattern) for pattern in patterns), name
