"""Noise levels of both objectives and the change of variables between them.

Both objectives are indexed by how much noise a sample carries, and log-SNR lambda is the common
axis (docs/strategies.md, "Both objectives", has the derivation and the numbers):

  DDPM step i (0 .. T-1):   lambda_i = log(abar_i / (1 - abar_i)), decreasing in i
  flow time t in [0, 1]:    x_t = (1 - t) x0 + t eps, so lambda(t) = 2 log((1 - t) / t),
                            t(lambda) = sigmoid(-lambda / 2), |d lambda / dt| = 2 / (t (1 - t))

The T DDPM steps cut the flow interval [0, 1] into T cells: cell i holds the t whose log-SNR is
nearer lambda_i than its neighbours' (edges at the log-SNR midpoints, mapped to t; the outer edges
are t = 0 and t = 1, so the cells cover the whole flow interval). A pmf over DDPM steps is then a
density over t, constant on each cell: q(t) = pmf_i / width_i. A density over t (or over lambda,
with the Jacobian) is a pmf over steps: pmf_i = F(edge_{i+1}) - F(edge_i).
"""

from __future__ import annotations

import numpy as np
import torch


def alphas_cumprod(betas) -> np.ndarray:
    """abar_i = prod_{s <= i} (1 - beta_s) in float64; ``betas`` is any 1-D array of >= 2 steps."""
    betas = np.asarray(betas.cpu() if isinstance(betas, torch.Tensor) else betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size < 2:
        raise ValueError(f"betas must be a 1-D array with at least 2 steps, got shape {betas.shape}")
    return np.cumprod(1.0 - betas)


def ddpm_log_snr(betas) -> np.ndarray:
    """lambda_i = log(abar_i / (1 - abar_i)) [T], decreasing in i."""
    abar = alphas_cumprod(betas)
    return np.log(abar) - np.log1p(-abar)


def flow_log_snr(t):
    """lambda(t) = 2 log((1 - t) / t) on the linear path (+inf at t = 0, -inf at t = 1)."""
    t = np.asarray(t, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return 2.0 * (np.log1p(-t) - np.log(t))


def flow_time_of_log_snr(log_snr):
    """t(lambda) = sigmoid(-lambda / 2), the inverse of ``flow_log_snr``."""
    return 1.0 / (1.0 + np.exp(np.asarray(log_snr, dtype=np.float64) / 2.0))


def flow_cell_edges(betas) -> np.ndarray:
    """Edges [T + 1] of the T cells that the DDPM steps cut [0, 1] into (increasing, 0 and 1 at the ends)."""
    log_snr = ddpm_log_snr(betas)
    midpoints = 0.5 * (log_snr[1:] + log_snr[:-1])  # [T - 1]
    return np.concatenate([[0.0], flow_time_of_log_snr(midpoints), [1.0]])


class NoiseCells:
    """The DDPM steps of a beta schedule as cells of flow time: lookups both ways.

    edges   float64 [T + 1], increasing from 0 to 1
    widths  float64 [T]: the uniform-t mass of each cell (flow's baseline, as a pmf over steps)
    """

    def __init__(self, betas):
        self.edges_np = flow_cell_edges(betas)
        self.edges = torch.from_numpy(self.edges_np)  # [T + 1] float64
        self.widths = self.edges[1:] - self.edges[:-1]  # [T]
        self.num_timesteps = int(self.widths.numel())

    def cell_of(self, t: torch.Tensor) -> torch.Tensor:
        """The DDPM step whose cell holds each flow time t [n] -> long [n]."""
        # On t's own device: the trainer looks up cells of device tensors without a host sync.
        inner = self.edges[1:-1].to(t.device)
        index = torch.searchsorted(inner, t.detach().double(), right=True)
        return index.clamp_(0, self.num_timesteps - 1)

    def uniform_in_cells(self, steps: torch.Tensor, generator=None) -> torch.Tensor:
        """A flow time drawn uniformly inside each given step's cell: float64 [n]."""
        u = torch.rand(steps.shape, generator=generator, dtype=torch.float64)
        return self.edges[steps] + u * self.widths[steps]

    def pmf_of_cdf(self, cdf) -> torch.Tensor:
        """pmf over steps [T] of a distribution over t given by its CDF (a numpy function of t)."""
        mass = np.diff(cdf(self.edges_np))
        mass = np.clip(mass, 0.0, None)
        return torch.from_numpy(mass / mass.sum())

    def density_of_pmf(self, pmf: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The flow-time density q(t) = pmf_i / width_i of a pmf over steps, at t [n]."""
        cells = self.cell_of(t)
        return pmf.double()[cells] / self.widths[cells]
