"""The one errors module (``ivonserve.errors``): every fault has one HTTP status, and its body is
OpenAI's error shape as ``server.protocol.ErrorResponse`` declares it. No engine, no server."""

from __future__ import annotations

import json

import pytest

from ivonserve import errors
from ivonserve.errors import (
    ApiError,
    BodyTooLarge,
    EngineError,
    EngineNotReady,
    InvalidRequest,
    IvonserveError,
    Overloaded,
    PluginError,
    PosteriorError,
    RequestTimeout,
    ShuttingDown,
    Unauthorized,
    UnknownPosterior,
    api_error,
    status_of,
    validation_error,
)
from ivonserve.server.protocol import ErrorResponse

FAULTS = [
    (Unauthorized("no key"), 401, "AuthenticationError"),
    (UnknownPosterior("nope", ["tiny", "tiny-mean"]), 404, "NotFoundError"),
    (BodyTooLarge("too large"), 413, "RequestTooLargeError"),
    (InvalidRequest("n_models", "must be <= the pool size 4, got 5"), 422, "BadRequestError"),
    (PosteriorError("x: missing file"), 422, "BadRequestError"),
    (IvonserveError("a user error"), 422, "BadRequestError"),
    (Overloaded("too many requests", 3), 429, "RateLimitError"),
    (ShuttingDown("the server is shutting down", 1), 503, "ServiceUnavailableError"),
    (EngineError("the vLLM engine died"), 503, "ServiceUnavailableError"),
    (EngineNotReady("the engine is not ready"), 503, "ServiceUnavailableError"),
    (RequestTimeout("the request took longer"), 504, "TimeoutError"),
    (KeyError("a bug"), 500, "InternalServerError"),
]


@pytest.mark.parametrize(("exc", "status", "kind"), FAULTS, ids=lambda v: type(v).__name__)
def test_every_fault_has_one_status_and_openais_body(exc, status, kind):
    err = api_error(exc)
    assert status_of(exc) == err.status == status
    body = err.body()
    assert body == ErrorResponse.model_validate(body).model_dump()  # the declared schema
    assert body["error"]["type"] == kind and body["error"]["code"] == status
    # the bytes the middleware sends are the ones the handlers' JSONResponse renders
    assert err.json() == bytes(err.response().body)
    assert json.loads(err.json()) == body
    if status == 500:
        assert "KeyError" in err.message and "a bug" not in err.message  # no internals


def test_the_fields_and_headers_a_client_reads():
    unknown = api_error(UnknownPosterior("nope", ["tiny", "tiny-mean"]))
    assert unknown.message == "model: 'nope' is not served here; served: tiny, tiny-mean"
    assert unknown.param == "model"
    limit = api_error(InvalidRequest("n_samples", "exceeds max_candidates 64"))
    assert (limit.message, limit.param) == ("n_samples: exceeds max_candidates 64", "n_samples")
    assert api_error(Overloaded("busy", 7)).headers == {"Retry-After": "7"}
    assert api_error(ShuttingDown("draining", 1)).headers == {"Retry-After": "1"}
    assert api_error(Unauthorized("no key")).headers == {"WWW-Authenticate": "Bearer"}
    assert api_error(BodyTooLarge("big")).param == "body"
    assert Overloaded("busy", 1).status == 429 and ShuttingDown("bye", 1).status == 503
    given = ApiError(418, "a teapot", "x", {"H": "v"})
    assert api_error(given) is given and given.type == "Error"


def test_validation_names_every_field():
    err = validation_error(
        [
            {"loc": ("body", "n_models"), "msg": "too small", "type": "greater_than_equal"},
            {"loc": ("body", "foo"), "msg": "extra", "type": "extra_forbidden"},
            {"loc": ("body", "prompt"), "msg": "missing", "type": "missing"},
        ]
    )
    assert err.status == 422 and err.param == "n_models"
    assert (
        err.message
        == "n_models: too small; foo: unknown field (not allowed); prompt: field required"
    )


def test_every_exception_class_lives_in_the_one_module():
    """PluginError is vllm_plugin's own (vLLM loads the plugin alone), re-exported here; the
    modules that raise the others import them from here."""
    from ivonserve import posterior, vllm_plugin
    from ivonserve.server import limits

    assert posterior.PosteriorError is PosteriorError
    assert vllm_plugin.PluginError is PluginError
    assert limits.Overloaded is Overloaded
    for name in errors.__all__:
        value = getattr(errors, name)
        if isinstance(value, type) and issubclass(value, Exception) and value is not PluginError:
            assert value.__module__ == "ivonserve.errors", name
