"""The files an experiment leaves in its folder (both front ends write the same ones):

- ``results.md`` / ``results.csv``: one row per trial (``report.build_rows``);
- ``curves.png``: the metric (and the loss) against step per variant, seed mean with a min-max band;
- ``timesteps.png``: each strategy's sampling pmf and loss weights;
- ``cells.json`` (and a table in ``results.md``): for trials that are cells of the compute-to-quality
  grid (search-space key ``cell``), the speed-ups over ddpm-uniform-none in steps, FLOPs and
  CPU-seconds, the same format as ``benchmarks.speedup``'s ``speedup.json`` ``cells``.
"""

from __future__ import annotations

import json
from typing import Any, Dict, List, Mapping, Optional, Sequence

from speed import storage
from speed.config.schema import Config
from speed.experiments.convergence import metric_curve
from speed.experiments.plots import plot_curves, plot_timesteps, strategy_arrays
from speed.experiments.report import TrialRecord, best_row, build_rows, rows_to_csv, rows_to_markdown
from speed.experiments.space import expand_cell, variant_label


def grouped_curves(records: Sequence[TrialRecord], metric: str) -> Dict[str, Dict[Any, list]]:
    """variant label (overrides minus the seed) -> seed -> curve of ``metric``."""
    groups: Dict[str, Dict[Any, list]] = {}
    for r in records:
        label = variant_label(r.overrides) if r.overrides else r.strategy
        runs = groups.setdefault(label, {})
        runs[r.seed if r.seed not in runs else r.name] = metric_curve(r.history, metric)
    return groups


def timestep_variants(records: Sequence[TrialRecord], base: Config) -> Dict[str, Dict[str, Any]]:
    """label -> pmf/weights arrays for each distinct ``diffusion.*`` setting among the trials."""
    from speed.config.load import apply_overrides

    out: Dict[str, Dict[str, Any]] = {}
    for r in records:
        overrides = expand_cell(r.overrides, base.sampling.steps)  # a cell sets several keys together
        diff = {k: v for k, v in overrides.items() if k.startswith("diffusion.")}
        label = variant_label(diff) if diff else base.diffusion.timesteps.name
        if label in out:
            continue
        # The whole trial's overrides: a flow objective is only valid with its model and sampler keys.
        cfg = apply_overrides(base, {k: v for k, v in overrides.items() if k != "run.seed"}) if diff else base
        out[label] = strategy_arrays(cfg.diffusion)
    return out


def render(
    records: Sequence[TrialRecord],
    base: Config,
    metric: str,
    mode: str = "min",
    title: str = "experiment",
    notes: Sequence[str] = (),
) -> Dict[str, Any]:
    """The experiment's rows, best row and files ({name: bytes}); nothing is written."""
    rows = build_rows(records, metric, mode)
    panels = [(metric, grouped_curves(records, metric))]
    if metric != "loss":
        panels.append(("loss", grouped_curves(records, "loss")))
    cells = cells_of(records, metric, mode, base.train.steps)
    if cells is not None:
        from speed.experiments.compute import DEFINITIONS, cells_markdown

        notes = [*notes, "Compute to quality (cells against ddpm-uniform-none; cells.json holds the same):",
                 "\n".join(cells_markdown(cells, metric)), f"Definitions: {DEFINITIONS}."]
    files = {
        "results.md": rows_to_markdown(rows, title=title, notes=notes).encode(),
        "results.csv": rows_to_csv(rows).encode(),
        "curves.png": plot_curves(panels, title=title),
        "timesteps.png": plot_timesteps(timestep_variants(records, base), title=title),
    }
    if cells is not None:
        files["cells.json"] = (json.dumps({"metric": metric, "cells": cells}, indent=1, default=str) + "\n").encode()
    return {"rows": rows, "best": best_row(rows, metric, mode), "files": files}


def cells_of(records: Sequence[TrialRecord], metric: str, mode: str, budget: int) -> Optional[Dict[str, Any]]:
    """The compute-to-quality cells of an experiment whose trials are grid cells (with the baseline
    cell among them), else None."""
    from speed.experiments.cells import BASELINE_CELL
    from speed.experiments.compute import cells_report
    from speed.experiments.space import CELL_KEY

    if not records or not all(CELL_KEY in r.overrides for r in records):
        return None
    histories: Dict[str, Dict[int, list]] = {}
    for r in records:
        histories.setdefault(str(r.overrides[CELL_KEY]), {})[r.seed] = r.history
    if BASELINE_CELL not in histories:
        return None
    ordered = {BASELINE_CELL: histories.pop(BASELINE_CELL), **histories}
    return cells_report(ordered, metric, mode, budget, BASELINE_CELL)


def write_files(out_uri: str, files: Mapping[str, bytes], storage_cfg=None) -> List[str]:
    """Write ``files`` under ``out_uri`` (local folder or s3://); returns their URIs."""
    uris = []
    for name, data in files.items():
        uri = storage.join(out_uri, name)
        storage.write_bytes(uri, data, storage_cfg)
        uris.append(uri)
    return uris
