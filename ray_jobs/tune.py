"""python -m ray_jobs.tune -c configs/ablations/NAME.yaml [key=value ...]: Ray Tune ablations.

The ablation file includes a training config (``include: ../digits/speed.yaml``) and sets the
``tune:`` section: ``search_space`` (dotted config key -> values; see speed.experiments.space),
``metric`` (a metric the training loop logs: ``fid`` (the dataset's own FID, ``fid_<dataset>``,
e.g. ``fid_digits``; either name works)/``class_accuracy``/``precision``/``recall`` from the
in-trial evaluation at ``train.eval_every``, or ``loss``/``mse``), ``mode``,
``num_samples``, ``scheduler`` (``none`` | ``asha``), ``grace_period`` (ASHA: training steps before
a trial may be stopped; at least one report of the metric) and ``max_concurrent_trials``.

How it runs (Ray 2.60's pattern):

- ``Tuner`` runs a *driver function* per trial, which takes no CPU
  (``tune.with_resources(fn, DRIVER_RESOURCES)``: 0 CPUs); it builds the trial's config (base +
  the trial's values), a ``TorchTrainer`` with ``ray_jobs.train.build_trainer`` and a
  ``TuneReportCallback`` in its RunConfig, and fits it. Only the reports that carry ``tune.metric`` are passed on to Tune
  (Tune insists on the metric in every result): the metric is computed inside each trial at its
  evaluation steps, not by a separate job.
- Trials run one at a time by default (``tune.max_concurrent_trials``, lowered to what the
  cluster's CPUs/GPUs can hold), so Train and Data are never starved by the Tune driver.
- Each trial's training run is named after the trial (``t003-speed-seed1``) and lives under
  ``<experiment>/runs/``; a restarted trial resumes from its own checkpoints, and only when its
  resolved config matches the one the run was started with (``speed.experiments.fingerprint``:
  a continued experiment whose base config changed stops before any trial, naming the keys).
- The experiment lives in ``<tune.output_uri or run.output_uri>/<tune.name or the file's stem>``
  (a local folder or s3://). Rerunning the same command continues an interrupted experiment with
  ``Tuner.restore`` (unfinished and errored trials; finished ones are kept).

Output in the experiment folder: ``results.md`` / ``results.csv`` (one row per trial: its values,
final and best metric, steps to reach the uniform baseline's final metric at the same seed, speed-up,
wall time), ``curves.png`` (metric against step per variant, seed band), ``timesteps.png`` (each
strategy's sampling pmf and weights). The last stdout line is
``{"event": "tune_done", "experiment": URI, "trials": N, "best": {...}}``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ray_jobs.common import emit, init_ray, parse_args, run_main
from ray_jobs.resources import ClusterCapacity, cluster_can_grow, cluster_capacity, plan_cpus_per_worker
from speed import storage
from speed.config import Config, ConfigError, config_from_dict, load_config, num_workers_range, to_dict
from speed.config.load import apply_overrides
from speed.experiments import TrialRecord, check_search_space, num_trials, parse_search_space, trial_run_name
from speed.experiments.fingerprint import check_run_fingerprint
from speed.experiments.outputs import render, write_files
from speed.experiments.space import CELL_KEY, SEED_KEY, STRATEGY_KEY, Dimension, expand_cell
from speed.train.run_layout import RunLayout

log = logging.getLogger("speed.tune")

DEFAULT_ABLATION = "configs/ablations/digits_quick.yaml"
# From the in-trial evaluation; "fid" stands for the dataset's own fid_<dataset> (resolve_metric).
EVAL_METRICS = ("fid", "class_accuracy", "precision", "recall")
TRAIN_METRICS = ("loss", "mse", "vb", "grad_norm", *[f"loss_t{b}" for b in range(10)])
RUNS_FOLDER = "runs"
TRIAL_FILE = "tune_trial.json"
EXPERIMENT_FILE = "experiment.json"
# The per-trial driver takes no CPU, so Train workers and Data tasks get all of them. Ray 2.60
# refuses an all-zero request ("empty head and zero worker bundles"), so it holds one byte of
# the memory resource instead.
DRIVER_RESOURCES = {"cpu": 0, "memory": 1}
NEW_EXPERIMENT = "set tune.name (or tune.output_uri) to start a new experiment"


# --- naming -------------------------------------------------------------------------------------


def experiment_uri(cfg: Config, name: str) -> str:
    root = cfg.tune.output_uri or cfg.run.output_uri
    if not storage.is_s3(root):
        root = str(Path(root).expanduser().resolve())
    return storage.join(root, name)


def trial_index(trial_id: str) -> int:
    """Tune's trial ids end in the trial's creation index (``a1b2c_00003`` -> 3)."""
    tail = str(trial_id).rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def trial_name(trial_id: str, config: Dict[str, Any]) -> str:
    return trial_run_name(trial_index(trial_id), config)


def _trial_dirname(trial) -> str:
    return trial_name(trial.trial_id, trial.config)


def trial_config(base: Config, values: Dict[str, Any], experiment: str, trial_id: str) -> Config:
    """The training config of one trial: base + its values, run under <experiment>/runs/<name>."""
    return apply_overrides(base, {
        **expand_cell(values, base.sampling.steps),
        "run.name": trial_name(trial_id, values),
        "run.output_uri": storage.join(experiment, RUNS_FOLDER),
    })


# --- checks before any trial starts --------------------------------------------------------------


def resolve_metric(cfg: Config) -> str:
    """tune.metric with ``fid`` spelled out as the dataset's FID key, ``fid_<dataset>``."""
    from speed.evaluate.dataset_fid import fid_metric_name

    metric, fid = cfg.tune.metric, fid_metric_name(cfg.data)
    if metric == "fid":
        return fid
    if metric == "digits_fid" or (metric.startswith("fid_") and metric != fid):
        raise ConfigError(
            f"tune.metric={metric} is not logged here: the in-trial FID is named after the dataset being trained, "
            f"{fid} for data.format={cfg.data.format}{' data.uri=' + cfg.data.uri if cfg.data.uri else ''}; "
            f"set tune.metric=fid (or {fid})"
        )
    return metric


def with_resolved_metric(cfg: Config) -> Config:
    metric = resolve_metric(cfg)
    return cfg if metric == cfg.tune.metric else apply_overrides(cfg, {"tune.metric": metric})


def check_metric(cfg: Config) -> None:
    from speed.evaluate.dataset_fid import EVAL_FORMATS, fid_metric_name

    metric = resolve_metric(cfg)
    if metric in EVAL_METRICS or metric == fid_metric_name(cfg.data):
        if cfg.eval.feature_extractor != "digits" or cfg.data.format not in EVAL_FORMATS:
            raise ConfigError(
                f"tune.metric={metric} comes from the in-trial evaluation, which trains its classifier on "
                f"{', '.join(EVAL_FORMATS)} data and needs eval.feature_extractor=digits (got data.format="
                f"{cfg.data.format}, eval.feature_extractor={cfg.eval.feature_extractor}); use tune.metric=loss"
            )
        if cfg.train.eval_every and cfg.train.eval_every % cfg.train.log_every:
            raise ConfigError(
                f"train.eval_every={cfg.train.eval_every} must be a multiple of train.log_every="
                f"{cfg.train.log_every}: evaluation results reach Tune with the log-step reports"
            )
    elif metric not in TRAIN_METRICS:
        raise ConfigError(
            f"tune.metric={metric!r} is not logged by training; choose one of "
            f"{', '.join(EVAL_METRICS + TRAIN_METRICS[:4])}"
        )


def report_interval(cfg: Config) -> int:
    """Steps between reports that carry tune.metric."""
    if cfg.tune.metric not in TRAIN_METRICS:
        return cfg.train.eval_every or cfg.train.steps
    return cfg.train.log_every


def max_concurrent(cfg: Config, capacity: ClusterCapacity) -> int:
    """tune.max_concurrent_trials, lowered to the number of trials the cluster can hold at once.

    A trial's workers are sized as ``ray_jobs.train.build_trainer`` sizes them
    (``plan_cpus_per_worker``; ``ray.cpus_per_worker=auto`` gives one trial the whole cluster),
    so a request that can never be placed fails here, before any trial starts (on a joined cluster,
    which may autoscale, an explicit request larger than today's cluster is left to the autoscaler)."""
    low, _ = num_workers_range(cfg.ray)
    limit = cfg.tune.max_concurrent_trials
    cpus = low * plan_cpus_per_worker(cfg, capacity, can_grow=cluster_can_grow(cfg))
    if cpus > 0 and capacity.total_cpus:
        limit = min(limit, max(1, math.floor(capacity.total_cpus / cpus + 1e-9)))
    if cfg.ray.use_gpu and capacity.total_gpus:
        limit = min(limit, max(1, int(capacity.total_gpus // low)))
    return max(1, limit)


def _experiment_identity(cfg: Config) -> Dict[str, Any]:
    t = cfg.tune
    return {"search_space": t.search_space, "metric": t.metric, "mode": t.mode, "num_samples": t.num_samples,
            "scheduler": t.scheduler}


def check_trial_runs(base: Config, experiment: str) -> None:
    """Before a continued experiment starts any trial: each trial run already in it must match the
    resolved config its trial would run now (FingerprintMismatch names the keys that differ)."""
    runs = storage.join(experiment, RUNS_FOLDER)
    fs, path = storage.filesystem(runs, base.storage)
    import pyarrow.fs as pafs

    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return
    for entry in fs.get_file_info(pafs.FileSelector(path, recursive=False)):
        if entry.type != pafs.FileType.Directory:
            continue
        run = storage.join(runs, entry.base_name)
        info_uri = storage.join(run, TRIAL_FILE)
        if not storage.exists(info_uri, base.storage):
            continue
        info = json.loads(storage.read_text(info_uri, base.storage))
        cfg = trial_config(base, dict(info.get("values") or {}), experiment, str(info.get("trial_id", "")))
        layout = RunLayout(run, base.storage)
        check_run_fingerprint(run, cfg, has_results=bool(layout.checkpoints() or layout.metrics_parts()),
                              storage_cfg=base.storage, fix=NEW_EXPERIMENT, write=False)


def _check_same_experiment(cfg: Config, experiment: str) -> None:
    uri = storage.join(experiment, EXPERIMENT_FILE)
    if not storage.exists(uri, cfg.storage):
        return
    stored = json.loads(storage.read_text(uri, cfg.storage))
    current = json.loads(json.dumps(_experiment_identity(cfg)))
    for key, value in current.items():
        if stored.get(key) != value:
            raise ConfigError(
                f"experiment '{experiment}' already exists with tune.{key}={stored.get(key)!r}, not {value!r}; "
                "rerun with the same settings to continue it, or set tune.name to start a new experiment"
            )


# --- the per-trial driver function (runs in a Tune trial actor that holds no CPU) ----------------


def _trial_driver(config: Dict[str, Any], base: Optional[Dict[str, Any]] = None,
                  experiment: Optional[str] = None) -> None:
    from ray import tune
    from ray_jobs.train import build_trainer, preflight, run_layout, training_datasets

    trial_id = tune.get_context().get_trial_id()
    base_cfg = config_from_dict(base)
    cfg = trial_config(base_cfg, dict(config), experiment, trial_id)
    started = time.time()
    layout = run_layout(cfg)
    # A trial's run is resumed only when its resolved config matches the one it was started with.
    check_run_fingerprint(layout.root, cfg, has_results=bool(layout.checkpoints() or layout.metrics_parts()),
                          storage_cfg=cfg.storage, fix=NEW_EXPERIMENT)
    info_uri = layout.path(TRIAL_FILE)
    info = {"trial_id": trial_id, "values": dict(config), "wall_s": 0.0, "attempts": 0}
    if storage.exists(info_uri, cfg.storage):
        info.update(json.loads(storage.read_text(info_uri, cfg.storage)))
    info["attempts"] += 1
    start_step, resume_uri = preflight(cfg)
    try:
        if start_step >= cfg.train.steps:
            # Finished in an earlier attempt (e.g. the experiment was restarted from scratch): hand
            # the recorded results to Tune again instead of training.
            _replay(cfg)
            return
        datasets = training_datasets(cfg, start_step)
        trainer = build_trainer(cfg, resume_uri, "", datasets, callbacks=[_metric_callback(cfg.tune.metric)],
                                start_step=start_step)
        trainer.fit()
    finally:
        info["wall_s"] = float(info["wall_s"]) + time.time() - started
        storage.write_text(info_uri, json.dumps(info, sort_keys=True), cfg.storage)


def _metric_callback(metric: str):
    from ray.tune.integration.ray_train import TuneReportCallback

    class MetricReportCallback(TuneReportCallback):
        """TuneReportCallback passing on only the reports that carry ``metric``."""

        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metric in metrics[0]:
                super().after_report(run_context, metrics, checkpoint)

    return MetricReportCallback()


def _replay(cfg: Config) -> None:
    from ray import tune
    from ray_jobs.train import run_layout

    for record in run_layout(cfg).iter_metrics():
        if _number(record.get(cfg.tune.metric)):
            tune.report({k: v for k, v in record.items() if _number(v)})


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- the experiment ------------------------------------------------------------------------------


def _param_space(dims: Sequence[Dimension]) -> Dict[str, Any]:
    from ray import tune

    space: Dict[str, Any] = {}
    for d in dims:
        values = list(d.values)
        if d.kind == "grid":
            space[d.key] = tune.grid_search(values)
        elif d.kind == "choice":
            space[d.key] = tune.choice(values)
        elif d.kind == "uniform":
            space[d.key] = tune.uniform(*values)
        else:
            space[d.key] = tune.loguniform(*values)
    return space


def _scheduler(cfg: Config):
    if cfg.tune.scheduler != "asha":
        return None
    from ray.tune.schedulers import ASHAScheduler

    grace = max(cfg.tune.grace_period, report_interval(cfg))
    if grace > cfg.train.steps:
        raise ConfigError(
            f"tune.grace_period={cfg.tune.grace_period} (at least one report of tune.metric, every "
            f"{report_interval(cfg)} steps) exceeds train.steps={cfg.train.steps}"
        )
    # time_attr "step" stays right when a restored trial resumes its run mid-way.
    return ASHAScheduler(time_attr="step", max_t=cfg.train.steps, grace_period=grace, reduction_factor=2)


def _base_for_trials(cfg: Config) -> Config:
    """Local paths made absolute (a copy): trial actors do not share the driver's working folder."""
    return storage.absolute_paths(copy.deepcopy(cfg))


def run_experiment(cfg: Config, name: str, callbacks: Sequence[Any] = ()) -> Dict[str, Any]:
    """Run (or continue) the experiment ``name``; returns a summary with its rows and best row.

    ``callbacks``: extra ``ray.tune.Callback``s for the Tuner (a new experiment only; a restored
    one keeps those it was started with).
    """
    from ray import tune

    cfg = with_resolved_metric(cfg)  # tune.metric=fid -> fid_<dataset>, everywhere below
    dims = parse_search_space(cfg.tune.search_space)
    check_search_space(cfg, dims)
    check_metric(cfg)
    experiment = experiment_uri(cfg, name)
    out_root = cfg.tune.output_uri or cfg.run.output_uri
    storage.preflight(out_root, cfg.storage, key="tune.output_uri" if cfg.tune.output_uri else "run.output_uri",
                      must_exist=False, writable=True)
    fs, path = storage.filesystem(experiment, cfg.storage)
    restoring = tune.Tuner.can_restore(path, storage_filesystem=fs)
    if restoring:
        _check_same_experiment(cfg, experiment)
        check_trial_runs(_base_for_trials(cfg), experiment)
    scheduler = _scheduler(cfg)
    init_ray(cfg)
    # Sized like each trial's TorchTrainer (after Ray is connected); fails before anything is written.
    concurrent = max_concurrent(cfg, cluster_capacity())
    base = _base_for_trials(cfg)
    trainable = tune.with_resources(
        tune.with_parameters(_trial_driver, base=to_dict(base, redact=False), experiment=experiment),
        DRIVER_RESOURCES,
    )
    if restoring:
        log.info("continuing the interrupted experiment %s", experiment)
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=fs)
    else:
        storage.write_text(storage.join(experiment, EXPERIMENT_FILE),
                           json.dumps(_experiment_identity(cfg), indent=1, sort_keys=True), cfg.storage)
        tuner = tune.Tuner(
            trainable,
            param_space=_param_space(dims),
            tune_config=tune.TuneConfig(
                metric=cfg.tune.metric,
                mode=cfg.tune.mode,
                num_samples=cfg.tune.num_samples,
                scheduler=scheduler,
                max_concurrent_trials=concurrent,
                trial_dirname_creator=_trial_dirname,
                trial_name_creator=_trial_dirname,
            ),
            run_config=tune.RunConfig(
                name=Path(path).name,
                storage_path=str(Path(path).parent) if not storage.is_s3(experiment) else path.rsplit("/", 1)[0],
                storage_filesystem=fs,
                callbacks=list(callbacks) or None,
            ),
        )
    started = time.time()
    results = tuner.fit()
    # Tune creates trials lazily: an interrupted experiment may not have created all of them yet.
    expected = num_trials(dims, cfg.tune.num_samples)
    interrupted = len(results) > results.num_terminated + results.num_errors or len(results) < expected
    records = collect_records(cfg, experiment, results, scheduler is not None and not interrupted)
    notes = [
        f"Experiment `{experiment}`: {len(records)} trial(s), metric `{cfg.tune.metric}` ({cfg.tune.mode}).",
        "steps_to_baseline: first evaluation step reaching the final metric of the uniform trial(s) at the same "
        "seed; speedup_vs_baseline = baseline_steps / steps_to_baseline.",
    ]
    rendered = render(records, cfg, cfg.tune.metric, cfg.tune.mode, title=f"Tune experiment {name}", notes=notes)
    write_files(experiment, rendered["files"], cfg.storage)
    return {
        "experiment": experiment,
        "trials": len(records),
        "expected_trials": expected,
        "errors": results.num_errors,
        "interrupted": interrupted,
        "rows": rendered["rows"],
        "best": rendered["best"],
        "table": storage.join(experiment, "results.md"),
        "wall_s": time.time() - started,
    }


def collect_records(cfg: Config, experiment: str, results, early_stopping: bool) -> List[TrialRecord]:
    """A TrialRecord per trial of a ResultGrid, read from each trial's run folder."""
    records = []
    for result in results:
        values = {k: v for k, v in (result.config or {}).items()}
        name = Path(str(result.path)).name
        run = storage.join(experiment, RUNS_FOLDER, name)
        history = RunLayout(run, cfg.storage).read_metrics()
        trial_cfg = apply_overrides(cfg, expand_cell(values, cfg.sampling.steps)) if values else cfg
        info_uri = storage.join(run, TRIAL_FILE)
        wall = None
        if storage.exists(info_uri, cfg.storage):
            wall = json.loads(storage.read_text(info_uri, cfg.storage)).get("wall_s")
        if wall is None and result.metrics:
            wall = result.metrics.get("time_total_s")
        last = max((int(r.get("step", 0)) for r in history), default=0)
        if result.error is not None:
            status = "error"
        elif last >= trial_cfg.train.steps:
            status = "done"
        elif early_stopping and history:
            status = "stopped"
        else:
            status = "incomplete" if history else "pending"
        records.append(TrialRecord(
            name=name,
            overrides=values,
            strategy=str(values.get(CELL_KEY) or values.get(STRATEGY_KEY, trial_cfg.diffusion.timesteps.name)),
            seed=int(values.get(SEED_KEY, trial_cfg.run.seed)),
            history=history,
            status=status,
            wall_s=wall,
            error=str(result.error).splitlines()[0] if result.error is not None else None,
            run_uri=run,
        ))
    records.sort(key=lambda r: r.name)
    return records


def _main(argv: List[str]) -> None:
    args = parse_args("tune", argv, default_config=DEFAULT_ABLATION)
    cfg = storage.absolute_paths(load_config(args.config, args.overrides, phase="tune"))
    name = cfg.tune.name or Path(args.config).stem
    summary = run_experiment(cfg, name)
    best = summary["best"]
    if summary["interrupted"]:
        emit("tune_interrupted", experiment=summary["experiment"], trials=summary["expected_trials"],
             finished=sum(1 for r in summary["rows"] if r["status"] in ("done", "stopped")),
             resume="rerun the same command to continue", table=summary["table"])
        return
    emit("tune_done", experiment=summary["experiment"], trials=summary["trials"], errors=summary["errors"],
         best=best, table=summary["table"])


def main(argv=None) -> int:
    return run_main("tune", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
