"""Which weights a sampling job uses, resolved in one place (``resolve_weights``) so that the
driver's fail-fast check (``read_description``) and the loader (``load_sampling_model``) accept
exactly the same things:

  an export folder          ``ema.safetensors`` + ``model.json`` (end of training, or convert_dit)
  a .safetensors file       e.g. ``<run>/export/ema.safetensors``
  a training checkpoint     ``<run>/checkpoint_<step>/`` (DCP shards + state.json); its EMA weights
  a run folder              ``<run.output_uri>/<run.name>``: its export, or, while there is none
                            yet, its newest complete checkpoint

so every path a job prints (train's ``checkpoint``, ``export`` and ``run``) can be sampled. Never
a pickle: ``.pt``/``.pth``/``.ckpt`` files are refused with the command that converts them.
Local paths and s3:// URIs alike.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple, Union

import torch

from speed import storage
from speed.config.schema import Config, ConfigError, StorageConfig
from speed.models.export import DESCRIPTION_NAME, METADATA_KEY, WEIGHTS_NAME, WeightsError, load_export
from speed.models.registry import ModelDescription

log = logging.getLogger("speed.sample")

_PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl")
# A safetensors header is JSON; anything claiming more than this is not one.
_MAX_HEADER_BYTES = 100 << 20

EXPORT = "export"
CHECKPOINT = "checkpoint"
_ACCEPTED = ("an export folder (ema.safetensors + model.json), a .safetensors file, a training checkpoint "
             "folder (checkpoint_<step>, with state.json), or a run folder (<run.output_uri>/<run.name>)")


@dataclass(frozen=True)
class WeightsSource:
    """What a weights URI resolved to.

    ``kind`` is ``"export"`` (``uri`` is a safetensors file) or ``"checkpoint"`` (``uri`` is a
    training checkpoint folder); ``given`` is what was asked for. Resolving ``uri`` again gives the
    same source, so a driver hands ``uri`` to its workers and they load exactly what it checked.
    """

    kind: str
    uri: str
    given: str

    @property
    def is_checkpoint(self) -> bool:
        return self.kind == CHECKPOINT


def parent_uri(uri: str) -> str:
    """The folder or prefix holding ``uri``."""
    if storage.is_s3(uri):
        return posixpath.dirname(str(uri).rstrip("/"))
    return str(Path(str(uri).removeprefix("file://")).parent)


def _is_run_folder(layout) -> bool:
    storage_cfg = layout.storage_cfg
    return (storage.is_dir(layout.export_uri, storage_cfg) or bool(layout.checkpoints())
            or storage.exists(layout.config_uri, storage_cfg))


def resolve_weights(uri: Union[str, WeightsSource, None], storage_cfg: Optional[StorageConfig] = None, *,
                    key: str = "inference.checkpoint_uri") -> WeightsSource:
    """The one resolution of a weights URI (see the module docstring), with errors that name ``key``.

    A run folder resolves to ``<run>/export/ema.safetensors`` when the export exists, else to the
    newest checkpoint whose every part arrived (``latest_complete_checkpoint``, which passes over
    checkpoints with a missing or truncated part); a training checkpoint named directly must be
    complete too (``incomplete_reason``). Reads only small files and listings, never weights.
    """
    from speed.train.checkpoint import incomplete_reason, is_training_checkpoint, latest_complete_checkpoint
    from speed.train.run_layout import RunLayout

    if isinstance(uri, WeightsSource):
        return uri
    if not uri:
        raise ConfigError(
            f"{key} is not set; give {_ACCEPTED}, or an official DiT checkpoint converted with "
            "python -m ray_jobs.convert_dit"
        )
    uri = str(uri)
    if uri.endswith(_PICKLE_SUFFIXES):
        raise WeightsError(
            f"{key}: '{uri}' is a pickle checkpoint, which can run code when loaded; convert it first: "
            f"python -m ray_jobs.convert_dit {uri} DST_FOLDER --model DiT-XL/2 --image-size 256, then set {key}=DST_FOLDER"
        )
    if not storage.is_dir(uri, storage_cfg):
        if not storage.exists(uri, storage_cfg):
            raise WeightsError(f"{key}: '{uri}' does not exist; fix the path or URI (it takes {_ACCEPTED})")
        return WeightsSource(EXPORT, uri, uri)
    weights = storage.join(uri, WEIGHTS_NAME)
    if storage.exists(weights, storage_cfg):
        return WeightsSource(EXPORT, weights, uri)
    if is_training_checkpoint(uri, storage_cfg):
        reason = incomplete_reason(uri, storage_cfg)
        if reason is not None:
            raise WeightsError(
                f"{key}: training checkpoint '{uri}' is incomplete ({reason}; an interrupted upload?); "
                "use an earlier checkpoint, the run's export, or the run folder (its newest complete checkpoint)"
            )
        return WeightsSource(CHECKPOINT, uri, uri)
    layout = RunLayout(uri, storage_cfg)
    if _is_run_folder(layout):
        export_weights = storage.join(layout.export_uri, WEIGHTS_NAME)
        if storage.exists(export_weights, storage_cfg):
            return WeightsSource(EXPORT, export_weights, uri)
        checkpoint = latest_complete_checkpoint(layout)
        if checkpoint is not None:
            log.info("%s: run '%s' has no export yet; using its newest complete checkpoint %s", key, uri, checkpoint)
            return WeightsSource(CHECKPOINT, checkpoint, uri)
        raise WeightsError(
            f"{key}: run folder '{uri}' has no export ({layout.export_uri}) and no complete checkpoint yet; "
            "let training reach its first checkpoint (or finish: python -m ray_jobs.train), or give another path"
        )
    raise WeightsError(
        f"{key}: folder '{uri}' has no {WEIGHTS_NAME} and is not a training checkpoint (state.json + .metadata) "
        f"or a run folder (export/, checkpoint_*); give {_ACCEPTED}"
    )


def resolve_weights_uri(uri: Optional[str], storage_cfg: Optional[StorageConfig] = None, *,
                        key: str = "inference.checkpoint_uri") -> str:
    """``resolve_weights(...).uri``: the safetensors file, or the training checkpoint folder, behind ``uri``."""
    return resolve_weights(uri, storage_cfg, key=key).uri


def job_weights(uri: Optional[str], cfg: Config, *, key: str) -> WeightsSource:
    """The weights a sampling job reads: ``uri`` when set, else the export of the configured run
    (``RunLayout.for_run(cfg.run, cfg.storage).export_uri``), so sampling right after training
    needs no keys. A missing default says where it looked and what to do."""
    if uri:
        return resolve_weights(uri, cfg.storage, key=key)
    from speed.train.run_layout import RunLayout

    layout = RunLayout.for_run(cfg.run, cfg.storage)
    default = layout.export_uri
    if not storage.exists(storage.join(default, WEIGHTS_NAME), cfg.storage):
        hint = ""
        if layout.checkpoints():
            hint = f" (the run has checkpoints: {key}={layout.root} samples its newest complete one)"
        raise ConfigError(
            f"{key} is not set, and its default, the export of run '{cfg.run.name}', does not exist: "
            f"looked at '{default}'{hint}; train first (python -m ray_jobs.train with the same run.output_uri "
            f"and run.name) or set {key} to {_ACCEPTED}"
        )
    return resolve_weights(default, cfg.storage, key=key)


def _checkpoint_description(uri: str, storage_cfg: Optional[StorageConfig], key: str) -> ModelDescription:
    from speed.train.checkpoint import STATE_FILE, TrainState

    state_uri = storage.join(uri, STATE_FILE)
    try:
        description = TrainState.from_json(storage.read_text(state_uri, storage_cfg)).description
    except (ValueError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise WeightsError(f"{key}: '{state_uri}' is not a readable training state ({type(exc).__name__})") from None
    if not isinstance(description, dict) or not description:
        raise WeightsError(f"{key}: '{state_uri}' holds no model description; sample the run's export instead")
    try:
        return ModelDescription.from_dict(description)
    except TypeError as exc:
        raise WeightsError(f"{key}: the model description in '{state_uri}' is incomplete ({exc})") from None


def _export_description(weights_uri: str, storage_cfg: Optional[StorageConfig], key: str) -> ModelDescription:
    fs, path = storage.filesystem(weights_uri, storage_cfg)
    try:
        with fs.open_input_file(path) as handle:
            header_len = int.from_bytes(handle.read(8), "little")
            if not 0 < header_len <= _MAX_HEADER_BYTES:
                raise ValueError("bad header length")
            header = json.loads(handle.read(header_len))
    except (ValueError, UnicodeDecodeError):
        raise WeightsError(
            f"{key}: '{weights_uri}' is not a safetensors file; exports and converted checkpoints must be "
            "safetensors (convert DiT .pt files with python -m ray_jobs.convert_dit)"
        ) from None
    text = (header.get("__metadata__") or {}).get(METADATA_KEY)
    if text is None:
        sibling = storage.join(parent_uri(weights_uri), DESCRIPTION_NAME)
        if not storage.exists(sibling, storage_cfg):
            raise WeightsError(f"{key}: '{weights_uri}' carries no model description and no {DESCRIPTION_NAME} beside it")
        text = storage.read_text(sibling, storage_cfg)
    return ModelDescription.from_json(text)


def read_description(uri: Union[str, WeightsSource, None], storage_cfg: Optional[StorageConfig] = None, *,
                     key: str = "inference.checkpoint_uri") -> ModelDescription:
    """The model description behind anything ``load_sampling_model`` accepts, without reading any
    weights: the safetensors header of an export, or the state.json of a training checkpoint."""
    source = resolve_weights(uri, storage_cfg, key=key)
    if source.is_checkpoint:
        return _checkpoint_description(source.uri, storage_cfg, key)
    return _export_description(source.uri, storage_cfg, key)


def load_sampling_model(uri: Union[str, WeightsSource, None], storage_cfg: Optional[StorageConfig] = None, *,
                        key: str = "inference.checkpoint_uri",
                        device: Optional[torch.device] = None) -> Tuple[torch.nn.Module, ModelDescription]:
    """The EMA DiT (eval mode, frozen) and its description, from anything ``resolve_weights``
    accepts: an export, a .safetensors file, a training checkpoint or a run folder."""
    from speed.train.checkpoint import load_ema_model

    source = resolve_weights(uri, storage_cfg, key=key)
    if source.is_checkpoint:
        return load_ema_model(source.uri, storage_cfg, key=key, device=device)
    return load_export(source.uri, storage_cfg, key=key, device=device)
