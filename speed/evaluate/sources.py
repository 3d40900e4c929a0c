"""Where evaluation images come from, split into independent work items for feature extraction.

Every source yields uint8 images [n, H, W, C] for an item ``{"source", "start", "end", "refs"}``
covering images [start, end) of that source; workers read their items themselves (row ranges of
an .npz, image files, Parquet files), so no image passes through the driver.
"""

from __future__ import annotations

import posixpath
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import numpy as np

from speed import storage
from speed.config.schema import StorageConfig
from speed.sample.npz import NpzArray, NpzFormatError


def _ranges(total: int, batch_size: int):
    return [(s, min(s + batch_size, total)) for s in range(0, total, batch_size)]


@dataclass
class NpzSource:
    """Images in an .npz array (ADM sample or reference batch), read by row range."""

    uri: str
    array: str = "arr_0"
    storage_cfg: Optional[StorageConfig] = None
    _reader: Optional[NpzArray] = field(default=None, repr=False, compare=False)

    def _array(self) -> NpzArray:
        if self._reader is None:
            self._reader = NpzArray(self.uri, self.array, self.storage_cfg)
            shape, dtype = self._reader.shape, self._reader.dtype
            if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3):
                raise NpzFormatError(
                    f"'{self.uri}': {self.array} is {dtype} {shape}; expected ADM's uint8 images [N, H, W, C] with C 1 or 3"
                )
        return self._reader

    def __len__(self) -> int:
        return len(self._array())

    @property
    def image_shape(self):
        return tuple(self._array().shape[1:])

    def items(self, name: str, batch_size: int) -> List[Dict[str, Any]]:
        return [{"source": name, "start": s, "end": e, "refs": ""} for s, e in _ranges(len(self), batch_size)]

    def read(self, item: Dict[str, Any]) -> np.ndarray:
        return self._array().read(int(item["start"]), int(item["end"]))

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_reader"] = None  # reopened where it is used
        return state


@dataclass
class ArraySource:
    """Images already in memory (small sets, e.g. the embedded digits)."""

    images: np.ndarray

    def __len__(self) -> int:
        return len(self.images)

    @property
    def image_shape(self):
        return tuple(self.images.shape[1:])

    def items(self, name: str, batch_size: int) -> List[Dict[str, Any]]:
        return [{"source": name, "start": s, "end": e, "refs": ""} for s, e in _ranges(len(self), batch_size)]

    def read(self, item: Dict[str, Any]) -> np.ndarray:
        return self.images[int(item["start"]) : int(item["end"])]


@dataclass
class ImageFolderSource:
    """Encoded image files (imagefolder layout), center-cropped ADM-style to the samples' size."""

    uri: str
    files: List[str]  # relative to uri, sorted
    resolution: int
    channels: int
    storage_cfg: Optional[StorageConfig] = None

    def __len__(self) -> int:
        return len(self.files)

    def items(self, name: str, batch_size: int) -> List[Dict[str, Any]]:
        return [
            {"source": name, "start": s, "end": e, "refs": "\n".join(self.files[s:e])}
            for s, e in _ranges(len(self), batch_size)
        ]

    def read(self, item: Dict[str, Any]) -> np.ndarray:
        from speed.data.transforms import load_and_crop

        fs, root = storage.filesystem(self.uri, self.storage_cfg)
        images = []
        for relative in str(item["refs"]).split("\n"):
            with fs.open_input_file(posixpath.join(root, relative)) as handle:
                images.append(load_and_crop(handle.read(), self.resolution, self.channels))
        return np.stack(images)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["files"] = []  # items carry their own file names; the full list stays on the driver
        return state


@dataclass
class ParquetSource:
    """Encoded images in a Parquet column, one work item per file."""

    uri: str
    files: List[str]
    rows: List[int]
    column: str
    resolution: int
    channels: int
    storage_cfg: Optional[StorageConfig] = None

    def __len__(self) -> int:
        return int(sum(self.rows))

    def items(self, name: str, batch_size: int) -> List[Dict[str, Any]]:
        items, start = [], 0
        for relative, count in zip(self.files, self.rows):
            items.append({"source": name, "start": start, "end": start + count, "refs": relative})
            start += count
        return items

    def read(self, item: Dict[str, Any]) -> np.ndarray:
        import pyarrow.parquet as pq

        from speed.data.catalog import image_bytes_column
        from speed.data.transforms import load_and_crop

        fs, root = storage.filesystem(self.uri, self.storage_cfg)
        with fs.open_input_file(posixpath.join(root, str(item["refs"]))) as handle:
            column = pq.read_table(handle, columns=[self.column]).column(0)
        blobs = image_bytes_column(column).to_pylist()
        return np.stack([load_and_crop(blob, self.resolution, self.channels) for blob in blobs])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["files"], state["rows"] = [], []
        return state
