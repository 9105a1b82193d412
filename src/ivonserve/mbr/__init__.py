"""Minimum Bayes Risk selection over candidates from several posterior draws.

Pure: numpy and the standard library only (plus ``ivonserve.answers``). Usable without a server::

    from ivonserve.mbr import Candidate, select, UTILITIES, METHODS

    cands = [Candidate(draw=0, text="... The answer is 18."), Candidate(1, "... #### 18")]
    result = select(cands, method="model", utility="answer")
    result.index, result.text, result.answer, result.confidence, result.scores

``METHODS`` (flat, model, majority, flat_weighted, model_weighted, majority_weighted) and
``UTILITIES`` (answer, bleu, chrf, rouge_l, token_f1) are the registries; ``register_method`` /
``register_utility`` add entries. See ``methods`` for the formulas, ``lexical`` for the metrics.
"""

from . import lexical  # noqa: F401  (registers chrf, bleu, rouge_l)
from .lexical import BLEU, BLEUConfig, ChrF, ChrFConfig, RougeL, RougeLConfig
from .methods import (
    METHODS,
    Flat,
    Majority,
    Method,
    MethodConfig,
    Model,
    get_method,
    register_method,
    select,
)
from .registry import Registry
from .types import Candidate, Selection
from .utilities import (
    UTILITIES,
    AnswerUtility,
    CallableUtility,
    TokenF1,
    Utility,
    get_utility,
    register_utility,
)

__all__ = [
    "BLEU",
    "METHODS",
    "UTILITIES",
    "AnswerUtility",
    "BLEUConfig",
    "CallableUtility",
    "Candidate",
    "ChrF",
    "ChrFConfig",
    "Flat",
    "Majority",
    "Method",
    "MethodConfig",
    "Model",
    "Registry",
    "RougeL",
    "RougeLConfig",
    "Selection",
    "TokenF1",
    "Utility",
    "get_method",
    "get_utility",
    "register_method",
    "register_utility",
    "select",
]
