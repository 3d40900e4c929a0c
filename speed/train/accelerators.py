"""The training accelerators of one Trainer: token routing (``model.routing``) and representation
alignment (``repa``). Both are off by default, and then nothing here touches a step.

  routing  the kept tokens of the whole global batch are drawn from stream ``routing`` keyed by
           the step, and each micro-batch takes its rows by global sample index (like the noise),
           so the result does not depend on the world size and resumes are exact.
  repa     the frozen encoder runs on the clean images of the micro-batch (on latents: the
           clean images the records carry beside the latents, ``clean``); the projector is
           trained with its own optimizer (same settings and schedule as the DiT's) and wrapped on
           its own (FSDP2 root or DDP); the encoder is never wrapped, sharded or optimised, and
           is not checkpointed (it is rebuilt from ``repa.weights_uri``).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Dict, List, Optional

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from speed.config.schema import OptimConfig, ParallelConfig, RepaConfig, RoutingConfig, StorageConfig
from speed.models.registry import DIT_PRESETS, ModelDescription, repa_block
from speed.models.repa import RepaAligner
from speed.models.routing import TokenRouter
from speed.train.distributed import DistEnv
from speed.train.flops import train_flops_per_image
from speed.train.optim import build_optimizer, set_lr
from speed.train.parallelize import effective_strategy, parallelize_aux


def model_shape(description: ModelDescription) -> Dict[str, int]:
    """depth, hidden_size and the token grid side of a description's model."""
    model = description.model_config()
    preset = DIT_PRESETS[model.name]
    patch = preset["patch_size"]
    return {
        "depth": model.depth if model.depth is not None else preset["depth"],
        "hidden_size": model.hidden_size if model.hidden_size is not None else preset["hidden_size"],
        "grid": description.input_size // patch,
    }


class Accelerators:
    """Routing draws, the REPA aligner and the projector's optimizer; ``train_flops_per_image``."""

    def __init__(self, description: ModelDescription, *, routing: Optional[RoutingConfig], repa: Optional[RepaConfig],
                 storage: Optional[StorageConfig], parallel: ParallelConfig, optim: OptimConfig, env: DistEnv,
                 micro_batch_size: int):
        shape = model_shape(description)
        grid = (shape["grid"], shape["grid"])
        self.env = env
        self.latent = description.is_latent  # the encoder then needs the clean images beside x
        self.strategy_name = effective_strategy(parallel, env)
        self.router: Optional[TokenRouter] = None
        if routing is not None and routing.fraction > 0:
            self.router = TokenRouter.from_config(routing, shape["depth"], grid[0] * grid[1])
        self.aligner: Optional[RepaAligner] = None
        self.optimizer: Optional[torch.optim.Optimizer] = None
        meta_aligner = None
        if repa is not None and repa.encoder:
            block = repa_block(repa, shape["depth"])
            self.aligner = RepaAligner.build(repa, hidden_size=shape["hidden_size"], block=block, token_grid=grid,
                                             storage_cfg=storage).to(env.device)
            self.aligner.projector = parallelize_aux(self.aligner.projector, parallel=parallel, env=env)
            self.optimizer = build_optimizer(self.aligner.projector.parameters(), optim, env.device.type)
            meta_aligner = RepaAligner.build(repa, hidden_size=shape["hidden_size"], block=block, token_grid=grid,
                                             load_weights=False, device="meta")
        # On latents the encoder's input is the clean RGB image (resized to its resolution anyway).
        image_shape = (3, description.resolution, description.resolution) if self.latent else None
        self.train_flops_per_image = train_flops_per_image(description, batch_size=micro_batch_size,
                                                           router=self.router, aligner=meta_aligner,
                                                           image_shape=image_shape)

    # -- a step ---------------------------------------------------------------------------------

    def params(self) -> List[torch.nn.Parameter]:
        """Trainable parameters beyond the DiT's (clipped with them)."""
        return list(self.aligner.projector.parameters()) if self.aligner is not None else []

    def draw_routes(self, seed: int, step: int, global_batch: int) -> Optional[torch.Tensor]:
        """Kept-token indices [B, K] of the whole global batch on the device, or None."""
        if self.router is None:
            return None
        return self.router.draw(seed, step, global_batch).to(self.env.device, non_blocking=True)

    def model_kwargs(self, keep: Optional[torch.Tensor], rows: slice) -> Dict[str, Any]:
        return {} if keep is None else {"route": self.router.route(keep[rows])}

    def training_losses(self, diffusion, model: torch.nn.Module, x: torch.Tensor, t: torch.Tensor,
                        model_kwargs: Dict[str, Any], clean: Optional[torch.Tensor] = None,
                        **options: Any) -> Dict[str, torch.Tensor]:
        """The diffusion's per-sample losses, plus ``repa_loss`` [n] when aligning (not yet in
        ``loss``: ``add_alignment`` adds it once the timestep strategy has weighted the loss, so
        neither the weighting nor loss-aware sampling sees it).

        ``clean``: the micro-batch's clean images when ``x`` holds latents (uint8 or [-1, 1]
        floats, oriented like their latents); on pixels the encoder sees ``x`` itself."""
        if self.aligner is None:
            return diffusion.training_losses(model, x, t, model_kwargs=model_kwargs, **options)
        if clean is None and self.latent:
            raise ValueError(
                "repa.encoder is set and data.format=latents, but the batch carries no clean images for the "
                "encoder (it must see the image, never the latent); re-encode the latents with "
                "prepare.keep_images=true, and have the batch source yield (latents, labels, clean images)"
            )
        target = self.aligner.target(x if clean is None else clean)
        captured: Dict[str, Any] = {}

        def forward(x_t: torch.Tensor, timesteps: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            out, hidden, keep = model(x_t, timesteps, capture_block=self.aligner.block, **kwargs)
            captured.update(hidden=hidden, keep=keep)
            return out

        losses = diffusion.training_losses(forward, x, t, model_kwargs=model_kwargs, **options)
        losses["repa_loss"] = self.aligner.loss(captured["hidden"], target, captured["keep"])  # [n]
        return losses

    @staticmethod
    def add_alignment(losses: Dict[str, torch.Tensor]) -> None:
        """``loss`` += ``repa_loss`` per sample (in place; nothing when not aligning)."""
        if "repa_loss" in losses:
            losses["loss"] = losses["loss"] + losses["repa_loss"].to(losses["loss"].dtype)

    def grad_sync(self, enabled: bool):
        if self.aligner is None:
            return nullcontext()
        projector = self.aligner.projector
        if self.strategy_name == "fsdp":
            projector.set_requires_gradient_sync(enabled)
        elif self.strategy_name == "ddp" and not enabled:
            return projector.no_sync()
        return nullcontext()

    def set_lr(self, lr: float) -> None:
        if self.optimizer is not None:
            set_lr(self.optimizer, lr)

    def step(self, apply: bool) -> None:
        """After the DiT's step: step the projector (unless the step is skipped), clear its grads."""
        if self.optimizer is None:
            return
        if apply:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    # -- state ----------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, Any]:
        if self.aligner is None:
            return {}
        projector = self.aligner.projector
        return {"repa_projector": get_model_state_dict(projector),
                "repa_optim": get_optimizer_state_dict(projector, self.optimizer)}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if self.aligner is None:
            return
        if "repa_projector" not in state:
            raise KeyError("repa: the checkpoint holds no REPA projector (it was trained without repa.encoder); "
                           "resume with the same repa settings or start a new run.name")
        projector = self.aligner.projector
        set_model_state_dict(projector, state["repa_projector"], options=StateDictOptions(strict=True))
        set_optimizer_state_dict(projector, self.optimizer, state["repa_optim"])

