"""The Trainer of one worker: model, optimizer, EMA and timestep strategy, and ``train_step``.

It is a ``Stateful``: ``state_dict`` / ``load_state_dict`` hold exactly what a checkpoint stores
(tensors only; the step and the config travel as plain JSON beside them), so the checkpointer
hands it to torch.distributed.checkpoint as it is.

Determinism: every random draw of a step (timesteps, noise, label dropout, routed tokens) is
made for the whole global batch from streams keyed by (seed, step) (``speed.seeding``), and each
rank takes its slice by global sample index. So one worker with accumulation 2 and two workers
with accumulation 1 compute the same per-sample losses, and a resumed run continues exactly where
it stopped.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from speed import seeding
from speed.config.schema import (
    DiffusionConfig,
    OptimConfig,
    ParallelConfig,
    RepaConfig,
    RoutingConfig,
    StorageConfig,
    TrainConfig,
)
from speed.diffusion.factory import build_strategy_from_config, build_training_diffusion
from speed.models.registry import ModelDescription
from speed.train.accelerators import Accelerators
from speed.train.distributed import DistEnv, accumulation_steps, micro_slices, rank_slice
from speed.train.ema import EMA
from speed.train.optim import build_optimizer, lr_at, set_lr
from speed.train.parallelize import autocast_context, effective_strategy, parallelize

NUM_LOSS_BUCKETS = 10


@dataclass
class StepDraws:
    t: torch.Tensor  # [B]: long DDPM steps, or float flow times in [0, 1]
    weights: torch.Tensor  # [B] float
    noise: torch.Tensor  # [B, C, H, W]
    drop_mask: torch.Tensor  # [B] bool


def draw_step(strategy, seed: int, step: int, global_batch: int, sample_shape: Tuple[int, ...],
              dropout_prob: float, device: torch.device) -> StepDraws:
    """All random draws of one global batch; ranks slice them by global sample index."""
    t, w = strategy.sample(global_batch, generator=seeding.generator(seed, "timesteps", step))  # CPU
    noise_gen = seeding.generator(seed, "noise", step, device=device)
    noise = torch.randn((global_batch, *sample_shape), generator=noise_gen, device=device)  # [B, C, H, W]
    drop = torch.rand(global_batch, generator=noise_gen, device=device) < dropout_prob  # [B]
    return StepDraws(t.to(device, non_blocking=True), w.to(device, non_blocking=True), noise, drop)


class MetricsAccumulator:
    """Running sums on the device; ``read`` does one all-reduce and one host sync (log steps only)."""

    def __init__(self, time_span: float, device: torch.device, has_vb: bool = True):
        # time_span: T for DDPM steps, 1.0 for flow time; loss_t<b> buckets split it into ten.
        self.time_span = float(time_span)
        self.has_vb = has_vb
        self.device = device
        self.reset()

    def reset(self) -> None:
        # [loss_sum, mse_sum, vb_sum, count, grad_norm_sum, steps, skipped, bucket sums..., bucket counts...]
        self.sums = torch.zeros(7 + 2 * NUM_LOSS_BUCKETS, dtype=torch.float64, device=self.device)
        self.repa_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # REPA's term, when aligning
        self.has_repa = False

    def add_losses(self, losses: Dict[str, torch.Tensor], t: torch.Tensor) -> None:
        loss = losses["loss"].detach().double()
        self.sums[0] += loss.sum()
        self.sums[1] += losses["mse"].detach().double().sum()
        if self.has_vb:
            self.sums[2] += losses["vb"].detach().double().sum()
        self.sums[3] += loss.numel()
        if "repa_loss" in losses:
            self.repa_sum += losses["repa_loss"].detach().double().sum()
            self.has_repa = True
        bucket = (t.double() * NUM_LOSS_BUCKETS / self.time_span).floor().long().clamp(0, NUM_LOSS_BUCKETS - 1)
        self.sums[7:7 + NUM_LOSS_BUCKETS].index_add_(0, bucket, loss)
        self.sums[7 + NUM_LOSS_BUCKETS:].index_add_(0, bucket, torch.ones_like(loss))

    def add_step(self, grad_norm: torch.Tensor, skipped: bool = False) -> None:
        self.sums[4] += grad_norm.detach().double()
        self.sums[5] += 1
        if skipped:
            self.sums[6] += 1

    def read(self, env: DistEnv) -> Dict[str, float]:
        has_repa = self.has_repa
        sums = torch.cat([self.sums, self.repa_sum.view(1)]) if has_repa else self.sums.clone()
        if env.distributed:
            grad = sums[4:6].clone()
            dist.all_reduce(sums)
            sums[4:6] = grad  # the grad norm is already global; keep rank 0's
        values = sums.tolist()
        count = max(values[3], 1.0)
        out = {"loss": values[0] / count, "mse": values[1] / count}
        if self.has_vb:
            out["vb"] = values[2] / count
        if has_repa:
            out["repa_loss"] = values[-1] / count
        out["grad_norm"] = values[4] / max(values[5], 1.0)
        out["skipped_steps"] = values[6]
        for b in range(NUM_LOSS_BUCKETS):
            n = values[7 + NUM_LOSS_BUCKETS + b]
            out[f"loss_t{b}"] = values[7 + b] / n if n else float("nan")
        self.reset()
        return out


class Trainer(Stateful):
    """Model, optimizer, EMA and strategy of one worker; ``train_step`` is the unit under test."""

    def __init__(self, description: ModelDescription, *, diffusion: DiffusionConfig, optim: OptimConfig,
                 train: TrainConfig, parallel: ParallelConfig, seed: int, env: DistEnv,
                 routing: Optional[RoutingConfig] = None, repa: Optional[RepaConfig] = None,
                 storage: Optional[StorageConfig] = None):
        self.description = description
        self.optim_cfg = optim
        self.train_cfg = train
        self.parallel_cfg = parallel
        self.seed = seed
        self.env = env
        self.sample_shape = (description.in_channels, description.input_size, description.input_size)
        self.class_dropout_prob = description.model_config().class_dropout_prob
        torch.manual_seed(seed)  # same initial weights on every rank
        self.model = parallelize(description.build(), parallel=parallel, env=env)
        self.strategy_name = effective_strategy(parallel, env)
        self.optimizer = build_optimizer(self.model.parameters(), optim, env.device.type)
        self.ema = EMA(self.model, decay=train.ema_decay, warmup=train.ema_warmup)
        self.objective = diffusion.objective
        self.diffusion = build_training_diffusion(diffusion, description.model_config().learn_sigma)
        self.timesteps = build_strategy_from_config(diffusion)
        if self.objective == "ddpm":
            weight_vb = diffusion.timesteps.weight_vb or self.timesteps.weights_apply_to == "all"
            self.loss_options = {"weight_vb": weight_vb}
        else:
            self.loss_options = {}  # the velocity MSE is the whole loss
        self.adaptive = self.timesteps.adaptive  # learns from every worker's losses after each step
        self.learns_weights = self.timesteps.learns_weights  # trains loss-weighting parameters
        self.global_batch = train.global_batch_size
        self.offset, self.count = rank_slice(self.global_batch, env.world_size, env.rank)
        self.num_micro = accumulation_steps(self.global_batch, env.world_size, train.micro_batch_size)
        self.metrics = MetricsAccumulator(
            diffusion.num_timesteps if self.objective == "ddpm" else 1.0, env.device, has_vb=self.objective == "ddpm"
        )
        # Token routing and REPA (off by default); also counts the training FLOPs per image.
        self.extras = Accelerators(description, routing=routing, repa=repa, storage=storage, parallel=parallel,
                                   optim=optim, env=env, micro_batch_size=min(train.micro_batch_size, self.count))
        self.train_flops_per_image = self.extras.train_flops_per_image
        self.params = [p for p in self.model.parameters() if p.requires_grad] + self.extras.params()

    # -- one optimizer step ---------------------------------------------------------------------

    def _grad_sync(self, enabled: bool):
        if self.strategy_name == "fsdp":
            self.model.set_requires_gradient_sync(enabled)
            return nullcontext()
        if self.strategy_name == "ddp" and not enabled:
            return self.model.no_sync()
        return nullcontext()

    def train_step(self, step: int, x: torch.Tensor, y: torch.Tensor, clean: Optional[torch.Tensor] = None) -> None:
        """One optimizer step on this rank's share (x [count, C, H, W], y [count]) of batch ``step``.

        ``clean`` [count, 3, r, r]: the clean images beside latent ``x`` (uint8, or floats in
        [-1, 1]), which REPA's encoder sees on the latent path; unused otherwise.

        The loss is normalised by the global batch (times the world size, since FSDP/DDP average
        gradients over ranks), so uneven shares and any accumulation give the same update.
        """
        set_lr(self.optimizer, lr_at(step, self.optim_cfg))
        self.extras.set_lr(lr_at(step, self.optim_cfg))
        routes = self.extras.draw_routes(self.seed, step, self.global_batch)  # [B, K] or None
        draws = draw_step(self.timesteps, self.seed, step, self.global_batch, self.sample_shape,
                          self.class_dropout_prob, self.env.device)
        x = x.to(self.env.device, non_blocking=True)
        y = y.to(self.env.device, non_blocking=True)
        if clean is not None:
            clean = clean.to(self.env.device, non_blocking=True)
        scale = self.env.world_size / self.global_batch
        local_t, local_losses = [], []
        for index, (start, size) in enumerate(micro_slices(self.offset, self.count, self.num_micro)):
            last = index == self.num_micro - 1
            local = slice(start - self.offset, start - self.offset + size)
            glob = slice(start, start + size)
            with self._grad_sync(last), self.extras.grad_sync(last), autocast_context(self.parallel_cfg, self.env):
                losses = self.extras.training_losses(
                    self.diffusion,
                    self.model,
                    x[local],
                    draws.t[glob],
                    model_kwargs={"y": y[local], "drop_mask": draws.drop_mask[glob],
                                  **self.extras.model_kwargs(routes, glob)},
                    clean=None if clean is None else clean[local],
                    noise=draws.noise[glob],
                    weights=draws.weights[glob],
                    **self.loss_options,
                )
                raw_loss = losses["loss"]
                if self.learns_weights:
                    losses["loss"] = self.timesteps.transform_loss(raw_loss, draws.t[glob])
                self.extras.add_alignment(losses)  # REPA's term, after the strategy's weighting
                (losses["loss"].float().sum() * scale).backward()
            self.metrics.add_losses(losses, draws.t[glob])
            if self.adaptive:
                local_t.append(draws.t[glob])
                local_losses.append(raw_loss.detach())
        max_norm = self.optim_cfg.grad_clip if self.optim_cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        skipped = False
        if self.train_cfg.on_nonfinite == "skip":
            # Skipping needs the decision now: one host sync per step, only in this mode.
            finite = torch.isfinite(grad_norm).to(torch.int32)
            if self.env.distributed:
                dist.all_reduce(finite, op=dist.ReduceOp.MIN)
            skipped = not bool(finite.item())
        if not skipped:
            self.optimizer.step()
            self.ema.update(self.model, step)
            if self.learns_weights:
                self.timesteps.after_backward(self._average_over_workers)
        elif self.learns_weights:
            self.timesteps.discard_gradients()
        self.optimizer.zero_grad(set_to_none=True)
        self.extras.step(apply=not skipped)
        self.metrics.add_step(torch.nan_to_num(grad_norm, nan=0.0, posinf=0.0) if skipped else grad_norm, skipped)
        if self.adaptive:
            self._update_adaptive(torch.cat(local_t), torch.cat(local_losses))

    def _average_over_workers(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.env.distributed:
            dist.all_reduce(tensor)
            tensor /= self.env.world_size
        return tensor

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
            t, losses = stacked[0, keep].to(t.dtype), stacked[1, keep]
        self.timesteps.update(t.cpu(), losses.cpu())

    # -- state (Stateful) -----------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        """Model and optimizer (sharded under FSDP), EMA and strategy state: tensors only."""
        state: Dict[str, Any] = {
            "model": get_model_state_dict(self.model),
            "optim": get_optimizer_state_dict(self.model, self.optimizer),
            "ema": self.ema.state_dict(),
        }
        strategy = _flatten_tensors(self.timesteps.state_dict())
        if strategy:
            state["strategy"] = strategy
        state.update(self.extras.state_dict())
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=True))
        if "optim" in state:
            set_optimizer_state_dict(self.model, self.optimizer, state["optim"])
        self.ema.load_state_dict(state["ema"])
        self.extras.load_state_dict(state)
        if state.get("strategy"):
            self.timesteps.load_state_dict(_unflatten_tensors(state["strategy"]))

    def ema_model(self) -> torch.nn.Module:
        """A plain fp32 DiT holding the EMA weights, for sampling and evaluation (a collective
        under FSDP: every rank calls it)."""
        model = self.description.build()
        model.load_state_dict(self.ema.full_state_dict(), strict=True)
        return model.eval().requires_grad_(False)

    def init_weights(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Start from given full weights (``train.init_from``): the model and a fresh EMA."""
        set_model_state_dict(self.model, tensors, options=StateDictOptions(full_state_dict=True, strict=True))
        self.ema = EMA(self.model, decay=self.train_cfg.ema_decay, warmup=self.train_cfg.ema_warmup)


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
