"""The per-worker training loop. Knows nothing about Ray: the caller hands it a batch source and
a reporter (``ray_jobs.train`` adapts Ray Train to both; tests use in-memory ones).

Determinism: every random draw of a step (timesteps, noise, label dropout) is made for the whole
global batch from generators keyed by (seed, step), and each rank takes its slice by global
sample index. So one worker with accumulation 2 and two workers with accumulation 1 compute the
same per-sample losses, and a resumed run continues exactly where the interrupted one stopped.
"""

from __future__ import annotations

import json
from contextlib import nullcontext
import logging
import math
import os
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Protocol, Tuple

import numpy as np
import torch
import torch.distributed as dist

from speed import storage
from speed.config.load import to_dict
from speed.config.schema import Config
from speed.diffusion.factory import build_strategy_from_config, build_training_diffusion
from speed.train.checkpoint import TrainState, assert_finite, load_checkpoint, save_checkpoint
from speed.train.distributed import DistEnv, accumulation_steps, micro_slices, rank_slice
from speed.train.ema import EMA
from speed.train.export import build_model, describe, load_state_dict_checked, save_export, read_weights
from speed.train.optim import build_optimizer, lr_at, set_lr
from speed.train.parallelize import autocast_context, effective_strategy, parallelize, unwrap

log = logging.getLogger("speed.train")

NUM_LOSS_BUCKETS = 10


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the message names the step range."""


# --- what the loop consumes and produces --------------------------------------------------------


class BatchSource(Protocol):
    """Yields this rank's share of global batch ``step``: (x [count, C, H, W], y [count])."""

    def batch(self, step: int, offset: int, count: int) -> Tuple[torch.Tensor, torch.Tensor]: ...


class Reporter(Protocol):
    """Receives metrics at log steps and checkpoint folders at checkpoint steps (every rank calls)."""

    def report(self, metrics: Dict[str, Any], checkpoint_dir: Optional[str] = None) -> None: ...


@dataclass
class TrainResult:
    steps: int
    start_step: int
    final_loss: float
    images_per_sec: float
    export_uri: Optional[str]
    checkpoint_dir: Optional[str]
    history: List[Dict[str, Any]] = field(default_factory=list)


# --- randomness keyed by (seed, step) ------------------------------------------------------------


def step_seed(seed: int, step: int, stream: int) -> int:
    """A 63-bit seed for one random stream of one step (SeedSequence mixes the three well)."""
    return int(np.random.SeedSequence([seed, step, stream]).generate_state(2, dtype=np.uint64)[0] >> 1)


@dataclass
class StepDraws:
    t: torch.Tensor  # [B] long
    weights: torch.Tensor  # [B] float
    noise: torch.Tensor  # [B, C, H, W]
    drop_mask: torch.Tensor  # [B] bool


def draw_step(strategy, seed: int, step: int, global_batch: int, sample_shape: Tuple[int, ...],
              dropout_prob: float, device: torch.device) -> StepDraws:
    """All random draws of one global batch; ranks slice them by global sample index."""
    t_gen = torch.Generator().manual_seed(step_seed(seed, step, 0))
    t, w = strategy.sample(global_batch, generator=t_gen)  # CPU
    dev_gen = torch.Generator(device=device).manual_seed(step_seed(seed, step, 1))
    noise = torch.randn((global_batch, *sample_shape), generator=dev_gen, device=device)  # [B, C, H, W]
    drop = torch.rand(global_batch, generator=dev_gen, device=device) < dropout_prob  # [B]
    return StepDraws(t.to(device, non_blocking=True), w.to(device, non_blocking=True), noise, drop)


# --- metrics accumulated on device, read at log steps only ---------------------------------------


class MetricsAccumulator:
    """Running sums on the device; ``read`` does one all-reduce and one host sync."""

    def __init__(self, num_timesteps: int, device: torch.device):
        self.num_timesteps = num_timesteps
        self.device = device
        self.reset()

    def reset(self) -> None:
        # [loss_sum, mse_sum, vb_sum, count, grad_norm_sum, steps, skipped, bucket sums..., bucket counts...]
        self.sums = torch.zeros(7 + 2 * NUM_LOSS_BUCKETS, dtype=torch.float64, device=self.device)

    def add_losses(self, losses: Dict[str, torch.Tensor], t: torch.Tensor) -> None:
        loss = losses["loss"].detach().double()
        self.sums[0] += loss.sum()
        self.sums[1] += losses["mse"].detach().double().sum()
        self.sums[2] += losses["vb"].detach().double().sum()
        self.sums[3] += loss.numel()
        bucket = (t * NUM_LOSS_BUCKETS) // self.num_timesteps  # [n]
        self.sums[7:7 + NUM_LOSS_BUCKETS].index_add_(0, bucket, loss)
        self.sums[7 + NUM_LOSS_BUCKETS:].index_add_(0, bucket, torch.ones_like(loss))

    def add_step(self, grad_norm: torch.Tensor, skipped: bool = False) -> None:
        self.sums[4] += grad_norm.detach().double()
        self.sums[5] += 1
        if skipped:
            self.sums[6] += 1

    def read(self, env: DistEnv) -> Dict[str, float]:
        sums = self.sums.clone()
        if env.distributed:
            grad = sums[4:6].clone()
            dist.all_reduce(sums)
            sums[4:6] = grad  # the grad norm is already global; keep rank 0's
        values = sums.tolist()
        count = max(values[3], 1.0)
        out = {
            "loss": values[0] / count,
            "mse": values[1] / count,
            "vb": values[2] / count,
            "grad_norm": values[4] / max(values[5], 1.0),
            "skipped_steps": values[6],
        }
        for b in range(NUM_LOSS_BUCKETS):
            n = values[7 + NUM_LOSS_BUCKETS + b]
            out[f"loss_t{b}"] = values[7 + b] / n if n else float("nan")
        self.reset()
        return out


# --- the trainer ---------------------------------------------------------------------------------


class StopRequested:
    """Set by SIGTERM (``ray job stop``, a node shutting down) or a caller; checked between steps."""

    def __init__(self) -> None:
        self.flag = False

    def install(self) -> None:
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: the caller sets the flag itself
            pass

    def _handle(self, *_: Any) -> None:
        self.flag = True


# Called on every rank at log steps: returns (checkpoint_now, stop_now) for this rank; ranks then
# agree (any rank asking wins). Ray's adapter reports preemption notices and job-stop requests here.
Control = Callable[[], Tuple[bool, bool]]


class Trainer:
    """Model, optimizer, EMA and strategy of one worker; ``train_step`` is the unit under test."""

    def __init__(self, cfg: Config, env: DistEnv, sample_shape: Optional[Tuple[int, int, int]] = None):
        self.cfg = cfg
        self.env = env
        description = describe(cfg)
        self.description = description
        self.sample_shape = sample_shape or (description.in_channels, description.input_size, description.input_size)
        torch.manual_seed(cfg.run.seed)  # same initial weights on every rank
        model = build_model(cfg.model, description.input_size, description.in_channels)
        self.model = parallelize(model, parallel=cfg.parallel, env=env)
        self.strategy_name = effective_strategy(cfg.parallel, env)
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim, env.device.type)
        self.ema = EMA(self.model, decay=cfg.train.ema_decay, warmup=cfg.train.ema_warmup)
        self.diffusion = build_training_diffusion(cfg.diffusion, cfg.model.learn_sigma)
        self.timesteps = build_strategy_from_config(cfg.diffusion)
        self.weight_vb = cfg.diffusion.timesteps.weight_vb or self.timesteps.weights_apply_to == "all"
        self.adaptive = "loss_aware" in (
            cfg.diffusion.timesteps.sampling or cfg.diffusion.timesteps.name,
        )
        self.global_batch = cfg.train.global_batch_size
        self.offset, self.count = rank_slice(self.global_batch, env.world_size, env.rank)
        self.num_micro = accumulation_steps(self.global_batch, env.world_size, cfg.train.micro_batch_size)
        self.metrics = MetricsAccumulator(cfg.diffusion.num_timesteps, env.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    # -- one optimizer step ---------------------------------------------------------------------

    def _grad_sync(self, enabled: bool):
        if self.strategy_name == "fsdp":
            self.model.set_requires_gradient_sync(enabled)
            return nullcontext()
        if self.strategy_name == "ddp" and not enabled:
            return self.model.no_sync()
        return nullcontext()

    def train_step(self, step: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimizer step on this rank's share (x [count, C, H, W], y [count]) of batch ``step``.

        The loss is normalised by the global batch (times the world size, since FSDP/DDP average
        gradients over ranks), so uneven shares and any accumulation give the same update.
        """
        cfg = self.cfg
        set_lr(self.optimizer, lr_at(step, cfg.optim))
        draws = draw_step(
            self.timesteps, cfg.run.seed, step, self.global_batch, self.sample_shape,
            cfg.model.class_dropout_prob, self.env.device,
        )
        x = x.to(self.env.device, non_blocking=True)
        y = y.to(self.env.device, non_blocking=True)
        scale = self.env.world_size / self.global_batch
        local_t, local_losses = [], []
        for index, (start, size) in enumerate(micro_slices(self.offset, self.count, self.num_micro)):
            last = index == self.num_micro - 1
            local = slice(start - self.offset, start - self.offset + size)
            glob = slice(start, start + size)
            with self._grad_sync(last), autocast_context(cfg.parallel, self.env):
                losses = self.diffusion.training_losses(
                    self.model,
                    x[local],
                    draws.t[glob],
                    model_kwargs={"y": y[local], "drop_mask": draws.drop_mask[glob]},
                    noise=draws.noise[glob],
                    weights=draws.weights[glob],
                    weight_vb=self.weight_vb,
                )
                (losses["loss"].float().sum() * scale).backward()
            self.metrics.add_losses(losses, draws.t[glob])
            if self.adaptive:
                local_t.append(draws.t[glob])
                local_losses.append(losses["loss"].detach())
        max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        skipped = False
        if cfg.train.on_nonfinite == "skip":
            # Skipping needs the decision now: one host sync per step, only in this mode.
            finite = torch.isfinite(grad_norm).to(torch.int32)
            if self.env.distributed:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            skipped = not bool(finite.item())
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.ema.update(self.model, step)
        self.metrics.add_step(torch.nan_to_num(grad_norm, nan=0.0, posinf=0.0) if skipped else grad_norm, skipped)
        if self.adaptive:
            self._update_adaptive(torch.cat(local_t), torch.cat(local_losses))

    def _update_adaptive(self, t: torch.Tensor, losses: torch.Tensor) -> None:
        """Loss-aware sampling learns from every worker's losses (gathered, padded to equal size)."""
        if self.env.distributed:
            width = max(rank_slice(self.global_batch, self.env.world_size, r)[1] for r in range(self.env.world_size))
            packed = torch.full((2, width), -1.0, device=self.env.device, dtype=torch.float64)
            packed[0, : t.numel()] = t.double()
            packed[1, : t.numel()] = losses.double()
            gathered = [torch.empty_like(packed) for _ in range(self.env.world_size)]
            dist.all_gather(gathered, packed)
            stacked = torch.cat(gathered, dim=1)
            keep = stacked[0] >= 0
            t, losses = stacked[0, keep].long(), stacked[1, keep]
        self.timesteps.update(t.cpu(), losses.cpu())

    # -- state ----------------------------------------------------------------------------------

    def strategy_state(self) -> Dict[str, torch.Tensor]:
        return _flatten_tensors(self.timesteps.state_dict())

    def load_strategy_state(self, flat: Dict[str, torch.Tensor]) -> None:
        if flat:
            self.timesteps.load_state_dict(_unflatten_tensors(flat))

    def full_ema_state(self) -> Dict[str, torch.Tensor]:
        """The EMA weights gathered to full tensors on every rank (a collective under FSDP)."""
        out = {}
        for key, value in self.ema.state_dict().items():
            if hasattr(value, "full_tensor"):
                value = value.full_tensor()
            out[key] = value.detach().to("cpu", torch.float32)
        return out

    def ema_model(self) -> torch.nn.Module:
        """A plain fp32 DiT holding the EMA weights, for sampling and evaluation."""
        model = build_model(self.cfg.model, self.description.input_size, self.description.in_channels)
        model.load_state_dict(self.full_ema_state(), strict=True)
        return model.eval().requires_grad_(False)

    def init_weights_from(self, uri: str) -> None:
        """train.init_from: load safetensors weights (no pickle) into the model and the EMA."""
        tensors, _ = read_weights(uri, self.cfg.storage, "train.init_from")
        plain = build_model(self.cfg.model, self.description.input_size, self.description.in_channels)
        load_state_dict_checked(plain, tensors, source=uri, key="train.init_from")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, plain.state_dict(), options=StateDictOptions(full_state_dict=True))
        self.ema = EMA(self.model, decay=self.cfg.train.ema_decay, warmup=self.cfg.train.ema_warmup)


def _flatten_tensors(state: Dict[str, Any], prefix: str = "") -> Dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten_tensors(value, name + "/"))
        elif isinstance(value, torch.Tensor):
            out[name] = value
    return out


def _unflatten_tensors(flat: Dict[str, torch.Tensor]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        parts = key.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return out


# --- run outputs ---------------------------------------------------------------------------------


class RunFiles:
    """Files of a run under <run.output_uri>/<run.name> (local or s3://), written by rank 0.

    metrics.jsonl is rewritten whole at each log step (object stores cannot append), so it is
    always a complete file; on resume it is truncated to the resumed step so it continues cleanly.
    """

    def __init__(self, cfg: Config, env: DistEnv):
        self.cfg = cfg
        self.env = env
        self.run_uri = storage.join(cfg.run.output_uri, cfg.run.name)
        self.records: List[Dict[str, Any]] = []
        self.tb = None
        self.tb_dir = None

    def start(self, start_step: int) -> None:
        if not self.env.is_main:
            return
        uri = storage.join(self.run_uri, "metrics.jsonl")
        if start_step > 0 and storage.exists(uri, self.cfg.storage):
            for line in storage.read_text(uri, self.cfg.storage).splitlines():
                if line.strip():
                    record = json.loads(line)
                    if record.get("step", 0) <= start_step:
                        self.records.append(record)
        storage.write_text(
            storage.join(self.run_uri, "config.yaml"),
            json.dumps(to_dict(self.cfg), indent=1, sort_keys=True),
            self.cfg.storage,
        )
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb_dir = tempfile.mkdtemp(prefix="speed-tb-")
            self.tb = SummaryWriter(self.tb_dir, purge_step=start_step + 1 if start_step else None)
        except ImportError:  # tensorboard is optional at run time
            self.tb = None

    def log(self, record: Dict[str, Any]) -> None:
        if not self.env.is_main:
            return
        record = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}
        self.records.append(record)
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records)
        storage.write_text(storage.join(self.run_uri, "metrics.jsonl"), text, self.cfg.storage)
        if self.tb is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()
            self._upload_tb()

    def _upload_tb(self) -> None:
        if self.tb_dir is None:
            return
        for path in Path(self.tb_dir).glob("*"):
            storage.write_bytes(storage.join(self.run_uri, "tensorboard", path.name), path.read_bytes(), self.cfg.storage)

    def write(self, relative: str, data: bytes) -> str:
        uri = storage.join(self.run_uri, relative)
        storage.write_bytes(uri, data, self.cfg.storage)
        return uri

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self._upload_tb()
            shutil.rmtree(self.tb_dir, ignore_errors=True)


# --- periodic sampling and evaluation ------------------------------------------------------------


def _sample_grid(model: torch.nn.Module, description, cfg: Config, step: int, files: RunFiles) -> str:
    from speed.sample import generate, make_grid_png

    labels = [c for c in cfg.sample.classes for _ in range(cfg.sample.per_class)]
    images = generate(model, description, cfg.sampling, labels, list(range(len(labels))), cfg.sample.seed, "cpu")
    return files.write(f"samples/step_{step:07d}.png", make_grid_png(images, nrow=cfg.sample.per_class))


def _evaluate(model: torch.nn.Module, description, cfg: Config) -> Dict[str, float]:
    """digits-FID and class accuracy of EMA samples (the CPU configs' metric)."""
    if cfg.eval.feature_extractor != "digits" or description.is_latent:
        return {}
    from speed.evaluate import default_classifier_uri, digits_metrics, get_digits_classifier
    from speed.sample import generate

    n = cfg.train.eval_num_samples
    labels = [i % cfg.model.num_classes for i in range(n)]
    images = generate(model, description, cfg.sampling, labels, list(range(n)), cfg.run.seed + 1, "cpu")
    # The classifier is trained once and cached beside the runs, not retrained by every worker.
    classifier = get_digits_classifier(default_classifier_uri(cfg), cfg.storage)
    return digits_metrics(images, labels, classifier=classifier)


# --- the loop ------------------------------------------------------------------------------------


def _due(step: int, every: int, last_step: int) -> bool:
    return step == last_step or (every > 0 and step % every == 0)


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
    on_log: Optional[Callable[[Dict[str, Any]], None]] = None,
) -> TrainResult:
    """Train until ``train.steps``; every rank calls this with its own source and reporter."""
    trainer = Trainer(cfg, env)
    start_step = 0
    images_seen = 0
    if resume_dir is not None:
        ema_state = trainer.ema.state_dict()
        strategy_state = trainer.strategy_state()
        state = load_checkpoint(
            resume_dir, model=trainer.model, optimizer=trainer.optimizer, ema_state=ema_state,
            strategy_state=strategy_state, env=env,
        )
        trainer.ema.load_state_dict(ema_state)
        trainer.load_strategy_state(strategy_state)
        start_step, images_seen = state.step, state.images_seen
        log.info("resumed from %s at step %d", resume_dir, start_step)
    elif cfg.train.init_from:
        trainer.init_weights_from(cfg.train.init_from)
    stop = stop or StopRequested()
    files = RunFiles(cfg, env)
    files.start(start_step)
    total = cfg.train.steps
    bar = None
    if progress and env.is_main:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=start_step, desc=cfg.run.name, unit="step", dynamic_ncols=True)
    last_log_step = start_step
    interval_start = time.perf_counter()
    data_wait = 0.0
    run_start = time.perf_counter()
    last_record: Dict[str, Any] = {}
    checkpoint_dir = None
    export_uri = None
    step = start_step
    history: List[Dict[str, Any]] = []
    while step < total:
        fetch_start = time.perf_counter()
        x, y = source.batch(step, trainer.offset, trainer.count)
        data_wait += time.perf_counter() - fetch_start
        trainer.train_step(step, x, y)
        step += 1
        images_seen += trainer.global_batch
        at_log_boundary = step % cfg.train.log_every == 0 or step == total
        # Ranks must agree before stopping or saving out of turn (a collective at log steps).
        extra_checkpoint, stop_now = False, stop.flag and not env.distributed
        if at_log_boundary:
            wanted_checkpoint, wanted_stop = control() if control is not None else (False, False)
            extra_checkpoint = _agree(wanted_checkpoint, env)
            stop_now = _agree(wanted_stop or stop.flag, env)
        metrics: Dict[str, Any] = {}
        if at_log_boundary or stop_now:
            values = trainer.metrics.read(env)
            elapsed = time.perf_counter() - interval_start
            steps_done = step - last_log_step
            if not math.isfinite(values["loss"]) and cfg.train.on_nonfinite == "raise":
                raise NonFiniteLossError(
                    f"the loss became NaN or inf between steps {last_log_step + 1} and {step}; lower "
                    "optim.lr, set optim.grad_clip, or train.on_nonfinite=skip. No checkpoint was written "
                    "from these weights; resume from the last checkpoint"
                )
            metrics = {
                "step": step,
                "images_seen": images_seen,
                "world_size": env.world_size,
                "global_batch_size": trainer.global_batch,
                "resumed_from_step": start_step,  # the checkpoint this attempt started from (0: fresh)
                "lr": lr_at(step - 1, cfg.optim),
                **values,
                "images_per_sec": steps_done * trainer.global_batch / max(elapsed, 1e-9),
                "step_time_s": elapsed / max(steps_done, 1),
                "data_wait_fraction": data_wait / max(elapsed, 1e-9),
            }
            interval_start, data_wait, last_log_step = time.perf_counter(), 0.0, step
        eval_due = _due(step, cfg.train.eval_every, total) and not stop_now
        sample_due = _due(step, cfg.train.sample_every, total) and not stop_now
        if eval_due or sample_due:
            # Gathering the EMA is a collective: every rank takes part, rank 0 samples.
            ema_model = trainer.ema_model()
            if env.is_main and eval_due:
                metrics.update(_evaluate(ema_model, trainer.description, cfg))
            if env.is_main and sample_due:
                metrics["sample_grid"] = _sample_grid(ema_model, trainer.description, cfg, step, files)
        checkpoint_now = _due(step, cfg.train.checkpoint_every, total) or stop_now or extra_checkpoint
        if metrics:
            files.log({k: v for k, v in metrics.items()})
            history.append(metrics)
            last_record = metrics
            if on_log:
                on_log(metrics)
            if bar is not None:
                bar.set_postfix(loss=f"{metrics.get('loss', float('nan')):.4f}", ips=f"{metrics.get('images_per_sec', 0):.0f}")
        if checkpoint_now:
            checkpoint_dir = _checkpoint(trainer, cfg, env, step, images_seen, reporter, metrics)
        elif at_log_boundary:
            reporter.report(_plain(metrics))
        if bar is not None:
            bar.update(1)
        if stop_now:
            log.warning("stop requested: saved a checkpoint at step %d and stopping", step)
            break
    if bar is not None:
        bar.close()
    if step >= total:
        state = trainer.full_ema_state()
        if env.is_main:
            export_uri = save_export(state, describe(cfg, step), storage.join(files.run_uri, "export"), cfg.storage)
    files.close()
    wall = time.perf_counter() - run_start
    trained = step - start_step
    return TrainResult(
        steps=step,
        start_step=start_step,
        final_loss=float(last_record.get("loss", float("nan"))),
        images_per_sec=trained * trainer.global_batch / max(wall, 1e-9),
        export_uri=export_uri,
        checkpoint_dir=checkpoint_dir,
        history=history,
    )


def _agree(flag: bool, env: DistEnv) -> bool:
    """True on every rank if any rank wants to stop (a collective; called at log steps)."""
    if not env.distributed:
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=env.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _plain(metrics: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}


def _checkpoint(trainer: Trainer, cfg: Config, env: DistEnv, step: int, images_seen: int,
                reporter: Reporter, metrics: Dict[str, Any]) -> str:
    state = TrainState(
        step=step,
        images_seen=images_seen,
        config=to_dict(cfg),
        description=json.loads(describe(cfg, step).to_json()),
    )
    directory = tempfile.mkdtemp(prefix=f"speed-ckpt-{step:07d}-")
    save_checkpoint(
        directory, model=trainer.model, optimizer=trainer.optimizer, ema_state=trainer.ema.state_dict(),
        strategy_state=trainer.strategy_state(), train_state=state, env=env,
    )
    reporter.report({**_plain(metrics), "step": step}, checkpoint_dir=directory)
    return directory
