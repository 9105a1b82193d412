"""Scoring: teacher-forced log-probabilities of sequences (``score``: vLLM's prompt
log-probabilities, one request per (sequence, draw), every one in one batch) and the
log-probabilities of chosen tokens right after a prompt (``score_next``: one forward pass per
(prompt, draw)). The Bayesian averaging of the draws' scores is the server's
(``server/score``, with ``predictive`` and ``calibration``)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from ivonserve.engine.types import Job, NextScored, Scored, TokenScores, job_name

if TYPE_CHECKING:
    from ivonserve.pool import Pool


class ScoringMixin:
    """``Engine``'s scoring; ``engine.lifecycle.Engine`` holds the state and the methods
    annotated here (``_run_all`` is the fan-out's submission)."""

    pool: Callable[..., Pool]
    require_ready: Callable[[], None]
    _run_all: Callable[[list[Job]], Awaitable[list[Any]]]

    async def score(
        self,
        sequences: Sequence[Sequence[int]],
        starts: Sequence[int],
        n_draws: int,
        pool: Pool | None = None,
        top: int = 0,
    ) -> Scored:
        """Teacher-forced log-probabilities of ``sequences[i][starts[i]:]`` under the mean
        (n_draws = 0) or each of draws 0..n_draws-1 of ``pool`` (None: the default pool), every
        (sequence, draw) in one vLLM batch.

        Only prompt log-probabilities are asked for; vLLM decodes one greedy token per request
        (its minimum), which ``TokenScores.next_token`` reports."""
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        self.require_ready()
        adapters = (pool or self.pool()).adapters(n_draws)
        sequences = [list(s) for s in sequences]
        for sequence, start in zip(sequences, starts, strict=True):
            if not 1 <= start <= len(sequence):
                raise ValueError(f"start {start} is outside 1..{len(sequence)}")
        params = SamplingParams(
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=top,
            logprobs=top,
            detokenize=False,
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        score_id = f"ivs-score-{uuid.uuid4().hex[:16]}"
        jobs = [
            Job(draw, job_name(f"{score_id}-s{i}", draw), params, lora, s)
            for i, s in enumerate(sequences)
            for draw, lora in adapters
        ]
        began = time.perf_counter()
        outputs = iter(await self._run_all(jobs))
        per_sequence = [
            [_token_scores(draw, sequence, start, top, next(outputs)) for draw, _ in adapters]
            for sequence, start in zip(sequences, starts, strict=True)
        ]
        return Scored(
            sequences=per_sequence,
            prompt_tokens=sum(len(s) for s in sequences),
            seconds=time.perf_counter() - began,
        )

    async def score_next(
        self,
        prompts: Sequence[Sequence[int]],
        token_ids: Sequence[Sequence[int]],
        n_draws: int,
        pool: Pool | None = None,
    ) -> NextScored:
        """log p(t | prompt) of each of ``token_ids[i]`` for the token right after ``prompts[i]``,
        under the mean (n_draws = 0) or each of draws 0..n_draws-1: one vLLM request (one
        forward pass over the prompt) per (prompt, draw), every one in one batch. The
        log-probabilities are over the whole vocabulary (vLLM's raw logprobs), so a caller can
        renormalise them over the tokens it asked for (multiple-choice letters)."""
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        self.require_ready()
        adapters = (pool or self.pool()).adapters(n_draws)
        jobs = []
        score_id = f"ivs-next-{uuid.uuid4().hex[:16]}"
        for i, (prompt, ids) in enumerate(zip(prompts, token_ids, strict=True)):
            params = SamplingParams(
                max_tokens=1,
                temperature=0.0,
                logprob_token_ids=[int(t) for t in ids],
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )
            for draw, lora in adapters:
                jobs.append(
                    Job(draw, job_name(f"{score_id}-p{i}", draw), params, lora, list(prompt))
                )
        began = time.perf_counter()
        outputs = iter(await self._run_all(jobs))
        per_prompt = []
        for ids in token_ids:
            rows = []
            for _ in adapters:
                step = next(outputs).outputs[0].logprobs[0]
                rows.append([float(step[int(t)].logprob) for t in ids])
            per_prompt.append(rows)
        return NextScored(
            logprobs=per_prompt,
            draws=[draw for draw, _ in adapters],
            prompt_tokens=sum(len(p) for p in prompts),
            seconds=time.perf_counter() - began,
        )


def _top(entry: Mapping[int, Any], top: int) -> dict[int, float]:
    """The ``top`` likeliest tokens of one position (vLLM adds the actual token beyond them)."""
    return {t: lp.logprob for t, lp in entry.items() if lp.rank is not None and lp.rank <= top}


def _token_scores(
    draw: int | None, sequence: list[int], start: int, top: int, out: Any
) -> TokenScores:
    entries = out.prompt_logprobs[start:]
    completion = out.outputs[0]
    token = completion.token_ids[0]
    step = completion.logprobs[0]
    return TokenScores(
        draw=draw,
        logprobs=[entry[t].logprob for entry, t in zip(entries, sequence[start:], strict=True)],
        top=[_top(entry, top) for entry in entries] if top else None,
        next_token=(token, step[token].logprob, _top(step, top)),
    )
