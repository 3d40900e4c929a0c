"""Experiment logic shared by the Tune ablations (``ray_jobs.tune``) and the convergence benchmark
(``benchmarks.speedup``): search-space expansion, results tables, speed-up computation, plots, and
the config fingerprint that decides whether a trial's run may be resumed.

Pure library code: no Ray here (the front ends adapt it to Ray Tune or run trials in-process).
"""

from speed.experiments.convergence import (
    baseline_for,
    best_point,
    final_value,
    mean_curve,
    metric_curve,
    speedup,
    speedup_summary,
    steps_to_target,
)
from speed.experiments.fingerprint import (
    FingerprintMismatch,
    check_run_fingerprint,
    config_fingerprint,
    fingerprint_differences,
    resolved_config,
)
from speed.experiments.report import TrialRecord, best_row, build_rows, rows_to_csv, rows_to_markdown
from speed.experiments.space import (
    SEED_KEY,
    STRATEGY_KEY,
    Dimension,
    check_search_space,
    grid_points,
    num_trials,
    parse_search_space,
    trial_run_name,
    trial_slug,
    variant_label,
)

__all__ = [
    "Dimension",
    "FingerprintMismatch",
    "SEED_KEY",
    "STRATEGY_KEY",
    "TrialRecord",
    "baseline_for",
    "best_point",
    "best_row",
    "build_rows",
    "check_run_fingerprint",
    "check_search_space",
    "config_fingerprint",
    "final_value",
    "fingerprint_differences",
    "grid_points",
    "mean_curve",
    "metric_curve",
    "num_trials",
    "parse_search_space",
    "resolved_config",
    "rows_to_csv",
    "rows_to_markdown",
    "speedup",
    "speedup_summary",
    "steps_to_target",
    "trial_run_name",
    "trial_slug",
    "variant_label",
]
