"""Metric curves, steps-to-target and convergence speed-up (pure Python, no Ray, no torch).

A curve is a list of ``(step, value)`` pairs in increasing step order, e.g. fid_digits of the EMA
model at each evaluation step. ``mode`` says which way is better: ``min`` (FID, loss) or ``max``
(class accuracy).

Speed-up against a baseline (SpeeD's "x faster"): the baseline's *final* value is the target;
``baseline_steps`` is the first step at which the baseline itself reaches it (its last step, or
earlier when the curve is not monotone); ``steps`` is the first step at which the strategy reaches
it; ``speedup = baseline_steps / steps``. A strategy that never reaches the target within the
budget has ``steps = None`` and ``speedup = None``.

Over seeds (the same seeds for every strategy), each seed is compared with the baseline run of the
same seed (``per_seed``), and the summary ``speedup`` compares the seed-mean curves; its spread
``speedup_min``/``speedup_max`` is the range of the per-seed speed-ups. When some seed never
reaches its target, the true minimum is unknown (below ``baseline_steps / budget``), so
``speedup_min`` is None; ``speedup_max`` is None only when no seed reaches it.

Steps are evaluation steps, so speed-ups finer than the evaluation grid cannot show (with
evaluations every 50 of 300 steps, anything below 300/250 = 1.2 reads as 1.0).
``speedup_interpolated`` (and its ``_min``/``_max``) uses the crossing points interpolated linearly
between evaluations instead.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

Curve = List[Tuple[int, float]]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def metric_curve(history: Iterable[Mapping[str, Any]], metric: str) -> Curve:
    """``(step, value)`` of every record carrying a finite ``metric``, by step (last record wins)."""
    by_step: Dict[int, float] = {}
    for record in history:
        value = record.get(metric)
        if "step" in record and _finite(value):
            by_step[int(record["step"])] = float(value)
    return sorted(by_step.items())


def better(value: float, target: float, mode: str) -> bool:
    """True when ``value`` reaches ``target`` (<= for min, >= for max)."""
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    return value <= target if mode == "min" else value >= target


def steps_to_target(curve: Curve, target: Optional[float], mode: str = "min", interpolate: bool = False):
    """First step whose value reaches ``target``; None if it never does (or no target).

    ``interpolate``: the crossing point (a float) on the straight line between that evaluation and
    the one before it, which resolves speed-ups finer than the evaluation interval.
    """
    if target is None or not curve:
        return None
    previous = None
    for step, value in curve:
        if better(value, target, mode):
            if not interpolate:
                return int(step)
            if previous is None or previous[1] == value:
                return float(step)
            prev_step, prev_value = previous
            return float(prev_step + (step - prev_step) * (prev_value - target) / (prev_value - value))
        previous = (step, value)
    return None


def final_value(curve: Curve) -> Optional[float]:
    return float(curve[-1][1]) if curve else None


def best_point(curve: Curve, mode: str = "min") -> Optional[Tuple[int, float]]:
    """(step, value) of the best value (the earliest one on ties)."""
    if not curve:
        return None
    pick = min if mode == "min" else max
    best = pick(value for _, value in curve)
    for step, value in curve:
        if value == best:
            return int(step), float(value)
    return None  # unreachable


def speedup(baseline: Curve, candidate: Curve, mode: str = "min", target: Optional[float] = None) -> Dict[str, Any]:
    """Speed-up of ``candidate`` over ``baseline`` at the baseline's final value (or ``target``)."""
    target = final_value(baseline) if target is None else target
    base_steps = steps_to_target(baseline, target, mode)
    steps = steps_to_target(candidate, target, mode)
    ratio = base_steps / steps if base_steps is not None and steps else None
    base_fine = steps_to_target(baseline, target, mode, interpolate=True)
    fine = steps_to_target(candidate, target, mode, interpolate=True)
    return {
        "target": target,
        "baseline_steps": base_steps,
        "steps": steps,
        "speedup": ratio,
        "speedup_interpolated": base_fine / fine if base_fine is not None and fine else None,
    }


def mean_curve(curves: Sequence[Curve]) -> Dict[str, List[float]]:
    """Seed statistics at the steps every curve has: ``steps``, ``mean``, ``min``, ``max``, ``std``."""
    curves = [c for c in curves if c]
    if not curves:
        return {"steps": [], "mean": [], "min": [], "max": [], "std": []}
    common = set(step for step, _ in curves[0])
    for c in curves[1:]:
        common &= set(step for step, _ in c)
    steps = sorted(common)
    lookup = [dict(c) for c in curves]
    out: Dict[str, List[float]] = {"steps": steps, "mean": [], "min": [], "max": [], "std": []}
    for step in steps:
        values = [d[step] for d in lookup]
        out["mean"].append(statistics.fmean(values))
        out["min"].append(min(values))
        out["max"].append(max(values))
        out["std"].append(statistics.pstdev(values) if len(values) > 1 else 0.0)
    return out


def as_curve(stats: Mapping[str, Sequence[float]], key: str = "mean") -> Curve:
    return list(zip([int(s) for s in stats["steps"]], [float(v) for v in stats[key]]))


def speedup_summary(
    curves: Mapping[str, Mapping[Any, Curve]],
    baseline: str = "uniform",
    mode: str = "min",
) -> Dict[str, Dict[str, Any]]:
    """Per strategy: speed-up over ``baseline`` with its spread over seeds, and the curves.

    ``curves`` maps strategy -> seed -> curve. Every strategy is compared seed by seed with the
    baseline run of the same seed; seeds the baseline lacks are ignored for ``per_seed``.
    Raises ValueError when the baseline strategy is missing.
    """
    if baseline not in curves or not any(curves[baseline].values()):
        raise ValueError(f"the baseline strategy '{baseline}' has no curves; it is needed for speed-ups")
    base_runs = curves[baseline]
    base_stats = mean_curve(list(base_runs.values()))
    base_mean = as_curve(base_stats)
    summary: Dict[str, Dict[str, Any]] = {}
    for name, runs in curves.items():
        stats = mean_curve(list(runs.values()))
        overall = speedup(base_mean, as_curve(stats), mode)
        per_seed = []
        for seed, curve in runs.items():
            if seed not in base_runs or not base_runs[seed] or not curve:
                continue
            entry = speedup(base_runs[seed], curve, mode)
            per_seed.append({"seed": seed, "final_metric": final_value(curve), **entry})
        values = [p["speedup"] for p in per_seed]
        reached = [v for v in values if v is not None]
        finals = [final_value(c) for c in runs.values() if c]
        fine = [p["speedup_interpolated"] for p in per_seed]
        fine_reached = [v for v in fine if v is not None]
        summary[name] = {
            "speedup": overall["speedup"],
            "speedup_min": min(reached) if reached and len(reached) == len(values) else None,
            "speedup_max": max(reached) if reached else None,
            "speedup_interpolated": overall["speedup_interpolated"],
            "speedup_interpolated_min": min(fine_reached) if fine_reached and len(fine_reached) == len(fine) else None,
            "speedup_interpolated_max": max(fine_reached) if fine_reached else None,
            "seeds_reached": len(reached),
            "seeds": len(values),
            "target": overall["target"],
            "baseline_steps": overall["baseline_steps"],
            "steps_to_target": overall["steps"],
            "final_metric": statistics.fmean(finals) if finals else None,
            "final_metric_min": min(finals) if finals else None,
            "final_metric_max": max(finals) if finals else None,
            "per_seed": per_seed,
            "curve": stats,
            "curves_per_seed": {str(seed): [[s, v] for s, v in curve] for seed, curve in runs.items()},
        }
    return summary


# --- baselines for a table of trials ---------------------------------------------------------------


def baseline_for(
    trial: Mapping[str, Any],
    trials: Sequence[Mapping[str, Any]],
    strategy_key: str = "strategy",
    seed_key: str = "seed",
    baseline: str = "uniform",
    match_keys: Sequence[str] = (),
) -> List[Mapping[str, Any]]:
    """The baseline trial(s) of ``trial``: strategy == ``baseline`` at the same seed.

    Trials are dicts with at least ``strategy_key`` and ``seed_key``. Among same-seed baselines,
    those that also agree on every key of ``match_keys`` (e.g. the learning rate) are preferred;
    when none agree, all same-seed baselines are returned.
    """
    same_seed = [t for t in trials if t.get(strategy_key) == baseline and t.get(seed_key) == trial.get(seed_key)]
    matching = [t for t in same_seed if all(t.get(k) == trial.get(k) for k in match_keys)]
    return matching or same_seed
