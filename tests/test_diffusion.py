import math

import numpy as np
import pytest
import torch

from speed.diffusion import (
    GaussianDiffusion,
    SpacedDiffusion,
    create_diffusion,
    get_beta_schedule,
    guided_model,
    space_timesteps,
)
from speed.diffusion.gaussian import discretized_gaussian_log_likelihood, normal_kl


def test_beta_schedules():
    linear = get_beta_schedule("linear", 1000)
    assert linear[0] == pytest.approx(1e-4) and linear[-1] == pytest.approx(0.02)
    np.testing.assert_allclose(get_beta_schedule("linear", 250)[[0, -1]], [4e-4, 0.08])
    cosine = get_beta_schedule("cosine", 1000)
    assert cosine.max() <= 0.999 and cosine[-1] == pytest.approx(0.999)
    abar = np.cumprod(1 - cosine)
    s = 500 / 1000
    expected = math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2 / math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    assert abar[499] == pytest.approx(expected, rel=1e-9)
    with pytest.raises(ValueError, match="linear.*cosine"):
        get_beta_schedule("quadratic", 1000)


def test_q_sample_statistics():
    diffusion = create_diffusion(learn_sigma=False)
    torch.manual_seed(0)
    x_start = torch.rand(1, 2, 2, 2) * 2 - 1  # [1, 2, 2, 2]
    draws = 40_000
    for step in (0, 300, 999):
        t = torch.full((draws,), step)
        x_t = diffusion.q_sample(x_start.expand(draws, -1, -1, -1), t)  # [draws, 2, 2, 2]
        abar = diffusion.alphas_cumprod[step]
        torch.testing.assert_close(x_t.mean(0), math.sqrt(abar) * x_start[0], atol=0.03, rtol=0)
        torch.testing.assert_close(x_t.var(0), torch.full_like(x_start[0], 1 - abar), atol=0.03, rtol=0.03)
        mean, var, log_var = diffusion.q_mean_variance(x_start, t[:1])
        torch.testing.assert_close(mean, math.sqrt(abar) * x_start)
        assert float(var.flatten()[0]) == pytest.approx(1 - abar, rel=1e-6)
        assert float(log_var.flatten()[0]) == pytest.approx(math.log(1 - abar), rel=1e-5)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_q_posterior_matches_closed_form(schedule):
    betas = get_beta_schedule(schedule, 100)
    diffusion = GaussianDiffusion(betas)
    alphas = 1 - betas
    abar = np.cumprod(alphas)
    torch.manual_seed(0)
    t = torch.tensor([0, 1, 50, 99])
    x_start, x_t = torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)
    mean, var, log_var = diffusion.q_posterior_mean_variance(x_start, x_t, t)
    for i, step in enumerate(t.tolist()):
        abar_prev = abar[step - 1] if step > 0 else 1.0
        coef_x0 = math.sqrt(abar_prev) * betas[step] / (1 - abar[step])
        coef_xt = math.sqrt(alphas[step]) * (1 - abar_prev) / (1 - abar[step])
        torch.testing.assert_close(mean[i], coef_x0 * x_start[i] + coef_xt * x_t[i], rtol=1e-5, atol=1e-6)
        expected_var = betas[step] * (1 - abar_prev) / (1 - abar[step])
        assert float(var[i].flatten()[0]) == pytest.approx(expected_var, rel=1e-5, abs=1e-12)
        # Log variance at t=0 is clipped to step 1's posterior variance.
        clipped = expected_var if step > 0 else betas[1] * (1 - abar[0]) / (1 - abar[1])
        assert float(log_var[i].flatten()[0]) == pytest.approx(math.log(clipped), rel=1e-5)


def test_normal_kl():
    m, lv = torch.randn(10), torch.randn(10)
    torch.testing.assert_close(normal_kl(m, lv, m, lv), torch.zeros(10))
    # KL(N(1, 1) || N(0, 4)) = log 2 + (1 + 1) / 8 - 1/2
    kl = normal_kl(torch.tensor(1.0), torch.tensor(0.0), torch.tensor(0.0), torch.tensor(math.log(4.0)))
    assert float(kl) == pytest.approx(math.log(2) + 2 / 8 - 0.5, rel=1e-6)


def test_discretized_gaussian_sums_to_one():
    levels = torch.linspace(-1, 1, 256)  # [256] pixel values
    for mean, log_scale in [(0.0, math.log(0.1)), (0.9, math.log(0.5)), (-0.3, math.log(0.004))]:
        means = torch.full_like(levels, mean)
        log_probs = discretized_gaussian_log_likelihood(levels, means, torch.full_like(levels, log_scale))
        assert float(log_probs.exp().sum()) == pytest.approx(1.0, abs=1e-4)


def test_space_timesteps():
    assert len(space_timesteps(1000, "ddim50")) == 50
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert len(space_timesteps(1000, "250")) == 250
    assert space_timesteps(1000, "10") == {round(i * 999 / 9) for i in range(10)}
    assert space_timesteps(100, "") == set(range(100))
    sections = space_timesteps(300, "10,15,20")
    assert len(sections) == 45
    assert sum(s < 100 for s in sections) == 10 and sum(s >= 200 for s in sections) == 20
    with pytest.raises(ValueError, match="ddim"):
        space_timesteps(1000, "ddim999")
    with pytest.raises(ValueError, match="section_counts"):
        space_timesteps(1000, "fast")


def test_respaced_betas_reproduce_alpha_bar():
    base = create_diffusion(schedule="cosine", learn_sigma=True)
    spaced = create_diffusion(schedule="cosine", learn_sigma=True, timestep_respacing="25")
    assert isinstance(spaced, SpacedDiffusion) and spaced.num_timesteps == 25
    kept = spaced.timestep_map.numpy()
    np.testing.assert_allclose(spaced.alphas_cumprod, base.alphas_cumprod[kept], rtol=1e-9, atol=0)
    assert kept[0] == 0 and kept[-1] == 999


class ConvModel(torch.nn.Module):
    """Tiny timestep-aware model: a 1x1 conv plus a per-step bias."""

    def __init__(self, channels=3, learn_sigma=True):
        super().__init__()
        out = 2 * channels if learn_sigma else channels
        self.conv = torch.nn.Conv2d(channels, out, 1)
        self.seen_t = []

    def forward(self, x, t, y=None):
        self.seen_t.append(t.clone())
        return torch.tanh(self.conv(x) + 1e-3 * t.float().reshape(-1, 1, 1, 1))


def test_training_losses_shapes_and_weights():
    torch.manual_seed(0)
    diffusion = create_diffusion(num_timesteps=100, learn_sigma=True)
    model = ConvModel()
    x_start, noise = torch.rand(4, 3, 4, 4) * 2 - 1, torch.randn(4, 3, 4, 4)
    t = torch.tensor([0, 5, 50, 99])
    plain = diffusion.training_losses(model, x_start, t, noise=noise)
    for key in ("loss", "mse", "vb"):
        assert plain[key].shape == (4,)
    assert bool((plain["vb"] > 0).all())
    torch.testing.assert_close(plain["loss"], plain["mse"] + plain["vb"])
    w = torch.tensor([0.5, 2.0, 1.0, 3.0])
    weighted = diffusion.training_losses(model, x_start, t, noise=noise, weights=w)
    torch.testing.assert_close(weighted["loss"], w * plain["mse"] + plain["vb"])
    all_weighted = diffusion.training_losses(model, x_start, t, noise=noise, weights=w, weight_vb=True)
    torch.testing.assert_close(all_weighted["loss"], w * (plain["mse"] + plain["vb"]))
    # Manual MSE at one sample.
    x_t = diffusion.q_sample(x_start, t, noise)
    eps = model(x_t, t)[:, :3]
    torch.testing.assert_close(plain["mse"], ((noise - eps) ** 2).mean(dim=(1, 2, 3)))

    fixed = create_diffusion(num_timesteps=100, learn_sigma=False)
    out = fixed.training_losses(ConvModel(learn_sigma=False), x_start, t, noise=noise)
    assert torch.equal(out["vb"], torch.zeros(4)) and torch.equal(out["loss"], out["mse"])
    with pytest.raises(ValueError, match="channels"):
        fixed.training_losses(model, x_start, t, noise=noise)


def test_vb_gradient_reaches_only_variance_channels():
    diffusion = create_diffusion(num_timesteps=100, learn_sigma=True)
    torch.manual_seed(0)
    output = (torch.rand(3, 6, 4, 4) * 2 - 1).requires_grad_()  # [N, 2C, H, W] leaf

    def model(x, t):
        return output

    x_start, t = torch.rand(3, 3, 4, 4) * 2 - 1, torch.tensor([0, 10, 99])
    losses = diffusion.training_losses(model, x_start, t)
    losses["vb"].sum().backward()
    assert float(output.grad[:, :3].abs().max()) == 0.0
    assert float(output.grad[:, 3:].abs().min(dim=1).values.max()) > 0
    output.grad = None
    diffusion.training_losses(model, x_start, t)["mse"].sum().backward()
    assert float(output.grad[:, 3:].abs().max()) == 0.0 and float(output.grad[:, :3].abs().max()) > 0


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_loops_deterministic_and_use_original_steps(sampler):
    diffusion = create_diffusion(num_timesteps=1000, learn_sigma=True, timestep_respacing="10")
    model = ConvModel()

    def run_with(generator, batch=2):
        shape = (batch, 3, 4, 4)
        if sampler == "ddpm":
            return diffusion.p_sample_loop(model, shape, generator=generator)
        return diffusion.ddim_sample_loop(model, shape, generator=generator, eta=1.0)

    def run(seed):
        return run_with(torch.Generator().manual_seed(seed))

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 3, 4, 4) and bool(torch.isfinite(a).all())
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.abs().max()) <= 1.0 + 1e-5  # last step returns the clipped mean
    steps = sorted({int(t[0]) for t in model.seen_t})
    assert steps == sorted(space_timesteps(1000, "10"))
    assert max(steps) == 999

    # Per-sample generators: a sample's noise does not depend on its batch.
    pair = run_with([torch.Generator().manual_seed(s) for s in (5, 6)], batch=2)
    alone = run_with([torch.Generator().manual_seed(6)], batch=1)
    torch.testing.assert_close(pair[1:], alone)


def test_learned_range_variance():
    diffusion = create_diffusion(num_timesteps=100, learn_sigma=True)
    x, t = torch.randn(2, 3, 2, 2), torch.tensor([4, 60])
    for v, table in ((1.0, np.log(diffusion.betas)), (-1.0, diffusion.posterior_log_variance_clipped)):
        output = torch.cat([torch.zeros_like(x), torch.full_like(x, v)], dim=1)  # [N, 6, 2, 2]
        out = diffusion.p_mean_variance(lambda x_, t_: output, x, t)
        expected = torch.tensor(table[[4, 60]], dtype=torch.float32).reshape(2, 1, 1, 1).expand_as(x)
        torch.testing.assert_close(out["log_variance"], expected)
    output = torch.zeros(2, 6, 2, 2)  # v = 0: geometric mean of the two variances
    log_var = diffusion.p_mean_variance(lambda x_, t_: output, x, t)["log_variance"][:, 0, 0, 0]
    midpoint = 0.5 * (np.log(diffusion.betas) + diffusion.posterior_log_variance_clipped)[[4, 60]]
    torch.testing.assert_close(log_var, torch.tensor(midpoint, dtype=torch.float32))


class LabelModel(torch.nn.Module):
    """Output depends on x and label; 4 latent channels + 4 variance channels."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append(x.shape[0])
        label = y.float().reshape(-1, 1, 1, 1)
        channel = torch.arange(8.0).reshape(1, 8, 1, 1)
        return torch.cat([x, x], dim=1) * 0.5 + label * (channel + 1)  # [N, 8, H, W]


def test_classifier_free_guidance():
    model = LabelModel()
    x, t, y = torch.randn(2, 4, 3, 3), torch.tensor([3, 7]), torch.tensor([1, 2])
    cond = model(x, t, y)
    uncond = model(x, t, torch.full_like(y, 10))
    model.calls.clear()
    assert torch.equal(guided_model(model, 1.0, null_class=10)(x, t, y=y), cond)
    assert model.calls == [2]

    scale = 4.0
    guided_all = guided_model(model, scale, null_class=10, guidance_channels="all", in_channels=4)(x, t, y=y)
    assert model.calls[-1] == 4  # one forward with cond and null halves
    first3 = guided_model(model, scale, null_class=10, guidance_channels="first3", in_channels=4)(x, t, y=y)
    mixed = uncond + scale * (cond - uncond)
    torch.testing.assert_close(guided_all[:, :4], mixed[:, :4])
    torch.testing.assert_close(first3[:, :3], mixed[:, :3])
    torch.testing.assert_close(first3[:, 3], cond[:, 3])  # 4th eps channel unguided in DiT's code
    torch.testing.assert_close(guided_all[:, 4:], cond[:, 4:])  # variance from the cond half
    torch.testing.assert_close(first3[:, 4:], cond[:, 4:])
    assert not torch.allclose(guided_all[:, 3], first3[:, 3])
    with pytest.raises(ValueError, match="all.*first3"):
        guided_model(model, scale, null_class=10, guidance_channels="some")

    # Guidance plugs into a sampler.
    diffusion = create_diffusion(num_timesteps=1000, learn_sigma=True, timestep_respacing="ddim5")
    wrapped = guided_model(model, 1.5, null_class=10, in_channels=4)
    sample = diffusion.ddim_sample_loop(
        wrapped, (2, 4, 3, 3), model_kwargs={"y": y}, generator=torch.Generator().manual_seed(0)
    )
    assert sample.shape == (2, 4, 3, 3)
