"""The engine on the real vLLM CPU engine (shared, tiny model + tiny posterior).

Coroutines run on the live server's loop (``live.run``), where the AsyncLLM lives.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from conftest import POOL_SIZE

from ivonserve.engine import SamplingOptions, request_seed_for_draw
from ivonserve.errors import InvalidRequest, UnknownPosterior, api_error
from ivonserve.posterior import Posterior

pytestmark = pytest.mark.engine

PROMPT = "Natalia sold 48 clips in April and half as many in May. How many clips did she sell?"
GREEDY = SamplingOptions(max_tokens=16, temperature=0.0, ignore_eos=True)


def test_pool_is_registered_as_lora_slots(live, engine, tiny_posterior):
    pool = engine.pools["tiny"]
    assert pool.size == POOL_SIZE
    names = [lora.lora_name for lora in pool.loras]
    ids = [lora.lora_int_id for lora in pool.loras]
    assert len(set(names)) == len(names) == POOL_SIZE + 1  # unique names (prefix cache key)
    assert len(set(ids)) == len(ids)  # and unique int ids
    every = {lora.lora_int_id for p in engine.pools.values() for lora in p.loras}
    assert set(ids) <= every and len(every) == len(engine.pools) * (POOL_SIZE + 1)
    assert set(live.run(engine.llm.list_loras())) == every  # both pools, distinct ids
    args = engine.engine_args
    posterior = Posterior.load(tiny_posterior)
    assert args["max_loras"] == len(every)  # every draw and mean; the grouped kernel needs no spare
    assert args["max_lora_rank"] >= posterior.rank
    assert args["lora_target_modules"] == posterior.target_modules
    assert args["block_size"] == 32 and args["dtype"] == "float32"
    for lora in pool.loras:  # PEFT folders on tmpfs
        assert (Path(lora.lora_path) / "adapter_model.safetensors").is_file()
        if Path("/dev/shm").is_dir():
            assert lora.lora_path.startswith("/dev/shm/")


def test_greedy_tokens_equal_peft_for_every_draw_and_the_mean(live, engine, hf):
    prompt_ids = engine.render(PROMPT)
    assert prompt_ids == hf.prompt_ids(PROMPT)
    pool = engine.pools["tiny"]
    draws = live.run(engine.fan_out(prompt_ids, POOL_SIZE, 1, GREEDY))
    mean = live.run(engine.fan_out(prompt_ids, 0, 1, GREEDY))
    assert [c.draw for c in draws.candidates] == list(range(POOL_SIZE))
    assert [c.draw for c in mean.candidates] == [None]
    for cand in draws.candidates:
        expected = hf.greedy(pool.draws[cand.draw].lora_path, prompt_ids, 16)
        assert list(cand.token_ids) == expected, f"draw {cand.draw}"
        assert cand.text == hf.decode(expected)
    assert list(mean.candidates[0].token_ids) == hf.greedy(pool.mean.lora_path, prompt_ids, 16)
    # the draws are different models: their greedy outputs are not all the same
    assert len({c.token_ids for c in draws.candidates}) > 1


def test_fan_out_shape_draws_and_seeds(live, engine):
    sampling = SamplingOptions(max_tokens=12, temperature=1.0, seed=7)
    first = live.run(engine.fan_out(PROMPT, 3, 2, sampling))
    assert [(c.draw, c.sample) for c in first.candidates] == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1),
    ]  # fmt: skip
    assert len(first.request_ids) == len(set(first.request_ids)) == 3
    assert first.seed == 7
    assert first.prompt_tokens == len(engine.encode(PROMPT))  # a text is used as is: no template
    assert first.completion_tokens == sum(c.tokens for c in first.candidates)
    assert all(c.logprob is not None and c.logprob <= 0 for c in first.candidates)
    assert all(1 <= c.tokens <= 12 for c in first.candidates)
    # same seed, same candidates; request ids are new
    again = live.run(engine.fan_out(PROMPT, 3, 2, sampling))
    assert [c.token_ids for c in again.candidates] == [c.token_ids for c in first.candidates]
    assert not set(again.request_ids) & set(first.request_ids)
    # different draws (and samples) give different candidates
    assert len({c.token_ids for c in first.candidates}) >= 4
    # another seed, other samples
    other = live.run(engine.fan_out(PROMPT, 3, 2, SamplingOptions(max_tokens=12, seed=8)))
    assert [c.token_ids for c in other.candidates] != [c.token_ids for c in first.candidates]
    # a random seed when none is given, reported back: it reproduces the same candidates
    unseeded = SamplingOptions(max_tokens=8, temperature=1.0)
    drawn = live.run(engine.fan_out(PROMPT, 2, 2, unseeded))
    replay = SamplingOptions(max_tokens=8, temperature=1.0, seed=drawn.seed)
    again = live.run(engine.fan_out(PROMPT, 2, 2, replay))
    assert [c.token_ids for c in again.candidates] == [c.token_ids for c in drawn.candidates]
    assert live.run(engine.fan_out(PROMPT, 2, 2, unseeded)).seed != drawn.seed  # fresh each time


def test_per_draw_seeds_are_distinct():
    seeds = [request_seed_for_draw(7, k) for k in range(64)]
    assert len(set(seeds)) == 64
    assert all(0 <= s < 2**62 for s in seeds)
    assert request_seed_for_draw(7, 0) != request_seed_for_draw(8, 0)


def test_greedy_with_several_samples_repeats_the_one_decode(live, engine):
    out = live.run(engine.fan_out(PROMPT, 2, 3, GREEDY))
    assert len(out.candidates) == 6
    assert len({c.token_ids for c in out.candidates[:3]}) == 1
    assert out.completion_tokens == 2 * 16  # decoded once per draw


def test_base_request_in_a_full_batch_keeps_the_base_model(live, engine, hf):
    """Upstream bug: with vLLM's CPU LoRA ops, a no-LoRA request batched while every LoRA slot is
    busy got the last slot's adapter (its index -1 reads weights[-1]). The grouped kernel leaves
    such tokens alone, so there is no spare slot (max_loras = every adapter): here every adapter
    of both pools runs in the same batch as a base request, and the base request keeps the base
    model."""
    prompt_ids = engine.render(PROMPT)
    pool = engine.pools["tiny"]
    slots = sum(p.size + 1 for p in engine.pools.values())
    assert engine.engine_args["max_loras"] == slots  # every slot taken by the batch below

    async def mixed():
        other = engine.pools["tiny-mean"]
        return await asyncio.gather(
            engine.fan_out(prompt_ids, POOL_SIZE, 1, GREEDY),
            engine.fan_out(prompt_ids, 0, 1, GREEDY),
            engine.generate_base(prompt_ids, GREEDY),
            engine.fan_out(prompt_ids, POOL_SIZE, 1, GREEDY, pool=other),
            engine.fan_out(prompt_ids, 0, 1, GREEDY, pool=other),
        )

    draws, mean, base, *_ = live.run(mixed())
    base_ids = list(base[0].token_ids)
    assert base_ids == hf.greedy(None, prompt_ids, 16)
    adapters = [list(c.token_ids) for c in draws.candidates] + [list(mean.candidates[0].token_ids)]
    assert base_ids not in adapters  # so a wrongly given adapter would have been caught
    for cand in draws.candidates:  # and every LoRA request kept its own adapter
        assert list(cand.token_ids) == hf.greedy(pool.draws[cand.draw].lora_path, prompt_ids, 16)


def _long() -> SamplingOptions:
    return SamplingOptions(max_tokens=450, temperature=1.0, ignore_eos=True, seed=1)


def test_cancelling_the_caller_aborts_every_engine_request(live, engine):
    async def scenario():
        before = engine.aborted_requests
        task = asyncio.create_task(engine.fan_out(PROMPT, POOL_SIZE, 8, _long()))
        while engine.num_unfinished_requests() < POOL_SIZE * 8:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)
        running = engine.num_unfinished_requests()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.05)
        return running, engine.num_unfinished_requests(), engine.aborted_requests - before

    running, after, aborted = live.run(scenario())
    assert running == POOL_SIZE * 8  # all 32 sequences were in the engine
    assert after == 0  # and none is left
    assert aborted == POOL_SIZE  # one vLLM request per draw, each aborted


def test_a_timeout_aborts_the_fan_out(live, engine):
    async def scenario():
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(1.0):
                await engine.fan_out(PROMPT, 2, 4, _long())
        await asyncio.sleep(0.05)
        return engine.num_unfinished_requests()

    assert live.run(scenario()) == 0


def test_the_engine_takes_the_pool_resolved_once_and_guards_its_invariants(live, engine, hf):
    """A request resolves its pool once (``Engine.pool``: an unknown name is a 404 wherever it is
    met) and hands the ``Pool`` itself to ``fan_out``; the request's limits are the server's
    (tests/test_limits.py), so a count past the pool here is a caller's bug, and what vLLM
    itself refuses (an empty prompt) is the client's ``InvalidRequest``."""
    with pytest.raises(UnknownPosterior) as err:
        engine.pool("nope")
    assert err.value.field == "model" and api_error(err.value).status == 404
    assert "tiny" in str(err.value) and "tiny-mean" in str(err.value)
    other = engine.pool("tiny-mean")
    assert engine.pool() is engine.pools["tiny"] and other is engine.pools["tiny-mean"]
    prompt_ids = engine.render(PROMPT)
    named = live.run(engine.fan_out(prompt_ids, 1, 1, GREEDY, other))
    (only,) = named.candidates
    assert only.draw == 0  # the given pool's draw 0, not the default pool's
    assert list(only.token_ids) == hf.greedy(other.draws[0].lora_path, prompt_ids, 16)
    for args in ((PROMPT, POOL_SIZE + 1, 1, GREEDY), (PROMPT, 1, 0, GREEDY)):
        with pytest.raises(ValueError):
            live.run(engine.fan_out(*args))
    with pytest.raises(InvalidRequest) as refused:
        live.run(engine.fan_out([], 1, 1, GREEDY))
    assert refused.value.field == "prompt" and api_error(refused.value).status == 422


def test_ivonserve_sample_writes_exactly_the_servers_draw(engine, tiny_posterior, tiny_settings,
                                                          tmp_path):  # fmt: skip
    from ivonserve import cli

    pool = engine.pools["tiny"]
    for k in (0, POOL_SIZE - 1):
        out = tmp_path / f"draw-{k}"
        code = cli.main([
            "sample", str(tiny_posterior), "--draw", str(k),
            "--pool-seed", str(tiny_settings.pool_seed),
            "--posterior-temperature", str(tiny_settings.posterior_temperature),
            "--prune", str(tiny_settings.prune), "--prune-by", tiny_settings.prune_by,
            "--out", str(out),
        ])  # fmt: skip
        assert code == 0
        served = Path(pool.draws[k].lora_path) / "adapter_model.safetensors"
        assert (out / "adapter_model.safetensors").read_bytes() == served.read_bytes()
