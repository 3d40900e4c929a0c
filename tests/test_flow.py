"""Flow matching: the loss, the samplers, guidance on the velocity, the objective recorded in exports,
and every timestep strategy carried between DDPM steps and flow time by log-SNR."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare, laplace

from speed.config import load_config
from speed.config.schema import ConfigError
from speed.diffusion import TIMESTEP_STRATEGIES, build_timestep_strategy, create_flow_matching, get_beta_schedule
from speed.diffusion import guided_model
from speed.diffusion.noise_levels import NoiseCells, ddpm_log_snr, flow_log_snr, flow_time_of_log_snr

T = 1000
BETAS = get_beta_schedule("linear", T)
LOG_SNR = ddpm_log_snr(BETAS)
FLOW = ["diffusion.objective=flow", "model.learn_sigma=false", "sampling.sampler=euler", "sampling.steps=4"]


# ----------------------------------------------------------------------------- the loss


def test_flow_loss_matches_closed_form():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    t = torch.tensor([0.0, 0.25, 0.9])
    weights = torch.tensor([1.0, 2.0, 0.5])
    seen = {}

    def model(x, t_in, y):
        seen["t"] = t_in
        return 2.0 * x + t_in.view(-1, 1, 1, 1) + y.view(-1, 1, 1, 1)

    y = torch.tensor([0, 1, 2])
    out = create_flow_matching().training_losses(model, x0, t, noise=noise, model_kwargs={"y": y}, weights=weights)
    assert torch.equal(seen["t"], t)  # float t reaches the model as given
    a, e, tt = x0.double().numpy(), noise.double().numpy(), t.double().numpy()[:, None, None, None]
    x_t = (1 - tt) * a + tt * e
    pred = 2 * x_t + tt + y.double().numpy()[:, None, None, None]
    mse = ((pred - (e - a)) ** 2).mean(axis=(1, 2, 3))
    np.testing.assert_allclose(out["mse"].numpy(), mse, rtol=1e-5)
    np.testing.assert_allclose(out["loss"].numpy(), mse * weights.numpy(), rtol=1e-5)


def test_flow_loss_refuses_learned_sigma_and_integer_steps():
    fm = create_flow_matching()
    x0 = torch.zeros(2, 1, 2, 2)
    with pytest.raises(ValueError, match="learn_sigma=false"):
        fm.training_losses(lambda x, t: torch.cat([x, x], dim=1), x0, torch.rand(2))
    with pytest.raises(ValueError, match="float t"):
        fm.training_losses(lambda x, t: x, x0, torch.tensor([3, 4]))


# ----------------------------------------------------------------------------- samplers


def field(x, t):
    return x * t.view(-1, 1) + 1.0


def test_euler_and_heun_match_hand_computed_steps():
    fm = create_flow_matching()
    x1 = torch.ones(1, 1, dtype=torch.float64)
    # Two intervals: t = 1 -> 0.5 -> 0, h = 0.5, v(x, t) = x t + 1.
    euler = fm.sample_loop(field, (1, 1), x1, steps=2, method="euler")
    assert float(euler) == pytest.approx(-0.5)  # 1 - 0.5 * 2 = 0; 0 - 0.5 * 1 = -0.5
    heun = fm.sample_loop(field, (1, 1), x1, steps=2, method="heun")
    # step 1: v = 2, x' = 0, v' = v(0, 0.5) = 1 -> x = 1 - 0.25 * 3 = 0.25
    # step 2: v = 1.125, x' = -0.3125, v' = v(x', 0) = 1 -> x = 0.25 - 0.25 * 2.125 = -0.28125
    assert float(heun) == pytest.approx(-0.28125)


def test_heun_is_second_order_and_euler_first():
    fm = create_flow_matching()
    x1 = torch.ones(1, 1, dtype=torch.float64)
    exact = math.exp(-1.0)  # dx/dt = x from t = 1 to t = 0

    def errors(method):
        return [abs(float(fm.sample_loop(lambda x, t: x, (1, 1), x1, steps=n, method=method)) - exact) for n in (8, 16)]

    heun, euler = errors("heun"), errors("euler")
    assert 3.5 < heun[0] / heun[1] < 4.5
    assert 1.8 < euler[0] / euler[1] < 2.2
    assert heun[1] < euler[1] / 20


@pytest.mark.parametrize("method", ["euler", "sde"])
def test_samplers_reach_the_data_distribution_with_the_exact_velocity(method):
    """Data x0 ~ N(0, s^2): the exact velocity is E[eps - x0 | x_t] = x_t (t - (1-t) s^2) / Var(x_t);
    both the ODE and the SDE (whose drift uses the score derived from it) must land on std s."""
    s = 0.5

    def exact_velocity(x, t):
        t = t.view(-1, 1).to(x.dtype)
        return x * (t - (1 - t) * s**2) / ((1 - t) ** 2 * s**2 + t**2)

    g = torch.Generator().manual_seed(0)
    out = create_flow_matching().sample_loop(exact_velocity, (20000, 1), steps=400, method=method, generator=g)
    assert float(out.std()) == pytest.approx(s, rel=0.03)
    assert abs(float(out.mean())) < 0.02


def test_sde_noise_follows_per_sample_generators():
    fm = create_flow_matching()

    def run(indices):
        gens = [torch.Generator().manual_seed(100 + i) for i in indices]
        return fm.sample_loop(lambda x, t: 0.1 * x, (len(indices), 3), steps=5, method="sde", generator=gens)

    both = run([0, 1])
    assert torch.equal(both[1], run([1])[0])  # sample 1 does not depend on its batch


def test_guidance_mixes_velocities():
    def model(x, t, y):
        return x * 0 + y.view(-1, 1, 1, 1).float()  # cond: the label, uncond: the null class 10

    forward = guided_model(model, guidance_scale=3.0, null_class=10, learn_sigma=False, in_channels=1)
    out = forward(torch.zeros(2, 1, 2, 2), torch.rand(2), y=torch.tensor([2, 4]))
    torch.testing.assert_close(out[:, 0, 0, 0], torch.tensor([10 + 3 * (2 - 10.0), 10 + 3 * (4 - 10.0)]))


# ----------------------------------------------------------------------------- the objective travels


def tiny_flow_model(tmp_path, *extra):
    from speed.models.registry import build_model, describe, model_geometry

    cfg = load_config(None, ["model.name=DiT-N/2", f"run.output_uri={tmp_path}", *FLOW, *extra])
    description = describe(cfg.model, cfg.data, cfg.diffusion)
    size, channels = model_geometry(cfg.data)
    torch.manual_seed(0)
    return cfg, build_model(cfg.model, size, channels).eval(), description


def test_export_records_objective_and_flow_models_refuse_ddpm_samplers(tmp_path):
    from speed.models.export import load_export, save_export
    from speed.sample.generate import generate

    cfg, model, description = tiny_flow_model(tmp_path)
    assert description.objective == "flow"
    path = tmp_path / "export"
    save_export(model.state_dict(), description, str(path))
    _, loaded = load_export(str(path))
    assert loaded.objective == "flow"

    images = generate(model, loaded, cfg.sampling, [1, 2], [0, 1], seed=0, device="cpu")
    assert images.shape == (2, 8, 8, 1) and images.dtype == np.uint8
    again = generate(model, loaded, cfg.sampling, [2], [1], seed=0, device="cpu")
    assert np.array_equal(images[1], again[0])  # per-index noise

    ddim = load_config(None, ["sampling.sampler=ddim"]).sampling
    with pytest.raises(ConfigError, match=r"sampling.sampler=ddim .*trained with is flow; .*euler, heun, sde"):
        generate(model, loaded, ddim, [1], [0], seed=0, device="cpu")
    ddpm_description = type(loaded).from_dict({**loaded.__dict__, "objective": "ddpm"})
    with pytest.raises(ConfigError, match=r"sampling.sampler=euler .*ddpm, ddim"):
        generate(model, ddpm_description, cfg.sampling, [1], [0], seed=0, device="cpu")


def test_old_exports_without_objective_are_ddpm():
    from speed.models.registry import ModelDescription

    _, _, description = tiny_flow_model("unused")
    data = {k: v for k, v in description.__dict__.items() if k != "objective"}
    assert ModelDescription.from_dict(data).objective == "ddpm"


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["diffusion.objective=flow"], r"model.learn_sigma=false and sampling.sampler to one of euler, heun, sde"),
        (["diffusion.objective=flow", "model.learn_sigma=false"], r"sampling.sampler=\w+ samples DDPM models"),
        (["sampling.sampler=heun"], r"sampling.sampler=heun samples flow models, but diffusion.objective is ddpm"),
    ],
)
def test_objective_and_sampler_mismatch_is_refused_at_load(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config("configs/digits/speed.yaml", overrides)


def test_flow_configs_load():
    for path in ("configs/digits/flow.yaml", "configs/digits/flow_baseline.yaml",
                 "configs/imagenet_256/flow_baseline.yaml", "configs/imagenet_256/flow_speed.yaml"):
        cfg = load_config(path, [])
        assert cfg.diffusion.objective == "flow" and not cfg.model.learn_sigma, path
    assert load_config(None, []).diffusion.objective == "ddpm"  # the embedded default stays DDPM SpeeD


# ----------------------------------------------------------------------------- strategies on both axes


def flow_cdf(strategy, x: np.ndarray) -> np.ndarray:
    """The CDF of a flow strategy's t, computed independently of its sampler."""
    sampler = strategy.sampler
    if sampler.native == "both":
        return x
    if sampler.native == "time":
        return sampler.time_cdf(x)
    cells = NoiseCells(BETAS)
    cumulative = np.concatenate([[0.0], np.cumsum(sampler.pmf.numpy())])
    return np.interp(x, cells.edges_np, cumulative)


def test_noise_cells_follow_log_snr():
    cells = NoiseCells(BETAS)
    assert cells.edges_np[0] == 0 and cells.edges_np[-1] == 1 and np.all(np.diff(cells.edges_np) > 0)
    # The flow time at DDPM step i's own log-SNR lies inside cell i.
    t_at_steps = torch.from_numpy(flow_time_of_log_snr(LOG_SNR))
    assert torch.equal(cells.cell_of(t_at_steps), torch.arange(T))
    np.testing.assert_allclose(flow_log_snr(flow_time_of_log_snr(LOG_SNR)), LOG_SNR, rtol=1e-10)
    assert float(cells.widths.sum()) == pytest.approx(1.0)


@pytest.mark.parametrize("name", TIMESTEP_STRATEGIES)
def test_flow_samples_follow_the_transformed_density(name):
    strategy = build_timestep_strategy(name, BETAS, objective="flow")
    n = 200_000
    t, w = strategy.sample(n, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.float32 and t.shape == w.shape == (n,)
    assert float(t.min()) >= 0 and float(t.max()) <= 1 and bool((w > 0).all())
    # chi-square over 40 bins of equal expected mass
    quantiles = np.linspace(0, 1, 41)
    grid = np.linspace(0, 1, 200_001)
    cdf = flow_cdf(strategy, grid)
    edges = np.interp(quantiles, cdf, grid)
    observed = np.histogram(t.double().numpy(), bins=edges)[0]
    expected = np.diff(flow_cdf(strategy, edges)) * n
    expected *= observed.sum() / expected.sum()
    assert chisquare(observed, expected).pvalue > 1e-3
    # mean: E[t] = integral of (1 - F)
    assert float(t.double().mean()) == pytest.approx(np.trapezoid(1 - cdf, grid), abs=3e-3)
    # density() is the derivative of that CDF (checks the Jacobians), away from cell edges
    probe = torch.tensor([0.05, 0.3, 0.5, 0.77, 0.95], dtype=torch.float64)
    h = 2e-5
    numeric = (flow_cdf(strategy, probe.numpy() + h) - flow_cdf(strategy, probe.numpy() - h)) / (2 * h)
    np.testing.assert_allclose(strategy.density(probe).numpy(), numeric, rtol=2e-2)


def test_continuous_strategies_have_their_moments_in_their_own_coordinates():
    g = torch.Generator().manual_seed(1)
    t = build_timestep_strategy("laplace", BETAS, objective="flow").sample(200_000, g)[0].double()
    lam = 2 * (torch.log1p(-t) - torch.log(t))
    assert float(lam.mean()) == pytest.approx(0.0, abs=0.01) and float(lam.var()) == pytest.approx(0.5, rel=0.02)
    t = build_timestep_strategy("logit_normal", BETAS, objective="flow", m=0.3, s=0.8).sample(200_000, g)[0].double()
    assert float(torch.logit(t).mean()) == pytest.approx(0.3, abs=0.01)
    assert float(torch.logit(t).std()) == pytest.approx(0.8, rel=0.01)
    t = build_timestep_strategy("lognormal", BETAS, objective="flow").sample(200_000, g)[0].double()
    assert float(torch.logit(t).mean()) == pytest.approx(-1.2, abs=0.01)  # log sigma = logit(t)


def test_laplace_ddpm_pmf_is_its_log_snr_mass():
    pmf = build_timestep_strategy("laplace", BETAS, mu=1.0, b=2.0).pmf.numpy()
    mid = 0.5 * (LOG_SNR[1:] + LOG_SNR[:-1])
    dist = laplace(loc=1.0, scale=2.0)
    assert pmf[0] == pytest.approx(dist.sf(mid[0]), rel=1e-6)
    assert pmf[400] == pytest.approx(dist.cdf(mid[399]) - dist.cdf(mid[400]), rel=1e-6)
    assert pmf[T - 1] == pytest.approx(dist.cdf(mid[-1]), rel=1e-6)


def test_speed_keeps_tau_as_a_ddpm_step_under_flow():
    strategy = build_timestep_strategy("speed", BETAS, objective="flow")
    t, w = strategy.sample(100_000, torch.Generator().manual_seed(2))
    cells = NoiseCells(BETAS)
    steps = cells.cell_of(t)
    assert torch.equal(w, strategy.weights[steps])
    t_tau = float(cells.edges[700])  # the convergence area t >= t(tau) on the linear path
    assert 0.92 < t_tau < 0.925
    share = float((t >= t_tau).double().mean())
    assert share == pytest.approx(float(strategy.pmf[700:].sum()), abs=0.005)
    # Steps drawn by SpeeD's own dual reflection, then spread inside their cells.
    t = strategy.sample(1000, torch.Generator().manual_seed(2))[0]
    ddpm = build_timestep_strategy("speed", BETAS)
    same = cells.cell_of(t) == ddpm.sample(1000, torch.Generator().manual_seed(2))[0]
    assert float(same.double().mean()) > 0.99  # all but float32 rounding across a cell edge


def test_weights_carry_over_by_noise_level():
    strategy = build_timestep_strategy("min_snr", BETAS, objective="flow")
    t, w = strategy.sample(50_000, torch.Generator().manual_seed(3))
    # Each weight is Min-SNR's at the log-SNR of the t's cell: between its values at the cell's edges.
    cells = NoiseCells(BETAS)
    steps = cells.cell_of(t)

    def min_snr_at(edge_t):
        snr = np.exp(flow_log_snr(edge_t.numpy()))
        with np.errstate(invalid="ignore"):
            return np.where(snr <= 5.0, 1.0, 5.0 / snr)  # at t = 0 (snr = inf) the weight -> 0

    low, high = min_snr_at(cells.edges[steps]), min_snr_at(cells.edges[steps + 1])
    assert np.all(w.double().numpy() >= low * (1 - 1e-6)) and np.all(w.double().numpy() <= high * (1 + 1e-6))
    assert float(strategy.sample(10, torch.Generator())[1].max()) <= 1.0
    # uniform means uniform flow time with weight 1 (the flow baseline)
    t, w = build_timestep_strategy("uniform", BETAS, objective="flow").sample(10_000, torch.Generator().manual_seed(4))
    assert bool((w == 1).all()) and abs(float(t.mean()) - 0.5) < 0.01


def test_loss_aware_under_flow_is_unbiased_for_uniform_time():
    strategy = build_timestep_strategy("loss_aware", BETAS, objective="flow", history=2)
    cells = NoiseCells(BETAS)
    per_step = torch.linspace(0.1, 3.0, T, dtype=torch.float64) ** 2
    for _ in range(2):  # fill every step's history through the flow interface (t -> its cell)
        centre = (cells.edges[:-1] + cells.edges[1:]) / 2
        strategy.update(centre.float(), per_step)
    assert not torch.allclose(strategy.pmf, cells.widths)  # it adapted
    t, w = strategy.sample(400_000, torch.Generator().manual_seed(5))
    estimate = float((w.double() * per_step[cells.cell_of(t)]).mean())
    target = float((cells.widths * per_step).sum())  # E over t ~ U[0, 1]
    assert estimate == pytest.approx(target, rel=0.01)
    # and its state round-trips through the same layout as under DDPM
    other = build_timestep_strategy("loss_aware", BETAS, objective="flow", history=2)
    other.load_state_dict(strategy.state_dict())
    assert torch.equal(other.pmf, strategy.pmf)


def test_composed_strategies_work_under_flow():
    strategy = build_timestep_strategy("speed", BETAS, weighting="min_snr", objective="flow")
    t, w = strategy.sample(1000, torch.Generator().manual_seed(6))
    min_snr = build_timestep_strategy("min_snr", BETAS)
    assert torch.equal(w, min_snr.weights[NoiseCells(BETAS).cell_of(t)])
    with pytest.raises(ValueError, match="objective"):
        build_timestep_strategy("speed", BETAS, objective="edm")


def test_a_ddpm_checkpoint_does_not_resume_as_flow(tmp_path):
    import dataclasses

    from ray_jobs.train import check_compatible
    from speed.train.checkpoint import CheckpointError, TrainState
    from speed.models.registry import describe

    cfg, _, flow_description = tiny_flow_model(tmp_path)
    ddpm_cfg = load_config(None, ["model.name=DiT-N/2", "model.learn_sigma=false"])
    ddpm_state = TrainState(description=dataclasses.asdict(describe(ddpm_cfg.model, ddpm_cfg.data, ddpm_cfg.diffusion)))
    with pytest.raises(CheckpointError, match="diffusion.objective=ddpm, but this config has diffusion.objective=flow"):
        check_compatible(ddpm_state, cfg, "checkpoint_0000010")
    check_compatible(TrainState(description=dataclasses.asdict(flow_description)), cfg, "checkpoint_0000010")


def test_a_checkpoint_of_other_blocks_does_not_resume():
    import dataclasses

    from ray_jobs.train import check_compatible
    from speed.models.registry import describe
    from speed.train.checkpoint import CheckpointError, TrainState

    plain = load_config(None, ["model.name=DiT-N/2"])
    state = TrainState(description=dataclasses.asdict(describe(plain.model, plain.data, plain.diffusion)))
    check_compatible(state, plain, "checkpoint_0000010")
    modern = load_config(None, ["model.name=DiT-N/2", "model.norm=rmsnorm"])
    with pytest.raises(CheckpointError, match="model.norm='layernorm', but this config gives model.norm='rmsnorm'"):
        check_compatible(state, modern, "checkpoint_0000010")


def test_flow_models_are_measured_on_the_ddpm_noise_levels():
    """benchmarks.timestep_mse compares both objectives by eps-MSE at the DDPM steps' log-SNR: a flow
    model predicting the exact velocity gives back the exact eps."""
    from benchmarks.timestep_mse import flow_eps

    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 1, 4, 4, generator=g), torch.randn(5, 1, 4, 4, generator=g)
    steps = torch.tensor([0, 100, 500, 900, 999])
    abar = torch.as_tensor(np.cumprod(1 - BETAS), dtype=torch.float64)
    x_ddpm = (abar[steps].sqrt().view(-1, 1, 1, 1) * x0 + (1 - abar[steps]).sqrt().view(-1, 1, 1, 1) * eps).float()
    seen = {}

    def exact(x_t, t, y):
        seen["t"] = t
        expected = ((1 - t).view(-1, 1, 1, 1) * x0 + t.view(-1, 1, 1, 1) * eps)
        torch.testing.assert_close(x_t, expected, atol=1e-5, rtol=1e-5)  # the same point on the flow path
        return eps - x0

    torch.testing.assert_close(flow_eps(exact, x_ddpm, steps, torch.zeros(5, dtype=torch.long), abar), eps,
                               atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(seen["t"].numpy(), flow_time_of_log_snr(LOG_SNR[steps.numpy()]), rtol=1e-5)
