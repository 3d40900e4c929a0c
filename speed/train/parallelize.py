"""The only place models get wrapped: FSDP2, DDP, activation checkpointing, torch.compile.

The model file knows nothing about any of this; ``parallelize`` takes a plain DiT (with a
``blocks`` ModuleList) and returns the module to train. Token routing needs nothing here: the
gather and scatter happen in the DiT's forward, outside the (checkpointed, compiled) blocks, and
the kept-token count is fixed per run, so a compiled block sees two shapes at most.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from speed.config.schema import ParallelConfig
from speed.train.distributed import DistEnv


def compute_dtype(parallel: ParallelConfig, device: torch.device) -> torch.dtype:
    """bf16 on GPU and fp32 on CPU unless configured."""
    choice = parallel.mixed_precision
    if choice == "auto":
        choice = "bf16" if device.type == "cuda" else "fp32"
    return torch.bfloat16 if choice == "bf16" else torch.float32


def effective_strategy(parallel: ParallelConfig, env: DistEnv) -> str:
    """fsdp / ddp when several processes train; a single process trains the plain module."""
    return parallel.strategy if env.distributed else "none"


def _checkpoint_blocks(model: nn.Module) -> None:
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for index, block in enumerate(model.blocks):
        model.blocks[index] = checkpoint_wrapper(block)


def parallelize(model: nn.Module, *, parallel: ParallelConfig, env: DistEnv) -> nn.Module:
    """Wrap ``model`` for training on ``env`` as ``parallel`` says; returns the module to call."""
    model.to(env.device)
    if parallel.activation_checkpointing:
        _checkpoint_blocks(model)
    dtype = compute_dtype(parallel, env.device)
    strategy = effective_strategy(parallel, env)
    if strategy == "fsdp":
        policy = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        fully_shard(model, mp_policy=policy)
    elif strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        model = DistributedDataParallel(model, device_ids=ids)
    if parallel.compile:
        for block in _unwrap(model).blocks:
            block.compile()
    return model


def parallelize_aux(module: nn.Module, *, parallel: ParallelConfig, env: DistEnv) -> nn.Module:
    """Wrap a small trainable module that lives beside the DiT (REPA's projector) like the DiT:
    its own FSDP2 root (same mixed precision) or its own DDP; frozen modules are never wrapped."""
    module.to(env.device)
    strategy = effective_strategy(parallel, env)
    if strategy == "fsdp":
        dtype = compute_dtype(parallel, env.device)
        fully_shard(module, mp_policy=MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32))
    elif strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [env.device.index] if env.device.type == "cuda" else None
        module = DistributedDataParallel(module, device_ids=ids)
    return module


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and not hasattr(model, "blocks") else model


def autocast_context(parallel: ParallelConfig, env: DistEnv):
    """FSDP2 casts parameters itself; DDP and single-process bf16 use autocast."""
    dtype = compute_dtype(parallel, env.device)
    if dtype == torch.float32 or effective_strategy(parallel, env) == "fsdp":
        return torch.autocast(env.device.type, enabled=False)
    return torch.autocast(env.device.type, dtype=dtype)
