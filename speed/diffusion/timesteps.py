"""Timestep sampling distributions and per-step loss weights, under both objectives.

Every strategy is native to one time axis (``native``): DDPM steps ("steps": speed, speed_v1, p2,
min_snr, loss_aware), continuous time ("time": logit_normal, lognormal, laplace), or both
("both": uniform, which means uniform in each objective's own time). Built for DDPM, a strategy
exposes
  pmf               float64 [T]: marginal distribution of the steps ``sample`` returns,
  weights           float32 [T] (> 0): per-step loss weights,
  weights_apply_to  "mse" (weights multiply the MSE term) or "all" (the whole loss),
  sample(n, generator) -> (t LongTensor [n], w FloatTensor [n]) on CPU,
  update(t, losses), state_dict(), load_state_dict(state).
Built for flow (``objective="flow"``), it is a ``FlowTimeStrategy``: ``sample`` gives float t in
[0, 1] [n] and weights [n], ``density(t)`` is the density of those t, and ``pmf`` is the mass of
each DDPM step's cell of t. Strategies cross between the axes by log-SNR
(``speed.diffusion.noise_levels``; docs/strategies.md has the formulas).

Build one with ``build_timestep_strategy`` (see its docstring for composition and parameters).
A strategy's parameters are its dataclass in ``speed.config.schema`` (``SpeedParams``, ...), which
holds their only defaults and allowed ranges; the strategy names are ``schema.TIMESTEP_STRATEGIES``.
T = len(betas), abar_t = prod_{s<=t} (1 - beta_s), SNR_t = abar_t / (1 - abar_t).
"""

import abc
import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from speed.config.schema import (
    OBJECTIVES,
    TIMESTEP_STRATEGIES,
    LogitNormalParams,
    LaplaceParams,
    LearnedParams,
    LogNormalParams,
    LossAwareParams,
    MinSNRParams,
    P2Params,
    ProgressParams,
    SpeedParams,
    TimestepsConfig,
)
from speed.config.validate import check_fields
from speed.diffusion.noise_levels import NoiseCells, alphas_cumprod, flow_log_snr


_alphas_cumprod = alphas_cumprod


def _snr(alphas_cumprod: np.ndarray) -> np.ndarray:
    return alphas_cumprod / (1.0 - alphas_cumprod)


def _normalize(p: np.ndarray) -> torch.Tensor:
    p = np.asarray(p, dtype=np.float64)
    return torch.from_numpy(p / p.sum())


def _uniform(num_timesteps: int) -> torch.Tensor:
    return torch.full((num_timesteps,), 1.0 / num_timesteps, dtype=torch.float64)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return torch.special.ndtr(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()


def _check_positive_weights(name: str, weights: np.ndarray, params: Dict[str, Any]) -> None:
    if not np.all(np.isfinite(weights)) or weights.min() <= 0:
        raise ValueError(
            f"{name}: parameters {params} give non-positive or non-finite loss weights "
            f"(min {weights.min():.4g}); weights must all be > 0"
        )


class TimestepStrategy:
    """Base class: fixed pmf and weights, i.i.d. sampling. Subclasses set pmf and weights.

    A subclass with parameters sets ``params_type`` (its schema dataclass) and takes an instance of
    it as ``__init__(betas, params)``; one without takes only ``betas``.
    """

    name = "base"
    weights_apply_to = "mse"
    params_type: Optional[type] = None
    native = "steps"  # the time axis the strategy is defined on: steps | time | both

    def __init__(self, pmf: torch.Tensor, weights: torch.Tensor):
        self.pmf = pmf.to(torch.float64)  # [T]
        self.weights = weights.to(torch.float32)  # [T]
        self.num_timesteps = int(pmf.shape[0])

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        t = torch.multinomial(self.pmf, n, replacement=True, generator=generator)  # [n]
        return t, self.weights[t]

    # Adaptive samplers learn from the losses the trainer hands ``update`` (every worker's, gathered).
    adaptive = False
    # Weightings with trained parameters transform each sample's loss and step after backward.
    learns_weights = False

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Adaptive strategies learn from per-sample losses; fixed ones ignore them."""

    def transform_loss(self, loss: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The per-sample loss [n] to optimise, given each sample's DDPM step [n]."""
        return loss

    def after_backward(self, average: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Update trained weighting parameters from their gradient (``average`` all-reduces it)."""

    def discard_gradients(self) -> None:
        """Drop the gradient of a step that is skipped (``train.on_nonfinite=skip``)."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.num_timesteps}, weights_apply_to={self.weights_apply_to!r})"


# ----------------------------------------------------------------------------- fixed strategies


class UniformStrategy(TimestepStrategy):
    """Uniform in the objective's own time: over DDPM steps, or over flow t in [0, 1]."""

    name = "uniform"
    native = "both"

    def __init__(self, betas):
        num_timesteps = len(_alphas_cumprod(betas))
        super().__init__(_uniform(num_timesteps), torch.ones(num_timesteps))


def meaningful_steps(alphas_cumprod: np.ndarray, threshold: float = 1e-4) -> int:
    """SpeeD's reflection point: first step where d sqrt(1 - abar)/dt drops below `threshold`, + 1."""
    grad = np.gradient(np.sqrt(1.0 - alphas_cumprod))
    return int(np.argmax(grad < threshold)) + 1


def reflect_about(t: torch.Tensor, center: int, num_timesteps: int) -> torch.Tensor:
    """SpeeD's dual step: center - t below center, t - center at/above it.

    Clamped into [0, T-1]: out of range only when center == T (no step with a small gradient).
    """
    reflected = torch.where(t < center, center - t, t - center)
    return reflected.clamp(0, num_timesteps - 1)


class _DualReflectionStrategy(TimestepStrategy):
    """Draws n//2 + 1 steps from a base pmf, appends their reflections about m, keeps the first n.

    ``pmf`` is the exact large-n marginal: 0.5 * (base + reflected base).
    """

    def __init__(self, base_pmf: torch.Tensor, center: int, weights: torch.Tensor):
        num_timesteps = base_pmf.shape[0]
        self.base_pmf = base_pmf.to(torch.float64)  # [T]
        self.meaningful_steps = center
        steps = torch.arange(num_timesteps)
        reflected = torch.zeros(num_timesteps, dtype=torch.float64)
        reflected.index_add_(0, reflect_about(steps, center, num_timesteps), self.base_pmf)
        super().__init__(0.5 * (self.base_pmf + reflected), weights)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        base = torch.multinomial(self.base_pmf, n // 2 + 1, replacement=True, generator=generator)
        dual = reflect_about(base, self.meaningful_steps, self.num_timesteps)
        t = torch.cat([base, dual])[:n]  # [n]
        return t, self.weights[t]


class SpeedStrategy(_DualReflectionStrategy):
    """SpeeD (final code): base pmf k for t < tau else 1, dual reflection, change-aware weights.

    w_t = (1 - lam) + (2 lam - 1) * minmax(grad(1 - abar))_t for t < tau, and 1 for t >= tau.
    """

    name = "speed"
    params_type = SpeedParams

    def __init__(self, betas, params: SpeedParams):
        k, tau, lam = params.k, params.tau, params.lam
        alphas_cumprod = _alphas_cumprod(betas)
        num_timesteps = len(alphas_cumprod)
        if not (isinstance(tau, (int, np.integer)) or float(tau).is_integer()) or not 0 < tau <= num_timesteps:
            raise ValueError(f"speed: tau must be an integer in (0, {num_timesteps}], got {tau!r}")
        tau = int(tau)
        steps = np.arange(num_timesteps)
        base = np.where(steps < tau, float(k), 1.0)
        change = np.gradient(1.0 - alphas_cumprod)
        change = (change - change.min()) / (change.max() - change.min())
        weights = np.where(steps < tau, (1.0 - lam) + (2.0 * lam - 1.0) * change, 1.0)
        _check_positive_weights(self.name, weights, dataclasses.asdict(params))
        center = meaningful_steps(alphas_cumprod)
        super().__init__(_normalize(base), center, torch.from_numpy(weights))


class SpeedV1Strategy(_DualReflectionStrategy):
    """SpeeD (first release): base pmf tanh(1e6 (g - 1e-4)) + 1.5, dual reflection, P2 weights."""

    name = "speed_v1"

    def __init__(self, betas):
        alphas_cumprod = _alphas_cumprod(betas)
        grad = np.gradient(np.sqrt(1.0 - alphas_cumprod))
        base = np.tanh(1e6 * (grad - 1e-4)) + 1.5
        weights = 1.0 / (1.0 + _snr(alphas_cumprod))
        center = meaningful_steps(alphas_cumprod)
        super().__init__(_normalize(base), center, torch.from_numpy(weights))


class P2Strategy(TimestepStrategy):
    """P2 weighting (Choi et al.): w = 1 / (k + SNR)^gamma, uniform sampling."""

    name = "p2"
    params_type = P2Params

    def __init__(self, betas, params: P2Params):
        alphas_cumprod = _alphas_cumprod(betas)
        weights = 1.0 / (params.k + _snr(alphas_cumprod)) ** params.gamma
        _check_positive_weights(self.name, weights, dataclasses.asdict(params))
        num_timesteps = len(alphas_cumprod)
        super().__init__(_uniform(num_timesteps), torch.from_numpy(weights))


class MinSNRStrategy(TimestepStrategy):
    """Min-SNR-gamma (Hang et al.), epsilon-prediction form: w = min(SNR, gamma) / SNR."""

    name = "min_snr"
    params_type = MinSNRParams

    def __init__(self, betas, params: MinSNRParams):
        alphas_cumprod = _alphas_cumprod(betas)
        snr = _snr(alphas_cumprod)
        weights = np.minimum(snr, params.gamma) / snr
        num_timesteps = len(alphas_cumprod)
        super().__init__(_uniform(num_timesteps), torch.from_numpy(weights))


class ContinuousTimeStrategy(TimestepStrategy, abc.ABC):
    """A strategy defined as a distribution over flow time t in (0, 1), weights 1.

    Subclasses give ``time_cdf`` (numpy, of t) and ``time_pdf`` / ``sample_time`` (torch). Under
    DDPM, step i gets the mass of its log-SNR cell of t (``noise_levels.NoiseCells``).
    """

    native = "time"

    def __init__(self, betas):
        cells = NoiseCells(betas)
        super().__init__(cells.pmf_of_cdf(self.time_cdf), torch.ones(cells.num_timesteps))

    @abc.abstractmethod
    def time_cdf(self, t: np.ndarray) -> np.ndarray:
        """Implemented by each continuous-time strategy."""

    @abc.abstractmethod
    def time_pdf(self, t: torch.Tensor) -> torch.Tensor:
        """Implemented by each continuous-time strategy."""

    @abc.abstractmethod
    def sample_time(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Implemented by each continuous-time strategy."""


def _logit(t):
    with np.errstate(divide="ignore"):
        return np.log(t) - np.log1p(-t)


class _LogitNormalTime(ContinuousTimeStrategy):
    """logit(t) ~ N(mean, std): t = sigmoid(mean + std z)."""

    def _set_moments(self, mean: float, std: float) -> None:
        self.mean, self.std = float(mean), float(std)

    def time_cdf(self, t: np.ndarray) -> np.ndarray:
        return _normal_cdf((_logit(np.asarray(t, dtype=np.float64)) - self.mean) / self.std)

    def time_pdf(self, t: torch.Tensor) -> torch.Tensor:
        t = t.double()
        z = (torch.logit(t) - self.mean) / self.std
        return torch.exp(-0.5 * z**2) / (self.std * np.sqrt(2 * np.pi) * t * (1 - t))

    def sample_time(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        z = torch.randn(n, generator=generator, dtype=torch.float64)
        return torch.sigmoid(self.mean + self.std * z)


class LogitNormalStrategy(_LogitNormalTime):
    """SD3's logit-normal over flow time: logit(t) ~ N(m, s). Weights 1."""

    name = "logit_normal"
    params_type = LogitNormalParams

    def __init__(self, betas, params: LogitNormalParams):
        self._set_moments(params.m, params.s)
        super().__init__(betas)


class LogNormalStrategy(_LogitNormalTime):
    """EDM's log-normal over sigma = sqrt((1 - abar) / abar): log sigma ~ N(p_mean, p_std). Weights 1.

    On the linear path sigma = t / (1 - t) at equal log-SNR, so log sigma = logit(t): EDM's
    log-normal is the logit-normal over flow time with (m, s) = (p_mean, p_std).
    """

    name = "lognormal"
    params_type = LogNormalParams

    def __init__(self, betas, params: LogNormalParams):
        self._set_moments(params.p_mean, params.p_std)
        super().__init__(betas)


class LaplaceStrategy(ContinuousTimeStrategy):
    """Laplace density in log-SNR (Hang et al. 2024, "Improved Noise Schedule for Diffusion
    Training"): p(lambda) = exp(-|lambda - mu| / b) / (2 b). Weights 1.

    Over flow time, q(t) = p(lambda(t)) |d lambda / dt| with |d lambda / dt| = 2 / (t (1 - t)).
    """

    name = "laplace"
    params_type = LaplaceParams

    def __init__(self, betas, params: LaplaceParams):
        self.mu, self.b = float(params.mu), float(params.b)
        super().__init__(betas)

    def _log_snr_cdf(self, log_snr: np.ndarray) -> np.ndarray:
        z = (log_snr - self.mu) / self.b
        with np.errstate(over="ignore"):
            return np.where(z < 0, 0.5 * np.exp(np.minimum(z, 0.0)), 1.0 - 0.5 * np.exp(-np.maximum(z, 0.0)))

    def time_cdf(self, t: np.ndarray) -> np.ndarray:
        # lambda decreases in t: P(T <= t) = P(Lambda >= lambda(t)).
        return 1.0 - self._log_snr_cdf(flow_log_snr(t))

    def time_pdf(self, t: torch.Tensor) -> torch.Tensor:
        t = t.double()
        log_snr = 2.0 * (torch.log1p(-t) - torch.log(t))
        return torch.exp(-torch.abs(log_snr - self.mu) / self.b) / (2 * self.b) * 2.0 / (t * (1 - t))

    def sample_time(self, n: int, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        u = torch.rand(n, generator=generator, dtype=torch.float64) - 0.5  # (-0.5, 0.5)
        log_snr = self.mu - self.b * torch.sign(u) * torch.log1p(-2 * torch.abs(u))
        return torch.sigmoid(-log_snr / 2)


# ----------------------------------------------------------------------------- adaptive


class LossAwareStrategy(TimestepStrategy):
    """IDDPM's loss-second-moment resampler with importance weights (applied to the whole loss).

    Keeps the last `history` losses per step; the baseline pmf q until every step's history is
    full, then p_t ∝ q_t sqrt(mean(loss_t^2)) mixed with `uniform_prob` of q. Weights q_t / p_t make
    the weighted loss an unbiased estimate of the loss under q. q is uniform over steps under DDPM
    (weights 1 / (T p_t), as IDDPM) and, under flow, each step's cell width (uniform flow time).
    """

    name = "loss_aware"
    weights_apply_to = "all"
    params_type = LossAwareParams
    adaptive = True

    def __init__(self, betas, params: LossAwareParams, baseline_pmf: Optional[torch.Tensor] = None):
        num_timesteps = len(_alphas_cumprod(betas))
        if not isinstance(params.history, (int, np.integer)):
            raise ValueError(f"loss_aware: history must be an integer, got {params.history!r}")
        self.history = int(params.history)
        self.uniform_prob = float(params.uniform_prob)
        self.baseline_pmf = _uniform(num_timesteps) if baseline_pmf is None else baseline_pmf.double()
        self.loss_history = torch.zeros(num_timesteps, self.history, dtype=torch.float64)  # [T, H]
        self.loss_counts = torch.zeros(num_timesteps, dtype=torch.long)  # [T]
        super().__init__(self.baseline_pmf.clone(), torch.ones(num_timesteps))

    def _refresh(self) -> None:
        baseline = self.baseline_pmf
        if bool((self.loss_counts < self.history).any()):
            pmf = baseline.clone()
        else:
            pmf = baseline * torch.sqrt((self.loss_history**2).mean(dim=1))  # [T]
            pmf = pmf / pmf.sum()
            pmf = pmf * (1.0 - self.uniform_prob) + self.uniform_prob * baseline
        self.pmf = pmf
        self.weights = (baseline / pmf).float()

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Record per-sample losses (all ranks' gathered losses; CPU or device tensors)."""
        steps = t.detach().cpu().reshape(-1).tolist()
        values = losses.detach().cpu().double().reshape(-1).tolist()
        if len(steps) != len(values):
            raise ValueError(f"update: got {len(steps)} timesteps but {len(values)} losses")
        for step, value in zip(steps, values):
            count = int(self.loss_counts[step])
            if count == self.history:  # drop the oldest
                self.loss_history[step, :-1] = self.loss_history[step, 1:].clone()
                self.loss_history[step, -1] = value
            else:
                self.loss_history[step, count] = value
                self.loss_counts[step] = count + 1
        self._refresh()

    def state_dict(self) -> Dict[str, Any]:
        return {"loss_history": self.loss_history.clone(), "loss_counts": self.loss_counts.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        history = torch.as_tensor(state["loss_history"], dtype=torch.float64)
        counts = torch.as_tensor(state["loss_counts"], dtype=torch.long)
        if history.shape != self.loss_history.shape or counts.shape != self.loss_counts.shape:
            raise ValueError(
                f"loss_aware state has shapes {tuple(history.shape)}, {tuple(counts.shape)}; "
                f"expected {tuple(self.loss_history.shape)}, {tuple(self.loss_counts.shape)}"
            )
        self.loss_history = history.clone()
        self.loss_counts = counts.clone()
        self._refresh()


class LearnedWeightingStrategy(TimestepStrategy):
    """EDM2's learned per-noise-level loss weighting, as a table: uniform sampling, and each sample's
    loss L becomes L / exp(u_b) + u_b for its noise-level bin b (``bins`` equal groups of DDPM
    steps; flow times through their cells), with u trained jointly by its own Adam.

    At the optimum exp(u_b) = E[L | b]: every level contributes about equally, whatever its loss
    scale. The table and its Adam moments are tensors in the checkpoint; under several workers
    the gradient of u is averaged over all of them (``after_backward``), so every rank holds the
    same u.
    """

    name = "learned"
    weights_apply_to = "all"
    params_type = LearnedParams
    learns_weights = True

    def __init__(self, betas, params: LearnedParams):
        num_timesteps = len(_alphas_cumprod(betas))
        if not isinstance(params.bins, (int, np.integer)) or not 1 <= params.bins <= num_timesteps:
            raise ValueError(f"learned: bins must be an integer in [1, {num_timesteps}], got {params.bins!r}")
        self.bins = int(params.bins)
        self.lr = float(params.lr)
        self.beta1, self.beta2 = 0.9, 0.99
        self.log_scale = torch.zeros(self.bins, dtype=torch.float32, requires_grad=True)  # u [bins]
        self.exp_avg = torch.zeros(self.bins)
        self.exp_avg_sq = torch.zeros(self.bins)
        self.adam_step = torch.zeros((), dtype=torch.float64)
        super().__init__(_uniform(num_timesteps), torch.ones(num_timesteps))

    def _to(self, device: torch.device) -> None:
        if self.log_scale.device != device:
            self.log_scale = self.log_scale.detach().to(device).requires_grad_(True)
            self.exp_avg, self.exp_avg_sq = self.exp_avg.to(device), self.exp_avg_sq.to(device)
            self.adam_step = self.adam_step.to(device)

    def bin_of(self, steps: torch.Tensor) -> torch.Tensor:
        return (steps.long() * self.bins) // self.num_timesteps

    def transform_loss(self, loss: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        self._to(loss.device)
        u = self.log_scale[self.bin_of(steps.to(loss.device))]  # [n]
        return loss / torch.exp(u) + u

    def after_backward(self, average: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """One Adam step on u with its gradient averaged over workers (``average``); no host sync."""
        grad = self.log_scale.grad
        if grad is None:
            return
        grad = average(grad.detach().clone())
        with torch.no_grad():
            self.adam_step += 1
            self.exp_avg.mul_(self.beta1).add_(grad, alpha=1 - self.beta1)
            self.exp_avg_sq.mul_(self.beta2).addcmul_(grad, grad, value=1 - self.beta2)
            m_hat = self.exp_avg / (1 - self.beta1 ** self.adam_step)
            v_hat = self.exp_avg_sq / (1 - self.beta2 ** self.adam_step)
            self.log_scale -= (self.lr * m_hat / (v_hat.sqrt() + 1e-8)).to(self.log_scale.dtype)
        self.log_scale.grad = None

    def discard_gradients(self) -> None:
        self.log_scale.grad = None

    def current_weights(self) -> torch.Tensor:
        """The effective weight 1 / exp(u) of each DDPM step [T] (for plots and logs)."""
        steps = torch.arange(self.num_timesteps)
        return torch.exp(-self.log_scale.detach().cpu()[self.bin_of(steps)])

    def state_dict(self) -> Dict[str, Any]:
        return {"log_scale": self.log_scale.detach().clone(), "exp_avg": self.exp_avg.clone(),
                "exp_avg_sq": self.exp_avg_sq.clone(), "adam_step": self.adam_step.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        log_scale = torch.as_tensor(state["log_scale"])
        if log_scale.shape != (self.bins,):
            raise ValueError(f"learned state has {tuple(log_scale.shape)} bins; expected ({self.bins},)")
        device = self.log_scale.device
        self.log_scale = log_scale.detach().clone().float().to(device).requires_grad_(True)
        self.exp_avg = torch.as_tensor(state["exp_avg"]).clone().float().to(device)
        self.exp_avg_sq = torch.as_tensor(state["exp_avg_sq"]).clone().float().to(device)
        self.adam_step = torch.as_tensor(state["adam_step"]).clone().double().to(device)


class ProgressStrategy(TimestepStrategy):
    """Samples noise levels where the loss is falling fastest: a running estimate of per-level
    learning progress drives the density, with a floor so no level starves.

    The T steps are grouped into ``bins`` bins. Each bin keeps two exponential moving averages of
    its per-sample loss, a fast one (``fast``) and a slow one (``slow``); its progress is the
    relative fall max(slow - fast, 0) / slow (``measure: relative``) or the fall itself, in loss
    units (``measure: absolute``), smoothed across neighbouring bins (Gaussian of
    ``smoothing`` bins). The sampling pmf is (1 - floor) * progress share + floor * baseline
    (uniform over the objective's own time: 1/T per step, or the cell widths under flow), spread
    evenly over the steps of a bin, and stays the baseline until every bin has seen ``warmup``
    samples. With ``unbiased``, each sample is weighted baseline / pmf (an unbiased estimate of the
    baseline objective); otherwise weights are 1. The trainer hands ``update`` every worker's losses
    (gathered), so every rank holds the same state; the state is tensors in the checkpoint.
    """

    name = "progress"
    weights_apply_to = "all"  # importance weights (with ``unbiased``) weight the whole loss
    params_type = ProgressParams
    adaptive = True

    def __init__(self, betas, params: ProgressParams, baseline_pmf: Optional[torch.Tensor] = None):
        num_timesteps = len(_alphas_cumprod(betas))
        if not isinstance(params.bins, (int, np.integer)) or not 1 <= params.bins <= num_timesteps:
            raise ValueError(f"progress: bins must be an integer in [1, {num_timesteps}], got {params.bins!r}")
        if not params.fast < params.slow:
            raise ValueError(f"progress: fast={params.fast} must be below slow={params.slow} (fast forgets sooner)")
        self.params = params
        self.bins = int(params.bins)
        self.baseline_pmf = _uniform(num_timesteps) if baseline_pmf is None else baseline_pmf.double()
        self.bin_index = (torch.arange(num_timesteps) * self.bins) // num_timesteps  # [T]
        self.fast_mean = torch.zeros(self.bins, dtype=torch.float64)
        self.slow_mean = torch.zeros(self.bins, dtype=torch.float64)
        self.counts = torch.zeros(self.bins, dtype=torch.long)
        offsets = torch.arange(self.bins, dtype=torch.float64)
        if params.smoothing > 0:
            kernel = torch.exp(-0.5 * ((offsets[:, None] - offsets[None, :]) / params.smoothing) ** 2)
        else:
            kernel = torch.eye(self.bins, dtype=torch.float64)
        self.kernel = kernel / kernel.sum(dim=1, keepdim=True)  # [bins, bins]
        super().__init__(self.baseline_pmf.clone(), torch.ones(num_timesteps))

    def progress(self) -> torch.Tensor:
        """Smoothed loss fall per bin [bins] (>= 0): relative to the slow mean, or in loss units (``measure``)."""
        fall = torch.clamp(self.slow_mean - self.fast_mean, min=0.0)
        if self.params.measure == "relative":
            fall = fall / torch.clamp(self.slow_mean, min=1e-12)
        return self.kernel @ fall

    def _refresh(self) -> None:
        baseline = self.baseline_pmf
        if bool((self.counts < self.params.warmup).any()):
            pmf = baseline.clone()
        else:
            progress = self.progress()
            bin_mass = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, self.bin_index, baseline)
            if float(progress.sum()) > 0:
                share = progress / progress.sum()  # [bins]
                # Within a bin, follow the baseline's shape (uniform steps, or cell widths).
                within = baseline / bin_mass[self.bin_index]
                pmf = (1 - self.params.floor) * share[self.bin_index] * within + self.params.floor * baseline
            else:
                pmf = baseline.clone()
        self.pmf = pmf / pmf.sum()
        self.weights = (baseline / self.pmf).float() if self.params.unbiased else torch.ones(self.num_timesteps)

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        bins = self.bin_index[t.detach().cpu().long().reshape(-1)]
        values = losses.detach().cpu().double().reshape(-1)
        if bins.numel() != values.numel():
            raise ValueError(f"update: got {bins.numel()} timesteps but {values.numel()} losses")
        total = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, bins, values)
        count = torch.zeros(self.bins, dtype=torch.long).index_add_(0, bins, torch.ones_like(bins))
        seen = count > 0
        first = seen & (self.counts == 0)
        self.fast_mean[first] = total[first] / count[first]
        self.slow_mean[first] = total[first] / count[first]
        again = seen & ~first
        mean_again = total[again] / count[again]
        self.fast_mean[again] = self.params.fast * self.fast_mean[again] + (1 - self.params.fast) * mean_again
        self.slow_mean[again] = self.params.slow * self.slow_mean[again] + (1 - self.params.slow) * mean_again
        self.counts += count
        self._refresh()

    def state_dict(self) -> Dict[str, Any]:
        return {"fast_mean": self.fast_mean.clone(), "slow_mean": self.slow_mean.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("fast_mean", "slow_mean", "counts"):
            value = torch.as_tensor(state[key])
            if value.shape != (self.bins,):
                raise ValueError(f"progress state {key} has shape {tuple(value.shape)}; expected ({self.bins},)")
        self.fast_mean = torch.as_tensor(state["fast_mean"]).double().clone()
        self.slow_mean = torch.as_tensor(state["slow_mean"]).double().clone()
        self.counts = torch.as_tensor(state["counts"]).long().clone()
        self._refresh()


# ----------------------------------------------------------------------------- composition


class ComposedStrategy(TimestepStrategy):
    """Steps (and pmf) from `sampler`, weights and weights_apply_to from `weighter`."""

    def __init__(self, sampler: TimestepStrategy, weighter: TimestepStrategy):
        self.sampler = sampler
        self.weighter = weighter
        self.name = f"{sampler.name}+{weighter.name}"
        self.weights_apply_to = weighter.weights_apply_to
        self.num_timesteps = sampler.num_timesteps
        self.adaptive = sampler.adaptive or weighter.adaptive
        self.learns_weights = weighter.learns_weights

    def transform_loss(self, loss: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        return self.weighter.transform_loss(loss, steps)

    def after_backward(self, average: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.weighter.after_backward(average)

    def discard_gradients(self) -> None:
        self.weighter.discard_gradients()

    @property
    def pmf(self) -> torch.Tensor:
        return self.sampler.pmf

    @property
    def weights(self) -> torch.Tensor:
        return self.weighter.weights

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        t, _ = self.sampler.sample(n, generator)
        return t, self.weighter.weights[t]

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        self.sampler.update(t, losses)
        self.weighter.update(t, losses)

    def state_dict(self) -> Dict[str, Any]:
        return {"sampling": self.sampler.state_dict(), "weighting": self.weighter.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.sampler.load_state_dict(state.get("sampling", {}))
        self.weighter.load_state_dict(state.get("weighting", {}))


class FlowTimeStrategy:
    """A strategy under the flow objective: float t in [0, 1] and weights, carried by log-SNR.

    Steps-native samplers draw a DDPM step (their own ``sample``, so SpeeD's dual reflection stays)
    and then t uniformly inside that step's cell; time-native samplers draw t directly; uniform
    draws t ~ U[0, 1]. Each t gets the weighting strategy's weight of the step whose cell holds it.
    ``update`` hands adaptive strategies the cell of each t, so their state is over DDPM steps.
    """

    objective = "flow"

    def __init__(self, sampler: TimestepStrategy, weighter: TimestepStrategy, cells: NoiseCells):
        self.sampler = sampler
        self.weighter = weighter
        self.cells = cells
        self.name = sampler.name if sampler is weighter else f"{sampler.name}+{weighter.name}"
        self.weights_apply_to = weighter.weights_apply_to
        self.num_timesteps = cells.num_timesteps
        self.adaptive = sampler.adaptive or weighter.adaptive
        self.learns_weights = weighter.learns_weights

    def transform_loss(self, loss: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.weighter.transform_loss(loss, self.cells.cell_of(t))

    def after_backward(self, average: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.weighter.after_backward(average)

    def discard_gradients(self) -> None:
        self.weighter.discard_gradients()

    @property
    def pmf(self) -> torch.Tensor:
        """Mass of each DDPM step's cell of t [T] (uniform t: the cell widths)."""
        return self.cells.widths.clone() if self.sampler.native == "both" else self.sampler.pmf

    @property
    def weights(self) -> torch.Tensor:
        """The weight of each cell [T]."""
        return self.weighter.weights

    def density(self, t: torch.Tensor) -> torch.Tensor:
        """Density of the sampled t at t [n] (float64)."""
        if self.sampler.native == "both":
            return torch.ones_like(t, dtype=torch.float64)
        if self.sampler.native == "time":
            return self.sampler.time_pdf(t)
        return self.cells.density_of_pmf(self.sampler.pmf, t)

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        if self.sampler.native == "both":
            t = torch.rand(n, generator=generator, dtype=torch.float64)
        elif self.sampler.native == "time":
            t = self.sampler.sample_time(n, generator)
        else:
            steps, _ = self.sampler.sample(n, generator)
            t = self.cells.uniform_in_cells(steps, generator)
        t = t.float()  # what the model sees; its cell (not the float64 draw's) sets the weight
        return t, self.weighter.weights[self.cells.cell_of(t)]  # [n], [n]

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        steps = self.cells.cell_of(t)
        self.sampler.update(steps, losses)
        if self.weighter is not self.sampler:
            self.weighter.update(steps, losses)

    def state_dict(self) -> Dict[str, Any]:
        # The same layout as under DDPM, so the checkpoint format does not depend on the objective.
        if self.weighter is self.sampler:
            return self.sampler.state_dict()
        return {"sampling": self.sampler.state_dict(), "weighting": self.weighter.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.weighter is self.sampler:
            self.sampler.load_state_dict(state)
        else:
            self.sampler.load_state_dict(state.get("sampling", {}))
            self.weighter.load_state_dict(state.get("weighting", {}))

    def __repr__(self) -> str:
        return f"FlowTimeStrategy({self.name}, T={self.num_timesteps})"


# Weightings whose importance weights assume their own sampling pmf.
OWN_SAMPLING_WEIGHTINGS = ("loss_aware", "progress")

_REGISTRY = {
    cls.name: cls
    for cls in (
        UniformStrategy,
        SpeedStrategy,
        SpeedV1Strategy,
        P2Strategy,
        MinSNRStrategy,
        LogitNormalStrategy,
        LogNormalStrategy,
        LossAwareStrategy,
        LaplaceStrategy,
        LearnedWeightingStrategy,
        ProgressStrategy,
    )
}


def _check_registry_matches_schema() -> None:
    """The schema lists the names and holds the parameter sections; the registry must agree."""
    if tuple(_REGISTRY) != TIMESTEP_STRATEGIES:
        raise AssertionError(f"registry {tuple(_REGISTRY)} != speed.config.schema.TIMESTEP_STRATEGIES")
    sections = {
        f.name: f.default_factory
        for f in dataclasses.fields(TimestepsConfig)
        if f.default_factory is not dataclasses.MISSING
    }
    expected = {name: cls.params_type for name, cls in _REGISTRY.items() if cls.params_type is not None}
    if sections != expected:
        raise AssertionError(f"TimestepsConfig parameter sections {sections} != the registry's {expected}")


_check_registry_matches_schema()


def _check_name(role: str, name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"{role} must be one of {TIMESTEP_STRATEGIES}, got {name!r}")


def _make_params(name: str, given: Any) -> Any:
    """The params dataclass instance for strategy ``name`` (None if it has no parameters).

    ``given`` is such an instance, or a mapping of some of its fields (the rest take the
    dataclass's defaults); values are checked against the fields' allowed ranges.
    """
    params_type = _REGISTRY[name].params_type
    if dataclasses.is_dataclass(given) and not isinstance(given, type):
        if params_type is None or not isinstance(given, params_type):
            expected = params_type.__name__ if params_type else "no parameters"
            raise ValueError(f"{name}: parameters must be {expected}, got {type(given).__name__}")
        params = given
    else:
        given = dict(given or {})
        valid = tuple(f.name for f in dataclasses.fields(params_type)) if params_type else ()
        unknown = sorted(set(given) - set(valid))
        if unknown:
            raise ValueError(f"{name}: unknown parameter(s) {unknown}; valid parameters: {valid or 'none'}")
        if params_type is None:
            return None
        params = params_type(**given)
    check_fields(params, prefix=f"{name}.")
    return params


def build_timestep_strategy(
    name: str,
    betas,
    sampling: Optional[str] = None,
    weighting: Optional[str] = None,
    params: Optional[Mapping[str, Any]] = None,
    objective: str = "ddpm",
    **kwargs: Any,
):
    """Build a timestep strategy from the registry (names: TIMESTEP_STRATEGIES).

    ``objective="ddpm"`` gives integer steps (a ``TimestepStrategy``); ``objective="flow"`` gives
    float t in [0, 1] (a ``FlowTimeStrategy``), with every strategy carried across by log-SNR over
    the noise levels of ``betas`` (so SpeeD's tau stays a DDPM step of that schedule).

    `name` sets both the sampling distribution and the weights; `sampling` / `weighting` override
    either one. When they differ, steps come from the sampling strategy (its pmf, including SpeeD's
    dual reflection) and each sampled step t gets the weighting strategy's weights[t], which multiply
    what the weighting strategy says (``weights_apply_to``: the MSE term, or the whole loss). E.g.
    ``build_timestep_strategy("speed", betas, weighting="min_snr")`` = SpeeD sampling, Min-SNR
    weights on the MSE. loss_aware's importance weights only make sense with its own sampling, so
    it cannot be the weighting of a different sampler.

    Parameters: ``params`` maps strategy name -> its parameters, as the schema dataclass (e.g.
    ``SpeedParams``) or a mapping of some of its fields, e.g.
    ``params={"speed": {"k": 5, "tau": 700}, "min_snr": {"gamma": 5}}``; entries for strategies not
    in use are checked but ignored, so a config can pass all of them. Flat ``**kwargs`` are a
    shorthand for ``params[name]`` (giving both raises). Missing parameters take the dataclass's
    defaults.
    """
    _check_name("name", name)
    sampling = name if sampling is None else sampling
    weighting = name if weighting is None else weighting
    _check_name("sampling", sampling)
    _check_name("weighting", weighting)

    given: Dict[str, Any] = dict(params or {})
    for key in given:
        _check_name("params key", key)
    if kwargs:
        if given.get(name):
            raise ValueError(f"give parameters for {name!r} either as keyword arguments or in params, not both")
        given[name] = kwargs
    all_params = {key: _make_params(key, value) for key, value in given.items()}

    if weighting in OWN_SAMPLING_WEIGHTINGS and sampling != weighting:
        raise ValueError(
            f"weighting {weighting!r} needs sampling {weighting!r} (its importance weights assume its own "
            f"pmf); got sampling {sampling!r}"
        )

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    cells = NoiseCells(betas) if objective == "flow" else None

    def make(strategy_name: str) -> TimestepStrategy:
        cls = _REGISTRY[strategy_name]
        if cls.params_type is None:
            return cls(betas)
        params = all_params.get(strategy_name)
        params = params if params is not None else _make_params(strategy_name, None)
        if cls.adaptive and cells is not None:
            return cls(betas, params, baseline_pmf=cells.widths)  # their baseline: uniform flow time
        return cls(betas, params)

    if objective == "flow":
        sampler = make(sampling)
        return FlowTimeStrategy(sampler, sampler if sampling == weighting else make(weighting), cells)
    if sampling == weighting:
        return make(sampling)
    return ComposedStrategy(make(sampling), make(weighting))
