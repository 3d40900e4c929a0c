"""The run folder: the one place that knows where a run's files live (local or s3://).

  <run.output_uri>/<run.name>/
    config.yaml                  the resolved config (secrets redacted)
    checkpoint_<step:07d>/       whole training state (DCP shards + state.json); the newest
                                 ``train.keep_checkpoints`` are kept
    metrics-<first step:09d>.jsonl   log records, one JSON object per line; one part per
                                 checkpoint interval, so no upload grows with the run's length
    tensorboard/                 TensorBoard event files
    samples/step_<step:07d>.png  sample grids of the EMA model
    export/ema.safetensors       the EMA weights with their model description (``model.json``)

``RunLayout.resolve`` turns a relative local ``run.output_uri`` into an absolute path once, on
the driver: a Ray Train worker's working directory is not the driver's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import pyarrow.fs as pafs

from speed import storage
from speed.config.schema import RunConfig, StorageConfig

CHECKPOINT_PREFIX = "checkpoint_"
METRICS_PREFIX = "metrics-"
METRICS_SUFFIX = ".jsonl"
EXPORT_DIR = "export"
SAMPLES_DIR = "samples"
TENSORBOARD_DIR = "tensorboard"
CONFIG_NAME = "config.yaml"
_METRICS_PART = re.compile(r"^metrics-(\d+)\.jsonl$")
_CHECKPOINT_DIR = re.compile(r"^checkpoint_(\d+)$")


def checkpoint_dir_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:07d}"


def metrics_part_name(first_step: int) -> str:
    return f"{METRICS_PREFIX}{first_step:09d}{METRICS_SUFFIX}"


@dataclass(frozen=True)
class RunLayout:
    """Paths of one run; ``root`` is absolute for local runs (see ``for_run``)."""

    root: str
    storage_cfg: Optional[StorageConfig] = None

    @classmethod
    def for_run(cls, run: RunConfig, storage_cfg: Optional[StorageConfig] = None) -> "RunLayout":
        return cls(storage.join(storage.absolute(run.output_uri), run.name), storage_cfg)

    # -- paths ----------------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return storage.join(self.root, *parts)

    @property
    def config_uri(self) -> str:
        return self.path(CONFIG_NAME)

    @property
    def export_uri(self) -> str:
        """The export folder (``ema.safetensors`` + ``model.json``): what sampling jobs read by default."""
        return self.path(EXPORT_DIR)

    @property
    def tensorboard_uri(self) -> str:
        return self.path(TENSORBOARD_DIR)

    def checkpoint_uri(self, step: int) -> str:
        return self.path(checkpoint_dir_name(step))

    def sample_grid_uri(self, step: int) -> str:
        return self.path(SAMPLES_DIR, f"step_{step:07d}.png")

    def metrics_part_uri(self, first_step: int) -> str:
        return self.path(metrics_part_name(first_step))

    # -- listing --------------------------------------------------------------------------------

    def _entries(self) -> List[pafs.FileInfo]:
        fs, path = storage.filesystem(self.root, self.storage_cfg)
        return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))

    def checkpoints(self) -> List[Tuple[int, str]]:
        """(step, URI) of every checkpoint folder of the run, oldest first (complete or not)."""
        found = []
        for info in self._entries():
            match = _CHECKPOINT_DIR.match(info.base_name)
            if match and info.type == pafs.FileType.Directory:
                found.append((int(match.group(1)), self.path(info.base_name)))
        return sorted(found)

    def metrics_parts(self) -> List[Tuple[int, str]]:
        """(first step, URI) of every metrics part, in step order."""
        found = []
        for info in self._entries():
            match = _METRICS_PART.match(info.base_name)
            if match and info.type == pafs.FileType.File:
                found.append((int(match.group(1)), self.path(info.base_name)))
        return sorted(found)

    # -- metrics ---------------------------------------------------------------------------------

    def read_metrics(self) -> List[Dict[str, Any]]:
        """Every log record of the run, in step order, as one stream over the parts."""
        return list(self.iter_metrics())

    def iter_metrics(self) -> Iterator[Dict[str, Any]]:
        for _, uri in self.metrics_parts():
            for line in storage.read_text(uri, self.storage_cfg).splitlines():
                if line.strip():
                    yield json.loads(line)

    def truncate_metrics(self, step: int) -> None:
        """Drop the records after ``step`` (a resume from the checkpoint at ``step``): parts that
        start later are deleted, a part that runs past it is rewritten up to it."""
        for first, uri in self.metrics_parts():
            if first > step:
                storage.delete(uri, self.storage_cfg)
                continue
            lines = [line for line in storage.read_text(uri, self.storage_cfg).splitlines() if line.strip()]
            kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
            if len(kept) != len(lines):
                storage.write_text(uri, "".join(line + "\n" for line in kept), self.storage_cfg)
