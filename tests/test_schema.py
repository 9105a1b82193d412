"""Property-based fuzzing of the served OpenAPI schema (schemathesis + hypothesis): every route,
a bounded number of generated requests each. No 5xx, and every response matches the schema,
status codes, content types and headers the server declares.

Requests drawn from the schema alone are nearly all refused (the limits that depend on the
settings, such as n_models <= pool size, are not in the schema), so each generation route is
also fuzzed with bodies that pass every limit: arbitrary unicode prompts (lone surrogates
included) and stop strings, any seed, temperature and top_p in range, streamed or not.

The server is an extra app on the shared tiny engine with tight limits, so that the valid
requests hypothesis finds stay cheap (at most 4 candidates of 4 tokens).
"""

from __future__ import annotations

import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

EXAMPLES_PER_ROUTE = 30
CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
]
BOUNDED = settings(
    max_examples=EXAMPLES_PER_ROUTE,
    deadline=None,
    database=None,  # no .hypothesis/ folder in the checkout
    suppress_health_check=list(HealthCheck),
)


def test_fuzzing_every_route_finds_no_5xx_and_no_schema_violation(serve_with):
    srv = serve_with(
        max_tokens_limit=4,
        default_max_tokens=4,
        max_candidates=4,
        default_n_models=1,
        default_n_samples=1,
        max_prompt_tokens=64,
    )
    schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    paths = sorted(op.path for op in operations)
    assert {"/generate", "/v1/chat/completions", "/v1/completions", "/metrics"} <= set(paths)
    for operation in operations:

        @BOUNDED
        @given(case=operation.as_strategy())
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=srv.url, checks=CHECKS, timeout=120)

        fuzz()
    by_path = {op.path: op for op in operations}
    for path, prompt_field in VALID_PROMPT.items():
        fuzz_valid(by_path[path], prompt_field, srv.url)
    answered = _requests_by_route_and_status(srv.url)
    for route in ("/generate", "/v1/chat/completions", "/v1/completions"):
        statuses = answered.get(route, {})
        assert sum(statuses.values()) >= EXAMPLES_PER_ROUTE // 2, (route, statuses)
        assert statuses.get("200", 0) >= 1, (route, statuses)  # valid requests were found too


def fuzz_valid(operation, prompt_field: str, url: str) -> None:
    @BOUNDED
    @given(body=valid_bodies(prompt_field))
    def fuzz(body: dict) -> None:
        case = operation.Case(body=body, media_type="application/json")
        case.call_and_validate(base_url=url, checks=CHECKS, timeout=120)

    fuzz()


VALID_PROMPT = {
    "/generate": "prompt",
    "/v1/completions": "prompt",
    "/v1/chat/completions": "messages",
}
_TEXT = st.text(min_size=1, max_size=80)


def valid_bodies(prompt_field: str) -> st.SearchStrategy[dict]:
    """Bodies inside every limit of the test server (at most 2 x 2 candidates of 4 tokens)."""
    from ivonserve import mbr

    if prompt_field == "messages":
        message = st.fixed_dictionaries(
            {
                "role": st.sampled_from(["system", "developer", "user", "assistant"]),
                "content": _TEXT,
            }
        )
        prompt = st.lists(message, min_size=1, max_size=3)
    else:
        prompt = _TEXT
    return st.fixed_dictionaries(
        {prompt_field: prompt},
        optional={
            "n_models": st.integers(0, 2),
            "n_samples": st.integers(1, 2),
            "max_tokens": st.integers(1, 4),
            "temperature": st.floats(0, 2),
            "top_p": st.floats(0.01, 1),
            "seed": st.integers(0, (1 << 63) - 1),
            "stop": st.lists(_TEXT, max_size=3),
            "ignore_eos": st.booleans(),
            "selection": st.sampled_from(sorted(mbr.METHODS)),
            "utility": st.sampled_from(sorted(mbr.UTILITIES)),
            "return_candidates": st.booleans(),
            "stream": st.booleans(),
        },
    )


def _requests_by_route_and_status(url: str) -> dict[str, dict[str, float]]:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics").text):
        for sample in family.samples:
            if sample.name == "ivonserve_requests_total":
                route, status = sample.labels["route"], sample.labels["status"]
                counts.setdefault(route, {})[status] = sample.value
    return counts
