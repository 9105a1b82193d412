"""Draws from a posterior: their statistics, temperature, pruning, seeds, and peft loading them."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny import make_tiny_model, write_train_data

from ivonserve.errors import IvonserveError
from ivonserve.posterior import Posterior
from ivonserve.sampler import Sampler, SamplerConfig, draw_seed, prune_mask
from ivonserve.train import TrainConfig, train

UNPRUNED = SamplerConfig(prune=0.0)

N_DRAWS = 200


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="module")
def posterior_dir(model_dir, tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("post")
    data = write_train_data(tmp / "train.jsonl")
    config = TrainConfig(
        data=str(data), out=str(tmp / "post"), steps=4, batch_size=2, ess=1e4, beta2=0.9,
        max_length=64, checkpoint_every=4,
    )  # fmt: skip
    return train(config, model_dir, progress=False)


@pytest.fixture(scope="module")
def posterior(posterior_dir) -> Posterior:
    return Posterior.load(posterior_dir)


def _standardised(posterior: Posterior, config: SamplerConfig) -> dict[str, torch.Tensor]:
    """(draw - mean) / sigma stacked over N_DRAWS draws, per tensor."""
    sampler = Sampler(posterior, config)
    sigma = posterior.sigma()
    draws = [sampler.draw(draw_seed(7, k)) for k in range(N_DRAWS)]
    return {
        key: torch.stack(
            [(d[key].double() - posterior.mean[key].double()) / sigma[key] for d in draws]
        )
        for key in posterior.keys
    }


def test_noise_is_standard_normal_per_tensor(posterior):
    for key, z in _standardised(posterior, UNPRUNED).items():
        n = z.numel()
        # mean of n standard normals has sd 1/sqrt(n); the sample std has sd ~1/sqrt(2n): 6 sigma.
        assert abs(z.mean().item()) < 6 / math.sqrt(n), key
        assert abs(z.std().item() - 1) < 6 / math.sqrt(2 * n), key
        # Per entry too: no coordinate is stuck at zero noise or shares another's noise.
        assert (z.std(dim=0) > 0.5).all(), key


def test_h_varies_so_sigma_is_per_coordinate(posterior):
    sigma = torch.cat([s.flatten() for s in posterior.sigma().values()])
    assert sigma.max() / sigma.min() > 1.01  # beta2=0.9 lets h move from hess_init


@pytest.mark.parametrize("temperature", [0.25, 4.0])
def test_temperature_scales_spread_as_sqrt(posterior, temperature):
    for key, z in _standardised(posterior, SamplerConfig(temperature, prune=0.0)).items():
        expected = math.sqrt(temperature)
        assert abs(z.std().item() / expected - 1) < 6 / math.sqrt(2 * z.numel()), key


def test_temperature_zero_is_the_mean(posterior):
    sampler = Sampler(posterior, SamplerConfig(posterior_temperature=0.0, prune=0.0))
    for key, value in sampler.draw(3).items():
        assert torch.equal(value, posterior.mean[key])


def test_same_seed_same_bytes_other_seed_different(posterior, tmp_path):
    sampler = Sampler(posterior, UNPRUNED)
    a = sampler.write(sampler.draw(11), tmp_path / "a")
    b = sampler.write(sampler.draw(11), tmp_path / "b")
    c = sampler.write(sampler.draw(12), tmp_path / "c")
    weights = "adapter_model.safetensors"
    assert (a / weights).read_bytes() == (b / weights).read_bytes()
    assert (a / weights).read_bytes() != (c / weights).read_bytes()


def test_draw_seeds_are_distinct_and_stable():
    seeds = [draw_seed(0, k) for k in range(64)] + [draw_seed(1, k) for k in range(64)]
    assert len(set(seeds)) == 128
    assert draw_seed(0, 3) == draw_seed(0, 3)
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("prune_by", ["variance", "snr"])
def test_pruning_zeroes_the_chosen_fraction_everywhere(posterior, prune_by):
    config = SamplerConfig(prune=0.1, prune_by=prune_by)
    sampler = Sampler(posterior, config)
    mask = prune_mask(posterior, config)
    dropped = torch.cat([~m.flatten() for m in mask.values()])
    assert dropped.sum().item() == round(0.1 * posterior.num_params)
    for weights in (sampler.draw(1), sampler.draw(2), sampler.mean()):
        for key, value in weights.items():
            assert torch.all(value[~mask[key]] == 0), key
            assert torch.count_nonzero(value[mask[key]]) > 0
    # The dropped entries are the extreme ones by the chosen score.
    variance = torch.cat([posterior.variance()[k].flatten() for k in posterior.keys])
    snr = torch.cat(
        [
            (posterior.mean[k].double().abs() / posterior.sigma()[k]).flatten()
            for k in posterior.keys
        ]
    )
    score = variance if prune_by == "variance" else -snr
    assert score[dropped].min() >= score[~dropped].max()


@pytest.mark.parametrize("fraction", [0.1, 0.37])
def test_random_pruning_drops_exactly_the_fraction_seeded_and_unrelated_to_variance(
    posterior, fraction
):
    config = SamplerConfig(prune=fraction, prune_by="random")
    mask = prune_mask(posterior, config)
    dropped = torch.cat([~m.flatten() for m in mask.values()])
    assert dropped.sum().item() == round(fraction * posterior.num_params)
    again = prune_mask(posterior, config)  # seeded: the same mask every time
    assert all(torch.equal(mask[k], again[k]) for k in mask)
    # not the variance ranking: dropped and kept entries overlap in variance
    variance = torch.cat([posterior.variance()[k].flatten() for k in posterior.keys])
    assert variance[dropped].min() < variance[~dropped].max()
    by_variance = prune_mask(posterior, SamplerConfig(prune=fraction, prune_by="variance"))
    assert any(not torch.equal(mask[k], by_variance[k]) for k in mask)


def test_plain_adapter_draws_are_the_adapter(posterior_dir, tmp_path):
    """`serve --adapter`: a zero-variance posterior, so every draw equals the adapter itself."""
    import shutil

    adapter = tmp_path / "adamw"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(posterior_dir / name, adapter / name)
    post = Posterior.from_adapter(adapter)
    sampler = Sampler(post, SamplerConfig(posterior_temperature=1.0, prune=0.1))
    assert sampler.mask is None  # no uncertainty to prune by: the adapter stays whole
    for key, value in sampler.draw(draw_seed(0, 3)).items():
        assert torch.equal(value, post.mean[key])


def test_bad_sampler_config_is_refused():
    for bad in ({"posterior_temperature": -1}, {"prune": 1.0}, {"prune_by": "size"}):
        with pytest.raises(IvonserveError):
            SamplerConfig(**bad)


def _greedy(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=12, do_sample=False, min_new_tokens=12)


def test_peft_loads_draws_and_mean(posterior, posterior_dir, model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    sampler = Sampler(posterior, UNPRUNED)
    ids = torch.tensor([[1, 17, 40, 33, 90, 12]])

    def run(adapter: Path) -> tuple[torch.Tensor, torch.Tensor]:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, adapter).eval()
        with torch.no_grad():
            return model(ids).logits, _greedy(model, ids)

    mean_logits, mean_tokens = run(sampler.write(sampler.mean(), tmp_path / "mean"))
    trained_logits, _ = run(posterior_dir)  # the trained model's own saved adapter
    assert torch.equal(mean_logits, trained_logits)
    draw_logits, draw_tokens = run(sampler.write(sampler.draw(5), tmp_path / "draw"))
    assert not torch.allclose(draw_logits, mean_logits, atol=1e-3)
    assert not torch.equal(draw_tokens, mean_tokens)
