"""Experiment plots as PNG bytes (matplotlib's Agg canvas; no global backend change, no display).

- ``plot_curves``: a metric against training step, one line per strategy/variant (the seed mean)
  with a band spanning the seeds (min to max);
- ``plot_timesteps``: each strategy's timestep sampling distribution (pmf) and loss weights;
- ``plot_bucket_errors``: final models' error per noise level, and its ratio to the baseline.
"""

from __future__ import annotations

import io
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

from speed.experiments.convergence import Curve, mean_curve


def _figure(ncols: int, width: float = 6.0, height: float = 4.2):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width * ncols, height), dpi=110)
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def plot_curves(
    panels: Sequence[Tuple[str, Mapping[str, Mapping[Any, Curve]]]],
    title: Optional[str] = None,
    targets: Optional[Mapping[str, float]] = None,
    xlabel: str = "training step",
) -> bytes:
    """One panel per (metric, {label: {seed: curve}}): seed mean with a min-max band per label.

    ``targets`` (metric -> value) draws a dashed horizontal line, e.g. the baseline's final metric.
    """
    fig, axes = _figure(max(1, len(panels)))
    for ax, (metric, groups) in zip(axes, panels):
        for label, runs in groups.items():
            curves = [c for c in runs.values() if c]
            if not curves:
                continue
            stats = mean_curve(curves)
            if not stats["steps"]:  # seeds logged at different steps: draw each
                for curve in curves:
                    ax.plot([s for s, _ in curve], [v for _, v in curve], label=label, alpha=0.7)
                continue
            line, = ax.plot(stats["steps"], stats["mean"], marker="o", markersize=3,
                            label=f"{label} (n={len(curves)})" if len(curves) > 1 else label)
            if len(curves) > 1:
                ax.fill_between(stats["steps"], stats["min"], stats["max"], color=line.get_color(), alpha=0.2)
        if targets and metric in targets and targets[metric] is not None:
            ax.axhline(targets[metric], color="grey", linestyle="--", linewidth=1, label="baseline final")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(metric)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _png(fig)


def strategy_arrays(diffusion) -> Dict[str, Any]:
    """pmf and weights (numpy [T]) of the strategy a DiffusionConfig describes.

    Adaptive strategies (loss_aware) show their initial state.
    """
    from speed.diffusion.factory import build_strategy_from_config

    strategy = build_strategy_from_config(diffusion)
    return {
        "pmf": strategy.pmf.detach().double().cpu().numpy(),
        "weights": strategy.weights.detach().double().cpu().numpy(),
    }


def plot_timesteps(strategies: Mapping[str, Mapping[str, Any]], title: Optional[str] = None) -> bytes:
    """Two panels: each strategy's sampling pmf over t, and its loss weight over t."""
    fig, (ax_pmf, ax_w) = _figure(2)
    for label, arrays in strategies.items():
        pmf, weights = arrays["pmf"], arrays["weights"]
        steps = range(len(pmf))
        ax_pmf.plot(steps, pmf, label=label, linewidth=1.2)
        ax_w.plot(steps, weights, label=label, linewidth=1.2)
    ax_pmf.set_title("timestep sampling distribution (pmf)")
    ax_pmf.set_xlabel("t")
    ax_pmf.set_ylabel("p(t)")
    ax_w.set_title("loss weight")
    ax_w.set_xlabel("t")
    ax_w.set_ylabel("w(t)")
    ax_w.set_yscale("log")
    for ax in (ax_pmf, ax_w):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return _png(fig)


def plot_bucket_errors(summary: Mapping[str, Mapping[str, Any]], baseline: Optional[str], centres: Sequence[float],
                       title: str) -> bytes:
    """Per cell: its error per timestep bucket (``mse_by_bucket``, log scale, band ``min/max_by_bucket``
    over seeds) and, beside it, ``ratio_to_<baseline>`` (benchmarks.timestep_mse's summary)."""
    fig, axes = _figure(2 if baseline else 1)
    for name, entry in summary.items():
        line, = axes[0].plot(centres, entry["mse_by_bucket"], marker="o", markersize=3,
                             label=f"{name} (n={entry['seeds']})")
        if entry["seeds"] > 1:
            axes[0].fill_between(centres, entry["min_by_bucket"], entry["max_by_bucket"], color=line.get_color(),
                                 alpha=0.2)
        if baseline:
            ratio = entry.get(f"ratio_to_{baseline}", [1.0] * len(centres))
            axes[1].plot(centres, ratio, marker="o", markersize=3, color=line.get_color(), label=name)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("unweighted eps MSE")
    axes[0].set_title("final EMA models' error per noise level")
    if baseline:
        axes[1].axhline(1.0, color="grey", linestyle="--", linewidth=1)
        axes[1].set_yscale("log")
        axes[1].set_ylabel(f"MSE / {baseline}'s MSE")
        axes[1].set_title("relative to the plain baseline (below 1: better)")
    for ax in axes:
        ax.set_xlabel("DDPM timestep t (bucket centre; flow models at the same log-SNR)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    return _png(fig)
