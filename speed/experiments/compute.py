"""Compute to quality: how much less training compute a cell needs than the plain baseline to
reach the same quality, in steps, training FLOPs and CPU-seconds, at several quality targets.

Definitions (the benchmark report repeats them):
- A run's *evaluation points* are its log records holding the metric, each with its step, the
  training FLOPs spent so far (step x global batch x ``train_flops_per_image``) and the CPU-seconds
  of the training process so far (``train_cpu_s``: fetch + optimizer steps, evaluation excluded).
- The *targets* of a seed are the baseline run's metric at 25%, 50% and 100% of its step budget
  (the last evaluation at or before that step), so a late burst does not decide the figure alone.
- The *cost* of a run at a target is its cost at the first evaluation reaching it (<= for a
  metric to minimise). Speed-up = baseline cost / cell cost, seed by seed against the baseline run
  of the same seed; summarised over seeds as mean, min and max (mean and min are null when some
  seed never reaches the target, max is over the seeds that did; null when none did).
"""

from __future__ import annotations

import math
from typing import Any, Dict, List, Mapping, Optional, Sequence

TARGETS: Dict[str, float] = {"25": 0.25, "50": 0.5, "100": 1.0}
UNITS = ("steps", "flops", "cpu_s")


def evaluation_points(history: Sequence[Mapping[str, Any]], metric: str) -> List[Dict[str, float]]:
    """[{step, value, steps, flops, cpu_s}] of the records holding ``metric``, by step."""
    records = sorted((r for r in history if "step" in r), key=lambda r: r["step"])
    flops_per_image = next((r["train_flops_per_image"] for r in records if r.get("train_flops_per_image")), None)
    batch = next((r["global_batch_size"] for r in records if r.get("global_batch_size")), None)
    points, cpu_so_far = [], 0.0
    for record in records:
        if "train_cpu_s" in record:
            cpu_so_far = float(record["train_cpu_s"])
        value = record.get(metric)
        if value is None or not math.isfinite(float(value)):
            continue
        step = int(record["step"])
        flops = float(step * batch * flops_per_image) if flops_per_image and batch else float("nan")
        points.append({"step": step, "value": float(value), "steps": float(step), "flops": flops,
                       "cpu_s": cpu_so_far if cpu_so_far > 0 else float("nan")})
    return points


def baseline_targets(points: Sequence[Mapping[str, float]], budget: int) -> Dict[str, Optional[float]]:
    """The baseline's metric at each target share of its budget (None before its first evaluation)."""
    out: Dict[str, Optional[float]] = {}
    for key, share in TARGETS.items():
        before = [p for p in points if p["step"] <= share * budget + 1e-9]
        out[key] = before[-1]["value"] if before else None
    return out


def first_reach(points: Sequence[Mapping[str, float]], target: float, mode: str) -> Optional[Mapping[str, float]]:
    for point in points:
        if (point["value"] <= target) if mode == "min" else (point["value"] >= target):
            return point
    return None


def _summary(ratios: Sequence[Optional[float]]) -> Optional[Dict[str, Any]]:
    reached = [r for r in ratios if r is not None and math.isfinite(r)]
    if not reached:
        return None
    complete = len(reached) == len(ratios)
    return {
        "mean": sum(reached) / len(reached) if complete else None,
        "min": min(reached) if complete else None,
        "max": max(reached),
        "seeds_reached": len(reached),
        "seeds": len(ratios),
    }


def cell_speedup(
    cell: Mapping[int, Sequence[Mapping[str, Any]]],
    baseline: Mapping[int, Sequence[Mapping[str, Any]]],
    metric: str,
    mode: str,
    budget: int,
) -> Dict[str, Dict[str, Optional[Dict[str, Any]]]]:
    """{unit: {target: summary over seeds or None}} of a cell's histories against the baseline's,
    both keyed by seed (the cell's seeds must all have a baseline run)."""
    missing = sorted(set(cell) - set(baseline))
    if missing:
        raise ValueError(f"no baseline run for seed(s) {missing}")
    ratios: Dict[str, Dict[str, List[Optional[float]]]] = {u: {k: [] for k in TARGETS} for u in UNITS}
    for seed, history in sorted(cell.items()):
        base_points = evaluation_points(baseline[seed], metric)
        points = evaluation_points(history, metric)
        for key, target in baseline_targets(base_points, budget).items():
            base = first_reach(base_points, target, mode) if target is not None else None
            reached = first_reach(points, target, mode) if target is not None else None
            for unit in UNITS:
                if base is None or reached is None or not reached[unit] > 0:
                    ratios[unit][key].append(None)
                else:
                    ratios[unit][key].append(base[unit] / reached[unit])
    return {unit: {key: _summary(values) for key, values in by_key.items()} for unit, by_key in ratios.items()}


def baseline_convergence(points: Sequence[Mapping[str, float]], budget: int, mode: str = "min") -> Dict[str, Any]:
    """Whether the baseline's curve clearly fell and then flattened within its budget.

    fell: the final value improved on the first evaluation by at least 30%; flattened: the last
    quarter of the budget moved it by at most 15% of its final value. Targets on a curve that did
    neither measure noise, and the report says so.
    """
    if len(points) < 3:
        return {"converged": False, "fell": False, "flattened": False, "reason": "fewer than 3 evaluations"}
    first, last = points[0]["value"], points[-1]["value"]
    late = [p for p in points if p["step"] <= 0.75 * budget + 1e-9]
    three_quarters = late[-1]["value"] if late else first
    if mode == "min":
        fell = last <= 0.7 * first
    else:
        fell = last >= first + 0.3 * abs(first)
    flattened = abs(three_quarters - last) <= 0.15 * max(abs(last), 1e-12)
    return {"converged": bool(fell and flattened), "fell": bool(fell), "flattened": bool(flattened),
            "first": first, "at_75": three_quarters, "final": last}
