"""AdamW and the learning-rate schedule as a pure function of the step."""

from __future__ import annotations

from typing import Iterable

import torch

from speed.config.schema import OptimConfig


def lr_at(step: int, optim: OptimConfig) -> float:
    """Constant learning rate after an optional linear warm-up (step counts from 0)."""
    if optim.warmup_steps > 0 and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    return optim.lr


def build_optimizer(params: Iterable[torch.nn.Parameter], optim: OptimConfig, device_type: str) -> torch.optim.AdamW:
    """AdamW with the fused kernel on GPU and the foreach kernel elsewhere, unless configured."""
    choice = optim.implementation
    if choice == "auto":
        choice = "fused" if device_type == "cuda" else "foreach"
    return torch.optim.AdamW(
        params,
        lr=optim.lr,
        betas=(optim.beta1, optim.beta2),
        eps=optim.eps,
        weight_decay=optim.weight_decay,
        fused=choice == "fused",
        foreach=choice == "foreach",
    )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
