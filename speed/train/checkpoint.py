"""Whole-training-state checkpoints with torch.distributed.checkpoint (DCP).

A checkpoint folder holds:
  .metadata, __<rank>_*.distcp   DCP: model, optimizer, EMA and strategy tensors, sharded; every
                                 rank writes its own part, and a different world size can load it
  state.json                     plain data: step, images seen, epoch, data position, the resolved
                                 config (secrets redacted) and the model description

DCP stores its metadata with pickle, so only checkpoints of the run's own storage are read here;
weights from anywhere else go through safetensors (``speed.train.export``). Per-rank RNG states
are saved under rank-specific keys ("rng.rank<r>"), since DCP de-duplicates identical keys.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from speed.train.distributed import DistEnv

STATE_FILE = "state.json"
METADATA_FILE = ".metadata"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message says which and why."""


class NonFiniteWeightsError(CheckpointError):
    pass


@dataclass
class TrainState:
    """Plain-data training position, saved as JSON beside the tensors."""

    step: int = 0
    images_seen: int = 0
    epoch: int = 0
    # The next run's data position: images of the current epoch already consumed.
    epoch_images: int = 0
    config: Dict[str, Any] = field(default_factory=dict)
    description: Dict[str, Any] = field(default_factory=dict)
    world_size: int = 1

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, **self.__dict__}, sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> "TrainState":
        data = json.loads(text)
        data.pop("format_version", None)
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


FAULT_ENV = "SPEED_FAULT_INJECT"


def maybe_inject_fault(point: str, step: int) -> None:
    """Test hook: ``SPEED_FAULT_INJECT=<point>:<step>:<marker file>`` kills this process at that
    point once (the marker file records that it fired), e.g. between writing a checkpoint's shards
    and its state.json, where a real crash's timing could not be reproduced."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    fault_point, fault_step, marker = spec.split(":", 2)
    if fault_point != point or int(fault_step) != step or os.path.exists(marker):
        return
    Path(marker).write_text(f"{point} at step {step}\n")
    os._exit(17)


def _rng_state(env: DistEnv) -> Dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if env.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(env.device)
    return state


def assert_finite(module: torch.nn.Module, what: str) -> None:
    """Refuse to save weights that hold NaN or inf (one host sync, at save time only)."""
    flags = [torch.isfinite(p.to_local() if hasattr(p, "to_local") else p).all() for p in module.parameters()]
    if flags and not bool(torch.stack(flags).all()):
        raise NonFiniteWeightsError(f"{what} holds NaN or inf values; no checkpoint was written")


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    ema_state: Dict[str, torch.Tensor],
    strategy_state: Dict[str, Any],
    train_state: TrainState,
    env: DistEnv,
) -> Path:
    """Write the whole training state into a local folder (every rank calls this)."""
    assert_finite(model, "the model")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
        "ema": ema_state,
        "strategy": {k: v for k, v in strategy_state.items() if isinstance(v, torch.Tensor)},
        f"rng.rank{env.rank}": _rng_state(env),
    }
    dcp.save(state, checkpoint_id=str(directory))
    maybe_inject_fault("checkpoint_write", train_state.step)
    if env.is_main:
        train_state.world_size = env.world_size
        tmp = directory / (STATE_FILE + ".tmp")
        tmp.write_text(train_state.to_json())
        os.replace(tmp, directory / STATE_FILE)
    return directory


def read_train_state(directory: str | os.PathLike) -> TrainState:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"'{directory}' is not a complete checkpoint: {STATE_FILE} is missing")
    return TrainState.from_json(path.read_text())


def _required_sizes(metadata) -> Dict[str, int]:
    """Bytes each shard file named by DCP metadata must at least hold."""
    sizes: Dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        sizes[info.relative_path] = max(sizes.get(info.relative_path, 0), int(info.offset) + int(info.length))
    return sizes


def incomplete_reason(directory: str | os.PathLike) -> Optional[str]:
    """None when the DCP metadata, state.json and every shard file the metadata names (at full
    length) are present in a local folder; otherwise what is missing."""
    directory = Path(directory)
    for name in (METADATA_FILE, STATE_FILE):
        if not (directory / name).is_file():
            return f"{name} is missing"
    try:
        metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    except Exception as exc:
        return f"{METADATA_FILE} is unreadable ({type(exc).__name__})"
    for name, size in _required_sizes(metadata).items():
        path = directory / name
        if not path.is_file():
            return f"shard {name} is missing"
        if path.stat().st_size < size:
            return f"shard {name} is truncated ({path.stat().st_size} < {size} bytes)"
    return None


def is_complete(directory: str | os.PathLike) -> bool:
    """True when a local checkpoint folder holds everything a resume needs."""
    return incomplete_reason(directory) is None


def stored_incomplete_reason(uri: str, storage_cfg=None) -> Optional[str]:
    """``incomplete_reason`` for a checkpoint folder in the run's storage (local or s3://): reads
    only its small files, and checks the shards' presence and size by listing.

    A checkpoint's ranks upload their parts independently, so state.json (rank 0) can be present
    while another rank's shard never arrived; a restart must not pick such a folder.
    """
    import tempfile

    import pyarrow.fs as pafs

    from speed import storage

    fs, path = storage.filesystem(uri, storage_cfg)
    listing = {
        info.path.rsplit("/", 1)[-1]: info.size
        for info in fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
        if info.type == pafs.FileType.File
    }
    for name in (METADATA_FILE, STATE_FILE):
        if name not in listing:
            return f"{name} is missing"
    with tempfile.TemporaryDirectory(prefix="speed-ckpt-meta-") as scratch:
        Path(scratch, METADATA_FILE).write_bytes(storage.read_bytes(storage.join(uri, METADATA_FILE), storage_cfg))
        try:
            metadata = dcp.FileSystemReader(scratch).read_metadata()
        except Exception as exc:
            return f"{METADATA_FILE} is unreadable ({type(exc).__name__})"
    for name, size in _required_sizes(metadata).items():
        if name not in listing:
            return f"shard {name} is missing"
        if (listing[name] or 0) < size:
            return f"shard {name} is truncated ({listing[name]} < {size} bytes)"
    return None


def stored_keys(directory: str | os.PathLike) -> set:
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    return set(metadata.state_dict_metadata)


def load_checkpoint(
    directory: str | os.PathLike,
    *,
    model: torch.nn.Module,
    optimizer: Optional[torch.optim.Optimizer],
    ema_state: Dict[str, torch.Tensor],
    strategy_state: Dict[str, Any],
    env: DistEnv,
) -> TrainState:
    """Load a checkpoint written by ``save_checkpoint`` into the given (possibly sharded) objects.

    The world size may differ from the saving run's: DCP reshards. ``ema_state`` and
    ``strategy_state`` are filled in place.
    """
    directory = Path(directory)
    if not is_complete(directory):
        raise CheckpointError(
            f"checkpoint '{directory}' is incomplete (an interrupted write?); resume from an earlier one"
        )
    train_state = read_train_state(directory)
    keys = stored_keys(directory)
    state: Dict[str, Any] = {"model": get_model_state_dict(model), "ema": ema_state}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    strategy_tensors = {k: v for k, v in strategy_state.items() if isinstance(v, torch.Tensor)}
    if strategy_tensors and any(k.startswith("strategy.") for k in keys):
        state["strategy"] = strategy_tensors
    rng_key = f"rng.rank{env.rank}"
    has_rng = any(k.startswith(rng_key + ".") for k in keys) and train_state.world_size == env.world_size
    if has_rng:
        state[rng_key] = _rng_state(env)
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    if "strategy" in state:
        strategy_state.update(state["strategy"])
    if has_rng:
        torch.set_rng_state(state[rng_key]["cpu"])
        if "cuda" in state[rng_key]:
            torch.cuda.set_rng_state(state[rng_key]["cuda"], env.device)
    return train_state


def load_ema_model(uri: str, storage_cfg=None, *, key: str = "inference.checkpoint_uri", device=None):
    """The EMA DiT stored in a training checkpoint (any world size), with its model description.

    Reads DCP, whose metadata is pickled: use this only on checkpoints of your own runs' storage.
    Exports (safetensors) are the format to share.
    """
    import tempfile

    from speed import storage
    from speed.train.export import ModelDescription, build_model

    with tempfile.TemporaryDirectory(prefix="speed-ema-") as scratch:
        local = Path(storage.local_copy(uri, scratch, storage_cfg))
        if not is_complete(local):
            raise CheckpointError(f"{key}: '{uri}' is not a complete training checkpoint (.metadata, shards and state.json)")
        state = read_train_state(local)
        description = ModelDescription(**state.description)
        model = build_model(description.model_config(), description.input_size, description.in_channels)
        ema = {k: v.clone() for k, v in model.state_dict().items()}
        dcp.load({"ema": ema}, checkpoint_id=str(local))
        model.load_state_dict(ema, strict=True)
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(device)
    return model, description


def is_training_checkpoint(uri: str, storage_cfg=None) -> bool:
    from speed import storage

    return storage.exists(storage.join(uri, STATE_FILE), storage_cfg) and storage.exists(
        storage.join(uri, METADATA_FILE), storage_cfg
    )
