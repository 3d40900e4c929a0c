"""Experiment trackers beside the run folder: ``run.trackers: [tensorboard, mlflow, wandb]``.

TensorBoard is the MetricLogger's own (event files in ``<run>/tensorboard``). MLflow and Weights &
Biases are optional packages (``pip install 'speed[trackers]'`` or ``-r requirements-trackers.txt``),
imported only when asked for. On rank 0 each gets:

  params    the resolved config, secrets redacted (the same dict as ``<run>/config.yaml``), as
            dotted keys; the whole config also as an artifact (MLflow) / the run config (W&B)
  metrics   every log record, with the keys of ``metrics-*.jsonl`` (numbers only; ``step`` is the step)
  images    every sample grid (``sample_grid`` records): an image artifact ``samples/step_<step>.png``
            (MLflow) or a ``samples`` image (W&B)

Where they go is each library's own setting: ``MLFLOW_TRACKING_URI`` (a server, or ``file:...``),
``WANDB_MODE`` / ``WANDB_API_KEY`` / ``WANDB_ENTITY``; ``run.tracker_project`` names the MLflow
experiment and the W&B project, ``run.name`` the run. A resumed run (``start_step > 0``) continues
the tracker runs recorded in ``<run>/trackers.json`` instead of opening new ones.

A tracker never stops or slows training: each runs on its own thread behind a bounded queue. The
first error (an unreachable server, a bad key) is logged once and that tracker is dropped; the
run and the other trackers go on. A full queue drops records (counted, logged once).
"""

from __future__ import annotations

import importlib.util
import io
import json
import logging
import math
import queue
import threading
from typing import Any, Callable, Dict, List, Optional, Sequence

from speed import storage
from speed.config.schema import ConfigError

log = logging.getLogger("speed.train")

TRACKERS = ("tensorboard", "mlflow", "wandb")
# tracker -> (module it imports, pip package that provides it)
PACKAGES = {"mlflow": ("mlflow", "mlflow-skinny"), "wandb": ("wandb", "wandb")}
EXTRA = "trackers"
IDS_FILE = "trackers.json"
DEFAULT_PROJECT = "speed"
_MLFLOW_BATCH = 100  # MLflow accepts at most 100 params per log_batch call


class TrackerError(ConfigError):
    """A tracker that is asked for but cannot be used; the message names the package and the fix."""


def missing_packages(names: Sequence[str]) -> List[str]:
    """The trackers of ``names`` whose package is not importable here (no import is done)."""
    return [name for name in names if name in PACKAGES and importlib.util.find_spec(PACKAGES[name][0]) is None]


def check_trackers(names: Sequence[str], key: str = "run.trackers") -> None:
    """Known names, no duplicates, and every optional package installed; else a ``TrackerError``
    naming the package and the extra (``pip install 'speed[trackers]'``)."""
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise TrackerError(f"{key}: unknown tracker(s) {unknown}; choose from {', '.join(TRACKERS)}")
    if len(set(names)) != len(names):
        raise TrackerError(f"{key}={list(names)} names a tracker twice")
    missing = missing_packages(names)
    if missing:
        packages = " ".join(PACKAGES[n][1] for n in missing)
        raise TrackerError(
            f"{key} asks for {', '.join(missing)}, but the package is not installed here: pip install "
            f"'speed[{EXTRA}]' (or pip install -r requirements-trackers.txt, or pip install {packages}), "
            f"or remove {', '.join(missing)} from {key}"
        )


def flatten(config: Dict[str, Any], prefix: str = "") -> Dict[str, str]:
    """{"train": {"steps": 5}} -> {"train.steps": "5"}; lists and None as JSON."""
    out: Dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return out


def numeric(record: Dict[str, Any]) -> Dict[str, float]:
    """The finite numbers of a log record (not ``step``, not booleans): what metrics.jsonl holds as
    numbers (it writes NaN and inf, e.g. the loss of a timestep bucket no sample fell in, as null)."""
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


# --- the trackers --------------------------------------------------------------------------------


class MLflowTracker:
    """One MLflow run per training run, through ``MlflowClient`` (tracking URI: MLflow's own setting)."""

    name = "mlflow"

    def __init__(self, project: str):
        self.project = project
        self.client = None
        self.run_id: Optional[str] = None

    def start(self, run_name: str, config: Dict[str, Any], start_step: int, resume_id: Optional[str]) -> str:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient()
        experiment = self.client.get_experiment_by_name(self.project)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(self.project)
        existing: Dict[str, str] = {}
        run = None
        if resume_id:
            try:
                run = self.client.get_run(resume_id)
            except Exception as exc:  # noqa: BLE001 - e.g. another tracking server now: start a new run
                log.info("mlflow: run %s of this training run is not found (%s); starting a new one", resume_id, exc)
        if run is not None:
            self.run_id = run.info.run_id
            existing = dict(run.data.params)
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            self.run_id = self.client.create_run(experiment_id, run_name=run_name,
                                                 tags={"speed.run_name": run_name}).info.run_id
        params = flatten(config)
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v[:6000])
        if changed:
            # MLflow params are immutable: the first value stays; the new config is in config.json.
            log.info("mlflow: run %s resumed with changed params (%s); they keep their first value, "
                     "config.json holds the current config", self.run_id, ", ".join(changed[:5]))
        fresh = [Param(k, v[:6000]) for k, v in sorted(params.items()) if k not in existing]
        for i in range(0, len(fresh), _MLFLOW_BATCH):
            self.client.log_batch(self.run_id, params=fresh[i:i + _MLFLOW_BATCH])
        self.client.log_dict(self.run_id, config, "config.json")
        return self.run_id

    def log_metrics(self, step: int, metrics: Dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in sorted(metrics.items())])

    def log_image(self, step: int, name: str, png: bytes) -> None:
        from PIL import Image

        image = Image.open(io.BytesIO(png))
        image.load()
        self.client.log_image(self.run_id, image, artifact_file=f"{name}/step_{step:07d}.png")

    def close(self, failed: bool) -> None:
        if self.client is not None and self.run_id is not None:
            self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")


class WandbTracker:
    """One W&B run per training run (``WANDB_MODE=offline`` keeps everything on the machine)."""

    name = "wandb"

    def __init__(self, project: str, directory: Optional[str]):
        self.project = project
        self.directory = directory
        self.run = None

    def start(self, run_name: str, config: Dict[str, Any], start_step: int, resume_id: Optional[str]) -> str:
        import wandb

        kwargs: Dict[str, Any] = dict(project=self.project, name=run_name, config=config, dir=self.directory,
                                      reinit="create_new")
        if resume_id:
            kwargs.update(id=resume_id, resume="allow")
        self.run = wandb.init(**kwargs)
        if resume_id:
            self.run.config.update(config, allow_val_change=True)
        return self.run.id

    def log_metrics(self, step: int, metrics: Dict[str, float]) -> None:
        self.run.log(metrics, step=step)

    def log_image(self, step: int, name: str, png: bytes) -> None:
        import wandb
        from PIL import Image

        image = Image.open(io.BytesIO(png))
        image.load()
        self.run.log({name: wandb.Image(image, caption=f"step {step}")}, step=step)

    def close(self, failed: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=1 if failed else 0)


# --- fan-out, on threads ---------------------------------------------------------------------------


class _Worker:
    """Runs one tracker's calls in order on its own thread; the first failure disables it."""

    def __init__(self, tracker, queue_size: int):
        self.tracker = tracker
        self.name = getattr(tracker, "name", type(tracker).__name__)
        self.queue: "queue.Queue" = queue.Queue(maxsize=queue_size)
        self.failed = False
        self.dropped = 0
        self.result: Dict[str, Any] = {}
        self.thread = threading.Thread(target=self._run, name=f"speed-tracker-{self.name}", daemon=True)
        self.thread.start()

    def submit(self, method: str, *args: Any) -> None:
        if self.failed:
            return
        try:
            self.queue.put_nowait((method, args))
        except queue.Full:
            if self.dropped == 0:
                log.warning("tracker %s is falling behind; dropping records until it catches up", self.name)
            self.dropped += 1

    def _run(self) -> None:
        while True:
            method, args = self.queue.get()
            if method is None:
                return
            if self.failed and method != "close":
                continue
            try:
                if method == "log_grid":  # read here, so a slow store never holds up training
                    step, uri, read_image = args
                    try:
                        png = read_image(uri)
                    except Exception as exc:  # noqa: BLE001 - the grid, not the tracker, is missing
                        log.warning("tracker %s: could not read the sample grid %s (%s)", self.name, uri, exc)
                        continue
                    self.tracker.log_image(step, "samples", png)
                else:
                    self.result[method] = getattr(self.tracker, method)(*args)
            except Exception as exc:  # noqa: BLE001 - a tracker must never stop training
                if method == "close":
                    log.debug("tracker %s: close failed (%s)", self.name, exc)
                    continue
                self.failed = True
                log.warning("tracker %s failed (%s: %s); training goes on without it", self.name,
                            type(exc).__name__, storage.redact(str(exc).splitlines()[0] if str(exc) else ""))

    def finish(self, failed: bool, timeout_s: float) -> None:
        try:
            self.queue.put(("close", (failed,)), timeout=timeout_s)
            self.queue.put((None, ()), timeout=timeout_s)
        except queue.Full:
            pass
        self.thread.join(timeout_s)
        if self.thread.is_alive():
            log.warning("tracker %s did not finish within %.0f s; its last records may be missing", self.name,
                        timeout_s)
        if self.dropped:
            log.warning("tracker %s dropped %d records it could not keep up with", self.name, self.dropped)


class Trackers:
    """The optional trackers of a run (everything but TensorBoard), fanned out on threads."""

    def __init__(self, trackers: Sequence[Any], *, ids_uri: Optional[str] = None, storage_cfg=None,
                 queue_size: int = 10_000, close_timeout_s: float = 60.0):
        self.trackers = list(trackers)
        self.ids_uri = ids_uri
        self.storage_cfg = storage_cfg
        self.queue_size = queue_size
        self.close_timeout_s = close_timeout_s
        self.workers: List[_Worker] = []
        self.saved_ids: Dict[str, str] = {}

    @classmethod
    def for_run(cls, names: Sequence[str], *, project: Optional[str], layout) -> "Trackers":
        """The trackers ``run.trackers`` names (TensorBoard excluded: the MetricLogger writes it)."""
        project = project or DEFAULT_PROJECT
        local_dir = None if storage.is_s3(layout.root) else layout.root
        made: List[Any] = []
        for name in names:
            if name == "mlflow":
                made.append(MLflowTracker(project))
            elif name == "wandb":
                made.append(WandbTracker(project, local_dir))
        return cls(made, ids_uri=layout.path(IDS_FILE), storage_cfg=layout.storage_cfg)

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _read_ids(self) -> Dict[str, str]:
        if self.ids_uri is None or not storage.exists(self.ids_uri, self.storage_cfg):
            return {}
        try:
            return json.loads(storage.read_text(self.ids_uri, self.storage_cfg))
        except ValueError:
            return {}

    def start(self, run_name: str, config: Dict[str, Any], start_step: int) -> None:
        """Open (or, resuming, reopen) every tracker's run; returns at once."""
        ids = self._read_ids() if start_step > 0 else {}
        self.workers = [_Worker(t, self.queue_size) for t in self.trackers]
        for worker in self.workers:
            worker.submit("start", run_name, config, start_step, ids.get(worker.name))

    def log(self, record: Dict[str, Any], read_image: Optional[Callable[[str], bytes]] = None) -> None:
        """Send a log record: its numbers as metrics, a ``sample_grid`` URI as an image."""
        step = int(record["step"])
        metrics = numeric(record)
        grid = record.get("sample_grid")
        for worker in self.workers:
            if metrics:
                worker.submit("log_metrics", step, metrics)
            if isinstance(grid, str) and read_image is not None:
                worker.submit("log_grid", step, grid, read_image)
        self._save_ids()

    def _save_ids(self) -> None:
        """Record the tracker run ids once they are known, so a resumed run continues them."""
        started = {w.name: w.result["start"] for w in self.workers if isinstance(w.result.get("start"), str)}
        if not started or started == self.saved_ids or self.ids_uri is None:
            return
        self.saved_ids = started
        try:
            ids = {**self._read_ids(), **started}
            storage.write_text(self.ids_uri, json.dumps(ids, indent=1, sort_keys=True), self.storage_cfg)
        except Exception as exc:  # noqa: BLE001 - only resuming into the same tracker run is lost
            log.warning("could not record the tracker run ids at %s (%s)", self.ids_uri, exc)

    def close(self, failed: bool = False) -> None:
        """Finish every tracker run, waiting at most ``close_timeout_s`` for each."""
        for worker in self.workers:
            worker.finish(failed, self.close_timeout_s)
        self._save_ids()
        self.workers = []


