"""Exponential moving average (EMA) of model weights, kept in fp32.

Plain (unsharded, DDP or compiled) models: the shadow is a full deep copy of
the model (``EMA.module``, fp32, eval mode, frozen), so it can be used for
sampling directly and its ``state_dict()`` has exactly the model's keys
(published DiT checkpoints are such EMA state dicts).

FSDP2-sharded models (``fully_shard``): FSDP2 forbids ``copy.deepcopy``, and a
module holding DTensor parameters without FSDP's hooks could not run forward
anyway. So the shadow is kept as fp32 DTensor clones of the parameters, named
like the model's, with the same placements: each rank stores and updates only
its own shard, with no communication. ``state_dict()`` then holds DTensors
(what torch.distributed.checkpoint expects), ``.module`` is unavailable, and to
sample with the EMA weights ``copy_to`` a sharded model of the same architecture.

``update`` is one ``torch._foreach_lerp_`` over the parameter lists, with a
Python-float weight: no ``.item()``, no host sync. DTensor dispatches foreach
lerp shard-locally; should a torch version lack that rule we fall back to the
local shards (``to_local()``), which is equivalent because lerp is elementwise
and placements match.
"""

import copy
from typing import Dict, Iterable, List, Tuple

import torch
import torch.nn as nn

try:  # DTensor lives in torch.distributed.tensor from torch 2.4 on.
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - torch without distributed support
    DTensor = None

# Wrappers that insert themselves into parameter names without changing the model.
_WRAPPER_NAME_PARTS = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def _unwrap(model: nn.Module) -> nn.Module:
    # DistributedDataParallel (and DataParallel) keep the real model in .module.
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    # torch.compile keeps it in ._orig_mod.
    return getattr(model, "_orig_mod", model)


def _clean_name(name: str) -> str:
    for part in _WRAPPER_NAME_PARTS:
        name = name.replace(part, "")
    return name


def _pair_by_name(
    shadow: Iterable[Tuple[str, torch.Tensor]], live: Iterable[Tuple[str, torch.Tensor]]
) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    live_by_name = {_clean_name(name): tensor for name, tensor in live}
    shadow_list, live_list = [], []
    for name, tensor in shadow:
        name = _clean_name(name)
        if name not in live_by_name:
            raise KeyError(f"EMA tensor {name!r} has no counterpart in the model")
        shadow_list.append(tensor)
        live_list.append(live_by_name[name])
    return shadow_list, live_list


def _is_dtensor(tensor: torch.Tensor) -> bool:
    return DTensor is not None and isinstance(tensor, DTensor)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if _is_dtensor(tensor) else tensor


class EMA:
    """fp32 EMA of a model's parameters; buffers are copied as-is.

    ema = EMA(model, decay=0.9999)
    ...after each optimizer step: ema.update(model, step)
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        model = _unwrap(model)
        self.sharded = any(_is_dtensor(p) for p in model.parameters())
        self._module = None
        if self.sharded:
            with torch.no_grad():
                # fp32 shadow: tiny (1 - decay) increments vanish in bf16.
                self._params = {_clean_name(n): p.detach().float().clone() for n, p in model.named_parameters()}
                self._buffers = {_clean_name(n): b.detach().clone() for n, b in model.named_buffers()}
            persistent = {_clean_name(k) for k in model.state_dict().keys()}
            self._state_keys = [k for k in (*self._params, *self._buffers) if k in persistent]
        else:
            self._module = copy.deepcopy(model)
            self._module.float()  # fp32 shadow: tiny (1 - decay) increments vanish in bf16
            self._module.eval()
            self._module.requires_grad_(False)

    @property
    def module(self) -> nn.Module:
        """The fp32 shadow model (eval mode, requires_grad False); not available for sharded models."""
        if self._module is None:
            raise RuntimeError(
                "EMA of an FSDP2-sharded model keeps only sharded tensors; use ema.copy_to(sharded_model) "
                "on a model of the same architecture to run it"
            )
        return self._module

    def _named_shadow_params(self) -> Iterable[Tuple[str, torch.Tensor]]:
        return self._params.items() if self.sharded else self._module.named_parameters()

    def _named_shadow_buffers(self) -> Iterable[Tuple[str, torch.Tensor]]:
        return self._buffers.items() if self.sharded else self._module.named_buffers()

    def decay_at(self, step: int) -> float:
        """Effective decay; warm-up min(decay, (1+step)/(10+step)) lets short runs have a useful EMA."""
        if not self.warmup:
            return self.decay
        return min(self.decay, (1.0 + step) / (10.0 + step))

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """shadow <- decay * shadow + (1 - decay) * param; buffers copied. No host syncs."""
        model = _unwrap(model)
        weight = 1.0 - self.decay_at(step)
        shadow_params, live_params = _pair_by_name(self._named_shadow_params(), model.named_parameters())
        # lerp needs matching dtypes: bf16/fp16 params are upcast (a temporary per tensor).
        live_params = [p.detach().to(s.dtype) for s, p in zip(shadow_params, live_params)]
        if shadow_params:
            try:
                torch._foreach_lerp_(shadow_params, live_params, weight)
            except (NotImplementedError, RuntimeError):
                if not self.sharded:
                    raise
                torch._foreach_lerp_([_local(s) for s in shadow_params], [_local(p) for p in live_params], weight)
        shadow_buffers, live_buffers = _pair_by_name(self._named_shadow_buffers(), model.named_buffers())
        for shadow, live in zip(shadow_buffers, live_buffers):
            shadow.copy_(live)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters and buffers with the EMA values (cast to the model's dtypes)."""
        model = _unwrap(model)
        pairs = (
            _pair_by_name(self._named_shadow_params(), model.named_parameters()),
            _pair_by_name(self._named_shadow_buffers(), model.named_buffers()),
        )
        for shadow_list, live_list in pairs:
            for shadow, live in zip(shadow_list, live_list):
                live.copy_(shadow)

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """The shadow's state dict: the model's keys, fp32 tensors (DTensors when sharded).

        Tensors alias the live shadow (no copy of a multi-GB model); serialise before the next update.
        """
        if self.sharded:
            shadow = {**self._params, **self._buffers}
            return {k: shadow[k] for k in self._state_keys}
        return self._module.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state_dict: Dict[str, torch.Tensor], strict: bool = True) -> None:
        # Strip wrapper prefixes so EMA state saved from a compiled model loads too.
        state_dict = {_clean_name(k): v for k, v in state_dict.items()}
        if not self.sharded:
            self._module.load_state_dict(state_dict, strict=strict)  # copies, casting into the fp32 shadow
            return
        missing = [k for k in self._state_keys if k not in state_dict]
        unexpected = [k for k in state_dict if k not in self._state_keys]
        if strict and (missing or unexpected):
            raise KeyError(f"EMA state dict mismatch: missing {missing}, unexpected {unexpected}")
        shadow = {**self._params, **self._buffers}
        for key, value in state_dict.items():
            if key in shadow:
                shadow[key].copy_(value)
