"""Exponential moving average (EMA) of model weights, kept in fp32.

One implementation for every model: the shadow is a dict of fp32 clones of the model's
parameters and persistent buffers, named like the model's state dict (without the prefixes that
``torch.compile``, activation checkpointing or DDP add). For an FSDP2-sharded model the clones are
DTensors with the parameters' placements, so each rank stores and updates only its own shard with
no communication, and ``state_dict()`` holds what torch.distributed.checkpoint expects; for a plain
model they are plain tensors, and ``state_dict()`` loads straight into a DiT (published DiT
checkpoints are such EMA state dicts).

``update`` is one ``torch._foreach_lerp_`` over the parameter lists with a Python-float weight: no
``.item()``, no host sync. ``full_state_dict`` gathers the shards (a collective under FSDP) to
run the EMA weights in a plain model.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

# Wrappers that insert themselves into parameter names without changing the model.
_WRAPPER_NAME_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.", "module.")


def clean_name(name: str) -> str:
    for part in _WRAPPER_NAME_PARTS:
        if part == "module.":
            name = name.removeprefix(part)  # DDP: only a leading "module."
        else:
            name = name.replace(part, "")
    return name


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


class EMA:
    """fp32 EMA of a model's parameters; persistent buffers are copied as they are.

    ema = EMA(model, decay=0.9999)
    ...after each optimizer step: ema.update(model, step)
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        persistent = {clean_name(k) for k in model.state_dict()}
        with torch.no_grad():
            # fp32: tiny (1 - decay) increments vanish in bf16.
            self._params = {clean_name(n): p.detach().float().clone() for n, p in model.named_parameters()}
            self._buffers = {
                clean_name(n): (b.detach().float() if b.is_floating_point() else b.detach()).clone()
                for n, b in model.named_buffers() if clean_name(n) in persistent
            }

    @property
    def sharded(self) -> bool:
        return any(isinstance(p, DTensor) for p in self._params.values())

    def decay_at(self, step: int) -> float:
        """Effective decay; warm-up min(decay, (1+step)/(10+step)) lets short runs have a useful EMA."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + step) / (10.0 + step))

    def _pairs(self, model: nn.Module) -> Tuple[List[torch.Tensor], List[torch.Tensor], List[torch.Tensor], List[torch.Tensor]]:
        live_params = {clean_name(n): p for n, p in model.named_parameters()}
        live_buffers = {clean_name(n): b for n, b in model.named_buffers()}
        missing = [n for n in self._params if n not in live_params] + [n for n in self._buffers if n not in live_buffers]
        if missing:
            raise KeyError(f"EMA tensors {missing[:3]} have no counterpart in the model")
        names, buffer_names = list(self._params), list(self._buffers)
        return ([self._params[n] for n in names], [live_params[n] for n in names],
                [self._buffers[n] for n in buffer_names], [live_buffers[n] for n in buffer_names])

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """shadow <- decay * shadow + (1 - decay) * param; buffers copied. No host syncs."""
        shadow, live, shadow_buffers, live_buffers = self._pairs(model)
        weight = 1.0 - self.decay_at(step)
        # lerp needs matching dtypes: bf16/fp16 params are upcast (a temporary per tensor). lerp is
        # elementwise and placements match, so the local shards are updated directly.
        live = [_local(p.detach()).to(torch.float32) for p in live]
        if shadow:
            torch._foreach_lerp_([_local(s) for s in shadow], live, weight)
        for target, source in zip(shadow_buffers, live_buffers):
            target.copy_(source)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters and buffers with the EMA values (cast to the model's dtypes)."""
        shadow, live, shadow_buffers, live_buffers = self._pairs(model)
        for source, target in zip([*shadow, *shadow_buffers], [*live, *live_buffers]):
            target.copy_(source)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The model's state-dict keys, fp32 tensors (DTensors when sharded).

        Tensors alias the live shadow (no copy of a multi-GB model); serialise before the next update.
        """
        return {**self._params, **self._buffers}

    def full_state_dict(self) -> Dict[str, torch.Tensor]:
        """Full fp32 CPU tensors on every rank (gathering shards is a collective under FSDP)."""
        out = {}
        for key, value in self.state_dict().items():
            if isinstance(value, DTensor):
                value = value.full_tensor()
            out[key] = value.detach().to("cpu", torch.float32)
        return out

    @torch.no_grad()
    def load_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True) -> None:
        state_dict = {clean_name(k): v for k, v in state_dict.items()}
        shadow = self.state_dict()
        missing = [k for k in shadow if k not in state_dict]
        unexpected = [k for k in state_dict if k not in shadow]
        if strict and (missing or unexpected):
            raise KeyError(f"EMA state dict mismatch: missing {missing[:3]}, unexpected {unexpected[:3]}")
        for key, value in state_dict.items():
            if key in shadow and value is not shadow[key]:
                shadow[key].copy_(value)
