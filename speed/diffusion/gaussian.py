"""Gaussian diffusion (DDPM / IDDPM) for epsilon-prediction models.

Math follows Ho et al. (DDPM), Nichol & Dhariwal (IDDPM, learned-range variance and the
hybrid loss) and Peebles & Xie (DiT: loss = MSE + VLB). Time index t runs 0..T-1, where
t = 0 is the least noisy step and alpha_bar_t = prod_{s<=t} (1 - beta_s).
"""

import math
from typing import Any, Callable, Dict, Optional, Sequence, Union

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "cosine")
GUIDANCE_CHANNELS = ("all", "first3")

# A single torch.Generator, or one generator per sample (noise of sample i then depends only on
# generator i, so a sample is reproducible whatever batch it lands in), or None.
GeneratorArg = Optional[Union[torch.Generator, Sequence[torch.Generator]]]


# ----------------------------------------------------------------------------- schedules


def betas_for_alpha_bar(num_timesteps: int, alpha_bar: Callable[[float], float], max_beta: float):
    """Discretise a continuous alpha_bar(s), s in [0, 1], into T betas (capped at max_beta)."""
    betas = []
    for i in range(num_timesteps):
        s_now, s_next = i / num_timesteps, (i + 1) / num_timesteps
        betas.append(min(1.0 - alpha_bar(s_next) / alpha_bar(s_now), max_beta))
    return np.array(betas, dtype=np.float64)


def get_beta_schedule(name: str, num_timesteps: int = 1000) -> np.ndarray:
    """Float64 betas [T] for the named schedule ("linear" or "cosine")."""
    if not isinstance(num_timesteps, (int, np.integer)) or num_timesteps < 1:
        raise ValueError(f"num_timesteps must be a positive integer, got {num_timesteps!r}")
    if name == "linear":
        # DDPM's 1e-4..0.02 for T=1000, rescaled so other T keep the same overall noise (IDDPM).
        scale = 1000.0 / num_timesteps
        return np.linspace(scale * 1e-4, scale * 0.02, num_timesteps, dtype=np.float64)
    if name == "cosine":
        offset = 0.008  # keeps beta_0 from being vanishingly small (IDDPM)
        return betas_for_alpha_bar(
            num_timesteps,
            lambda s: math.cos((s + offset) / (1 + offset) * math.pi / 2) ** 2,
            max_beta=0.999,
        )
    raise ValueError(f"schedule must be one of {BETA_SCHEDULES}, got {name!r}")


# ----------------------------------------------------------------------------- helpers


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over all non-batch dimensions: [N, ...] -> [N]."""
    return x.mean(dim=tuple(range(1, x.ndim)))


def extract(arr: np.ndarray, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """Gather arr[t] (float64 -> float32) and shape it [N, 1, ..., 1] to broadcast over x."""
    values = torch.from_numpy(arr).to(t.device)[t].float()  # [N]
    return values.reshape(-1, *([1] * (ndim - 1)))


def randn(shape: Sequence[int], generator: GeneratorArg, device) -> torch.Tensor:
    """Standard normal noise of `shape` on `device`, drawn from `generator` where given."""
    shape = tuple(shape)
    if generator is None:
        return torch.randn(shape, device=device)
    if isinstance(generator, torch.Generator):
        # Draw on the generator's own device so a CPU generator also drives GPU sampling.
        return torch.randn(shape, generator=generator, device=generator.device).to(device)
    generators = list(generator)
    if len(generators) != shape[0]:
        raise ValueError(
            f"generator: got {len(generators)} per-sample generators for a batch of {shape[0]}"
        )
    per_sample = [torch.randn(shape[1:], generator=g, device=g.device).to(device) for g in generators]
    return torch.stack(per_sample)  # [N, ...]


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL( N(mean1, exp(logvar1)) || N(mean2, exp(logvar2)) ), elementwise, in nats."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
        + (mean1 - mean2) ** 2 * torch.exp(-logvar2)
    )


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """Elementwise log-probability (nats) of x under a Gaussian discretised into 256 bins on [-1, 1].

    Bins have width 2/255 centred on the 256 levels; the outermost bins extend to -inf / +inf so
    the probabilities over all levels sum to one.
    """
    half_bin = 1.0 / 255.0
    inv_std = torch.exp(-log_scales)
    upper = inv_std * (x - means + half_bin)
    lower = inv_std * (x - means - half_bin)
    log_cdf_upper = torch.special.log_ndtr(upper)  # log P(X < upper edge), for the lowest bin
    log_sf_lower = torch.special.log_ndtr(-lower)  # log P(X > lower edge), for the highest bin
    bin_mass = torch.special.ndtr(upper) - torch.special.ndtr(lower)
    log_bin_mass = torch.log(bin_mass.clamp(min=1e-12))
    return torch.where(
        x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_sf_lower, log_bin_mass)
    )


# ----------------------------------------------------------------------------- diffusion


class GaussianDiffusion:
    """Forward process, model parameterisation, losses and samplers for a fixed beta schedule.

    The model predicts epsilon. With ``learn_sigma`` it outputs 2C channels; the second half is
    v in [-1, 1] interpolating log-variance between log(posterior variance) and log(beta) (IDDPM).
    Without it the variance is fixed to the posterior variance ("fixed small").
    """

    def __init__(self, betas, learn_sigma: bool = True):
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size < 1:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must all lie in (0, 1]")
        self.learn_sigma = bool(learn_sigma)
        self.betas = betas
        self.num_timesteps = int(betas.shape[0])
        # Model sees these timestep indices; SpacedDiffusion maps to the original schedule.
        self.timestep_map = torch.arange(self.num_timesteps, dtype=torch.long)

        alphas = 1.0 - betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.alphas_cumprod_next = np.append(self.alphas_cumprod[1:], 0.0)
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.log_one_minus_alphas_cumprod = np.log(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1.0)

        # q(x_{t-1} | x_t, x_0) = N(coef1 * x_0 + coef2 * x_t, posterior_variance)
        self.posterior_variance = betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # posterior_variance[0] is 0; reuse step 1's value so the log stays finite.
        first = self.posterior_variance[1] if self.num_timesteps > 1 else betas[0]
        self.posterior_log_variance_clipped = np.log(np.append(first, self.posterior_variance[1:]))
        self.posterior_mean_coef1 = betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (
            (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)
        )

    # ------------------------------------------------------------------ forward process

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Timestep indices [N] to feed the model (original-schedule indices)."""
        return self.timestep_map.to(t.device)[t]

    def q_mean_variance(self, x_start: torch.Tensor, t: torch.Tensor):
        """Mean, variance and log-variance of q(x_t | x_0)."""
        mean = extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
        variance = extract(1.0 - self.alphas_cumprod, t, x_start.ndim)
        log_variance = extract(self.log_one_minus_alphas_cumprod, t, x_start.ndim)
        return mean, variance, log_variance

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: Optional[torch.Tensor] = None):
        """Draw x_t ~ q(x_t | x_0) = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps."""
        if noise is None:
            noise = torch.randn_like(x_start)
        return (
            extract(self.sqrt_alphas_cumprod, t, x_start.ndim) * x_start
            + extract(self.sqrt_one_minus_alphas_cumprod, t, x_start.ndim) * noise
        )

    def q_posterior_mean_variance(self, x_start: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        ndim = x_t.ndim
        mean = (
            extract(self.posterior_mean_coef1, t, ndim) * x_start
            + extract(self.posterior_mean_coef2, t, ndim) * x_t
        )
        variance = extract(self.posterior_variance, t, ndim)
        log_variance = extract(self.posterior_log_variance_clipped, t, ndim)
        return mean, variance, log_variance

    # ------------------------------------------------------------------ reverse process

    def _split_output(self, model_output: torch.Tensor, x: torch.Tensor):
        """Split model output into (eps [N, C, ...], v [N, C, ...] or None), checking channels."""
        channels = x.shape[1]
        expected = 2 * channels if self.learn_sigma else channels
        if model_output.shape[1] != expected or model_output.shape[0] != x.shape[0]:
            raise ValueError(
                f"model output has shape {tuple(model_output.shape)}; expected {expected} channels "
                f"(learn_sigma={self.learn_sigma}, input channels={channels}) and batch {x.shape[0]}"
            )
        if self.learn_sigma:
            eps, v = torch.split(model_output, channels, dim=1)
            return eps, v
        return model_output, None

    def _predict_xstart_from_eps(self, x_t, t, eps):
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t
            - extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim) * eps
        )

    def _predict_eps_from_xstart(self, x_t, t, pred_xstart):
        return (
            extract(self.sqrt_recip_alphas_cumprod, t, x_t.ndim) * x_t - pred_xstart
        ) / extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.ndim)

    def p_mean_variance_from_output(
        self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True
    ) -> Dict[str, torch.Tensor]:
        """p(x_{t-1} | x_t) given an already computed model output."""
        eps, v = self._split_output(model_output, x)
        ndim = x.ndim
        min_log = extract(self.posterior_log_variance_clipped, t, ndim)
        if v is None:
            log_variance = min_log.expand_as(x)
        else:
            max_log = extract(np.log(self.betas), t, ndim)
            frac = (v + 1.0) / 2.0  # v in [-1, 1] -> [0, 1]
            log_variance = frac * max_log + (1.0 - frac) * min_log  # [N, C, H, W]
        pred_xstart = self._predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(pred_xstart, x, t)
        return {
            "mean": mean,
            "variance": torch.exp(log_variance),
            "log_variance": log_variance,
            "pred_xstart": pred_xstart,
            "eps": eps,
        }

    def p_mean_variance(
        self, model, x: torch.Tensor, t: torch.Tensor, model_kwargs: Optional[Dict[str, Any]] = None,
        clip_denoised: bool = True,
    ) -> Dict[str, torch.Tensor]:
        """Run the model and return dict(mean, variance, log_variance, pred_xstart, eps)."""
        model_output = model(x, self.model_timesteps(t), **(model_kwargs or {}))
        return self.p_mean_variance_from_output(model_output, x, t, clip_denoised)

    # ------------------------------------------------------------------ losses

    def _vb_terms_bpd(self, model_output, x_start, x_t, t) -> torch.Tensor:
        """Per-sample VLB term L_t in bits/dim: KL for t > 0, decoder NLL for t = 0. [N]"""
        true_mean, _, true_log_var = self.q_posterior_mean_variance(x_start, x_t, t)
        out = self.p_mean_variance_from_output(model_output, x_t, t, clip_denoised=False)
        kl = mean_flat(normal_kl(true_mean, true_log_var, out["mean"], out["log_variance"]))
        kl = kl / math.log(2.0)
        decoder_nll = -discretized_gaussian_log_likelihood(
            x_start, means=out["mean"], log_scales=0.5 * out["log_variance"]
        )
        decoder_nll = mean_flat(decoder_nll) / math.log(2.0)
        return torch.where(t == 0, decoder_nll, kl)

    def training_losses(
        self,
        model,
        x_start: torch.Tensor,
        t: torch.Tensor,
        model_kwargs: Optional[Dict[str, Any]] = None,
        noise: Optional[torch.Tensor] = None,
        weights: Optional[torch.Tensor] = None,
        weight_vb: bool = False,
    ) -> Dict[str, torch.Tensor]:
        """Per-sample losses [N]: "loss", "mse" (epsilon MSE) and "vb" (zeros without learn_sigma).

        loss = w * mse + vb, or w * (mse + vb) with ``weight_vb``. Following DiT, the VB term is
        NOT rescaled by num_timesteps / 1000 (that factor belongs to IDDPM's RESCALED_MSE loss type
        and is 1 anyway when training with the usual T = 1000 steps).
        """
        if noise is None:
            noise = torch.randn_like(x_start)
        x_t = self.q_sample(x_start, t, noise=noise)  # [N, C, H, W]
        model_output = model(x_t, self.model_timesteps(t), **(model_kwargs or {}))
        eps, v = self._split_output(model_output, x_t)
        mse = mean_flat((noise - eps) ** 2)  # [N]
        if v is None:
            vb = torch.zeros_like(mse)
        else:
            # Stop-gradient through eps: the VB term only trains the variance (IDDPM hybrid loss).
            frozen = torch.cat([eps.detach(), v], dim=1)  # [N, 2C, H, W]
            vb = self._vb_terms_bpd(frozen, x_start, x_t, t)  # [N]
        if weights is None:
            loss = mse + vb
        else:
            weights = weights.to(device=mse.device, dtype=mse.dtype)
            if weights.shape != mse.shape:
                raise ValueError(f"weights must have shape {tuple(mse.shape)}, got {tuple(weights.shape)}")
            loss = weights * (mse + vb) if weight_vb else weights * mse + vb
        return {"loss": loss, "mse": mse, "vb": vb}

    # ------------------------------------------------------------------ samplers

    def _timestep_iterator(self, progress: bool):
        indices = list(range(self.num_timesteps))[::-1]
        if progress:
            from tqdm.auto import tqdm

            return tqdm(indices)
        return indices

    def p_sample(
        self, model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
        model_kwargs: Optional[Dict[str, Any]] = None, generator: GeneratorArg = None,
    ) -> Dict[str, torch.Tensor]:
        """One DDPM ancestral step x_t -> x_{t-1}; no noise is added at t = 0."""
        out = self.p_mean_variance(model, x, t, model_kwargs, clip_denoised)
        noise = randn(x.shape, generator, x.device)
        nonzero = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))  # [N, 1, 1, 1]
        sample = out["mean"] + nonzero * torch.exp(0.5 * out["log_variance"]) * noise
        return {"sample": sample, "pred_xstart": out["pred_xstart"]}

    def _initial_noise(self, shape, noise, device, generator):
        if noise is not None:
            return noise.to(device) if device is not None else noise
        if device is None:
            device = "cpu"
        return randn(shape, generator, device)

    @torch.no_grad()
    def p_sample_loop(
        self, model, shape, noise: Optional[torch.Tensor] = None,
        model_kwargs: Optional[Dict[str, Any]] = None, device=None, progress: bool = False,
        clip_denoised: bool = True, generator: GeneratorArg = None,
    ) -> torch.Tensor:
        """Full DDPM ancestral sampling from x_{T-1} ~ N(0, I) to x_0."""
        x = self._initial_noise(shape, noise, device, generator)  # [N, C, H, W]
        for i in self._timestep_iterator(progress):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            x = self.p_sample(model, x, t, clip_denoised, model_kwargs, generator)["sample"]
        return x

    def ddim_sample(
        self, model, x: torch.Tensor, t: torch.Tensor, clip_denoised: bool = True,
        model_kwargs: Optional[Dict[str, Any]] = None, eta: float = 0.0,
        generator: GeneratorArg = None,
    ) -> Dict[str, torch.Tensor]:
        """One DDIM step x_t -> x_{t-1} (Song et al.); eta = 0 is deterministic."""
        out = self.p_mean_variance(model, x, t, model_kwargs, clip_denoised)
        # Recompute eps from the (possibly clipped) x_0 so the update is self-consistent.
        eps = self._predict_eps_from_xstart(x, t, out["pred_xstart"])
        abar = extract(self.alphas_cumprod, t, x.ndim)
        abar_prev = extract(self.alphas_cumprod_prev, t, x.ndim)
        sigma = eta * torch.sqrt((1 - abar_prev) / (1 - abar)) * torch.sqrt(1 - abar / abar_prev)
        mean = out["pred_xstart"] * torch.sqrt(abar_prev) + torch.sqrt(1 - abar_prev - sigma**2) * eps
        if eta > 0:
            nonzero = (t != 0).float().reshape(-1, *([1] * (x.ndim - 1)))  # [N, 1, 1, 1]
            mean = mean + nonzero * sigma * randn(x.shape, generator, x.device)
        return {"sample": mean, "pred_xstart": out["pred_xstart"]}

    @torch.no_grad()
    def ddim_sample_loop(
        self, model, shape, noise: Optional[torch.Tensor] = None,
        model_kwargs: Optional[Dict[str, Any]] = None, device=None, progress: bool = False,
        clip_denoised: bool = True, eta: float = 0.0, generator: GeneratorArg = None,
    ) -> torch.Tensor:
        """Full DDIM sampling; use a respaced diffusion (e.g. "ddim50") for few steps."""
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        x = self._initial_noise(shape, noise, device, generator)  # [N, C, H, W]
        for i in self._timestep_iterator(progress):
            t = torch.full((x.shape[0],), i, device=x.device, dtype=torch.long)
            x = self.ddim_sample(model, x, t, clip_denoised, model_kwargs, eta, generator)["sample"]
        return x


# ----------------------------------------------------------------------------- guidance


def guided_model(
    model,
    guidance_scale: float,
    null_class: int,
    guidance_channels: str = "all",
    learn_sigma: bool = True,
    in_channels: int = 4,
):
    """Wrap a class-conditional model ``model(x, t, y=..., **kw)`` with classifier-free guidance.

    The returned callable has the same signature. It runs conditional and null-label inputs in one
    forward of batch 2N and returns eps = uncond + s * (cond - uncond) on the noise channels; the
    learned-variance channels always come from the conditional half. ``guidance_channels="first3"``
    reproduces DiT's published code, which guides only the first 3 eps channels and takes the rest
    from the conditional half. ``guidance_scale == 1`` runs the plain model (one forward of N).
    """
    if guidance_channels not in GUIDANCE_CHANNELS:
        raise ValueError(f"guidance_channels must be one of {GUIDANCE_CHANNELS}, got {guidance_channels!r}")
    if not math.isfinite(guidance_scale):
        raise ValueError(f"guidance_scale must be finite, got {guidance_scale}")
    if guidance_scale == 1.0:
        return model
    guided = in_channels if guidance_channels == "all" else min(3, in_channels)
    out_channels = 2 * in_channels if learn_sigma else in_channels

    def forward(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
        n = x.shape[0]
        null = torch.full_like(y, null_class)
        both = model(torch.cat([x, x]), torch.cat([t, t]), y=torch.cat([y, null]), **kwargs)  # [2N, ...]
        if both.shape[1] != out_channels:
            raise ValueError(
                f"model output has {both.shape[1]} channels; expected {out_channels} "
                f"(in_channels={in_channels}, learn_sigma={learn_sigma})"
            )
        cond, uncond = both[:n], both[n:]
        mixed = uncond[:, :guided] + guidance_scale * (cond[:, :guided] - uncond[:, :guided])
        return torch.cat([mixed, cond[:, guided:]], dim=1)  # [N, out_channels, H, W]

    return forward
