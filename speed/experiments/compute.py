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

import numpy as np

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
    quarter of the budget moved it by at most 15% of its final value (the value at 75% interpolated
    between evaluations). Targets on a curve that did
    neither measure noise, and the report says so.
    """
    if len(points) < 3:
        return {"converged": False, "fell": False, "flattened": False, "reason": "fewer than 3 evaluations"}
    first, last = points[0]["value"], points[-1]["value"]
    # The evaluation grid need not hit 75% of the budget: read the curve there, linear between evaluations.
    three_quarters = float(np.interp(0.75 * budget, [p["step"] for p in points], [p["value"] for p in points]))
    if mode == "min":
        fell = last <= 0.7 * first
    else:
        fell = last >= first + 0.3 * abs(first)
    flattened = abs(three_quarters - last) <= 0.15 * max(abs(last), 1e-12)
    return {"converged": bool(fell and flattened), "fell": bool(fell), "flattened": bool(flattened),
            "first": first, "at_75": three_quarters, "final": last}


# --- reports shared by benchmarks.speedup and ray_jobs.tune ---------------------------------------


def _spread(values: Sequence[Optional[float]]) -> Optional[Dict[str, float]]:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"mean": sum(values) / len(values), "min": min(values), "max": max(values)}


def cells_report(histories: Mapping[str, Mapping[int, Sequence[Mapping[str, Any]]]], metric: str, mode: str,
                 budget: int, baseline_cell: str) -> Dict[str, Dict[str, Any]]:
    """The ``cells`` object of speedup.json: {cell name: {objective, strategy, accelerator, speedup, final_metric,
    train_flops_per_image, seeds}} from {cell name: {seed: history}} (the baseline cell among them)."""
    from speed.experiments.cells import Cell

    if baseline_cell not in histories:
        raise ValueError(f"no runs of the baseline cell {baseline_cell}")
    baseline = histories[baseline_cell]
    out: Dict[str, Dict[str, Any]] = {}
    for name, runs in histories.items():
        cell = Cell.parse(name)
        finals = []
        for history in runs.values():
            points = evaluation_points(history, metric)
            finals.append(points[-1]["value"] if points else None)
        flops = next((r.get("train_flops_per_image") for h in runs.values() for r in h
                      if r.get("train_flops_per_image")), None)
        out[name] = {
            "objective": cell.objective, "strategy": cell.strategy, "accelerator": cell.accelerator,
            "speedup": cell_speedup(runs, baseline, metric, mode, budget),
            "final_metric": _spread(finals),
            "train_flops_per_image": flops,
            "seeds": sorted(runs),
        }
    return out


def fmt_number(value: Any, none: str = "never") -> str:
    """A table cell: 3 significant digits, ``none`` for a missing value."""
    if value is None:
        return none
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _fmt_speedup(entry: Optional[Mapping[str, Any]]) -> str:
    if entry is None:
        return "never"
    reached = "" if entry["seeds_reached"] == entry["seeds"] else f" ({entry['seeds_reached']}/{entry['seeds']} seeds)"
    return f"{fmt_number(entry['mean'], '?')} [{fmt_number(entry['min'], '?')}, {fmt_number(entry['max'])}]{reached}"


def cells_markdown(cells: Mapping[str, Mapping[str, Any]], metric: str) -> List[str]:
    """The compute-to-quality table: one row per cell, speed-ups in FLOPs, steps and CPU-seconds."""
    order = ("flops", "steps", "cpu_s")
    head = " | ".join(f"{unit} @{key}%" for unit in order for key in TARGETS)
    lines = [
        f"| cell | final {metric} (mean [min, max]) | train GFLOPs/image | {head} |",
        "| --- | --- | --- | " + " | ".join("---" for _ in range(len(order) * len(TARGETS))) + " |",
    ]
    for name, cell in cells.items():
        final = cell["final_metric"]
        final_text = f"{fmt_number(final['mean'])} [{fmt_number(final['min'])}, {fmt_number(final['max'])}]" if final else "n/a"
        flops = cell["train_flops_per_image"]
        values = " | ".join(_fmt_speedup(cell["speedup"][unit][key]) for unit in order for key in TARGETS)
        lines.append(f"| {name} | {final_text} | {fmt_number(flops / 1e9 if flops else None, 'n/a')} | {values} |")
    return lines


DEFINITIONS = (
    "cells are measured against the plain DiT recipe (ddpm-uniform-none) of the same seed. Targets: the "
    "baseline's metric at 25%, 50% and 100% of its step budget. Cost of a run at a target: at its first "
    "evaluation reaching it, in training steps, training FLOPs (steps x global batch x train_flops_per_image, "
    "counted by torch.utils.flop_counter) and CPU-seconds of the training process (fetch + optimizer steps, "
    "evaluation excluded). Speed-up = baseline cost / cell cost; mean/min/max over seeds (mean and min null when "
    "a seed never reaches the target; the whole entry null when none does)"
)
