"""Flow matching on the linear path (rectified flow / SiT): losses and samplers.

  x_t = (1 - t) x0 + t eps,  t in [0, 1] (t = 0 data, t = 1 noise),  target velocity v = eps - x0.

The model gets t as a float tensor [N], as given (any scaling for its timestep embedding is the
model's business; DiT's sinusoidal embedding takes fractional t as SiT feeds it). Samplers
integrate dx/dt = v(x, t) from t = 1 to t = 0 on a uniform grid of ``steps`` intervals.

Classifier-free guidance mixes velocities: ``speed.diffusion.guided_model`` wraps a model the same
way for both objectives (a flow model has no learned-sigma channels).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional, Sequence

import torch

from speed.diffusion.gaussian import GeneratorArg, mean_flat, randn

FLOW_METHODS = ("euler", "heun", "sde")


class FlowMatching:
    """The linear path with velocity prediction; stateless, so one instance serves every caller."""

    objective = "flow"

    @staticmethod
    def interpolate(x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = (1 - t) x0 + t eps, with t [N] broadcast over x0 [N, ...]."""
        t = t.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
        return (1.0 - t) * x0 + t * noise

    def training_losses(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        t: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        model_kwargs: Optional[Dict[str, Any]] = None,
        weights: Optional[torch.Tensor] = None,
    ) -> Dict[str, torch.Tensor]:
        """Per-sample losses {"loss": [N], "mse": [N]}: mse = mean over pixels of (v_pred - (eps - x0))^2,
        loss = weights * mse (weights [N], default 1)."""
        if t.is_floating_point() is False:
            raise ValueError(f"flow matching takes float t in [0, 1]; got {t.dtype} (DDPM steps?)")
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.interpolate(x0, t, noise)
        output = model(x_t, t, **(model_kwargs or {}))
        if output.shape != x0.shape:
            raise ValueError(
                f"the model returns {tuple(output.shape)} for inputs {tuple(x0.shape)}; a flow model predicts "
                "the velocity only (build it with model.learn_sigma=false)"
            )
        mse = mean_flat((output.float() - (noise - x0).float()) ** 2)  # [N]
        loss = mse if weights is None else mse * weights.to(mse.dtype)
        return {"loss": loss, "mse": mse}

    @torch.no_grad()
    def sample_loop(
        self,
        model: Callable[..., torch.Tensor],
        shape: Sequence[int],
        noise: Optional[torch.Tensor] = None,
        steps: int = 50,
        method: str = "euler",
        model_kwargs: Optional[Dict[str, Any]] = None,
        device=None,
        generator: GeneratorArg = None,
        progress: bool = False,
    ) -> torch.Tensor:
        """Integrate from t = 1 (``noise``, or a draw from ``generator``) to t = 0 in ``steps`` intervals.

        euler: x <- x - h v(x, t).
        heun:  x' = x - h v(x, t); x <- x - h/2 (v(x, t) + v(x', t - h)) (two model calls per step).
        sde:   Euler-Maruyama on the reverse SDE with the flow's marginals and diffusion w(t) = t:
               x <- x - h (v - w/2 s) + sqrt(w h) z, score s = -(x + (1 - t) v) / t; the last step
               adds no noise (it lands on t = 0). ``generator`` drives the step noise.
        """
        if method not in FLOW_METHODS:
            raise ValueError(f"method must be one of {FLOW_METHODS}, got {method!r}")
        if int(steps) < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        steps = int(steps)
        kwargs = model_kwargs or {}
        if device is None:
            device = noise.device if noise is not None else torch.device("cpu")
        x = randn(shape, generator, device) if noise is None else noise.to(device)  # [N, C, H, W]
        grid = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)  # [steps + 1]
        indices = range(steps)
        if progress:
            from tqdm.auto import tqdm

            indices = tqdm(indices, desc=f"flow {method}", leave=False)
        for i in indices:
            t_now, t_next = float(grid[i]), float(grid[i + 1])
            h = t_now - t_next
            t = torch.full((x.shape[0],), t_now, device=x.device, dtype=torch.float32)
            v = model(x, t, **kwargs).to(x.dtype)
            if method == "euler":
                x = x - h * v
            elif method == "heun":
                predicted = x - h * v
                t2 = torch.full_like(t, t_next)
                v2 = model(predicted, t2, **kwargs).to(x.dtype)
                x = x - 0.5 * h * (v + v2)
            else:
                score = -(x + (1.0 - t_now) * v) / t_now  # t_now > 0 on every step
                drift = v - 0.5 * t_now * score
                x = x - h * drift
                if i < steps - 1:
                    x = x + (t_now * h) ** 0.5 * randn(x.shape, generator, x.device).to(x.dtype)
        return x


def create_flow_matching() -> FlowMatching:
    """The linear path with velocity prediction (the only flow this project trains)."""
    return FlowMatching()
