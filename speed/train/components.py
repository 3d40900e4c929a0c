"""The training loop's components. Each owns its schedule and its state, receives only the
config it needs, and is asked by the loop whether it is due at a step.

  MetricLogger   log records (every one has ``step``) -> metrics parts, TensorBoard, trackers, progress
  Checkpointer   the whole training state -> the reporter (which puts it in the run folder)
  Evaluator      fid_<dataset> / class accuracy of EMA samples (an evaluator trained on the dataset)
  SampleGrid     a PNG grid of EMA samples
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Protocol

import torch

from speed import storage
from speed.config.schema import DataConfig, EvalConfig, SampleConfig, SamplingConfig, StorageConfig
from speed.models.registry import ModelDescription
from speed.train.checkpoint import AfterShards, TrainState, assert_finite, save_checkpoint
from speed.train.distributed import DistEnv
from speed.train.run_layout import RunLayout, checkpoint_dir_name
from speed.train.trackers import Trackers

log = logging.getLogger("speed.train")


class Reporter(Protocol):
    """Receives metrics, and checkpoint folders to keep under ``checkpoint_name`` in the run
    folder. Every rank calls it the same number of times (Ray Train's report is a barrier)."""

    def report(self, metrics: Dict[str, Any], checkpoint_dir: Optional[str] = None,
               checkpoint_name: Optional[str] = None) -> None: ...


@dataclass(frozen=True)
class Schedule:
    """Due every ``every`` steps (0: never on the way) and always at ``last_step``."""

    every: int
    last_step: int

    def due(self, step: int) -> bool:
        return step == self.last_step or (self.every > 0 and step % self.every == 0)


def _finite_or_none(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


# --- metrics -------------------------------------------------------------------------------------


class MetricLogger:
    """Writes log records on rank 0: the current ``metrics-<first step>.jsonl`` part holds the
    records since the last checkpoint and is rewritten as they come (bounded, however long the
    run); a checkpoint closes it. TensorBoard events go to ``tensorboard/`` (written in place
    for local runs, uploaded at checkpoints and at the end for s3:// runs). Shows a progress bar
    on a terminal and one log line per record otherwise."""

    def __init__(self, layout: RunLayout, env: DistEnv, *, schedule: Schedule, run_name: str, progress: bool,
                 tensorboard: bool = True, trackers: Optional[Trackers] = None):
        self.layout = layout
        self.tensorboard = tensorboard
        self.trackers = trackers  # mlflow / wandb (speed.train.trackers), rank 0 only
        self.env = env
        self.schedule = schedule
        self.run_name = run_name
        self.progress = progress and env.is_main
        self.part_first_step: Optional[int] = None
        self.part: List[Dict[str, Any]] = []
        self.roll = False
        self.tb = None
        self.tb_local: Optional[str] = None
        self.bar = None
        self.history: List[Dict[str, Any]] = []

    def due(self, step: int) -> bool:
        return self.schedule.due(step)

    def start(self, start_step: int, config: Dict[str, Any]) -> None:
        """Continue the run's log at ``start_step`` (records after it are dropped)."""
        if not self.env.is_main:
            return
        self.layout.truncate_metrics(start_step)
        storage.write_text(self.layout.config_uri, json.dumps(config, indent=1, sort_keys=True), self.layout.storage_cfg)
        self.roll = True
        if self.tensorboard:
            self._open_tensorboard(start_step)
        if self.trackers:
            self.trackers.start(self.run_name, config, start_step)
        if self.progress and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.schedule.last_step, initial=start_step, desc=self.run_name, unit="step",
                            dynamic_ncols=True)

    def _open_tensorboard(self, start_step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if storage.is_s3(self.layout.root):
            self.tb_local = tempfile.mkdtemp(prefix="speed-tb-")
            directory = self.tb_local
        else:
            directory = self.layout.tensorboard_uri
        self.tb = SummaryWriter(directory, purge_step=start_step + 1 if start_step else None)

    def log(self, record: Dict[str, Any]) -> None:
        """Add a record (it must name its ``step``); a second record of the same step merges
        into the first (e.g. the evaluation after a step's checkpoint)."""
        step = int(record["step"])
        clean = {k: _finite_or_none(v) for k, v in record.items()}
        if self.history and self.history[-1]["step"] == step:
            self.history[-1].update(record)
        else:
            self.history.append(dict(record))
        if not self.env.is_main:
            return
        if self.part and self.part[-1]["step"] == step:
            self.part[-1].update(clean)
        else:
            if self.roll or self.part_first_step is None:
                self.part_first_step, self.part, self.roll = step, [], False
            self.part.append(clean)
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.part)
        storage.write_text(self.layout.metrics_part_uri(self.part_first_step), text, self.layout.storage_cfg)
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                    self.tb.add_scalar(key, value, step)
            if isinstance(record.get("sample_grid"), str):
                self._tensorboard_image(record["sample_grid"], step)
            self.tb.flush()
        if self.trackers:
            self.trackers.log(record, read_image=lambda uri: storage.read_bytes(uri, self.layout.storage_cfg))
        self._show(record)

    def _tensorboard_image(self, uri: str, step: int) -> None:
        """The grid as a TensorBoard image; best effort (the PNG itself is already in samples/)."""
        import io

        import numpy as np
        from PIL import Image

        try:
            png = storage.read_bytes(uri, self.layout.storage_cfg)
            image = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        except Exception as exc:  # noqa: BLE001 - an image for the dashboard never stops training
            log.warning("tensorboard: could not add the sample grid %s (%s)", uri, exc)
            return
        self.tb.add_image("samples", image, step, dataformats="HWC")

    def _show(self, record: Dict[str, Any]) -> None:
        step = int(record["step"])
        if self.bar is not None:
            self.bar.n = step
            if "loss" in record:
                self.bar.set_postfix(loss=f"{record['loss']:.4f}", ips=f"{record.get('images_per_sec', 0):.0f}")
            self.bar.refresh()
            return
        if not self.progress:
            return
        parts = [f"step {step}/{self.schedule.last_step}"]
        fids = [(k, k + " {:.3f}") for k in record if k.startswith("fid_")]  # fid_<dataset>
        for key, fmt in (("loss", "loss {:.4f}"), ("images_per_sec", "{:.0f} img/s"), *fids,
                         ("class_accuracy", "class_accuracy {:.3f}"), ("sample_grid", "grid {}")):
            if record.get(key) is not None:
                parts.append(fmt.format(record[key]))
        log.info("%s: %s", self.run_name, ", ".join(parts))

    def end_segment(self) -> None:
        """A checkpoint was written: the next record starts a new part; upload TensorBoard."""
        self.roll = True
        if self.env.is_main:
            self._upload_tensorboard()

    def _upload_tensorboard(self) -> None:
        if self.tb_local is None:
            return
        for path in Path(self.tb_local).glob("*"):
            storage.write_bytes(storage.join(self.layout.tensorboard_uri, path.name), path.read_bytes(),
                                self.layout.storage_cfg)

    def close(self, failed: bool = False) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.trackers:
            self.trackers.close(failed=failed)
        if self.tb is not None:
            self.tb.close()
            self._upload_tensorboard()
        if self.tb_local is not None:
            shutil.rmtree(self.tb_local, ignore_errors=True)


DATA_WAIT_TARGET = 0.05  # the share of step time spent waiting for data that docs/data.md sizes for


def data_wait_summary(records: List[Dict[str, Any]]) -> Optional[Dict[str, Any]]:
    """The data-wait fraction a run saw, from its log records: time-weighted over every interval but
    the first of each (re)start (which includes the pipeline's start-up), as
    {"data_wait_fraction", "intervals"}; None when there is no such interval."""
    waited = elapsed = 0.0
    intervals = 0
    seen_starts = set()
    for record in records:
        if "data_wait_fraction" not in record or "step_time_s" not in record:
            continue
        start = record.get("resumed_from_step", 0)
        if start not in seen_starts:
            seen_starts.add(start)  # the first interval of this start: start-up, not steady state
            continue
        seconds = float(record["step_time_s"])  # intervals hold train.log_every steps: weight by step time
        waited += float(record["data_wait_fraction"]) * seconds
        elapsed += seconds
        intervals += 1
    if not intervals or elapsed <= 0:
        return None
    return {"data_wait_fraction": waited / elapsed, "intervals": intervals}


class StepTimer:
    """Wall time and data-wait time of the steps since the last log record, and the CPU-seconds
    this process spent fetching and stepping since the run began (``train_cpu_s``: evaluation,
    sampling and checkpoints excluded; continued from ``cpu_s_before`` on resume), which the
    benchmarks compare strategies by."""

    def __init__(self, global_batch: int, start_step: int, cpu_s_before: float = 0.0):
        self.global_batch = global_batch
        self.last_step = start_step
        self.began = time.perf_counter()
        self.data_wait = 0.0
        self.train_cpu_s = float(cpu_s_before)
        self._cpu_began: Optional[float] = None

    def fetch(self, source, step: int, offset: int, count: int):
        self._cpu_began = time.process_time()
        began = time.perf_counter()
        batch = source.batch(step, offset, count)
        self.data_wait += time.perf_counter() - began
        return batch

    def stepped(self) -> None:
        """Call after the optimizer step that followed ``fetch``."""
        if self._cpu_began is not None:
            self.train_cpu_s += time.process_time() - self._cpu_began
            self._cpu_began = None

    def read(self, step: int) -> Dict[str, float]:
        elapsed = max(time.perf_counter() - self.began, 1e-9)
        steps = max(step - self.last_step, 1)
        out = {
            "images_per_sec": steps * self.global_batch / elapsed,
            "step_time_s": elapsed / steps,
            "data_wait_fraction": self.data_wait / elapsed,
            "train_cpu_s": self.train_cpu_s,
        }
        self.last_step, self.began, self.data_wait = step, time.perf_counter(), 0.0
        return out


# --- checkpoints ---------------------------------------------------------------------------------


class Checkpointer:
    """Saves the trainer at its schedule (and on request) into a local folder and hands it to
    the reporter, which keeps it as ``checkpoint_<step>`` in the run folder. ``after_shards`` is
    the tests' seam between the shards and state.json."""

    def __init__(self, env: DistEnv, *, schedule: Schedule, reporter: Reporter, config: Dict[str, Any],
                 after_shards: Optional[AfterShards] = None):
        self.env = env
        self.schedule = schedule
        self.reporter = reporter
        self.config = config
        self.after_shards = after_shards
        self.last_saved: Optional[int] = None

    def due(self, step: int) -> bool:
        return self.schedule.due(step)

    def save(self, trainer, step: int, images_seen: int, metrics: Dict[str, Any]) -> None:
        assert_finite(trainer.model, "the model")
        state = TrainState(step=step, images_seen=images_seen, config=self.config,
                           description=json.loads(trainer.description.at_step(step).to_json()))
        directory = tempfile.mkdtemp(prefix=f"speed-ckpt-{step:07d}-")
        save_checkpoint(directory, trainer, state, self.env, self.after_shards)
        self.reporter.report({**metrics, "step": step}, checkpoint_dir=directory,
                             checkpoint_name=checkpoint_dir_name(step))
        self.last_saved = step


# --- evaluation and sample grids -----------------------------------------------------------------


def auto_eval_num_samples(resolution: int) -> int:
    """The end-of-run evaluation's default size: 500 samples at 8x8, fewer as images grow (the
    cost of sampling grows with the pixels), never fewer than 64."""
    return max(64, int(500 * (8 / max(resolution, 8)) ** 2))


class Evaluator:
    """``fid_<dataset>``, precision, recall and class accuracy of EMA samples (the CPU configs'
    metrics), judged by a small classifier trained on the dataset being trained and its held-out
    split (``speed.evaluate.dataset_fid``); rank 0 samples."""

    def __init__(self, description: ModelDescription, *, schedule: Schedule, num_samples: Optional[int],
                 eval_cfg: EvalConfig, sampling: SamplingConfig, data: DataConfig, cache_uri: str,
                 storage_cfg: Optional[StorageConfig], seed: int):
        from speed.evaluate.dataset_fid import supports_in_training_eval

        self.description = description
        self.schedule = schedule
        self.sampling = sampling
        self.data = data
        self.cache_uri = cache_uri
        self.storage_cfg = storage_cfg
        self.seed = seed
        self.num_samples = auto_eval_num_samples(description.resolution) if num_samples is None else num_samples
        # Only pixel data the evaluator can train its classifier on is evaluated inside training.
        self.enabled = self.num_samples > 0 and eval_cfg.feature_extractor == "digits" and not description.is_latent
        if self.enabled and not supports_in_training_eval(data):
            log.warning("no in-training evaluation for data.format=%s (digits, patches and imagefolder have one); "
                        "evaluate exports with python -m ray_jobs.evaluate", data.format)
            self.enabled = False
        self._evaluator = None

    def due(self, step: int) -> bool:
        return self.enabled and self.schedule.due(step)

    def run(self, model: torch.nn.Module) -> Dict[str, Any]:
        from speed.sample import generate

        n = self.num_samples
        num_classes = self.description.model_config().num_classes
        labels = [i % num_classes for i in range(n)]
        images = generate(model, self.description, self.sampling, labels, list(range(n)), self.seed + 1, "cpu")
        return self.evaluator().metrics(images, labels)

    def evaluator(self):
        """The dataset's evaluator: trained once and cached beside the runs, not by every worker."""
        if self._evaluator is None:
            from speed.evaluate.dataset_fid import eval_data_from_config, get_dataset_evaluator

            num_classes = self.description.model_config().num_classes
            data = eval_data_from_config(self.data, self.storage_cfg, num_classes)
            self._evaluator = get_dataset_evaluator(data, self.cache_uri, self.storage_cfg)
        return self._evaluator


class SampleGrid:
    """One row per class of ``sample.classes``, ``sample.per_class`` columns, as a PNG."""

    def __init__(self, description: ModelDescription, layout: RunLayout, *, schedule: Schedule,
                 sample: SampleConfig, sampling: SamplingConfig):
        self.description = description
        self.layout = layout
        self.schedule = schedule
        self.sample = sample
        self.sampling = sampling

    def due(self, step: int) -> bool:
        return self.schedule.due(step)

    def run(self, model: torch.nn.Module, step: int) -> Dict[str, Any]:
        from speed.sample import generate, make_grid_png

        labels = [c for c in self.sample.classes for _ in range(self.sample.per_class)]
        indices = [j for _ in self.sample.classes for j in range(self.sample.per_class)]
        images = generate(model, self.description, self.sampling, labels, indices, self.sample.seed, "cpu")
        uri = self.layout.sample_grid_uri(step)
        storage.write_bytes(uri, make_grid_png(images, nrow=self.sample.per_class), self.layout.storage_cfg)
        return {"sample_grid": uri}


# --- stop requests -------------------------------------------------------------------------------


class StopRequested:
    """Set by SIGTERM (``ray job stop``, a node shutting down) or a caller; checked between steps."""

    def __init__(self) -> None:
        self.flag = False

    def install(self) -> None:
        import signal

        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: the caller sets the flag itself
            pass

    def _handle(self, *_: Any) -> None:
        self.flag = True


# Called on every rank at log steps: returns (checkpoint_now, stop_now) for this rank; ranks then
# agree (any rank asking wins). Ray's adapter reports preemption notices and job-stop requests here.
Control = Callable[[], "tuple[bool, bool]"]
