"""Strategies that learn where to train: EDM2-style learned weighting and progress-following
sampling, under both objectives, with their state round-trips."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from speed.diffusion import build_timestep_strategy, get_beta_schedule
from speed.diffusion.noise_levels import NoiseCells

T = 1000
BETAS = get_beta_schedule("linear", T)


# ----------------------------------------------------------------------------- learned weighting


def test_learned_weighting_transform_is_edm2s():
    strategy = build_timestep_strategy("learned", BETAS, bins=4)
    with torch.no_grad():
        strategy.log_scale.copy_(torch.tensor([0.0, 1.0, -1.0, 2.0]))
    loss = torch.tensor([2.0, 2.0, 2.0, 2.0])
    steps = torch.tensor([0, 300, 600, 999])  # bins 0, 1, 2, 3
    out = strategy.transform_loss(loss, steps)
    expected = loss / torch.exp(torch.tensor([0.0, 1.0, -1.0, 2.0])) + torch.tensor([0.0, 1.0, -1.0, 2.0])
    torch.testing.assert_close(out, expected)
    assert bool((strategy.sample(100, torch.Generator())[1] == 1).all())  # it only reweights


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_learned_log_scale_converges_to_each_levels_mean_loss(objective):
    """The optimum of L / exp(u) + u is u = log E[L]: the table learns each level's loss scale."""
    strategy = build_timestep_strategy("learned", BETAS, bins=8, lr=0.05, objective=objective)
    scale = torch.tensor([0.05, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 1.2])
    g = torch.Generator().manual_seed(0)
    cells = NoiseCells(BETAS)
    for _ in range(1500):
        t, _ = strategy.sample(256, g)
        steps = t if objective == "ddpm" else cells.cell_of(t)
        bins = (steps * 8) // T
        loss = scale[bins] * (0.5 + torch.rand(256, generator=g))  # mean = scale
        strategy.transform_loss(loss, t).mean().backward()
        strategy.after_backward(lambda grad: grad)
    u = strategy.weighter.log_scale if objective == "flow" else strategy.log_scale
    torch.testing.assert_close(u.detach(), torch.log(scale), atol=0.08, rtol=0)


def test_learned_state_round_trips_and_gradients_are_averaged():
    a = build_timestep_strategy("learned", BETAS, bins=4)
    steps = torch.tensor([0, 300, 600, 999])
    a.transform_loss(torch.ones(4), steps).sum().backward()
    seen = []
    a.after_backward(lambda grad: seen.append(grad.clone()) or grad / 2)  # e.g. an all-reduce mean
    assert len(seen) == 1 and seen[0].shape == (4,)
    b = build_timestep_strategy("learned", BETAS, bins=4)
    b.load_state_dict(a.state_dict())
    for s in (a, b):
        s.transform_loss(torch.full((4,), 3.0), steps).sum().backward()
        s.after_backward(lambda grad: grad)
    assert torch.equal(a.log_scale, b.log_scale) and torch.equal(a.exp_avg_sq, b.exp_avg_sq)
    with pytest.raises(ValueError, match="bins"):
        build_timestep_strategy("learned", BETAS, bins=8).load_state_dict(a.state_dict())


def test_learned_weighting_composes_with_any_sampler():
    strategy = build_timestep_strategy("speed", BETAS, weighting="learned")
    assert strategy.learns_weights and strategy.name == "speed+learned"
    t, w = strategy.sample(64, torch.Generator().manual_seed(1))
    assert bool((w == 1).all())
    out = strategy.transform_loss(torch.ones(64), t)
    assert out.requires_grad


# ----------------------------------------------------------------------------- progress sampling


def synthetic_curves(strategy, falling_bins, rounds=300, n=512, seed=0, objective="ddpm"):
    """Losses that fall over time in ``falling_bins`` (of 20) and stay flat elsewhere."""
    g = torch.Generator().manual_seed(seed)
    cells = NoiseCells(BETAS)
    for step in range(rounds):
        t, _ = strategy.sample(n, g)
        steps = t if objective == "ddpm" else cells.cell_of(t)
        bins = (steps * 20) // T
        falling = torch.isin(bins, torch.tensor(falling_bins))
        level = torch.where(falling, 1.0 + 4.0 * np.exp(-step / 100.0), torch.ones(n, dtype=torch.float64))
        loss = level * (0.9 + 0.2 * torch.rand(n, generator=g, dtype=torch.float64))
        strategy.update(t, loss)


def bin_mass(pmf):
    return torch.zeros(20, dtype=torch.float64).index_add_(0, (torch.arange(T) * 20) // T, pmf.double())


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_progress_density_follows_falling_losses_with_a_floor(objective):
    strategy = build_timestep_strategy("progress", BETAS, objective=objective)
    baseline = bin_mass(strategy.pmf)  # before any update: the objective's uniform
    synthetic_curves(strategy, falling_bins=[3, 4, 5], objective=objective)
    mass = bin_mass(strategy.pmf)
    assert float(mass[[3, 4, 5]].sum()) > float(baseline[[3, 4, 5]].sum()) + 0.3  # moved to the learning levels
    assert bool((mass >= 0.25 * baseline - 1e-12).all())  # the floor: no level starves
    assert float(strategy.pmf.sum()) == pytest.approx(1.0)
    # Once every level has stopped learning the density returns towards the baseline.
    synthetic_curves(strategy, falling_bins=[], rounds=600, objective=objective, seed=1)
    assert float(bin_mass(strategy.pmf)[[3, 4, 5]].sum()) < float(mass[[3, 4, 5]].sum())


def test_progress_measure_absolute_follows_loss_units_not_shares():
    """A large loss falling by a small share against a tiny loss falling by a large one: the relative
    measure follows the tiny loss, the absolute measure the large one."""
    steps = torch.arange(T)
    bins = (steps * 20) // T
    masses = {}
    for measure in ("relative", "absolute"):
        strategy = build_timestep_strategy("progress", BETAS, measure=measure, smoothing=0.0)
        for step in range(200):
            fall = float(np.exp(-step / 50.0))
            losses = torch.full((T,), 0.1, dtype=torch.float64)
            losses[bins == 2] = 0.5 + 0.05 * fall  # large, falling by at most 10%
            losses[bins == 18] = 0.001 + 0.004 * fall  # tiny, falling 5x
            strategy.update(steps, losses)
        mass = bin_mass(strategy.pmf)
        masses[measure] = (float(mass[2]), float(mass[18]))
    assert masses["relative"][1] > masses["relative"][0]
    assert masses["absolute"][0] > masses["absolute"][1]


def test_progress_stays_at_baseline_until_warm():
    strategy = build_timestep_strategy("progress", BETAS, warmup=1000)
    synthetic_curves(strategy, falling_bins=[3], rounds=5)
    torch.testing.assert_close(strategy.pmf, torch.full((T,), 1.0 / T, dtype=torch.float64))


@pytest.mark.parametrize("objective", ["ddpm", "flow"])
def test_progress_importance_weights_are_unbiased_when_asked(objective):
    strategy = build_timestep_strategy("progress", BETAS, unbiased=True, objective=objective)
    synthetic_curves(strategy, falling_bins=[1, 2], objective=objective)
    cells = NoiseCells(BETAS)
    f = torch.linspace(0.5, 2.0, T, dtype=torch.float64)  # any per-level quantity
    t, w = strategy.sample(400_000, torch.Generator().manual_seed(9))
    steps = t if objective == "ddpm" else cells.cell_of(t)
    baseline = torch.full((T,), 1.0 / T, dtype=torch.float64) if objective == "ddpm" else cells.widths
    assert float((w.double() * f[steps]).mean()) == pytest.approx(float((baseline * f).sum()), rel=0.01)
    biased = build_timestep_strategy("progress", BETAS, objective=objective)
    assert bool((biased.sample(10, torch.Generator())[1] == 1).all())


def test_progress_state_round_trips_exactly():
    a = build_timestep_strategy("progress", BETAS)
    synthetic_curves(a, falling_bins=[7], rounds=50)
    b = build_timestep_strategy("progress", BETAS)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.pmf, b.pmf)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(a.sample(100, g1)[0], b.sample(100, g2)[0])
    with pytest.raises(ValueError, match="fast"):
        build_timestep_strategy("progress", BETAS, fast=0.99, slow=0.9)
    with pytest.raises(ValueError, match="needs sampling 'progress'"):
        build_timestep_strategy("speed", BETAS, weighting="progress")


def test_learned_weighting_drops_the_gradient_of_a_skipped_step():
    strategy = build_timestep_strategy("speed", BETAS, weighting="learned", objective="flow")
    t, _ = strategy.sample(8, torch.Generator().manual_seed(0))
    strategy.transform_loss(torch.ones(8), t).sum().backward()
    strategy.discard_gradients()  # what the trainer does for a step skipped as non-finite
    assert strategy.weighter.log_scale.grad is None


def test_progress_replay_follows_the_logged_loss_that_falls_fastest():
    """benchmarks.progress_replay: the tenth whose logged loss falls (relatively) fastest gets the most mass."""
    from benchmarks.progress_replay import replay

    history = [{"step": 50 * (i + 1), **{f"loss_t{b}": (0.5 * 0.9 ** i if b == 2 else 0.5) for b in range(10)}}
               for i in range(20)]
    from speed.config import load_config

    rows = replay(history, load_config(overrides=["diffusion.timesteps.name=progress"]).diffusion, at=[1000])
    mass = rows[0]["mass_by_tenth"]
    assert rows[0]["step"] == 1000 and abs(sum(mass) - 1.0) < 1e-9
    assert max(range(10), key=mass.__getitem__) == 2 and min(mass) > 0  # the floor keeps every level
