"""The per-worker training loop. Knows nothing about Ray: the caller hands it a batch source and
a reporter (``ray_jobs.train`` adapts Ray Train to both; tests use in-memory ones).

Each step: draw the batch, take the optimizer step, then ask each component whether it is due.
Order within a step: the log record, then the checkpoint (and, at the end, the export), then
evaluation and the sample grid, so an interrupted evaluation never costs the training before it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Tuple

import torch
import torch.distributed as dist

from speed.config.load import to_dict
from speed.config.schema import Config
from speed.models.export import load_state_dict_checked, read_weights, save_export
from speed.models.registry import describe
from speed.train.checkpoint import AfterShards, load_checkpoint
from speed.train.components import (
    DATA_WAIT_TARGET,
    Checkpointer,
    Control,
    Evaluator,
    MetricLogger,
    Reporter,
    SampleGrid,
    Schedule,
    StepTimer,
    StopRequested,
    data_wait_summary,
)
from speed.train.distributed import DistEnv
from speed.train.optim import lr_at
from speed.train.run_layout import RunLayout
from speed.train.trackers import Trackers
from speed.train.trainer import Trainer

log = logging.getLogger("speed.train")

__all__ = ["BatchSource", "NonFiniteLossError", "Reporter", "StopRequested", "TrainResult", "Trainer",
           "build_trainer", "train"]


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the step range."""


class BatchSource(Protocol):
    """Yields this rank's share of global batch ``step``: (x [count, C, H, W], y [count]), or
    (x, y, clean [count, 3, r, r]) when latents travel with their clean images (REPA)."""

    def batch(self, step: int, offset: int, count: int) -> Tuple[torch.Tensor, ...]: ...


@dataclass
class TrainResult:
    steps: int
    start_step: int
    final_loss: float
    images_per_sec: float
    export_uri: Optional[str]
    history: List[Dict[str, Any]] = field(default_factory=list)
    data_wait_fraction: Optional[float] = None  # after the first log interval (components.data_wait_summary)


def build_trainer(cfg: Config, env: DistEnv) -> Trainer:
    """The Trainer of a config: each part gets its own section."""
    return Trainer(describe(cfg.model, cfg.data, cfg.diffusion), diffusion=cfg.diffusion, optim=cfg.optim,
                   train=cfg.train, parallel=cfg.parallel, seed=cfg.run.seed, env=env, routing=cfg.model.routing,
                   repa=cfg.repa, storage=cfg.storage)


def _agree(flag: bool, env: DistEnv) -> bool:
    """True on every rank if any rank wants it (a collective; called at log steps)."""
    if not env.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=env.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _plain(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}


def train(
    cfg: Config,
    env: DistEnv,
    source: BatchSource,
    reporter: Reporter,
    *,
    resume_dir: Optional[str] = None,
    stop: Optional[StopRequested] = None,
    control: Optional[Control] = None,
    progress: bool = True,
    after_shards: Optional[AfterShards] = None,
) -> TrainResult:
    """Train until ``train.steps``; every rank calls this with its own source and reporter.

    ``cfg``'s paths must already be absolute (``speed.storage.absolute_paths``, on the driver).
    """
    trainer = build_trainer(cfg, env)
    total = cfg.train.steps
    layout = RunLayout.for_run(cfg.run, cfg.storage)
    start_step, images_seen = 0, 0
    if resume_dir is not None:
        state = load_checkpoint(resume_dir, trainer, env)
        start_step, images_seen = state.step, state.images_seen
        log.info("resumed from %s at step %d", resume_dir, start_step)
    elif cfg.train.init_from:
        tensors, _ = read_weights(cfg.train.init_from, cfg.storage, "train.init_from")
        load_state_dict_checked(trainer.description.build(), tensors, source=cfg.train.init_from, key="train.init_from")
        trainer.init_weights(tensors)

    from speed.evaluate.dataset_fid import default_cache_uri

    trackers = (Trackers.for_run(cfg.run.trackers, project=cfg.run.tracker_project, layout=layout)
                if env.is_main else None)
    logger = MetricLogger(layout, env, schedule=Schedule(cfg.train.log_every, total), run_name=cfg.run.name,
                          progress=progress, tensorboard="tensorboard" in cfg.run.trackers, trackers=trackers)
    checkpointer = Checkpointer(env, schedule=Schedule(cfg.train.checkpoint_every, total), reporter=reporter,
                                config=to_dict(cfg), after_shards=after_shards)
    evaluator = Evaluator(trainer.description, schedule=Schedule(cfg.train.eval_every, total),
                          num_samples=cfg.train.eval_num_samples, eval_cfg=cfg.eval, sampling=cfg.sampling,
                          data=cfg.data, cache_uri=default_cache_uri(cfg.eval, cfg.run.output_uri),
                          storage_cfg=cfg.storage, seed=cfg.run.seed)
    grid = SampleGrid(trainer.description, layout, schedule=Schedule(cfg.train.sample_every, total),
                      sample=cfg.sample, sampling=cfg.sampling)
    stop = stop or StopRequested()
    timer = StepTimer(trainer.global_batch, start_step, cpu_s_before=_cpu_seconds_before(layout, start_step) if env.is_main else 0.0)
    logger.start(start_step, to_dict(cfg))
    export_uri = None
    step = start_step
    failed = False
    try:
        while step < total:
            batch = timer.fetch(source, step, trainer.offset, trainer.count)
            trainer.train_step(step, *batch)  # (x, y) or (x, y, clean)
            timer.stepped()
            step += 1
            images_seen += trainer.global_batch

            # Ranks must agree before stopping or saving out of turn (a collective at log steps).
            log_due = logger.due(step)
            extra_checkpoint, stop_now = False, stop.flag and not env.distributed
            if log_due:
                wanted_checkpoint, wanted_stop = control() if control is not None else (False, False)
                extra_checkpoint = _agree(wanted_checkpoint, env)
                stop_now = _agree(wanted_stop or stop.flag, env)

            record: Dict[str, Any] = {}
            if log_due or stop_now:
                record = _training_record(trainer, env, step, images_seen, start_step, timer, cfg)
                logger.log(record)
            if checkpointer.due(step) or stop_now or extra_checkpoint:
                checkpointer.save(trainer, step, images_seen, _plain(record))
                logger.end_segment()
            elif record:
                reporter.report(_plain(record))
            if step >= total:
                full_ema = trainer.ema.full_state_dict()  # a collective under FSDP
                if env.is_main:
                    export_uri = save_export(full_ema, trainer.description.at_step(step), layout.export_uri,
                                             cfg.storage)
            if stop_now:
                log.warning("stop requested: saved a checkpoint at step %d and stopping", step)
                break
            if evaluator.due(step) or grid.due(step):
                extra = _evaluate_and_sample(trainer, env, step, evaluator, grid)
                logger.log(extra)
                reporter.report(_plain(extra))
    except BaseException:
        failed = True
        raise
    finally:
        logger.close(failed=failed)
    wall_records = [r for r in logger.history if "images_per_sec" in r]
    waited = data_wait_summary(logger.history)
    if waited is not None and env.is_main:
        fraction = waited["data_wait_fraction"]
        message = (f"data wait: {100 * fraction:.1f}% of step time after the first log interval "
                   f"({waited['intervals']} intervals)")
        if fraction > DATA_WAIT_TARGET:
            log.warning("%s, above %.0f%%: the data pipeline does not keep up; give it more CPUs (see the sizing "
                        "table in docs/data.md) or raise data.read_cpus", message, 100 * DATA_WAIT_TARGET)
        else:
            log.info(message)
    return TrainResult(
        steps=step,
        start_step=start_step,
        final_loss=float(next((r["loss"] for r in reversed(logger.history) if "loss" in r), float("nan"))),
        images_per_sec=(sum(r["images_per_sec"] for r in wall_records) / len(wall_records)) if wall_records else 0.0,
        export_uri=export_uri,
        history=logger.history,
        data_wait_fraction=None if waited is None else waited["data_wait_fraction"],
    )


def _cpu_seconds_before(layout: RunLayout, start_step: int) -> float:
    """The training CPU-seconds a resumed run had spent up to its checkpoint (0 for a fresh run)."""
    if start_step == 0:
        return 0.0
    spent = [r["train_cpu_s"] for r in layout.iter_metrics() if "train_cpu_s" in r and r.get("step", 0) <= start_step]
    return float(spent[-1]) if spent else 0.0


def _training_record(trainer: Trainer, env: DistEnv, step: int, images_seen: int, start_step: int,
                     timer: StepTimer, cfg: Config) -> Dict[str, Any]:
    values = trainer.metrics.read(env)  # the one host sync of the interval
    if not math.isfinite(values["loss"]) and cfg.train.on_nonfinite == "raise":
        raise NonFiniteLossError(
            f"the loss became NaN or inf between steps {timer.last_step + 1} and {step}; lower "
            "optim.lr, set optim.grad_clip, or train.on_nonfinite=skip. No checkpoint was written "
            "from these weights; resume from the last checkpoint"
        )
    return {
        "step": step,
        "images_seen": images_seen,
        "world_size": env.world_size,
        "global_batch_size": trainer.global_batch,
        "resumed_from_step": start_step,  # the checkpoint this attempt started from (0: fresh)
        "lr": lr_at(step - 1, cfg.optim),
        "train_flops_per_image": trainer.train_flops_per_image,  # to compare strategies by compute
        **values,
        **timer.read(step),
    }


def _evaluate_and_sample(trainer: Trainer, env: DistEnv, step: int, evaluator: Evaluator,
                         grid: SampleGrid) -> Dict[str, Any]:
    """Gathering the EMA is a collective: every rank takes part, rank 0 samples."""
    model = trainer.ema_model()
    out: Dict[str, Any] = {"step": step}
    if env.is_main:
        if evaluator.due(step):
            out.update(evaluator.run(model))
        if grid.due(step):
            out.update(grid.run(model, step))
    return out
