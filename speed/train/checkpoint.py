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
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.stateful import Stateful

from speed.train.distributed import DistEnv

log = logging.getLogger("speed.train")

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


# Called between a checkpoint's shards and its state.json with the step: tests pass a hook that
# crashes there, where a real crash's timing could not be reproduced.
AfterShards = Callable[[int], None]


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
    trainer: Stateful,
    train_state: TrainState,
    env: DistEnv,
    after_shards: Optional[AfterShards] = None,
) -> Path:
    """Write the trainer's whole state into a local folder (every rank calls this): its tensors
    with DCP, then (rank 0) ``state.json``, which marks the folder complete."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dcp.save({**trainer.state_dict(), f"rng.rank{env.rank}": _rng_state(env)}, checkpoint_id=str(directory))
    if after_shards is not None:
        after_shards(train_state.step)
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


def incomplete_reason(uri: str | os.PathLike, storage_cfg=None) -> Optional[str]:
    """None when a checkpoint folder (local or s3://) holds DCP's metadata, state.json and every
    shard file the metadata names at full length; otherwise what is missing. Reads only the small
    metadata file and checks the shards by listing.

    A checkpoint's ranks upload their parts independently, so state.json (rank 0) can be present
    while another rank's shard never arrived; a restart must not pick such a folder.
    """
    import tempfile

    import pyarrow.fs as pafs

    from speed import storage

    uri = str(uri)
    fs, path = storage.filesystem(uri, storage_cfg)
    listing = {
        info.base_name: info.size
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


def is_complete(uri: str | os.PathLike, storage_cfg=None) -> bool:
    """True when a checkpoint folder holds everything a resume needs."""
    return incomplete_reason(uri, storage_cfg) is None


def stored_keys(directory: str | os.PathLike) -> set:
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    return set(metadata.state_dict_metadata)


def load_checkpoint(directory: str | os.PathLike, trainer: Stateful, env: DistEnv) -> TrainState:
    """Load a checkpoint written by ``save_checkpoint`` into the (possibly sharded) trainer.

    The world size may differ from the saving run's: DCP reshards. Parts the checkpoint lacks
    (a strategy without state when it was written) keep their initial values; the per-rank RNG
    state is restored only at the same world size.
    """
    directory = Path(directory)
    reason = incomplete_reason(directory)
    if reason is not None:
        raise CheckpointError(f"checkpoint '{directory}' is incomplete ({reason}); resume from an earlier one")
    train_state = read_train_state(directory)
    keys = stored_keys(directory)
    state = {
        name: part for name, part in trainer.state_dict().items()
        if name != "strategy" or any(k.startswith("strategy.") for k in keys)
    }
    rng_key = f"rng.rank{env.rank}"
    has_rng = any(k.startswith(rng_key + ".") for k in keys) and train_state.world_size == env.world_size
    if has_rng:
        state[rng_key] = _rng_state(env)
    dcp.load(state, checkpoint_id=str(directory))
    rng = state.pop(rng_key, None)
    trainer.load_state_dict(state)
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        if "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], env.device)
    return train_state


def latest_complete_checkpoint(layout, skipped: Optional[List[str]] = None) -> Optional[str]:
    """The newest checkpoint folder of a run (``RunLayout``) whose every part arrived; newer
    incomplete ones are logged, noted in ``skipped`` and passed over."""
    for _, uri in reversed(layout.checkpoints()):
        reason = incomplete_reason(uri, layout.storage_cfg)
        if reason is None:
            return uri
        log.warning("skipping incomplete checkpoint %s: %s", uri, reason)
        if skipped is not None:
            skipped.append(f"{uri.rsplit('/', 1)[-1]}: {reason}")
    return None


def load_ema_model(uri: str, storage_cfg=None, *, key: str = "inference.checkpoint_uri", device=None):
    """The EMA DiT stored in a training checkpoint (any world size), with its model description.

    Reads DCP, whose metadata is pickled: use this only on checkpoints of your own runs' storage.
    Exports (safetensors) are the format to share.
    """
    import tempfile

    from speed import storage
    from speed.models.registry import ModelDescription

    with tempfile.TemporaryDirectory(prefix="speed-ema-") as scratch:
        local = Path(storage.local_copy(uri, scratch, storage_cfg))
        if not is_complete(local):
            raise CheckpointError(f"{key}: '{uri}' is not a complete training checkpoint (.metadata, shards and state.json)")
        state = read_train_state(local)
        description = ModelDescription.from_dict(state.description)
        model = description.build()
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
