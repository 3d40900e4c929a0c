"""Timestep sampling distributions and per-step loss weights.

Every strategy exposes
  pmf               float64 [T]: marginal distribution of the steps ``sample`` returns,
  weights           float32 [T] (> 0): per-step loss weights,
  weights_apply_to  "mse" (weights multiply the MSE term) or "all" (the whole loss),
  sample(n, generator) -> (t LongTensor [n], w FloatTensor [n]) on CPU,
  update(t, losses), state_dict(), load_state_dict(state).

Build one with ``build_timestep_strategy`` (see its docstring for composition and parameters).
A strategy's parameters are its dataclass in ``speed.config.schema`` (``SpeedParams``, ...), which
holds their only defaults and allowed ranges; the strategy names are ``schema.TIMESTEP_STRATEGIES``.
T = len(betas), abar_t = prod_{s<=t} (1 - beta_s), SNR_t = abar_t / (1 - abar_t).
"""

import dataclasses
from typing import Any, Dict, Mapping, Optional, Tuple

import numpy as np
import torch

from speed.config.schema import (
    TIMESTEP_STRATEGIES,
    LogitNormalParams,
    LogNormalParams,
    LossAwareParams,
    MinSNRParams,
    P2Params,
    SpeedParams,
    TimestepsConfig,
)
from speed.config.validate import check_fields


def _alphas_cumprod(betas) -> np.ndarray:
    betas = np.asarray(betas.cpu() if isinstance(betas, torch.Tensor) else betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 2:
        raise ValueError(f"betas must be a 1-D array with at least 2 steps, got shape {betas.shape}")
    return np.cumprod(1.0 - betas)


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

    def __init__(self, pmf: torch.Tensor, weights: torch.Tensor):
        self.pmf = pmf.to(torch.float64)  # [T]
        self.weights = weights.to(torch.float32)  # [T]
        self.num_timesteps = int(pmf.shape[0])

    def sample(self, n: int, generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        t = torch.multinomial(self.pmf, n, replacement=True, generator=generator)  # [n]
        return t, self.weights[t]

    def update(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Adaptive strategies learn from per-sample losses; fixed ones ignore them."""

    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.num_timesteps}, weights_apply_to={self.weights_apply_to!r})"


# ----------------------------------------------------------------------------- fixed strategies


class UniformStrategy(TimestepStrategy):
    name = "uniform"

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


class LogitNormalStrategy(TimestepStrategy):
    """SD3 logit-normal over u = t / T: step i gets P(i/T <= u < (i+1)/T). Weights 1."""

    name = "logit_normal"
    params_type = LogitNormalParams

    def __init__(self, betas, params: LogitNormalParams):
        m, s = params.m, params.s
        num_timesteps = len(_alphas_cumprod(betas))
        edges = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps  # [T+1] in [0, 1]
        with np.errstate(divide="ignore"):
            logits = np.log(edges) - np.log1p(-edges)  # -inf at u = 0, +inf at u = 1
        mass = np.diff(_normal_cdf((logits - m) / s))
        super().__init__(_normalize(mass), torch.ones(num_timesteps))


class LogNormalStrategy(TimestepStrategy):
    """EDM log-normal over log sigma_t, sigma_t = sqrt((1 - abar)/abar). Weights 1.

    Step t gets the normal mass between the log-sigma midpoints to its neighbours; the first and
    last steps extend to -inf / +inf.
    """

    name = "lognormal"
    params_type = LogNormalParams

    def __init__(self, betas, params: LogNormalParams):
        p_mean, p_std = params.p_mean, params.p_std
        alphas_cumprod = _alphas_cumprod(betas)
        log_sigma = 0.5 * np.log((1.0 - alphas_cumprod) / alphas_cumprod)  # [T], increasing
        midpoints = 0.5 * (log_sigma[1:] + log_sigma[:-1])
        edges = np.concatenate([[-np.inf], midpoints, [np.inf]])  # [T+1]
        mass = np.diff(_normal_cdf((edges - p_mean) / p_std))
        super().__init__(_normalize(mass), torch.ones(len(alphas_cumprod)))


# ----------------------------------------------------------------------------- adaptive


class LossAwareStrategy(TimestepStrategy):
    """IDDPM's loss-second-moment resampler with importance weights (applied to the whole loss).

    Keeps the last `history` losses per step; uniform until every step's history is full, then
    p_t ∝ sqrt(mean(loss_t^2)) mixed with `uniform_prob` of uniform. Weights 1 / (T p_t) make the
    weighted loss an unbiased estimate of the uniform-t loss.
    """

    name = "loss_aware"
    weights_apply_to = "all"
    params_type = LossAwareParams

    def __init__(self, betas, params: LossAwareParams):
        num_timesteps = len(_alphas_cumprod(betas))
        if not isinstance(params.history, (int, np.integer)):
            raise ValueError(f"loss_aware: history must be an integer, got {params.history!r}")
        self.history = int(params.history)
        self.uniform_prob = float(params.uniform_prob)
        self.loss_history = torch.zeros(num_timesteps, self.history, dtype=torch.float64)  # [T, H]
        self.loss_counts = torch.zeros(num_timesteps, dtype=torch.long)  # [T]
        super().__init__(_uniform(num_timesteps), torch.ones(num_timesteps))

    def _refresh(self) -> None:
        num_timesteps = self.num_timesteps
        if bool((self.loss_counts < self.history).any()):
            pmf = _uniform(num_timesteps)
        else:
            pmf = torch.sqrt((self.loss_history**2).mean(dim=1))  # [T]
            pmf = pmf / pmf.sum()
            pmf = pmf * (1.0 - self.uniform_prob) + self.uniform_prob / num_timesteps
        self.pmf = pmf
        self.weights = (1.0 / (num_timesteps * pmf)).float()

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


# ----------------------------------------------------------------------------- composition


class ComposedStrategy(TimestepStrategy):
    """Steps (and pmf) from `sampler`, weights and weights_apply_to from `weighter`."""

    def __init__(self, sampler: TimestepStrategy, weighter: TimestepStrategy):
        self.sampler = sampler
        self.weighter = weighter
        self.name = f"{sampler.name}+{weighter.name}"
        self.weights_apply_to = weighter.weights_apply_to
        self.num_timesteps = sampler.num_timesteps

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
    **kwargs: Any,
) -> TimestepStrategy:
    """Build a timestep strategy from the registry (names: TIMESTEP_STRATEGIES).

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

    if weighting == "loss_aware" and sampling != "loss_aware":
        raise ValueError(
            f"weighting 'loss_aware' needs sampling 'loss_aware' (its importance weights assume its own "
            f"pmf); got sampling {sampling!r}"
        )

    def make(strategy_name: str) -> TimestepStrategy:
        cls = _REGISTRY[strategy_name]
        if cls.params_type is None:
            return cls(betas)
        params = all_params.get(strategy_name)
        return cls(betas, params if params is not None else _make_params(strategy_name, None))

    if sampling == weighting:
        return make(sampling)
    return ComposedStrategy(make(sampling), make(weighting))
