"""Results tables of an experiment: one row per trial, as Markdown and CSV (pure Python)."""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Sequence

from speed.experiments.convergence import baseline_for, best_point, final_value, metric_curve, steps_to_target
from speed.experiments.space import SEED_KEY, STRATEGY_KEY


@dataclass
class TrialRecord:
    """What one finished (or failed) trial left behind."""

    name: str  # the trial's run.name
    overrides: Dict[str, Any]  # its search-space values (dotted key -> value)
    strategy: str  # the resolved diffusion.timesteps.name
    seed: int  # the resolved run.seed
    history: List[Dict[str, Any]] = field(default_factory=list)  # logged metric records (with "step")
    status: str = "done"  # done | error | stopped | incomplete
    wall_s: Optional[float] = None
    error: Optional[str] = None
    run_uri: Optional[str] = None

    @property
    def last_step(self) -> Optional[int]:
        steps = [int(r["step"]) for r in self.history if "step" in r]
        return max(steps) if steps else None


def _match_keys(records: Sequence[TrialRecord]) -> List[str]:
    """Search keys a baseline must share with a trial: all but the timestep and seed keys."""
    keys: List[str] = []
    for r in records:
        for k in r.overrides:
            if k not in keys and k != SEED_KEY and not k.startswith("diffusion.timesteps."):
                keys.append(k)
    return keys


def build_rows(
    records: Sequence[TrialRecord],
    metric: str,
    mode: str = "min",
    baseline: str = "uniform",
) -> List[Dict[str, Any]]:
    """One row per trial: its config, final and best metric, steps to reach its baseline's final
    metric (baseline = the ``baseline``-strategy trial(s) at the same seed), and wall time."""
    keys = []
    for r in records:
        for k in r.overrides:
            if k not in keys:
                keys.append(k)
    match = _match_keys(records)
    views = []
    for r in records:
        curve = metric_curve(r.history, metric)
        views.append({"record": r, "curve": curve, "strategy": r.strategy, "seed": r.seed,
                      **{k: r.overrides.get(k) for k in match}})
    rows = []
    for view in views:
        r: TrialRecord = view["record"]
        curve = view["curve"]
        best = best_point(curve, mode)
        bases = [b for b in baseline_for(view, views, baseline=baseline, match_keys=match) if b["curve"]]
        target = base_steps = steps = ratio = None
        if bases:
            target = statistics.fmean(final_value(b["curve"]) for b in bases)
            reached = [s for s in (steps_to_target(b["curve"], target, mode) for b in bases) if s is not None]
            base_steps = round(statistics.fmean(reached)) if reached else None
            steps = steps_to_target(curve, target, mode)
            ratio = base_steps / steps if base_steps and steps else None
        row = {
            "trial": r.name,
            **{k: r.overrides.get(k) for k in keys},
            "status": r.status,
            "steps": r.last_step,
            f"final_{metric}": final_value(curve),
            f"best_{metric}": best[1] if best else None,
            "best_step": best[0] if best else None,
            "baseline_target": target,
            "baseline_steps": base_steps,
            "steps_to_baseline": steps,
            "speedup_vs_baseline": ratio,
        }
        if metric != "loss":
            row["final_loss"] = final_value(metric_curve(r.history, "loss"))
        row["wall_time_s"] = r.wall_s
        rows.append(row)
    return rows


def best_row(rows: Sequence[Mapping[str, Any]], metric: str, mode: str = "min") -> Optional[Dict[str, Any]]:
    """The row with the best final metric (ties: the first)."""
    key = f"final_{metric}"
    scored = [r for r in rows if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
    if not scored:
        return None
    pick = min if mode == "min" else max
    return dict(pick(scored, key=lambda r: r[key]))


def _columns(rows: Sequence[Mapping[str, Any]]) -> List[str]:
    cols: List[str] = []
    for row in rows:
        for k in row:
            if k not in cols:
                cols.append(k)
    return cols


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_cell(v) for v in value) + "]"
    return str(value)


def rows_to_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    cols = _columns(rows)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in cols})
    return buf.getvalue()


def rows_to_markdown(rows: Sequence[Mapping[str, Any]], title: Optional[str] = None, notes: Sequence[str] = ()) -> str:
    cols = _columns(rows)
    lines = []
    if title:
        lines += [f"# {title}", ""]
    for note in notes:
        lines.append(note)
    if notes:
        lines.append("")
    if not rows:
        return "\n".join(lines + ["(no trials)", ""])
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("| " + " | ".join("---" for _ in cols) + " |")
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k)).replace("|", "\\|") for k in cols) + " |")
    return "\n".join(lines) + "\n"


def strategy_of(overrides: Mapping[str, Any], default: str) -> str:
    return str(overrides.get(STRATEGY_KEY, default))
