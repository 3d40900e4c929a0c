"""python -m ray_jobs.train -c CONFIG [key=value ...]: SpeeD training of DiT on Ray Train.

A thin adapter: the loop lives in speed.train.loop; here Ray supplies the process group, the
dataset shard, checkpoint hand-over to storage, restarts after worker loss and elastic resizing.
With no -c, the embedded digits config runs on a local Ray.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import uuid
from typing import Any, Dict, List, Optional, Tuple

import torch

from ray_jobs.common import emit, init_ray, load_job_config, run_main
from ray_jobs.resources import cluster_can_grow, cluster_capacity, plan_cpus_per_worker
from speed import seeding, storage
from speed.config import Config, config_from_dict, num_workers_range, to_dict
from speed.models import describe
from speed.models.blocks import BlockOptions
from speed.models.registry import BLOCK_OPTION_FIELDS
from speed.models.export import WEIGHTS_NAME, save_export
from speed.train.checkpoint import AfterShards, CheckpointError, TrainState, incomplete_reason, latest_complete_checkpoint
from speed.train.run_layout import RunLayout

log = logging.getLogger("speed.train")

STOP_ACTOR_PREFIX = "speed-stop-"
# storage.* fields that hold credentials: never sent to workers.
SECRET_STORAGE_KEYS = ("access_key_id", "secret_access_key")


# --- driver side ---------------------------------------------------------------------------------


def run_layout(cfg: Config) -> RunLayout:
    return RunLayout.for_run(cfg.run, cfg.storage)


def run_uri(cfg: Config) -> str:
    return run_layout(cfg).root


def read_checkpoint_state(uri: str, cfg: Config, key: str) -> TrainState:
    state_uri = storage.join(uri, "state.json")
    if not storage.exists(uri, cfg.storage):
        raise CheckpointError(f"{key}: checkpoint '{uri}' does not exist; give a checkpoint_* folder of a run")
    if not storage.exists(state_uri, cfg.storage):
        raise CheckpointError(f"{key}: '{uri}' is not a complete checkpoint (no state.json); use an earlier one")
    return TrainState.from_json(storage.read_text(state_uri, cfg.storage))


def check_compatible(state: TrainState, cfg: Config, source: str) -> None:
    """A checkpoint of another model size or data geometry fails before any training starts."""
    expected = describe(cfg.model, cfg.data, cfg.diffusion)
    stored = state.description or {}
    for field in ("input_size", "in_channels"):
        if stored.get(field) != getattr(expected, field):
            raise CheckpointError(
                f"checkpoint '{source}' was trained with {field}={stored.get(field)}, but this config gives "
                f"{getattr(expected, field)}; use the checkpoint's data.* settings or a new run.name"
            )
    stored_objective = stored.get("objective", "ddpm")  # checkpoints from before flow matching are DDPM
    if stored_objective != cfg.diffusion.objective:
        raise CheckpointError(
            f"checkpoint '{source}' was trained with diffusion.objective={stored_objective}, but this config has "
            f"diffusion.objective={cfg.diffusion.objective}; use the same objective or a new run.name"
        )
    stored_model = stored.get("model", {})
    for field in ("name", "num_classes", "learn_sigma", "depth", "hidden_size", "num_heads", "mlp_ratio"):
        if stored_model.get(field) != getattr(cfg.model, field):
            raise CheckpointError(
                f"checkpoint '{source}' was trained with model.{field}={stored_model.get(field)!r}, but this "
                f"config has model.{field}={getattr(cfg.model, field)!r}; use the same model or a new run.name"
            )
    for field in BLOCK_OPTION_FIELDS:  # resolved from the preset in both descriptions
        stored_value = stored_model.get(field, getattr(BlockOptions(), field))  # older checkpoints: DiT's blocks
        if stored_value != expected.model[field]:
            raise CheckpointError(
                f"checkpoint '{source}' was trained with model.{field}={stored_value!r}, but this config gives "
                f"model.{field}={expected.model[field]!r}; use the same model or a new run.name"
            )


def preflight(cfg: Config) -> Tuple[int, Optional[str]]:
    """Every check that can fail before cluster work: storage, data, checkpoints. Returns
    (start_step, checkpoint URI to resume from or None)."""
    storage.preflight(cfg.run.output_uri, cfg.storage, key="run.output_uri", must_exist=False, writable=True)
    if cfg.data.format not in ("digits", "patches"):  # the built-in, in-memory datasets
        from ray_jobs.data import preflight_data

        preflight_data(cfg)
    if cfg.train.init_from:
        storage.preflight(cfg.train.init_from, cfg.storage, key="train.init_from")
        if not storage.exists(cfg.train.init_from, cfg.storage):
            raise CheckpointError(f"train.init_from: '{cfg.train.init_from}' does not exist")
    layout = run_layout(cfg)
    existing = layout.checkpoints()
    if existing:
        # The newest checkpoint says what this run is; a config of another model fails here.
        newest = existing[-1][1]
        if storage.exists(storage.join(newest, "state.json"), cfg.storage):
            check_compatible(read_checkpoint_state(newest, cfg, "run.name"), cfg, newest)
        skipped: List[str] = []
        latest = latest_complete_checkpoint(layout, skipped)
        if latest is None:
            raise CheckpointError(
                f"run '{cfg.run.name}' in {cfg.run.output_uri} has checkpoints, but none is complete "
                f"({'; '.join(skipped[:3])}); "
                "starting over would overwrite its metrics. Remove the incomplete checkpoint_* folders to start "
                "afresh, or choose a new run.name"
            )
        state = read_checkpoint_state(latest, cfg, "run.name")
        check_compatible(state, cfg, latest)
        return state.step, latest
    if cfg.train.resume_from:
        state = read_checkpoint_state(cfg.train.resume_from, cfg, "train.resume_from")
        check_compatible(state, cfg, cfg.train.resume_from)
        return state.step, cfg.train.resume_from
    return 0, None


def training_datasets(cfg: Config, start_step: int) -> Optional[Dict[str, Any]]:
    """The streamed dataset covering the rest of the run in one pass (None for in-memory digits).

    A Ray Dataset replays identically on every pass, so it holds all remaining epochs, each with
    its own seeded file order and flips, starting at the files the run has not consumed yet.
    """
    if cfg.data.format in ("digits", "patches"):  # built in, served from memory
        return None
    from ray_jobs.data import build_train_dataset, dataset_size, epochs_to_cover

    size = dataset_size(cfg)
    images_seen = start_step * cfg.train.global_batch_size
    remaining = (cfg.train.steps - start_step) * cfg.train.global_batch_size
    return {
        "train": build_train_dataset(
            cfg,
            seed=cfg.run.seed,
            epoch=images_seen // size,
            skip_images=images_seen % size,
            num_epochs=epochs_to_cover(images_seen, remaining, size),
        )
    }


def worker_config(cfg: Config) -> Dict[str, Any]:
    """The config a worker receives: credentials left out (workers read them from their own
    environment or the cluster's secret store, never from ``train_loop_config``)."""
    data = to_dict(cfg, redact=False)
    for key in SECRET_STORAGE_KEYS:
        data["storage"][key] = None
    return data


def build_trainer(cfg: Config, resume_uri: Optional[str], stop_actor_name: str, datasets: Optional[Dict[str, Any]] = None,
                  callbacks: Optional[List[Any]] = None, start_step: int = 0,
                  after_shards: Optional[AfterShards] = None):
    """The TorchTrainer of a run; ``callbacks`` (Ray Train UserCallbacks, e.g. Tune's
    TuneReportCallback when a Tune trial drives it) go into its RunConfig. Call it after Ray is
    connected: workers are sized from the cluster (``ray_jobs.resources``)."""
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    low, high = num_workers_range(cfg.ray)
    num_workers = low if low == high else (low, high)
    cpus = plan_cpus_per_worker(cfg, cluster_capacity(), can_grow=cluster_can_grow(cfg))
    log.info("%s: %s worker(s) with %g CPU(s) each", cfg.run.name, num_workers, cpus)
    resources = {"CPU": cpus}
    if cfg.ray.use_gpu:
        resources["GPU"] = 1
    fs, path = storage.filesystem(cfg.run.output_uri, cfg.storage)
    scaling = ScalingConfig(
        num_workers=num_workers,
        use_gpu=cfg.ray.use_gpu,
        resources_per_worker=resources,
        **({"elastic_resize_monitor_interval_s": cfg.ray.resize_interval_s} if low != high else {}),
    )
    dataset_config = None
    if datasets:
        from ray_jobs.data import ingest_options

        # Ray Train replaces a dataset's own execution options; keep rows in file order.
        dataset_config = ray.train.DataConfig(execution_options=ingest_options())
    return TorchTrainer(
        train_loop_per_worker=train_worker,
        train_loop_config={
            "config": worker_config(cfg),
            "cpus_per_worker": cpus,
            "resume_uri": resume_uri,
            "stop_actor": stop_actor_name,
            "fit_start_step": start_step,
            "after_shards": after_shards,
        },
        scaling_config=scaling,
        torch_config=TorchConfig(backend="nccl" if cfg.ray.use_gpu else "gloo",
                                 timeout_s=cfg.ray.worker_timeout_s),
        run_config=RunConfig(
            name=cfg.run.name,
            storage_path=path,
            storage_filesystem=fs,
            failure_config=FailureConfig(max_failures=cfg.ray.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=list(callbacks) if callbacks else None,
        ),
        datasets=datasets,
        dataset_config=dataset_config,
    )


def export_from_checkpoint(checkpoint_uri: str, cfg: Config) -> str:
    """Write the run's export from a finished run's last checkpoint (when the run stopped
    between the two); returns the weights URI."""
    from speed.train.checkpoint import load_ema_model

    model, description = load_ema_model(checkpoint_uri, cfg.storage, key="run.name")
    return save_export(model.state_dict(), description, run_layout(cfg).export_uri, cfg.storage)


def run_training(cfg: Config, *, after_shards: Optional[AfterShards] = None) -> Dict[str, Any]:
    """The whole job for a loaded config (paths absolute); returns the train_done fields."""
    start_step, resume_uri = preflight(cfg)
    layout = run_layout(cfg)
    export_uri = storage.join(layout.export_uri, WEIGHTS_NAME)
    if start_step >= cfg.train.steps:
        # Already trained this far: nothing to do, and that is a success.
        log.info("run '%s' already reached step %d (train.steps=%d); nothing to train", cfg.run.name, start_step,
                 cfg.train.steps)
        if not storage.exists(export_uri, cfg.storage) and resume_uri is not None:
            export_uri = export_from_checkpoint(resume_uri, cfg)
        return {"steps": start_step, "start_step": start_step, "checkpoint": resume_uri, "export": export_uri,
                "final_loss": _last_loss(layout), "images_per_sec": None, "run": layout.root}
    _share_credentials_with_local_workers(cfg)
    ray = init_ray(cfg)
    plan_cpus_per_worker(cfg, cluster_capacity(), can_grow=cluster_can_grow(cfg))  # a request that cannot be placed fails now, not after timeouts
    datasets = training_datasets(cfg, start_step)
    stop_actor_name = f"{STOP_ACTOR_PREFIX}{uuid.uuid4().hex[:8]}"
    stop_actor = _create_stop_actor(stop_actor_name)
    _forward_sigterm(stop_actor)
    try:
        trainer = build_trainer(cfg, resume_uri, stop_actor_name, datasets, start_step=start_step,
                                after_shards=after_shards)
        result = trainer.fit()
    finally:
        ray.kill(stop_actor)
    metrics = result.metrics or {}
    steps = int(metrics.get("step", start_step))
    return {
        "steps": steps,
        "start_step": start_step,
        "checkpoint": latest_complete_checkpoint(layout),
        "export": export_uri if steps >= cfg.train.steps and storage.exists(export_uri, cfg.storage) else None,
        "final_loss": _last_loss(layout),
        "images_per_sec": metrics.get("images_per_sec"),
        "data_wait_fraction": _data_wait_fraction(layout),
        "run": layout.root,
    }


def _data_wait_fraction(layout: RunLayout) -> Optional[float]:
    """The share of step time the run waited for data, after each start's first log interval."""
    from speed.train.components import data_wait_summary

    summary = data_wait_summary(list(layout.iter_metrics()))
    return None if summary is None else round(summary["data_wait_fraction"], 4)


def _last_loss(layout: RunLayout) -> Optional[float]:
    loss = None
    for record in layout.iter_metrics():
        loss = record.get("loss", loss)
    return loss


def _share_credentials_with_local_workers(cfg: Config) -> None:
    """Workers never get credentials through their config. A local Ray started by this job
    inherits this process's environment, so credentials given in the config are put there;
    on a cluster, its workers use their own environment (a warning says so)."""
    settings = {"access_key_id": "AWS_ACCESS_KEY_ID", "secret_access_key": "AWS_SECRET_ACCESS_KEY"}
    given = {env: getattr(cfg.storage, key) for key, env in settings.items() if getattr(cfg.storage, key)}
    if not given:
        return
    import ray

    if ray.is_initialized() or cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        log.warning("storage credentials in the config are not sent to the cluster's workers; give them the "
                    "AWS_* environment variables (or an instance role / secret) instead")
        return
    os.environ.update(given)


def _main(argv: List[str]) -> None:
    cfg = load_job_config("train", argv)
    emit("train_done", **run_training(cfg))


def _create_stop_actor(name: str):
    """A tiny named actor the driver sets on SIGTERM (ray job stop); workers read it at log steps."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    class StopFlag:
        def __init__(self):
            self.stop = False

        def set(self):
            self.stop = True

        def get(self) -> bool:
            return self.stop

    # On the driver's node: an actor on a worker node would die with it (a spot reclaim, an elastic
    # shrink) and take every later restart of the run down with it.
    here = ray.get_runtime_context().get_node_id()
    return StopFlag.options(
        name=name, scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False)
    ).remote()


def _forward_sigterm(stop_actor) -> None:
    """On SIGTERM, ask the workers to checkpoint and stop; a second SIGTERM exits at once."""
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum, frame):
        log.warning("SIGTERM: asking workers to save a checkpoint and stop")
        stop_actor.set.remote()
        signal.signal(signal.SIGTERM, previous if callable(previous) else signal.SIG_DFL)

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. called from a Ray task): nothing to forward
        pass


# --- worker side ---------------------------------------------------------------------------------


class RayReporter:
    """Hands metrics and checkpoint folders to Ray Train, which uploads each checkpoint to the
    run folder under the name the checkpointer gives it (``checkpoint_<step>``)."""

    def __init__(self, async_checkpoint: bool):
        self.async_checkpoint = async_checkpoint

    def report(self, metrics: Dict[str, Any], checkpoint_dir: Optional[str] = None,
               checkpoint_name: Optional[str] = None) -> None:
        import ray.train
        from ray.train import Checkpoint
        from ray.train.v2.api.report_config import CheckpointUploadMode

        kwargs: Dict[str, Any] = {}
        if checkpoint_dir:
            mode = CheckpointUploadMode.ASYNC if self.async_checkpoint else CheckpointUploadMode.SYNC
            kwargs = {"checkpoint": Checkpoint.from_directory(checkpoint_dir), "checkpoint_dir_name": checkpoint_name,
                      "checkpoint_upload_mode": mode, "delete_local_checkpoint_after_upload": True}
        ray.train.report(metrics, **kwargs)


class StreamSource:
    """This rank's share of each global batch from its Ray Data shard, in one pass.

    The dataset starts where this invocation started (``fit_start_step``). After a worker restart
    within the same invocation (worker loss, elastic resize) the loop resumes at a later step, so
    the batches between are read and dropped: data is never trained on twice.
    """

    def __init__(self, shard, cfg: Config, fit_start_step: int):
        self.shard = shard
        self.cfg = cfg
        self.next_step = fit_start_step
        self.iterator = None

    def _next_rows(self, count: int) -> Dict[str, torch.Tensor]:
        if self.iterator is None:
            self.iterator = iter(
                self.shard.iter_torch_batches(
                    batch_size=count,
                    drop_last=True,
                    local_shuffle_buffer_size=self.cfg.data.shuffle_buffer or None,
                    local_shuffle_seed=self.cfg.run.seed,
                    prefetch_batches=self.cfg.data.prefetch_batches,
                )
            )
        try:
            return next(self.iterator)
        except StopIteration:
            raise RuntimeError(
                "the training dataset ran out before train.steps; it covers the run's remaining epochs, "
                "so the dataset changed while training (files removed?)"
            ) from None

    def batch(self, step: int, offset: int, count: int) -> Tuple[torch.Tensor, ...]:
        while self.next_step < step:  # restarted later than this invocation began
            self._next_rows(count)
            self.next_step += 1
        rows = self._next_rows(count)
        self.next_step = step + 1
        labels = rows["label"].long()
        if "image" in rows:
            return rows["image"].float(), labels
        from speed.data.latents import sample_latents

        # A fresh posterior sample per visit, from stream "latents" at (step, this rank's offset).
        generator = seeding.generator(self.cfg.run.seed, "latents", step, offset)
        latents = sample_latents(rows["latent_mean"], rows["latent_std"], None, self.cfg.data.latent_scale, generator)
        if "clean_image" in rows:  # REPA: uint8 [count, 3, r, r], oriented like the latents
            return latents, labels, rows["clean_image"]
        return latents, labels


STOP_FLAG_TIMEOUT_S = 30.0


def _control(stop_actor_name: str):
    """(checkpoint now, stop now) for the loop's log steps: a preemption notice asks for a
    checkpoint, the driver's stop flag (``ray job stop``) for a checkpoint and a stop. An unreachable
    flag is a lost stop request, not a reason to fail training: it is logged and read as "go on"."""
    import ray
    import ray.train

    actor = None
    if stop_actor_name:
        try:
            actor = ray.get_actor(stop_actor_name)
        except ValueError:
            log.warning("stop flag actor %s not found; `ray job stop` cannot ask this run to checkpoint first",
                        stop_actor_name)

    def control() -> Tuple[bool, bool]:
        nonlocal actor
        preempted = ray.train.get_preemption_info() is not None
        stop = False
        if actor is not None:
            try:
                stop = bool(ray.get(actor.get.remote(), timeout=STOP_FLAG_TIMEOUT_S))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
                log.warning("stop flag unreachable (%s); training goes on without it", type(exc).__name__)
                actor = None
        return preempted, stop

    return control


def _resume_point(cfg: Config, fit_resume_uri: Optional[str], env) -> Optional[str]:
    """The checkpoint a (re)started worker group continues from, the same on every rank.

    The newest complete checkpoint in the run's own folder, rather than only the one Ray Train
    registered: a node lost right after every rank finished a checkpoint's report can take that
    report down before the controller collected it, and restarting from the one before would
    redo those steps. Without any in the run's folder, the fit's own resume point
    (``train.resume_from``), if any.
    """
    import ray.train
    import torch.distributed as dist

    choice = [None]
    if env.rank == 0:
        choice[0] = latest_complete_checkpoint(run_layout(cfg))
        if choice[0] is None and ray.train.get_checkpoint() is not None:
            raise CheckpointError(
                f"Ray Train registered a checkpoint of run '{cfg.run.name}', but no complete checkpoint is "
                f"in {run_uri(cfg)}; was the run folder changed while it ran?"
            )
        choice[0] = choice[0] or fit_resume_uri
    if env.distributed:
        dist.broadcast_object_list(choice, src=0)
    return choice[0]


def train_worker(loop_config: Dict[str, Any]) -> None:
    import ray.train

    from speed.train.components import StopRequested
    from speed.train.distributed import current_env
    from speed.train.loop import train
    from speed.train.sources import IndexedSource

    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not sys.stderr.isatty():
        # Ray Train logs every report's whole metrics dict (from a logger named by its file); the
        # loop's own log line says enough.
        from ray.train.v2._internal.execution import context as train_context

        logging.getLogger("ray.train").setLevel(logging.WARNING)
        getattr(train_context, "logger", logging.getLogger("ray.train")).setLevel(logging.WARNING)
    cfg = config_from_dict(loop_config["config"])
    # One thread per CPU the worker was given, never more than the node has (oversubscription
    # turned a 0.4 s step into 6 s).
    torch.set_num_threads(max(1, min(int(loop_config["cpus_per_worker"]), os.cpu_count() or 1)))
    env = current_env()
    if env.device.type == "cuda":
        torch.cuda.set_device(env.device)
    if cfg.data.format in ("digits", "patches"):
        from speed.data.builtin import load_builtin

        images, labels = load_builtin(cfg.data.format, cfg.data.resolution, cfg.data.channels)
        source = IndexedSource(images, labels, cfg.run.seed, cfg.train.global_batch_size)
    else:
        source = StreamSource(ray.train.get_dataset_shard("train"), cfg, int(loop_config.get("fit_start_step", 0)))
    stop = StopRequested()
    stop.install()
    context = ray.train.get_context()
    resume_uri = _resume_point(cfg, loop_config.get("resume_uri"), env)
    with tempfile.TemporaryDirectory(prefix="speed-resume-") as scratch:
        resume_dir = None
        if resume_uri is not None:
            resume_dir = storage.local_copy(resume_uri, scratch, cfg.storage)
            reason = incomplete_reason(resume_dir)
            if reason is not None:
                raise CheckpointError(f"checkpoint '{resume_uri}' is incomplete ({reason}); resume from an earlier one")
        result = train(
            cfg,
            env,
            source,
            RayReporter(cfg.train.async_checkpoint),
            resume_dir=resume_dir,
            stop=stop,
            control=_control(loop_config.get("stop_actor")),
            progress=env.is_main and context.get_world_rank() == 0,
            after_shards=loop_config.get("after_shards"),
        )
    log.info("worker %d finished at step %d", env.rank, result.steps)


def main(argv=None) -> int:
    return run_main("train", _main, argv)


if __name__ == "__main__":
    sys.exit(main())
