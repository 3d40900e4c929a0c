import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from speed.diffusion import TIMESTEP_STRATEGIES, build_timestep_strategy, get_beta_schedule
from speed.diffusion.timesteps import meaningful_steps

T = 1000
BETAS = get_beta_schedule("linear", T)
ABAR = np.cumprod(1.0 - BETAS)
SNR = ABAR / (1.0 - ABAR)


def coarse_bins(pmf: np.ndarray, min_mass: float) -> np.ndarray:
    """Bin edges over steps so each bin holds >= min_mass of the pmf (keeps chi-square valid)."""
    edges, mass = [0], 0.0
    for i, p in enumerate(pmf):
        mass += p
        if mass >= min_mass:
            edges.append(i + 1)
            mass = 0.0
    if edges[-1] != len(pmf):
        if len(edges) > 1:
            edges[-1] = len(pmf)  # merge the light tail into the last bin
        else:
            edges.append(len(pmf))
    return np.array(edges)


def assert_matches_pmf(t: torch.Tensor, pmf: torch.Tensor, bins: int = 20):
    pmf = pmf.double().numpy()
    n = t.numel()
    edges = coarse_bins(pmf, 1.0 / bins)
    counts = np.bincount(t.numpy(), minlength=len(pmf))
    observed = np.add.reduceat(counts, edges[:-1])
    expected = np.add.reduceat(pmf, edges[:-1]) * n
    expected *= observed.sum() / expected.sum()
    assert len(observed) >= 5
    assert expected.min() >= 5
    assert chisquare(observed, expected).pvalue > 1e-3


@pytest.mark.parametrize("name", TIMESTEP_STRATEGIES)
def test_samples_follow_pmf_and_weights(name):
    strategy = build_timestep_strategy(name, BETAS)
    assert strategy.pmf.shape == (T,)
    assert abs(float(strategy.pmf.sum()) - 1.0) < 1e-9
    assert strategy.weights.shape == (T,) and bool((strategy.weights > 0).all())
    t, w = strategy.sample(200_000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and w.dtype == torch.float32 and t.shape == w.shape == (200_000,)
    assert int(t.min()) >= 0 and int(t.max()) < T
    assert torch.equal(w, strategy.weights[t])
    assert_matches_pmf(t, strategy.pmf)


def test_chi_square_detects_wrong_pmf():
    t, _ = build_timestep_strategy("speed", BETAS).sample(200_000, torch.Generator().manual_seed(0))
    with pytest.raises(AssertionError):
        assert_matches_pmf(t, build_timestep_strategy("uniform", BETAS).pmf)


def test_sampling_is_deterministic_given_generator():
    strategy = build_timestep_strategy("speed", BETAS)
    a = strategy.sample(64, torch.Generator().manual_seed(3))
    b = strategy.sample(64, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_speed_meaningful_step_and_weights():
    assert meaningful_steps(ABAR) == 642
    strategy = build_timestep_strategy("speed", BETAS, k=5, tau=700, lam=0.6)
    assert strategy.meaningful_steps == 642
    h = np.gradient(1.0 - ABAR)
    h = (h - h.min()) / (h.max() - h.min())
    for step in (0, 10, 300, 699):
        expected = 0.4 + 0.2 * h[step]
        assert float(strategy.weights[step]) == pytest.approx(expected, rel=1e-6)
    assert float(strategy.weights[700]) == 1.0 and float(strategy.weights[999]) == 1.0
    # Dual draws: the second half reflects the first half about m.
    t, _ = strategy.sample(8, torch.Generator().manual_seed(1))
    base = t[:5]
    reflected = torch.where(base < 642, 642 - base, base - 642)
    assert torch.equal(t[5:], reflected[:3])


def test_speed_pmf_is_reflected_marginal():
    strategy = build_timestep_strategy("speed", BETAS)
    base = np.where(np.arange(T) < 700, 5.0, 1.0)
    base /= base.sum()
    reflected = np.zeros(T)
    for step in range(T):
        reflected[642 - step if step < 642 else step - 642] += base[step]
    np.testing.assert_allclose(strategy.pmf.numpy(), 0.5 * (base + reflected), rtol=1e-12)


def test_weight_formulas():
    np.testing.assert_allclose(build_timestep_strategy("p2", BETAS).weights.numpy(), 1 / (1 + SNR), rtol=1e-5)
    np.testing.assert_allclose(
        build_timestep_strategy("p2", BETAS, k=2.0, gamma=0.5).weights.numpy(), (2 + SNR) ** -0.5, rtol=1e-5
    )
    np.testing.assert_allclose(
        build_timestep_strategy("min_snr", BETAS).weights.numpy(), np.minimum(SNR, 5) / SNR, rtol=1e-5
    )
    np.testing.assert_allclose(build_timestep_strategy("speed_v1", BETAS).weights.numpy(), 1 / (1 + SNR), rtol=1e-5)


def test_logit_normal_and_lognormal_pmfs():
    from scipy.stats import norm

    # Both cross to DDPM steps by log-SNR: step i gets the mass between the log-SNR midpoints to its
    # neighbours. On the linear path logit(t) = log sigma = -lambda / 2 at equal log-SNR.
    log_sigma = 0.5 * np.log((1 - ABAR) / ABAR)
    mid = lambda i: 0.5 * (log_sigma[i] + log_sigma[i + 1])  # noqa: E731
    pmf = build_timestep_strategy("logit_normal", BETAS).pmf.numpy()
    assert pmf[0] == pytest.approx(norm.cdf(mid(0)), rel=1e-9)
    assert pmf[500] == pytest.approx(norm.cdf(mid(500)) - norm.cdf(mid(499)), rel=1e-9)

    pmf = build_timestep_strategy("lognormal", BETAS).pmf.numpy()
    assert pmf[0] == pytest.approx(norm.cdf((mid(0) + 1.2) / 1.2), rel=1e-9)
    assert pmf[100] == pytest.approx(norm.cdf((mid(100) + 1.2) / 1.2) - norm.cdf((mid(99) + 1.2) / 1.2), rel=1e-9)
    assert pmf[T - 1] == pytest.approx(1 - norm.cdf((mid(T - 2) + 1.2) / 1.2), rel=1e-6)


def test_bad_parameters_rejected():
    with pytest.raises(ValueError, match="lam"):
        build_timestep_strategy("speed", BETAS, k=1, lam=5)
    with pytest.raises(ValueError, match="tau"):
        build_timestep_strategy("speed", BETAS, tau=T + 1)
    with pytest.raises(ValueError, match="tau"):
        build_timestep_strategy("speed", BETAS, tau=0)
    with pytest.raises(ValueError, match=r"speed.k=0 .*> 0"):
        build_timestep_strategy("speed", BETAS, k=0)
    with pytest.raises(ValueError, match="min_snr") as info:
        build_timestep_strategy("nope", BETAS)
    assert "uniform" in str(info.value) and "loss_aware" in str(info.value)
    with pytest.raises(ValueError, match="unknown parameter.*kappa.*valid parameters.*tau"):
        build_timestep_strategy("speed", BETAS, kappa=3)
    with pytest.raises(ValueError, match="weighting"):
        build_timestep_strategy("speed", BETAS, weighting="bogus")
    with pytest.raises(ValueError, match="loss_aware"):
        build_timestep_strategy("speed", BETAS, weighting="loss_aware")


def fill_history(strategy, losses_per_step: np.ndarray, rounds: int):
    steps = torch.arange(len(losses_per_step))
    for _ in range(rounds):
        strategy.update(steps, torch.from_numpy(losses_per_step))


def test_loss_aware_uniform_until_full_then_unbiased():
    betas = get_beta_schedule("linear", 100)
    strategy = build_timestep_strategy("loss_aware", betas)
    assert strategy.weights_apply_to == "all"
    table = np.linspace(0.05, 2.0, 100) ** 2  # synthetic per-step loss
    fill_history(strategy, table, rounds=9)
    strategy.update(torch.arange(99), torch.from_numpy(table[:99]))  # step 99 still one short
    np.testing.assert_allclose(strategy.pmf.numpy(), np.full(100, 0.01))
    strategy.update(torch.tensor([99]), torch.tensor([table[99]]))
    pmf = strategy.pmf.numpy()
    expected = table / table.sum() * 0.999 + 0.001 / 100  # sqrt(mean(L^2)) = L for constant history
    np.testing.assert_allclose(pmf, expected, rtol=1e-10)
    weights = strategy.weights.double().numpy()
    np.testing.assert_allclose(weights, 1 / (100 * pmf), rtol=1e-6)
    # E_p[w L] equals the uniform-t mean loss.
    assert float(np.sum(pmf * weights * table)) == pytest.approx(table.mean(), rel=1e-6)
    t, w = strategy.sample(200_000, torch.Generator().manual_seed(0))
    assert_matches_pmf(t, strategy.pmf)
    assert float((w.double() * torch.from_numpy(table)[t]).mean()) == pytest.approx(table.mean(), rel=0.02)


def test_loss_aware_history_rolls_and_state_round_trip():
    betas = get_beta_schedule("linear", 10)
    strategy = build_timestep_strategy("loss_aware", betas, history=2)
    fill_history(strategy, np.ones(10), rounds=2)
    strategy.update(torch.tensor([3, 3]), torch.tensor([5.0, 7.0]))  # pushes out both 1.0s at step 3
    assert strategy.loss_history[3].tolist() == [5.0, 7.0]
    state = strategy.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    restored = build_timestep_strategy("loss_aware", betas, history=2)
    restored.load_state_dict(state)
    assert torch.equal(restored.pmf, strategy.pmf) and torch.equal(restored.weights, strategy.weights)
    a = strategy.sample(32, torch.Generator().manual_seed(0))
    b = restored.sample(32, torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_composed_speed_sampling_with_min_snr_weights():
    composed = build_timestep_strategy(
        "speed", BETAS, weighting="min_snr", params={"speed": {"tau": 700}, "min_snr": {"gamma": 2.0}}
    )
    speed = build_timestep_strategy("speed", BETAS, tau=700)
    assert torch.equal(composed.pmf, speed.pmf)
    np.testing.assert_allclose(composed.weights.numpy(), np.minimum(SNR, 2.0) / SNR, rtol=1e-5)
    assert composed.weights_apply_to == "mse"
    t, w = composed.sample(1000, torch.Generator().manual_seed(0))
    t_speed, _ = speed.sample(1000, torch.Generator().manual_seed(0))
    assert torch.equal(t, t_speed)
    assert torch.equal(w, composed.weights[t])
    # `sampling` override the other way round.
    other = build_timestep_strategy("min_snr", BETAS, sampling="speed")
    assert torch.equal(other.pmf, speed.pmf)
    with pytest.raises(ValueError, match="either"):
        build_timestep_strategy("speed", BETAS, params={"speed": {"k": 2}}, k=3)
    with pytest.raises(ValueError, match="gamma"):
        build_timestep_strategy("speed", BETAS, weighting="min_snr", params={"min_snr": {"gama": 2}})


def test_parameters_are_the_schema_dataclasses():
    from speed.config.schema import SpeedParams

    as_dict = build_timestep_strategy("speed", BETAS, params={"speed": {"k": 2.0}})
    as_params = build_timestep_strategy("speed", BETAS, params={"speed": SpeedParams(k=2.0)})
    assert torch.equal(as_dict.pmf, as_params.pmf) and torch.equal(as_dict.weights, as_params.weights)
    defaults = build_timestep_strategy("speed", BETAS)
    assert torch.equal(defaults.pmf, build_timestep_strategy("speed", BETAS, params={"speed": SpeedParams()}).pmf)
    with pytest.raises(ValueError, match="SpeedParams"):
        build_timestep_strategy("min_snr", BETAS, params={"min_snr": SpeedParams()})
