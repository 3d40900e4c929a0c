"""Compute to quality: how much less training reaches the plain DiT recipe's quality.

    python -m benchmarks.speedup [--quick] [--out DIR] [--cells a,b | --objectives ... --strategies ...
                                 --accelerators ...] [--seeds 0,1,2] [--config FILE] [key=value ...]

Trains a grid of cells ``<objective>-<strategy>-<accelerator>`` (``speed.experiments.cells``:
objective ddpm | flow, any registry strategy or ``a+b`` = sampling a with weighting b, accelerator
none | routing | modern | routing+modern) with the same seeds for every cell, evaluating the EMA
model every ``train.eval_every`` steps with the dataset's own evaluator (``fid_<dataset>`` and class
accuracy from a small classifier trained on the dataset being trained, against its held-out split:
``speed.evaluate.dataset_fid`` through the training loop's periodic evaluation). Each cell is
measured against the plain DiT recipe (``ddpm-uniform-none``, always added) of the same seed, in
training steps, training FLOPs and CPU-seconds of the training process, at the baseline's metric
after 25%, 50% and 100% of its budget (``speed.experiments.compute``, the code the Tune grid uses),
with the seed spread; the report says when the baseline's curve did not fall and flatten.

How the trials run: in-process, one after the other, with ``speed.train.loop.train`` (no Ray):
on a small machine that is simpler and faster than a Tune experiment (no actor start-up per
trial), and the numbers are the same code path (Trainer, EMA, periodic evaluation). The same grid
through Ray Tune is ``python -m ray_jobs.tune -c configs/ablations/digits_grid.yaml``.
Each run lives in ``<run.output_uri>/speedup[-quick]/<trial>`` with its checkpoints and the
fingerprint of its resolved config (``speed.experiments.fingerprint``: data and a digest of the
images loaded, model, strategy, budget, evaluation, seed), so an interrupted benchmark rerun with
the same arguments resumes its runs and skips finished ones; a run made with another config (say,
on another dataset) is never reused: the benchmark stops before training and names the keys that
differ (point ``run.output_uri`` at a fresh folder).

Data: the embedded digits by default (``configs/digits/speed.yaml``); ``--config
configs/patches/speed.yaml`` trains on the built-in crops of natural photographs
(``speed.data.patches``), and ``data.format=imagefolder data.uri=PATH`` (plus
``data.resolution``/``data.channels``) on any local or s3:// imagefolder, loaded into memory
(small datasets; larger ones belong on the Tune path, which streams with Ray Data). Each dataset
gets its own evaluator and metric name (``fid_digits``, ``fid_patches``, ``fid_<folder name>``).

Budget (``BUDGET``): the recipe's model and batch for 2000 steps, evaluated every 200 steps on 250
samples with DDIM-50. The full preset is 2 objectives x 6 strategies x 4 accelerators x 3 seeds
(days on 2 cores: pick cells with ``--cells``); ``--quick`` runs the baseline and the best cell
found, 2 seeds, the same budget (27 minutes of runs on the 2-core machine with ``--threads 1``;
one thread per run was no slower than two in these runs). Benchmarks are not tests and CI does not run them.

Writes ``<out>/speedup.json`` (``cells``: per cell its speed-ups ``{steps|flops|cpu_s: {25|50|100:
{mean, min, max}}}``, final metric and FLOPs per image; ``strategies``: the DDPM-without-accelerator
cells as steps-to-target entries), ``speedup.md`` (tables), ``speedup.png`` / ``speedup_flops.png``
(quality against steps and FLOPs with seed bands) and ``speedup_timesteps.png`` (each strategy's
density and weights); default out: ``benchmarks/results``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import warnings  # noqa: E402

# Single-process checkpoints are intended here; torch warns about every save otherwise.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

import torch  # noqa: E402

from speed import storage  # noqa: E402
from speed.config import Config, ConfigError, load_config  # noqa: E402
from speed.config.load import apply_overrides  # noqa: E402
from speed.experiments import (  # noqa: E402
    TrialRecord,
    build_rows,
    metric_curve,
    rows_to_markdown,
    speedup_summary,
)
from speed.experiments.cells import ACCELERATORS, BASELINE_CELL, Cell, grid  # noqa: E402
from speed.experiments.compute import DEFINITIONS as COMPUTE_DEFINITIONS  # noqa: E402
from speed.experiments.compute import (  # noqa: E402
    baseline_convergence,
    cells_markdown,
    cells_report,
    evaluation_points,
)
from speed.experiments.compute import fmt_number as _fmt  # noqa: E402
from speed.experiments.fingerprint import check_run_fingerprint  # noqa: E402
from speed.experiments.plots import plot_curves, plot_timesteps, strategy_arrays  # noqa: E402

BASE_CONFIG = "configs/digits/speed.yaml"
RUN_FILE = "speedup_run.json"  # a run's accumulated wall time (training + evaluation), over resumes
BASELINE = "uniform"
PRIMARY_MODE = "min"  # the primary metric is the dataset's FID, fid_<dataset> (primary_metric)
SECONDARY = ("class_accuracy", "max")
FRESH_FOLDER = "point run.output_uri at a fresh folder (the runs live under <run.output_uri>/speedup[-quick])"
# The budget: 2000 steps, where the plain DiT recipe's curve has fallen and flattened on the
# digits (1000 steps left it on the steepest part), evaluated every 200 steps.
BUDGET = ["train.steps=2000", "train.eval_every=200", "train.log_every=50", "train.checkpoint_every=200"]
# The full grid: objective x strategy x accelerator, 3 seeds (48 cells x 3 seeds; days on 2 cores).
FULL = {
    "objectives": ["ddpm", "flow"],
    "strategies": ["uniform", "speed", "laplace", "logit_normal", "progress", "speed+learned"],
    "accelerators": ["none", "routing", "modern", "routing+modern"],
    "seeds": [0, 1, 2],
    "overrides": BUDGET,
}
# The quick check of the headline: the plain baseline and the best combination the grid found (a
# flow cell), 2 seeds, at the full budget, so its runs are the full grid's runs of these cells.
QUICK = {
    "cells": ["ddpm-uniform-none", "flow-laplace-none"],
    "seeds": [0, 1],
    "overrides": BUDGET,
}


def log(message: str) -> None:
    print(f"[speedup {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- data ----------------------------------------------------------------------------------------


def primary_metric(cfg: Config) -> str:
    """The FID the training loop logs for this dataset: ``fid_<dataset>``."""
    from speed.evaluate.dataset_fid import fid_metric_name

    return fid_metric_name(cfg.data)


def data_digest(data: Tuple[torch.Tensor, torch.Tensor]) -> str:
    """SHA-256 of the images and labels as loaded (part of each run's fingerprint)."""
    import hashlib

    images, labels = data
    digest = hashlib.sha256()
    digest.update(images.detach().float().contiguous().numpy().tobytes())
    digest.update(labels.detach().long().contiguous().numpy().tobytes())
    return digest.hexdigest()


def load_dataset(cfg: Config) -> Tuple[torch.Tensor, torch.Tensor]:
    """(images float [N, C, R, R] in [-1, 1], labels [N]) held in memory."""
    from speed.data.builtin import is_builtin, load_builtin

    if is_builtin(cfg.data.format):
        return load_builtin(cfg.data.format, cfg.data.resolution, cfg.data.channels)
    if cfg.data.format != "imagefolder":
        raise ConfigError(
            f"data.format={cfg.data.format}: the in-process benchmark reads digits, patches or an imagefolder; run other "
            "formats through Ray Tune (python -m ray_jobs.tune -c configs/ablations/digits_strategies.yaml ...)"
        )
    import numpy as np

    from speed.data.catalog import scan_imagefolder
    from speed.data.transforms import load_and_crop, to_model_tensor

    catalog = scan_imagefolder(cfg.data, cfg.storage, cfg.model.num_classes)
    arrays, labels, bad = [], [], 0
    for relative in catalog.files:
        try:
            blob = storage.read_bytes(catalog.file_uri(relative), cfg.storage)
            arrays.append(load_and_crop(blob, cfg.data.resolution, cfg.data.channels))
        except Exception as exc:  # corrupt or non-image file
            if cfg.data.on_error == "raise":
                raise ValueError(f"data.uri: cannot read '{catalog.file_uri(relative)}': {exc}") from exc
            bad += 1
            continue
        labels.append(catalog.class_to_label[relative.split("/", 1)[0]])
    if bad:
        log(f"skipped {bad} unreadable file(s) under {cfg.data.uri}")
    if not arrays:
        raise ValueError(f"data.uri: no readable images under '{cfg.data.uri}'")
    return to_model_tensor(np.stack(arrays)), torch.tensor(labels, dtype=torch.long)


# --- one trial -----------------------------------------------------------------------------------


def check_trial(cfg: Config, digest: str, write: bool = True) -> None:
    """Stop (FingerprintMismatch, naming the differing keys) when the trial's run folder holds the
    results of another config; otherwise record this config's fingerprint there (``write``)."""
    from speed.train.run_layout import RunLayout

    layout = RunLayout.for_run(cfg.run, cfg.storage)
    has_results = bool(layout.checkpoints() or layout.metrics_parts() or storage.exists(layout.path(RUN_FILE)))
    check_run_fingerprint(layout.root, cfg, has_results=has_results, extra={"data.content_sha256": digest},
                          storage_cfg=cfg.storage, fix=FRESH_FOLDER, write=write)


def run_trial(cfg: Config, data: Tuple[torch.Tensor, torch.Tensor], progress: bool = False,
              digest: Optional[str] = None) -> Dict[str, Any]:
    """Train one config in-process (resuming its run if an earlier benchmark was interrupted and
    its fingerprint matches); returns {"history": [...], "wall_s": seconds of this call, "resumed_from": step}."""
    from speed.models.export import WEIGHTS_NAME
    from speed.train import loop
    from speed.train.checkpoint import latest_complete_checkpoint
    from speed.train.distributed import DistEnv
    from speed.train.run_layout import RunLayout
    from speed.train.sources import IndexedSource, LocalReporter

    check_trial(cfg, digest or data_digest(data))
    layout = RunLayout.for_run(cfg.run, cfg.storage)
    wall_uri = layout.path(RUN_FILE)
    wall = json.loads(storage.read_text(wall_uri))["wall_s"] if storage.exists(wall_uri) else 0.0
    reporter = LocalReporter(layout, keep=1)
    history = layout.read_metrics()
    if history and max(r.get("step", 0) for r in history) >= cfg.train.steps and storage.exists(
        storage.join(layout.export_uri, WEIGHTS_NAME)
    ):
        return {"history": history, "wall_s": wall, "resumed_from": cfg.train.steps}
    images, labels = data
    source = IndexedSource(images, labels, cfg.run.seed, cfg.train.global_batch_size)
    start = time.perf_counter()
    result = loop.train(cfg, DistEnv(), source, reporter, resume_dir=latest_complete_checkpoint(layout),
                        progress=progress)
    wall += time.perf_counter() - start
    storage.write_text(wall_uri, json.dumps({"wall_s": wall}))
    return {"history": layout.read_metrics() or result.history, "wall_s": wall, "resumed_from": result.start_step}


# --- the benchmark -------------------------------------------------------------------------------


def build(args) -> Tuple[Config, List[Tuple[Cell, int, Config]], List[Cell], List[int], str]:
    """The base config and every (cell, seed, trial config) of the benchmark, all validated first."""
    preset = QUICK if args.quick else FULL
    if args.cells:
        cells = [Cell.parse(name) for name in args.cells.split(",")]
    elif args.quick and not (args.strategies or args.objectives or args.accelerators):
        cells = [Cell.parse(name) for name in preset["cells"]]
    else:
        objectives = args.objectives.split(",") if args.objectives else preset.get("objectives", ["ddpm"])
        strategies = args.strategies.split(",") if args.strategies else preset.get("strategies", [BASELINE])
        accelerators = args.accelerators.split(",") if args.accelerators else preset.get("accelerators", ["none"])
        cells = grid(objectives, strategies, accelerators)
    baseline = Cell.parse(BASELINE_CELL)
    cells = [baseline] + [c for c in dict.fromkeys(cells) if c != baseline]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else list(preset["seeds"])
    name = "speedup-quick" if args.quick else "speedup"
    overrides = [*preset["overrides"], "parallel.strategy=none", *args.overrides]
    # Local paths absolute: the training loop expects them so (speed.storage.absolute_paths).
    cfg = storage.absolute_paths(load_config(args.config, overrides))
    runs_root = storage.join(cfg.run.output_uri, name)
    trials = []
    for cell in cells:
        cell_overrides = cell.overrides(cfg.sampling.steps)
        try:
            cell_cfg = storage.absolute_paths(load_config(args.config, [*overrides, *cell_overrides]))
        except ConfigError as exc:
            raise ConfigError(f"cell {cell.name} ({' '.join(cell_overrides)}): {exc}") from None
        for seed in seeds:
            trials.append((cell, seed, apply_overrides(cell_cfg, {
                "run.seed": seed, "run.name": f"{cell.run_name}-seed{seed}", "run.output_uri": runs_root})))
    return cfg, trials, cells, seeds, name


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speedup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"cells {', '.join(QUICK['cells'])}; 2 seeds; ~27 min on 2 cores")
    parser.add_argument("--out", default="benchmarks/results", help="folder for speedup.json/.md/.png")
    parser.add_argument("--config", default=BASE_CONFIG, help=f"training config (default {BASE_CONFIG})")
    parser.add_argument("--cells", default=None, help="comma-separated cells <objective>-<strategy>-<accelerator>, "
                        "e.g. flow-speed-routing (the baseline ddpm-uniform-none is always added)")
    parser.add_argument("--objectives", default=None, help="comma-separated objectives of the grid (ddpm, flow)")
    parser.add_argument("--strategies", default=None, help="comma-separated strategies of the grid (a+b: sampling a, "
                        "weighting b)")
    parser.add_argument("--accelerators", default=None,
                        help=f"comma-separated accelerators of the grid ({', '.join(ACCELERATORS)})")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds, the same for every cell")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: all cores)")
    parser.add_argument("--progress", action="store_true", help="show a progress bar per run")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. data.format=imagefolder data.uri=...")
    args = parser.parse_args(argv)
    try:
        cfg, trials, cells, seeds, name = build(args)
    except (ConfigError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    data = load_dataset(cfg)
    digest = data_digest(data)
    metric = primary_metric(cfg)
    runs_root = storage.join(cfg.run.output_uri, name)
    log(f"{len(trials)} runs ({len(cells)} cells x seeds {seeds}), {cfg.train.steps} steps each, "
        f"model {cfg.model.name}, {len(data[1])} images ({cfg.data.format}), metric {metric}; runs under {runs_root}")
    try:  # every earlier run must belong to this config before anything trains
        for _, _, trial_cfg in trials:
            check_trial(trial_cfg, digest, write=False)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    started = time.time()
    records: List[TrialRecord] = []
    for index, (cell, seed, trial_cfg) in enumerate(trials):
        run_name = trial_cfg.run.name
        log(f"run {index + 1}/{len(trials)}: {run_name}")
        out = run_trial(trial_cfg, data, progress=args.progress, digest=digest)
        fid = metric_curve(out["history"], metric)
        log(f"  done ({out['wall_s']:.0f}s of training and evaluation); "
            f"{metric} {' '.join(f'{s}:{v:.2f}' for s, v in fid)}")
        records.append(TrialRecord(
            name=run_name, overrides={"cell": cell.name}, strategy=cell.name, seed=seed,
            history=out["history"], status="done", wall_s=out["wall_s"],
            run_uri=storage.join(runs_root, run_name),
        ))
    log(f"all runs done in {time.time() - started:.0f}s")
    report = summarize(records, cfg, cells, seeds, args, sum(r.wall_s or 0.0 for r in records))
    write_outputs(report, records, cfg, Path(args.out), strategy_variants(trials))
    print(json.dumps({"event": "speedup_done", "out": str(Path(args.out) / "speedup.json"),
                      "speedup_flops_100": {k: (v["speedup"]["flops"]["100"] or {}).get("mean")
                                            for k, v in report["cells"].items()}}), flush=True)
    return 0


def _cell_histories(records: Sequence[TrialRecord], cell: str) -> Dict[int, list]:
    return {r.seed: r.history for r in records if r.strategy == cell}


def summarize(records: Sequence[TrialRecord], cfg: Config, cells: Sequence[Cell], seeds: Sequence[int],
              args, wall_s: float) -> Dict[str, Any]:
    primary_name = primary_metric(cfg)
    budget = cfg.train.steps
    baseline_runs = _cell_histories(records, BASELINE_CELL)
    cell_entries = cells_report({c.name: _cell_histories(records, c.name) for c in cells}, primary_name,
                                PRIMARY_MODE, budget, BASELINE_CELL)
    convergence = {seed: baseline_convergence(evaluation_points(h, primary_name), budget, PRIMARY_MODE)
                   for seed, h in sorted(baseline_runs.items())}
    # Today's per-strategy table: the DDPM cells without accelerators, against uniform.
    strategies = [c.strategy for c in cells if c.objective == "ddpm" and c.accelerator == "none"]
    by_strategy: Dict[str, Dict[str, Dict[int, list]]] = {}
    for metric, _ in ((primary_name, PRIMARY_MODE), SECONDARY):
        curves: Dict[str, Dict[int, list]] = {s: {} for s in strategies}
        for r in records:
            cell = Cell.parse(r.strategy)
            if cell.objective == "ddpm" and cell.accelerator == "none":
                curves[cell.strategy][r.seed] = metric_curve(r.history, metric)
        by_strategy[metric] = curves
    primary = speedup_summary(by_strategy[primary_name], baseline=BASELINE, mode=PRIMARY_MODE)
    secondary = speedup_summary(by_strategy[SECONDARY[0]], baseline=BASELINE, mode=SECONDARY[1])
    entries = {}
    for name in strategies:
        entry = dict(primary[name])
        entry["metric"] = primary_name
        entry[SECONDARY[0]] = {k: v for k, v in secondary[name].items()}
        entries[name] = entry
    return {
        "benchmark": "speedup",
        "quick": bool(args.quick),
        "command": "python -m benchmarks.speedup " + " ".join(sys.argv[1:] if args is not None else []),
        "metric": primary_name,
        "mode": PRIMARY_MODE,
        "baseline": BASELINE,
        "baseline_cell": BASELINE_CELL,
        "seeds": list(seeds),
        "steps": cfg.train.steps,
        "eval_every": cfg.train.eval_every,
        "eval_num_samples": cfg.train.eval_num_samples,
        "model": cfg.model.name,
        "data": {"format": cfg.data.format, "uri": cfg.data.uri, "resolution": cfg.data.resolution,
                 "channels": cfg.data.channels},
        "global_batch_size": cfg.train.global_batch_size,
        "sampling": {"sampler": cfg.sampling.sampler, "steps": cfg.sampling.steps,
                     "guidance_scale": cfg.sampling.guidance_scale},
        "host": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "wall_s": wall_s,  # sum of the runs' training + evaluation time (over resumes)
        "baseline_convergence": convergence,
        "compute_definitions": COMPUTE_DEFINITIONS,
        "cells": cell_entries,
        "definitions": (
            "target = the uniform baseline's final metric; steps = first evaluation step reaching it; "
            "speedup = baseline steps / strategy steps (seed-mean curves); speedup_min/max = range of the "
            "per-seed speed-ups against the uniform run of the same seed (min is null when a seed never "
            "reaches its target); null = never reached within the budget. Steps are evaluation steps, so "
            "speed-ups finer than the evaluation grid read as 1; speedup_interpolated uses the crossing "
            "points interpolated linearly between evaluations"
        ),
        "strategies": entries,
    }


def convergence_note(report: Dict[str, Any]) -> str:
    flags = report["baseline_convergence"]
    bad = [seed for seed, c in flags.items() if not c.get("converged")]
    if not bad:
        return ("The baseline's curve fell by at least 30% and flattened (the last quarter of the budget moved it by "
                "at most 15%) for every seed.")
    details = "; ".join(f"seed {seed}: fell {flags[seed].get('fell')}, flattened {flags[seed].get('flattened')}"
                        for seed in bad)
    return (f"**The baseline did not converge within the budget for seed(s) {', '.join(map(str, bad))}** ({details}): targets on "
            "a curve that has not fallen and flattened partly measure noise.")


def render_markdown(report: Dict[str, Any], rows: Sequence[Dict[str, Any]]) -> str:
    metric, second = report["metric"], SECONDARY[0]
    lines = [
        f"# Compute to quality against the plain DiT recipe ({'quick' if report['quick'] else 'full'})",
        "",
        f"`{report['command']}`",
        "",
        f"{report['model']} on {report['data']['format']} ({report['data']['resolution']}px), global batch "
        f"{report['global_batch_size']}, {report['steps']} steps, seeds {report['seeds']}. Speed-up of each cell over "
        f"{report['baseline_cell']} of the same seed, mean [min, max] over seeds, at the baseline's {metric} after "
        "25%, 50% and 100% of its budget; 'never': the target was not reached.",
        "",
        *cells_markdown(report["cells"], metric),
        "",
        convergence_note(report),
        "",
        f"Definitions: {report['compute_definitions']}.",
        "",
        "## Timestep strategies under DDPM without accelerators (steps to the uniform baseline's final metric)",
        "",
        f"{report['model']} on {report['data']['format']} ({report['data']['resolution']}px), global batch "
        f"{report['global_batch_size']}, {report['steps']} steps, EMA evaluated every {report['eval_every']} steps "
        f"on {report['eval_num_samples']} samples ({report['sampling']['sampler']}-{report['sampling']['steps']}, "
        f"guidance {report['sampling']['guidance_scale']}); seeds {report['seeds']}; "
        f"{report['wall_s'] / 60:.1f} min of training and evaluation on {report['host']['cpus']} CPUs.",
        "",
        f"Target: the uniform baseline's final {metric}. {report['definitions']}. "
        "In the range, '?' marks an unknown minimum (some seed never reached its target).",
        "",
        f"| strategy | final {metric} (mean [min, max]) | steps to target | baseline steps | speed-up | "
        f"speed-up range over seeds | seeds reaching | interpolated speed-up [range] | final {second} | "
        f"speed-up by {second} |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, e in report["strategies"].items():
        s2 = e[second]
        lines.append(
            f"| {name} | {_fmt(e['final_metric'])} [{_fmt(e['final_metric_min'])}, {_fmt(e['final_metric_max'])}] | "
            f"{_fmt(e['steps_to_target'])} | {_fmt(e['baseline_steps'])} | {_fmt(e['speedup'])} | "
            f"[{_fmt(e['speedup_min'], '?')}, {_fmt(e['speedup_max'], 'never')}] | {e['seeds_reached']}/{e['seeds']} | "
            f"{_fmt(e['speedup_interpolated'])} [{_fmt(e['speedup_interpolated_min'], '?')}, "
            f"{_fmt(e['speedup_interpolated_max'], 'never')}] | {_fmt(s2['final_metric'])} | {_fmt(s2['speedup'])} |"
        )
    lines += ["", "## Runs", "", rows_to_markdown(rows)]
    return "\n".join(lines) + "\n"


def cell_curves(records: Sequence[TrialRecord], metric: str) -> Dict[str, Dict[int, list]]:
    """cell -> seed -> [(step, metric)]."""
    out: Dict[str, Dict[int, list]] = {}
    for r in records:
        out.setdefault(r.strategy, {})[r.seed] = metric_curve(r.history, metric)
    return out


def strategy_variants(trials: Sequence[Tuple[Cell, int, Config]]) -> Dict[str, Dict[str, Any]]:
    """<objective>-<strategy> -> its pmf and weights over DDPM steps (adaptive ones: initial state)."""
    out: Dict[str, Dict[str, Any]] = {}
    for cell, _, trial_cfg in trials:
        out.setdefault(f"{cell.objective}-{cell.strategy}", strategy_arrays(trial_cfg.diffusion))
    return out


def write_outputs(report: Dict[str, Any], records: Sequence[TrialRecord], cfg: Config, out: Path,
                  variants: Dict[str, Dict[str, Any]]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    metric = primary_metric(cfg)
    rows = build_rows(records, metric, PRIMARY_MODE, baseline=BASELINE)
    (out / "speedup.json").write_text(json.dumps(report, indent=1, sort_keys=False, default=str) + "\n")
    (out / "speedup.md").write_text(render_markdown(report, rows))
    targets = {metric: report["strategies"][BASELINE].get("target"),
               SECONDARY[0]: report["strategies"][BASELINE][SECONDARY[0]].get("target")}
    title = f"{report['model']} on {report['data']['format']}, {report['steps']} steps, seeds {report['seeds']}"
    (out / "speedup.png").write_bytes(plot_curves(
        [(metric, cell_curves(records, metric)), (SECONDARY[0], cell_curves(records, SECONDARY[0]))],
        title=title, targets=targets,
    ))
    (out / "speedup_flops.png").write_bytes(plot_curves(
        [(metric, flops_curves(records, metric, cfg.train.global_batch_size))], title=title, targets=targets,
        xlabel="training FLOPs",
    ))
    (out / "speedup_timesteps.png").write_bytes(plot_timesteps(variants, title="timestep strategies (pmf over DDPM steps)"))
    log(f"wrote {out / 'speedup.json'}, speedup.md, speedup.png, speedup_flops.png, speedup_timesteps.png")


def flops_curves(records: Sequence[TrialRecord], metric: str, batch: int) -> Dict[str, Dict[int, list]]:
    """cell -> seed -> [(training FLOPs, metric)]."""
    out: Dict[str, Dict[int, list]] = {}
    for r in records:
        points = evaluation_points(r.history, metric)
        out.setdefault(r.strategy, {})[r.seed] = [(p["flops"], p["value"]) for p in points]
    return out


if __name__ == "__main__":
    sys.exit(main())
