"""POST /score and POST /score/choices: the routes translate; the work is ``serving``'s."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request

from ivonserve.server.routing import ERRORS, in_slot, log_fields, scoring, with_cancellation
from ivonserve.server.score.protocol import (
    ChoiceScoreRequest,
    ChoiceScoreResponse,
    ScoreRequest,
    ScoreResponse,
)

router = APIRouter()


@router.post("/score", response_model=ScoreResponse, responses=ERRORS)
@with_cancellation
async def score(request: ScoreRequest, raw_request: Request) -> Any:
    """The log-likelihood of each continuation given the prompt under the posterior predictive
    of n_models draws (0: the mean adapter), with the draws' own and their disagreement."""
    service = scoring(raw_request)
    plan = service.plan_score(request)
    log = log_fields(raw_request)
    return await in_slot(service, lambda t: service.score(plan, t, log))


@router.post("/score/choices", response_model=ChoiceScoreResponse, responses=ERRORS)
@with_cancellation
async def score_choices(request: ChoiceScoreRequest, raw_request: Request) -> Any:
    """The probability of each choice of a multiple-choice question under the posterior
    predictive of n_models draws (0: the mean adapter), from one forward pass per draw."""
    service = scoring(raw_request)
    plan = service.plan_choices(request)
    log = log_fields(raw_request)
    return await in_slot(service, lambda t: service.choices(plan, t, log))
